"""Vectors and metadata: the FAISS index, the SQLite table of images, and dedupe.

Nothing under ``lookalike.index`` imports TensorFlow.
"""
