"""vmrecover: restore and instant recovery from image-level VM backups."""

from importlib import metadata as _metadata

try:  # the version's one home is pyproject.toml; the installed metadata carries it
    __version__ = _metadata.version("vmrecover")
except _metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
