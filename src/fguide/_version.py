"""The package version, importable without importing the package (and torch)."""

__version__ = "0.1.0"
