"""Portmapper version 2 (RFC 1833): tells clients which port serves NFS and MOUNT.

Only the export's own programs are listed; SET and UNSET from clients are refused, and CALLIT (an
amplifier on the open internet) is not offered."""

from __future__ import annotations

from .rpc import PROC_UNAVAIL, Call, Program, Result, RpcFailure
from .xdr import Packer

PROGRAM, VERSION = 100000, 2
PORT = 111
IPPROTO_TCP = 6


class Portmap:
    def __init__(self) -> None:
        self.mappings: list[tuple[int, int, int, int]] = []  # (program, version, protocol, port)

    def register(self, program: int, version: int, port: int) -> None:
        self.mappings.append((program, version, IPPROTO_TCP, port))

    def program(self) -> Program:
        procs = {0: self.null, 1: self.refuse, 2: self.refuse, 3: self.getport, 4: self.dump, 5: self.callit}
        return Program(PROGRAM, VERSION, "portmap2", procs)

    async def null(self, call: Call) -> Result:
        return Packer()

    async def refuse(self, call: Call) -> Result:
        for _ in range(4):
            call.args.u32()
        p = Packer()
        p.bool(False)
        return p

    async def getport(self, call: Call) -> Result:
        prog, vers, prot = call.args.u32(), call.args.u32(), call.args.u32()
        call.args.u32()
        p = Packer()
        p.u32(next((m[3] for m in self.mappings if m[:3] == (prog, vers, prot)), 0))
        return p

    async def dump(self, call: Call) -> Result:
        p = Packer()
        for m in self.mappings:
            p.bool(True)
            for v in m:
                p.u32(v)
        p.bool(False)
        return p

    async def callit(self, call: Call) -> Result:
        raise RpcFailure(PROC_UNAVAIL)
