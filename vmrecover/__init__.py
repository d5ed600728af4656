"""vmrecover: restore and instant recovery from image-level VM backups."""

__version__ = "0.1.0"
