"""lookalike: look-alike photo search and deduplication with a convolutional autoencoder and FAISS."""

__version__ = "0.1.0"
