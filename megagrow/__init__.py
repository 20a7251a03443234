"""megagrow: staged training of transformer language models (grow width and depth, keep training)."""

__version__ = "0.1.0"
