"""ONC RPC version 2 over TCP (RFC 5531): record marking, call headers, AUTH_SYS, replies, dispatch.

One :class:`RpcServer` serves any number of :class:`Program` objects on any number of listeners.

Who is served is decided once per connection, when it is accepted:

- **served**: the client's address is in the allow list and, unless ``secure_ports`` is off, its
  source port is privileged (< 1024: only root can bind one, as with nfsd's ``secure``).  At most
  ``max_connections`` such connections, and ``max_per_address`` from any one address, so that one
  client cannot lock the others out.  A connection over a cap is closed at once, unanswered (a client
  takes that as a transient failure and reconnects later).
- **refused**: the address is outside the allow list, or the source port is not privileged.  These
  connections never take a served slot: the first call is answered with AUTH_ERROR (AUTH_TOOWEAK)
  from its header alone, whatever it is (NULL too: a NULL answered and a connection closed after it
  would send clients into a reconnect loop), and the connection is closed.  The one exception:
  an allowed address on an unprivileged port may use the programs in ``open_programs`` (the
  portmapper: rpcbind answers anyone, and Linux asks it from an unprivileged port).  Such
  connections have their own, small pool (``max_refused`` of each kind, ``max_refused_per_address``
  from one address); the server reads the first 16 bytes of a refused call's record (its xid and
  program), at most ``REFUSED_RECORD`` bytes of an open program's, and closes the connection after
  ``refused_timeout`` seconds at most, so a flood of them costs little and starves no allowed client.

The rules that keep a hostile or broken served client from hurting anyone else:

- A record (all fragments of one call, with their headers) may not exceed ``max_record`` bytes: a
  larger length closes that connection before anything is allocated for it.
- A connection has at most ``max_pending`` calls read and not yet answered: it is read again only
  when one of its replies went out, so a client that does not read its replies stops being read
  (and one whose replies make no progress for ``send_timeout`` seconds is closed).  At most
  ``max_inflight`` calls are being worked on across all connections (the slot is not held while a
  reply waits for its client).  Memory is bounded by about
  ``max_connections * max_pending * max_record``.
- A connection that completes no call for ``idle_timeout`` seconds while none of its calls is being
  answered is closed: an idle client, and one that dribbles a record slowly, alike.
- A call whose header cannot be read, or a message that is not a CALL, closes the connection (there
  is no xid to answer).  Everything else gets the RFC's reply: RPC_MISMATCH, AUTH_ERROR, PROG_UNAVAIL,
  PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS or SYSTEM_ERR; the connection stays up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
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
PRIVILEGED_PORTS = 1024  # source ports below this one can only be bound by root (IPPORT_RESERVED)
# The longest record a refused connection may send (to a program open to it): a call header with the
# largest credential and verifier (24 + 2 * 408 bytes) and a portmapper call's arguments fit.
REFUSED_RECORD = 1024
DRAIN_SECONDS, DRAIN_BYTES = 1.0, 4 << 20  # after a refusal: let the reply reach the client
# Unsent bytes a served connection's socket may hold before it stops taking more.  trio sets 16 KiB
# (TCP_NOTSENT_LOWAT, for interactive streams): a 1 MiB READ reply then went out in ~64 sends, each a
# wait for the socket and a turn of the event loop, and that was the main cost of a warm READ.
SEND_LOWAT = 4 << 20

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Observe = Callable[[str, str, float], None]  # (program name, procedure name, seconds it took)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Buffer = bytes | bytearray | memoryview


IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one sendmsg takes (1024 on Linux)


async def send_record(stream: trio.SocketStream, buffers: Sequence[Buffer]) -> None:
    """Send one reply as a single-fragment record (RFC 5531 record marking), gathered: one ``sendmsg``
    each time the socket takes data, no joined copy of the buffers."""
    if stream.socket.did_shutdown_SHUT_WR:
        raise trio.ClosedResourceError("the connection's sending side is closed")
    views = [memoryview(b).cast("B") for b in buffers]
    views.insert(0, memoryview(struct.pack(">I", LAST_FRAGMENT | sum(len(v) for v in views))))
    first = 0
    while first < len(views):
        sent = await stream.socket.sendmsg(views[first : first + IOV_MAX])  # EMSGSIZE past IOV_MAX
        while first < len(views) and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


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
    """Reads record-marked messages (RFC 5531 section 11) from a trio stream.

    :meth:`read` may be cancelled at any point and called again: the bytes received so far and the
    position in the record are kept in the reader, not in the cancelled call."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_record: int, chunk: int = 65536) -> None:
        self.stream = stream
        self.max_record = max_record
        self.chunk = chunk  # the most one receive asks for beyond what is needed
        self._buf = bytearray()
        self._total = 0  # bytes of the current record so far, fragment headers included
        self._frag: tuple[int, bool] | None = None  # (length, last) of the fragment being read
        self._joined: bytearray | None = None  # the fragments so far, once there is more than one

    @property
    def in_record(self) -> bool:
        """Whether part of a record has arrived and not all of it."""
        return bool(self._total or self._buf)

    async def _exactly(self, n: int, *, at_boundary: bool = False) -> bytes | None:
        while len(self._buf) < n:
            data = await self.stream.receive_some(max(n - len(self._buf), self.chunk))
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
        while True:
            if self._frag is None:
                head = await self._exactly(4, at_boundary=self._total == 0)
                if head is None:
                    return None
                (word,) = struct.unpack(">I", head)
                n = word & ~LAST_FRAGMENT
                self._total += 4 + n
                if self._total > self.max_record:
                    raise ProtocolViolation(f"record of {self._total}+ bytes exceeds {self.max_record}")
                self._frag = (n, bool(word & LAST_FRAGMENT))
            n, last = self._frag
            frag = await self._exactly(n)
            assert frag is not None
            self._frag = None
            if last and self._joined is None:
                self._total = 0
                return frag
            self._joined = bytearray() if self._joined is None else self._joined
            self._joined += frag
            if last:
                record, self._joined, self._total = bytes(self._joined), None, 0
                return record

    async def peek(self, n: int) -> bytes | None:
        """The first *n* bytes of the next record (fewer if its first fragment is shorter), left in
        the reader for :meth:`read`; None at a clean end of stream.  Call it between records only."""
        assert self._frag is None and not self._total
        while True:
            if len(self._buf) >= 4:
                (word,) = struct.unpack_from(">I", self._buf)
                end = 4 + min(n, word & ~LAST_FRAGMENT)
                if len(self._buf) >= end:
                    return bytes(self._buf[4:end])
            data = await self.stream.receive_some(self.chunk)
            if not data:
                if not self._buf:
                    return None
                raise ProtocolViolation("connection closed inside a record")
            self._buf += data


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


