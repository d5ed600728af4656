"""NFSv3 server for vmrecover's datastore (see issue: NFSv3 datastore export).

This package must not import anything from ``vmrecover``; it serves any object that
implements its filesystem protocol.  Not implemented yet.
"""
