"""fguide: classifier-guided diffusion sampling with calibrated and regularised guidance."""

__version__ = "0.1.0"