class AllowList:
    """Who may talk to the export.  It is read on every new connection, so a running export can be
    told of more clients (:meth:`grow`, from any thread: the list is replaced, never changed in place):
    the appliance's service grows it with each hypervisor host a recovery is published to."""

    def __init__(self, items: Sequence[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(parse_networks(items))

    def __contains__(self, ip: Address) -> bool:
        return any(ip in net for net in self.networks)

    def __iter__(self) -> Iterator[Network]:
        return iter(self.networks)

    def strings(self) -> list[str]:
        return [str(n) for n in self.networks]

    def grow(self, items: Sequence[str]) -> list[str]:
        """Add the networks of *items* not yet covered; return those added."""
        new = [n for n in parse_networks(items) if not any(n.subnet_of(o) for o in self.networks
                                                               if o.version == n.version)]  # fmt: skip
        if new:
            self.networks = self.networks + tuple(new)
        return [str(n) for n in new]


def client_address(host: str) -> Address:
    """The client's address as the allow list and the per-address caps see it (an IPv4 client of an
    IPv6 socket is its IPv4 address; a scope id is dropped)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def call_header(record: bytes) -> tuple[int, int] | None:
    """(xid, program) of a CALL, from the first 16 bytes of its record; None if it is not one."""
    if len(record) < 16:
        return None
    xid, mtype, _rpcvers, prog = struct.unpack_from(">IIII", record)
    return (xid, prog) if mtype == CALL else None


class Notices:
    """Warnings about clients, at most one per key every *interval* seconds: a flood of refused
    connections must not become a flood of log lines.  The next line says how many were held back."""

    def __init__(self, interval: float = 10.0, max_keys: int = 4096) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._last: dict[object, float] = {}
        self._held: Counter[object] = Counter()

    def warn(self, key: object, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] += 1
            return
        if len(self._last) >= self.max_keys:  # forget the keys that could log again anyway
            for k in [k for k, t in self._last.items() if now - t >= self.interval]:
                del self._last[k]
                self._held.pop(k, None)
        held = self._held.pop(key, 0)
        self._last[key] = now
        if held:
            msg += f" ({held} more like this in the last {self.interval:.0f} s not logged)"
        log.warning(msg, *args)


SERVED, INSECURE, OUTSIDE = "served", "insecure", "outside"
KIND_NAMES = {SERVED: "connections", INSECURE: "connections from unprivileged ports",
              OUTSIDE: "connections from outside the allow list"}  # fmt: skip


class RpcServer:
    def __init__(
        self,
        programs: Sequence[Program],
        *,
        allow: AllowList,
        max_record: int,
        max_inflight: int = 64,
        max_connections: int = 64,
        max_per_address: int = 16,
        max_pending: int = 8,
        send_timeout: float = 120.0,
        idle_timeout: float = 360.0,
        secure_ports: bool = True,
        open_programs: Collection[int] = (),
        max_refused: int = 16,
        max_refused_per_address: int = 4,
        refused_timeout: float = 5.0,
        observe: Observe | None = None,
    ) -> None:
        self.programs = {p.number: p for p in programs}
        self.observe = observe  # told of each call answered: (program, procedure, seconds)
        self.allow = allow
        self.max_record = max_record
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self.idle_timeout = idle_timeout
        self.secure_ports = secure_ports
        self.open_programs = frozenset(open_programs)
        self.refused_timeout = refused_timeout
        # (all connections of the kind, connections from one address)
        self.caps = {
            SERVED: (max_connections, max_per_address),
            INSECURE: (max_refused, max_refused_per_address),
            OUTSIDE: (max_refused, max_refused_per_address),
        }
        self.open: Counter[str] = Counter()  # connections by kind
        self.open_from: Counter[tuple[str, Address]] = Counter()  # (kind, address)
        self.notices = Notices()
        self._slots = trio.Semaphore(max_inflight)

    @property
    def connections(self) -> int:
        """Served connections open now."""
        return self.open[SERVED]

    def kind(self, ip: Address, port: int) -> str:
        if ip not in self.allow:
            return OUTSIDE
        if self.secure_ports and port >= PRIVILEGED_PORTS:
            return INSECURE
        return SERVED

    async def dispatch(self, record: bytes, peer: str) -> list[Buffer]:
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
        program = self.programs.get(prog)
        if program is None:
            return [accepted(xid, PROG_UNAVAIL).buf]
        if vers != program.version:
            return [accepted(xid, PROG_MISMATCH, (program.version, program.version)).buf]
        handler = program.procs.get(proc)
        if handler is None:
            return [accepted(xid, PROC_UNAVAIL).buf]
        call = Call(xid, prog, vers, proc, cred, u, peer)
        began = time.perf_counter()
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
        if self.observe is not None:
            self.observe(program.name, handler.__name__, time.perf_counter() - began)
        head = accepted(xid, SUCCESS)
        if isinstance(result, Packer):
            head.buf += result.buf
            return [head.buf]
        packer, tail = result
        head.buf += packer.buf
        return [head.buf, *tail]

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until the client closes it, breaks the protocol or falls idle."""
        try:
            try:
                host, port = stream.socket.getpeername()[:2]
            except OSError:  # reset by the client before it was served: there is no one to answer
                return
            ip = client_address(host)
            kind = self.kind(ip, port)
            total, per_address = self.caps[kind]
            what = KIND_NAMES[kind]
            if self.open[kind] >= total:
                self.notices.warn(("cap", kind), "%d %s are open, the most there may be: closing a new one "
                                  "from %s", total, what, host)  # fmt: skip
                return
            if self.open_from[kind, ip] >= per_address:
                self.notices.warn(("cap", kind, ip), "%d %s from %s are open, the most from one address: "
                                  "closing a new one", per_address, what, host)  # fmt: skip
                return
            self.open[kind] += 1
            self.open_from[kind, ip] += 1
            try:
                if kind == SERVED:
                    await self._serve(stream, host)
                else:
                    with trio.move_on_after(self.refused_timeout):
                        await self._refuse(stream, host, port, kind)
            finally:
                self.open[kind] -= 1
                self.open_from[kind, ip] -= 1
                if not self.open_from[kind, ip]:
                    del self.open_from[kind, ip]
        finally:
            await stream.aclose()

    async def _refuse(self, stream: trio.SocketStream, host: str, port: int, kind: str) -> None:
        """A connection that may not use the export: its first call (but one to an open program from
        an allowed address) is answered AUTH_TOOWEAK from its header alone, and it is closed."""
        if kind == OUTSIDE:
            self.notices.warn(("refused", host), "client %s is not in the allow list: calls refused and the "
                              "connection closed", host)  # fmt: skip
        reader = RecordReader(stream, REFUSED_RECORD, chunk=REFUSED_RECORD)
        try:
            while True:
                header = await reader.peek(16)
                if header is None:
                    return
                call = call_header(header)
                if call is None:
                    return  # no CALL, no xid to answer
                xid, prog = call
                if kind == INSECURE and prog in self.open_programs:
                    record = await reader.read()  # longer than REFUSED_RECORD: ProtocolViolation
                    assert record is not None
                    buffers = await self.dispatch(record, host)
                    await send_record(stream, buffers)
                    continue
                if kind == INSECURE:
                    self.notices.warn(("insecure", host), "client %s called from port %d, not a privileged "
                                      "port (< %d): call refused and the connection closed (nfs serve "
                                      "--insecure-ports allows such ports)", host, port,
                                      PRIVILEGED_PORTS)  # fmt: skip
                reply = denied(xid, AUTH_ERROR, AUTH_TOOWEAK).buf
                await stream.send_all(struct.pack(">I", LAST_FRAGMENT | len(reply)) + reply)
                # Close after the reply, not over it: a close with unread bytes would reset the
                # connection, and the reset can overtake the reply.
                await stream.send_eof()
                drained = 0
                with trio.move_on_after(DRAIN_SECONDS):
                    while drained < DRAIN_BYTES and (data := await stream.receive_some(65536)):
                        drained += len(data)
                return
        except (ProtocolViolation, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    async def _serve(self, stream: trio.SocketStream, peer: str) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux has it; elsewhere trio's default stays
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, SEND_LOWAT)
        reader = RecordReader(stream, self.max_record)
        send_lock = trio.Lock()
        pending = trio.Semaphore(self.max_pending)  # calls of this connection read but not yet answered
        busy = 0  # calls of this connection being answered
        last = trio.current_time()  # when a call of this connection last arrived or was answered

        async def serve_one(record: bytes) -> None:
            nonlocal busy, last
            try:
                async with self._slots:  # the global slot covers the work, not the wait for the client
                    buffers = await self.dispatch(record, peer)
                async with send_lock:
                    with trio.move_on_after(self.send_timeout) as waited:
                        await send_record(stream, buffers)
                    if waited.cancelled_caught:
                        raise ProtocolViolation(f"the client read no reply for {self.send_timeout:.0f} s")
            except ProtocolViolation as exc:
                log.warning("closing connection from %s: %s", peer, exc)
                nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                nursery.cancel_scope.cancel()  # the client went away
            finally:
                busy -= 1
                last = trio.current_time()
                pending.release()

        async def next_record() -> bytes | None:
            nonlocal last
            while True:
                with trio.CancelScope(deadline=last + self.idle_timeout):
                    return await reader.read()
                if busy:  # not idle while one of its calls is being answered
                    last = trio.current_time()
                    continue
                if trio.current_time() < last + self.idle_timeout:  # a reply went out meanwhile
                    continue
                why = "a record not completed" if reader.in_record else "idle"
                log.info("closing connection from %s: %s for %g s", peer, why, self.idle_timeout)
                return None

        # Everything is caught inside the nursery, so no exception group (trio >= 0.25) can escape.
        async with trio.open_nursery() as nursery:
            while True:
                # Read the next record only once this connection has room for another call: a
                # client that does not read its replies stops being read, holding no global slot.
                await pending.acquire()
                try:
                    record = await next_record()
                except ProtocolViolation as exc:
                    log.warning("closing connection from %s: %s", peer, exc)
                    record = None
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    record = None  # the client went away
                if record is None:  # replies to the calls read so far still go out
                    pending.release()
                    break
                busy += 1
                last = trio.current_time()
                nursery.start_soon(serve_one, record)
