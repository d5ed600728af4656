"""SOAP pieces the vSphere test proxy needs: read a request, build a response or a fault the way vcsim
(and ESXi) write them, splice a ``changeId`` into disk backings of a response without touching any
other byte, and a tiny SOAP client for the proxy's own calls to vcsim.

vcsim's encoder declares namespaces locally and under unusual prefixes (``xmlns:XMLSchema-instance=...``
then ``XMLSchema-instance:type="VirtualDisk"``), so everything here resolves namespaces properly
(expat or ElementTree with namespace processing) instead of matching prefixes.
"""

from __future__ import annotations

import http.client
import threading
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Callable
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
VIM = "urn:vim25"

ENVELOPE_OPEN = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/"'
    ' xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"'
    ' xmlns:xsd="http://www.w3.org/2001/XMLSchema"'
    ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
)
ENVELOPE_CLOSE = "</soapenv:Body></soapenv:Envelope>"

# Disk backings that carry a changeId when the VM has changed block tracking on.
CBT_BACKINGS = {
    "VirtualDiskFlatVer2BackingInfo",
    "VirtualDiskSeSparseBackingInfo",
    "VirtualDiskSparseVer2BackingInfo",
}
# The members that follow changeId in those types (WSDL sequence order): changeId goes before the first.
AFTER_CHANGE_ID = {
    "parent",
    "deltaDiskFormat",
    "digestEnabled",
    "deltaGrainSize",
    "deltaDiskFormatVariant",
    "sharing",
    "keyId",
    "grainSize",
    "spaceReserve",
}


def local(tag: str) -> str:
    """'{urn:vim25}fileName' -> 'fileName'."""
    return tag.rsplit("}", 1)[-1]


def child(elem: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in elem if local(c.tag) == name), None)


def text(elem: ET.Element, name: str, default: str = "") -> str:
    c = child(elem, name)
    return c.text or "" if c is not None else default


def xsi_type(elem: ET.Element) -> str:
    return (elem.get(f"{{{XSI}}}type") or "").rsplit(":", 1)[-1]


@dataclass
class Request:
    """A SOAP request: the method's name, ``_this`` and its argument elements (by local name)."""

    method: str
    this_type: str
    this: str
    args: dict[str, list[ET.Element]] = field(default_factory=dict)

    def arg(self, name: str) -> ET.Element | None:
        return (self.args.get(name) or [None])[0]

    def arg_text(self, name: str, default: str = "") -> str:
        a = self.arg(name)
        return a.text or "" if a is not None else default


def parse_request(body: bytes) -> Request | None:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    bodies = [e for e in root if local(e.tag) == "Body"]
    if not bodies or len(bodies[0]) == 0:
        return None
    call = bodies[0][0]
    req = Request(local(call.tag), "", "")
    for a in call:
        name = local(a.tag)
        if name == "_this":
            req.this_type, req.this = a.get("type", ""), a.text or ""
        else:
            req.args.setdefault(name, []).append(a)
    return req


@dataclass
class Mor:
    """A managed object reference as a method's return value."""

    type: str
    value: str


def response(method: str, returnval: str | Mor | None) -> bytes:
    """A method's response body; *returnval* is the inner XML of ``<returnval>``, a Mor, or None (void)."""
    if isinstance(returnval, Mor):
        inner = f'<returnval type="{returnval.type}">{escape(returnval.value)}</returnval>'
    else:
        inner = "" if returnval is None else f"<returnval>{returnval}</returnval>"
    return (
        f'{ENVELOPE_OPEN}<{method}Response xmlns="{VIM}">{inner}</{method}Response>{ENVELOPE_CLOSE}'.encode()
    )


def fault(fault_type: str, message: str, fields: str = "") -> bytes:
    """A SOAP fault as vcsim writes one (HTTP 500): *fields* is the fault's inner XML."""
    return (
        f"{ENVELOPE_OPEN}<soapenv:Fault><faultcode>ServerFaultCode</faultcode>"
        f"<faultstring>{escape(message)}</faultstring><detail>"
        f'<{fault_type}Fault xmlns="{VIM}" xsi:type="{fault_type}">{fields}</{fault_type}Fault>'
        f"</detail></soapenv:Fault>{ENVELOPE_CLOSE}"
    ).encode()


