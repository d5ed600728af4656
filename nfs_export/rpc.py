"""ONC RPC version 2 over TCP (RFC 5531): record marking, call headers, AUTH_SYS, replies, dispatch.

One :class:`RpcServer` serves any number of :class:`Program` objects on any number of listeners.  The
rules that keep a hostile or broken client from hurting anyone else:

- A record (all fragments of one call, with their headers) may not exceed ``max_record`` bytes: a
  larger length closes that connection before anything is allocated for it.
- A connection has at most ``max_pending`` calls read and not yet answered: it is read again only
  when one of its replies went out, so a client that does not read its replies stops being read
  (and one whose replies make no progress for ``send_timeout`` seconds is closed).  At most
  ``max_inflight`` calls are being worked on across all connections (the slot is not held while a
  reply waits for its client).  Memory is bounded by about
  ``max_connections * max_pending * max_record``, and connections are capped by ``max_connections``.
- A call whose header cannot be read, or a message that is not a CALL, closes the connection (there
  is no xid to answer).  Everything else gets the RFC's reply: RPC_MISMATCH, AUTH_ERROR, PROG_UNAVAIL,
  PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS or SYSTEM_ERR; the connection stays up.
- Clients outside the allow list get AUTH_ERROR (AUTH_TOOWEAK) for every call but NULL.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from .xdr import Packer, Unpacker, XdrError

log = logging.getLogger("nfs_export.rpc")

RPC_VERSION = 2
CALL, REPLY = 0, 1
MSG_ACCEPTED, MSG_DENIED = 0, 1
SUCCESS, PROG_UNAVAIL, PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS, SYSTEM_ERR = range(6)
RPC_MISMATCH, AUTH_ERROR = 0, 1
AUTH_OK, AUTH_BADCRED, AUTH_REJECTEDCRED, AUTH_BADVERF, AUTH_REJECTEDVERF, AUTH_TOOWEAK = range(6)
AUTH_NONE, AUTH_SYS = 0, 1
MAX_AUTH_BYTES = 400
LAST_FRAGMENT = 0x80000000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Buffer = bytes | bytearray | memoryview
# A procedure's result: its XDR, optionally followed by more buffers sent as they are (READ's data).
Result = Packer | tuple[Packer, Sequence[Buffer]]


@dataclass(frozen=True, slots=True)
class Credential:
    flavor: int
    uid: int = 65534
    gid: int = 65534
    gids: tuple[int, ...] = ()
    machine: str = ""


@dataclass(slots=True)
class Call:
    xid: int
    prog: int
    vers: int
    proc: int
    cred: Credential
    args: Unpacker
    peer: str


Handler = Callable[[Call], Awaitable[Result]]


class RpcFailure(Exception):
    """Raised by a procedure to send an accepted reply with a non-SUCCESS status."""

    def __init__(self, accept_stat: int) -> None:
        super().__init__(accept_stat)
        self.accept_stat = accept_stat


@dataclass
class Program:
    number: int
    version: int
    name: str
    procs: dict[int, Handler] = field(default_factory=dict)


class ProtocolViolation(Exception):
    """The byte stream cannot be an RPC conversation any more: the connection is closed."""


class RecordReader:
    """Reads record-marked messages (RFC 5531 section 11) from a trio stream."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_record: int) -> None:
        self.stream = stream
        self.max_record = max_record
        self._buf = bytearray()

    async def _exactly(self, n: int, *, at_boundary: bool = False) -> bytes | None:
        while len(self._buf) < n:
            data = await self.stream.receive_some(max(n - len(self._buf), 65536))
            if not data:
                if at_boundary and not self._buf:
                    return None
                raise ProtocolViolation(f"connection closed {n - len(self._buf)} bytes into a record")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read(self) -> bytes | None:
        """The next whole record, or None at a clean end of stream.

        The fragment headers count towards ``max_record`` too: a stream of empty (or one-byte)
        fragments is a record that grows with every header, not an endless one, and the fragments
        are joined as they come rather than kept as a list of tiny objects."""
        joined: bytearray | None = None  # the fragments so far, once there is more than one
        total = 0
        while True:
            head = await self._exactly(4, at_boundary=total == 0)
            if head is None:
                return None
            (word,) = struct.unpack(">I", head)
            n = word & ~LAST_FRAGMENT
            total += 4 + n
            if total > self.max_record:
                raise ProtocolViolation(f"record of at least {total} bytes exceeds {self.max_record}")
            frag = await self._exactly(n)
            assert frag is not None
            if word & LAST_FRAGMENT and joined is None:
                return frag
            joined = bytearray() if joined is None else joined
            joined += frag
            if word & LAST_FRAGMENT:
                return bytes(joined)


def _reply_head(xid: int) -> Packer:
    p = Packer()
    p.u32(xid)
    p.u32(REPLY)
    return p


def accepted(xid: int, stat: int, low_high: tuple[int, int] | None = None) -> Packer:
    p = _reply_head(xid)
    p.u32(MSG_ACCEPTED)
    p.u32(AUTH_NONE)  # verifier
    p.u32(0)
    p.u32(stat)
    if low_high is not None:
        p.u32(low_high[0])
        p.u32(low_high[1])
    return p


def denied(xid: int, reject: int, detail: int | tuple[int, int]) -> Packer:
    p = _reply_head(xid)
    p.u32(MSG_DENIED)
    p.u32(reject)
    if isinstance(detail, tuple):
        p.u32(detail[0])
        p.u32(detail[1])
    else:
        p.u32(detail)
    return p


