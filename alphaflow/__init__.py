"""alphaflow: α-Flow (arXiv 2510.20771) one/few-step generators as a declarative pipeline."""

__version__ = "0.1.0"