def fault_message(key: str, message: str) -> str:
    """A ``faultMessage`` (LocalizableMessage) member, as ESXi attaches to CBT faults."""
    return f"<faultMessage><key>{escape(key)}</key><message>{escape(message)}</message></faultMessage>"


def is_fault(body: bytes, fault_type: str) -> bool:
    """Whether *body* is a SOAP fault whose detail is of *fault_type*."""
    if b"Fault>" not in body:
        return False
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return False
    return any(xsi_type(e) == fault_type for e in root.iter() if local(e.tag).endswith("Fault"))


# --------------------------------------------------------------------------- changeId injection
@dataclass
class Backing:
    """A disk backing found in a response: where a changeId would go and what it names."""

    insert_at: int  # byte offset in the response
    file_name: str  # datastore path of the descriptor, e.g. "[LocalDS_0] vm/vm.vmdk"
    obj: tuple[str, str] | None  # the ObjectContent/ObjectUpdate it belongs to: (type, value)


class _BackingFinder:
    """expat handlers for :func:`find_backings`: tracks the open elements, the last ``obj`` seen (the
    ObjectContent or ObjectUpdate a property belongs to) and, inside a top-level backing, its fileName
    and the offset of its first member that must follow changeId."""

    def __init__(self, body: bytes) -> None:
        self.parser = xml.parsers.expat.ParserCreate(namespace_separator="}")
        self.parser.StartElementHandler = self.start
        self.parser.EndElementHandler = self.end
        self.parser.CharacterDataHandler = self.data
        self.body = body
        self.found: list[Backing] = []
        self.depth = 0
        self.text: list[str] = []
        self.obj: tuple[str, str] | None = None
        self.obj_type = ""
        self.backing_depth = -1  # depth of the open top-level backing, -1 outside one
        self.file = ""
        self.insert_at: int | None = None
        self.has_change_id = False

    def data(self, s: str) -> None:
        self.text.append(s)

    def start(self, name: str, attrs: dict[str, str]) -> None:
        lname = name.rsplit("}", 1)[-1]
        self.text = []
        if lname == "obj":
            self.obj_type = attrs.get("type", "")
        if self.backing_depth >= 0 and self.depth == self.backing_depth + 1:
            if lname == "changeId":
                self.has_change_id = True
            elif lname in AFTER_CHANGE_ID and self.insert_at is None:
                self.insert_at = self.parser.CurrentByteIndex
        is_backing = attrs.get(f"{XSI}}}type", "").rsplit(":", 1)[-1] in CBT_BACKINGS
        if is_backing and self.backing_depth < 0:  # (a backing inside one is its parent chain)
            self.backing_depth, self.file, self.insert_at, self.has_change_id = self.depth, "", None, False
        self.depth += 1

    def end(self, name: str) -> None:
        self.depth -= 1
        lname = name.rsplit("}", 1)[-1]
        if lname == "obj":
            self.obj = (self.obj_type, "".join(self.text).strip())
        elif self.backing_depth >= 0:
            if lname == "fileName" and self.depth == self.backing_depth + 1:
                self.file = "".join(self.text)
            elif self.depth == self.backing_depth:
                at = self.insert_at if self.insert_at is not None else self.parser.CurrentByteIndex
                if not self.has_change_id:
                    self.found.append(Backing(at, self.file, self.obj))
                self.backing_depth = -1
        self.text = []

    def run(self) -> list[Backing]:
        try:
            self.parser.Parse(self.body, True)
        except xml.parsers.expat.ExpatError:
            return []
        return self.found


def find_backings(body: bytes) -> list[Backing]:
    """Top-level CBT-capable disk backings (not their ``parent`` chain) lacking a changeId, with byte
    offsets into *body* (expat reports them exactly; the XML is never re-serialised)."""
    if b"BackingInfo" not in body:
        return []
    return _BackingFinder(body).run()


def insert_change_ids(body: bytes, ids: list[tuple[int, str]]) -> bytes:
    """Splice ``<changeId>ID</changeId>`` at each (offset, id); offsets are into the original body."""
    out, pos = [], 0
    for at, cid in sorted(ids):
        out += [body[pos:at], f"<changeId>{escape(cid)}</changeId>".encode()]
        pos = at
    out.append(body[pos:])
    return b"".join(out)


