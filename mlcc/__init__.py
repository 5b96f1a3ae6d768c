"""mlcc: an ahead-of-time compiler for large language models."""

__version__ = "0.1.0"
