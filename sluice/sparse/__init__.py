"""Activation-sparse decoding: CETT-calibrated thresholds, low-rank predictors and statistical
top-k decide which MLP neurons a decode token computes; a gathered kernel and a per-layer weight
cache compute only those (see docs/design.md, "Sparse decoding")."""
