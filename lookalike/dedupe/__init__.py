"""Near-duplicate photos of a store: grouping, calibration, verification, keep rule, actions,
report. No TensorFlow at import: calibration reaches the model only through the embedder it is
given (or the store loads)."""
