"""``vmrecover serve``: one long-running process for the appliance (see core.py for its shared state)."""
