"""Scale-out: embed and index a collection on a Ray cluster (`lookalike index --ray`).

Ray is an optional extra (``pip install "lookalike[ray]"``); nothing here imports it until a
Ray run starts, and the rest of lookalike never imports this package without ``--ray``.
"""
