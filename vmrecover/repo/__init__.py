"""The chunk repository: chunk store, fixed indexes, catalog, locking, verify, prune and gc."""
