"""The library version (one place; ``bnn_tol.__version__`` and every file we write read it)."""

__version__ = "0.1.0"
