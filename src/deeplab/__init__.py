"""DeepLabv3+ in PyTorch."""

__version__ = "0.1.0"