def parse_credential(flavor: int, body: bytes) -> Credential | None:
    """AUTH_NONE or AUTH_SYS (RFC 5531 appendix A); None for anything malformed or unknown."""
    if flavor == AUTH_NONE:
        return Credential(AUTH_NONE)
    if flavor != AUTH_SYS:
        return None
    u = Unpacker(body)
    try:
        u.u32()  # stamp
        machine = u.string(255)
        uid, gid = u.u32(), u.u32()
        n = u.u32()
        if n > 16:
            return None
        gids = tuple(u.u32() for _ in range(n))
    except XdrError:
        return None
    return Credential(AUTH_SYS, uid, gid, gids, machine)


def parse_networks(items: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(i, strict=False) for i in items]


def address_allowed(host: str, allow: Sequence[Network]) -> bool:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allow)


class RpcServer:
    def __init__(
        self,
        programs: Sequence[Program],
        *,
        allow: Sequence[Network],
        max_record: int,
        max_inflight: int = 64,
        max_connections: int = 64,
        max_pending: int = 8,
        send_timeout: float = 120.0,
    ) -> None:
        self.programs = {p.number: p for p in programs}
        self.allow = list(allow)
        self.max_record = max_record
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self._slots = trio.Semaphore(max_inflight)
        self.connections = 0

    async def dispatch(self, record: bytes, peer: str, allowed: bool) -> list[Buffer]:
        """The reply to one record (a list of buffers), or raise ProtocolViolation."""
        u = Unpacker(record)
        try:
            xid, mtype = u.u32(), u.u32()
        except XdrError as exc:
            raise ProtocolViolation(f"record too short for an RPC header: {exc}") from None
        if mtype != CALL:
            raise ProtocolViolation(f"message type {mtype} where a CALL was expected")
        try:
            rpcvers, prog, vers, proc = u.u32(), u.u32(), u.u32(), u.u32()
            flavor, body = u.u32(), u.opaque(MAX_AUTH_BYTES)
            u.u32()  # verifier flavor: AUTH_NONE or AUTH_SYS send an empty one; nothing to check
            u.opaque(MAX_AUTH_BYTES)
        except XdrError:
            return [denied(xid, AUTH_ERROR, AUTH_BADCRED).buf]
        if rpcvers != RPC_VERSION:
            return [denied(xid, RPC_MISMATCH, (RPC_VERSION, RPC_VERSION)).buf]
        cred = parse_credential(flavor, body)
        if cred is None:
            return [denied(xid, AUTH_ERROR, AUTH_BADCRED).buf]
        if not allowed and proc != 0:
            return [denied(xid, AUTH_ERROR, AUTH_TOOWEAK).buf]
        program = self.programs.get(prog)
        if program is None:
            return [accepted(xid, PROG_UNAVAIL).buf]
        if vers != program.version:
            return [accepted(xid, PROG_MISMATCH, (program.version, program.version)).buf]
        handler = program.procs.get(proc)
        if handler is None:
            return [accepted(xid, PROC_UNAVAIL).buf]
        call = Call(xid, prog, vers, proc, cred, u, peer)
        try:
            result = await handler(call)
        except (XdrError, UnicodeError) as exc:
            log.info("garbage arguments", extra={"peer": peer, "program": program.name, "proc": proc,
                                                 "error": str(exc)})  # fmt: skip
            return [accepted(xid, GARBAGE_ARGS).buf]
        except RpcFailure as exc:
            return [accepted(xid, exc.accept_stat).buf]
        except Exception:
            log.exception("%s procedure %d failed", program.name, proc, extra={"peer": peer})
            return [accepted(xid, SYSTEM_ERR).buf]
        head = accepted(xid, SUCCESS)
        if isinstance(result, Packer):
            head.buf += result.buf
            return [head.buf]
        packer, tail = result
        head.buf += packer.buf
        return [head.buf, *tail]

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until the client closes it or breaks the protocol."""
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:  # reset by the client before it was served: there is no one to answer
            await stream.aclose()
            return
        if self.connections >= self.max_connections:
            log.warning("too many connections; refusing %s", peer)
            await stream.aclose()
            return
        allowed = address_allowed(peer, self.allow)
        if not allowed:
            log.warning("client %s is not in the allow list: calls refused", peer)
        self.connections += 1
        reader = RecordReader(stream, self.max_record)
        send_lock = trio.Lock()
        pending = trio.Semaphore(self.max_pending)  # calls of this connection read but not yet answered

        async def serve_one(record: bytes) -> None:
            try:
                async with self._slots:  # the global slot covers the work, not the wait for the client
                    buffers = await self.dispatch(record, peer, allowed)
                size = sum(len(b) for b in buffers)
                mark = struct.pack(">I", LAST_FRAGMENT | size)
                async with send_lock:
                    with trio.move_on_after(self.send_timeout) as waited:
                        if size <= 65536:
                            await stream.send_all(b"".join([mark, *buffers]))
                        else:
                            await stream.send_all(mark + buffers[0])
                            for b in buffers[1:]:
                                await stream.send_all(b)
                    if waited.cancelled_caught:
                        raise ProtocolViolation(f"the client read no reply for {self.send_timeout:.0f} s")
            except ProtocolViolation as exc:
                log.warning("closing connection from %s: %s", peer, exc)
                nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                nursery.cancel_scope.cancel()  # the client went away
            finally:
                pending.release()

        # Everything is caught inside the nursery, so no exception group (trio >= 0.25) can escape.
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    # Read the next record only once this connection has room for another call: a
                    # client that does not read its replies stops being read, holding no global slot.
                    await pending.acquire()
                    try:
                        record = await reader.read()
                    except ProtocolViolation as exc:
                        log.warning("closing connection from %s: %s", peer, exc)
                        record = None
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        record = None  # the client went away
                    if record is None:
                        pending.release()
                        break
                    nursery.start_soon(serve_one, record)
        finally:
            self.connections -= 1
            await stream.aclose()
