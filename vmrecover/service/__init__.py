"""``vmrecover serve``: one long-running process for the appliance (see core.py for its shared state)."""

from pathlib import Path

# Here, not in config.py, so that the CLI can name it without importing pydantic (~0.14 s at startup).
DEFAULT_PATH = Path("/etc/vmrecover/vmrecover.toml")
