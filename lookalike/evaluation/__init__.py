"""`lookalike eval`: retrieval and near-duplicate quality of a store against baselines.

`metrics` holds the pure-numpy metric functions, `baselines` the raw-pixel and pHash rankers,
`run` the drivers and `cli` the typer sub-app. Nothing here imports TensorFlow at import time.
"""
