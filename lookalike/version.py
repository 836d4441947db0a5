"""The version of lookalike (one place; the package and the store read it from here)."""

__version__ = "0.1.0"
