"""Baseline methods, run through the same data, runner and savers as IntraSlice.

* ``slicegpt``: SliceGPT (Ashkboos et al. 2024), re-implemented from the paper: PCA
  rotation of the residual stream at every block boundary, slicing, shortcut matrices.
* ``channel``: FLAP / Wanda-sp style structured pruning (whole heads and MLP channels by
  weight-norm x activation score, optional bias compensation), no PCA, no least squares.
"""