def element_spans(body: bytes, want: Callable[[str, dict[str, str], int], bool]) -> list[tuple[int, int]]:
    """Byte spans [start, end) of the elements for which want(local name, attrs, depth) is true."""
    parser = xml.parsers.expat.ParserCreate(namespace_separator="}")
    spans: list[tuple[int, int]] = []
    open_: list[tuple[int, int] | None] = []

    def start(name: str, attrs: dict[str, str]) -> None:
        lname = name.rsplit("}", 1)[-1]
        open_.append((parser.CurrentByteIndex, len(open_)) if want(lname, attrs, len(open_)) else None)

    def end(name: str) -> None:
        o = open_.pop()
        if o is not None:
            # CurrentByteIndex is the end tag's '<': the element ends after the matching '>'
            stop = body.index(b">", parser.CurrentByteIndex) + 1
            spans.append((o[0], stop))

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.Parse(body, True)
    return spans


# --------------------------------------------------------------------------- the proxy's own vcsim client
class VimError(Exception):
    def __init__(self, fault_type: str, message: str, body: bytes) -> None:
        super().__init__(f"{fault_type}: {message}")
        self.fault_type = fault_type
        self.body = body


class Vim:
    """The proxy's own logged-in session on vcsim (plain HTTP): what it needs to look up VMs, disks
    and datastores while answering a call itself.  Thread-safe (one connection per thread)."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self.host, self.port = host, port
        self.cookie = ""
        self._local = threading.local()
        self.call(
            "Login",
            "SessionManager",
            "SessionManager",
            f"<userName>{escape(user)}</userName><password>{escape(password)}</password>",
        )

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        return conn

    def close_thread_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def raw(
        self, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, list[tuple[str, str]]]:
        hdrs = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"urn:vim25/6.5"', **(headers or {})}
        if self.cookie and "Cookie" not in hdrs:
            hdrs["Cookie"] = self.cookie
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request("POST", "/sdk", body, hdrs)
                r = conn.getresponse()
                return r.status, r.read(), r.getheaders()
            except (http.client.HTTPException, OSError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def call(
        self, method: str, this_type: str, this: str, args: str = "", cookie: str | None = None
    ) -> ET.Element | None:
        """Call *method* on (this_type, this); return the ``returnval`` element (None if void)."""
        body = (
            f'{ENVELOPE_OPEN}<{method} xmlns="{VIM}"><_this type="{this_type}">{escape(this)}</_this>'
            f"{args}</{method}>{ENVELOPE_CLOSE}"
        ).encode()
        status, data, headers = self.raw(body, {"Cookie": cookie} if cookie is not None else None)
        if method == "Login":
            for k, v in headers:
                if k.lower() == "set-cookie":
                    self.cookie = v.split(";", 1)[0]
        root = ET.fromstring(data)
        if status != 200:
            detail = next((e for e in root.iter() if local(e.tag) == "detail"), None)
            ftype = xsi_type(detail[0]) if detail is not None and len(detail) else "Fault"
            raise VimError(
                ftype, "".join(e.text or "" for e in root.iter() if local(e.tag) == "faultstring"), data
            )
        return next((e for e in root.iter() if local(e.tag) == "returnval"), None)

    def props(self, obj_type: str, obj: str, *paths: str, cookie: str | None = None) -> dict[str, ET.Element]:
        """Properties of one object through the PropertyCollector (``val`` elements by path); a property
        that is unset is missing from the result (reading it any other way upsets vcsim).  *cookie*:
        in a client's session instead of ours (vcsim keeps some objects per session: NFC leases)."""
        path_xml = "".join(f"<pathSet>{p}</pathSet>" for p in paths)
        ret = self.call(
            "RetrievePropertiesEx",
            "PropertyCollector",
            "propertyCollector",
            f"<specSet><propSet><type>{obj_type}</type>{path_xml}</propSet>"
            f'<objectSet><obj type="{obj_type}">{escape(obj)}</obj></objectSet></specSet><options></options>',
            cookie=cookie,
        )
        out: dict[str, ET.Element] = {}
        if ret is None:
            return out
        for ps in ret.iter():
            if local(ps.tag) == "propSet":
                val = child(ps, "val")
                if val is not None:
                    out[text(ps, "name")] = val
        return out

    def wait_task(self, task: str) -> None:
        info = self.props("Task", task, "info.state", "info.error")
        state = info["info.state"].text if "info.state" in info else ""
        if state == "error":
            raise VimError("TaskError", ET.tostring(info["info.error"], encoding="unicode"), b"")
