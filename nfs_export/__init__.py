"""NFSv3 server for vmrecover's datastore, on trio: ONC RPC over TCP (record marking, XDR, AUTH_SYS),
MOUNT v3, NFS v3 and portmapper v2.

This package must not import anything from ``vmrecover``: it serves any object that implements the
filesystem protocol of :mod:`nfs_export.fs` (``vmrecover.vfs.Vfs`` does), and ``vmrecover nfs serve``
(vmrecover/cli/nfs_cmds.py) plugs the two together.  :func:`nfs_export.server.serve` with an
:class:`~nfs_export.server.ExportConfig` runs an export; who may talk to it (allow list, privileged
source ports, connection caps, idle timeout) is decided in :mod:`nfs_export.rpc`.
"""
