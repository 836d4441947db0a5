"""The convolutional autoencoder: building it, training it on a collection, embedding with it.

Importing this package imports TensorFlow; everything outside ``lookalike.encoder`` that needs it
imports it lazily, so ``lookalike --help`` and the index code stay fast.
"""
