"""Choosing what to remove: the layer-by-layer engine, layer importance (SLEB and the other rules), recipes from an
analysis, the search for a speed target, and the early-exit (AdaInfer) classifier."""
