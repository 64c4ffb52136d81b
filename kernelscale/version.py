"""The version of kernelscale."""

__version__ = "0.1.0"
