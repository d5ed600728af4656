"""Unit tests of the on-disk formats and pure logic (no subprocesses)."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrecover.errors import BadInput, CorruptChunk, IntegrityError, UsageError
from vmrecover.ingest.extents import bitmap_extents, chunks_touching, load_changed_extents, merged
from vmrecover.repo.blob import HEADER, ChunkCodec
from vmrecover.repo.catalog import Point, check_name
from vmrecover.repo.index import FixedIndex
from vmrecover.repo.keys import Keys
from vmrecover.repo.prune import Policy, select
from vmrecover.repo.reader import ordered_map
from vmrecover.repo.repository import parse_size

_KEYS = Keys(os.urandom(32), os.urandom(32))
CODECS = [
    ChunkCodec(keys=None),
    ChunkCodec(keys=_KEYS),
    ChunkCodec(keys=None, version=1),
    ChunkCodec(keys=_KEYS, version=1),
]


@pytest.mark.parametrize("codec", CODECS, ids=["plain", "aes-gcm", "v1-plain", "v1-aes-gcm"])
@given(data=st.binary(min_size=1, max_size=70_000))
@settings(max_examples=60, deadline=None)
def test_envelope_round_trip(codec: ChunkCodec, data: bytes) -> None:
    d = codec.digest(data)
    assert codec.decode(d, codec.encode(d, data)) == data


@pytest.mark.parametrize("codec", CODECS, ids=["plain", "aes-gcm", "v1-plain", "v1-aes-gcm"])
def test_envelope_never_returns_wrong_bytes_after_a_bit_flip(codec: ChunkCodec) -> None:
    data = (b"some text " * 5000) + os.urandom(1000)
    d = codec.digest(data)
    blob = codec.encode(d, data)
    for pos in [*range(16), *range(16, len(blob), max(1, len(blob) // 97))]:
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        # never wrong bytes: the read path raises, or (a flip in the crc field or reserved bytes,
        # which the digest check does not need) returns exactly the right data
        with contextlib.suppress(CorruptChunk):
            assert codec.decode(d, bytes(bad)) == data
        with pytest.raises(CorruptChunk):  # verify's decode catches every flip
            codec.decode(d, bytes(bad), check_crc=True)
    with pytest.raises(CorruptChunk, match="shorter"):
        codec.decode(d, blob[: HEADER.size - 1])
    with pytest.raises(CorruptChunk):
        codec.decode(d, blob[:-1])


def test_encrypted_digest_is_keyed_and_payload_hides_plaintext() -> None:
    plain, enc = CODECS[:2]
    data = b"secret payload " * 1000
    assert plain.digest(data) != enc.digest(data)
    assert b"secret payload" not in enc.encode(enc.digest(data), data)
    # a chunk stored under another name fails authentication
    other = enc.digest(b"x")
    with pytest.raises(CorruptChunk, match="authentication"):
        enc.decode(other, enc.encode(enc.digest(data), data))


def test_incompressible_chunks_are_stored_raw() -> None:
    v2, v1 = CODECS[0], CODECS[2]
    data = os.urandom(65536)
    blob = v1.encode(v1.digest(data), data)
    assert blob[5] & 1 == 0 and len(blob) == HEADER.size + len(data)
    ident = v2.identify(data + b"a" * 65536)  # a random piece stored raw, a compressible one as zstd
    layout = v2.layout(ident.digest, blob := v2.encode(ident, data + b"a" * 65536), len(blob))
    assert layout.zstd == (False, True) and layout.lengths[0] == 65536 and layout.lengths[1] < 100


def test_index_round_trip_and_damage(tmp_path: Path) -> None:
    idx = FixedIndex.empty(10 * 65536 + 5, 65536)
    assert idx.count == 11 and idx.extent(10) == (10 * 65536, 5)
    idx.set(3, b"\x11" * 32)
    idx.set(7, b"\x11" * 32)
    p = tmp_path / "d.fidx"
    idx.write(p)
    back = FixedIndex.read(p)
    assert back.table == idx.table and back.disk_size == idx.disk_size
    assert back.digests() == {b"\x11" * 32} and back.positions(b"\x11" * 32) == [3, 7]
    raw = bytearray(p.read_bytes())
    raw[100] ^= 1
    p.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="damaged"):
        FixedIndex.read(p)
    p.write_bytes(bytes(raw[:30]))
    with pytest.raises(IntegrityError, match="truncated"):
        FixedIndex.read(p)


def test_index_resize_keeps_prefix() -> None:
    idx = FixedIndex.empty(4 * 1024, 1024)
    idx.set(1, b"\x01" * 32)
    grown = idx.resized(6 * 1024)
    assert grown.count == 6 and grown.digest(1) == b"\x01" * 32 and grown.digest(5) == bytes(32)
    assert idx.resized(1024).count == 1


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 3000)), max_size=20))
def test_chunks_touching_matches_brute_force(extents: list[tuple[int, int]]) -> None:
    cs, count = 512, 20
    expected = sorted({b // cs for off, n in extents for b in range(off, off + n) if b // cs < count})
    assert chunks_touching(extents, cs, count) == expected


@given(st.lists(st.booleans(), max_size=70), st.integers(1, 80 * 16))
def test_bitmap_extents_are_the_set_bits(bits: list[bool], size: int) -> None:
    """A change bitmap (MSB first, as XenServer's list_changed_blocks) to byte ranges of the disk."""
    block = 16
    bitmap = bytearray(-(-len(bits) // 8))
    for i, b in enumerate(bits):
        if b:
            bitmap[i // 8] |= 0x80 >> (i % 8)
    want = {o for i, b in enumerate(bits) if b for o in range(i * block, min(size, (i + 1) * block))}
    got = bitmap_extents(bytes(bitmap), block, size)
    assert {o for off, n in got for o in range(off, off + n)} == want
    assert got == merged(got, size)


@given(st.lists(st.tuples(st.integers(-3000, 10_000), st.integers(-100, 3000)), max_size=20))
def test_merged_extents_cover_exactly_the_bytes_inside_the_disk(extents: list[tuple[int, int]]) -> None:
    """Changed areas from a hypervisor, untrusted: unsorted, overlapping, negative, past the end."""
    size = 8000
    out = merged(extents, size)
    want = {b for off, n in extents for b in range(max(0, off), min(size, off + n))}
    assert {b for off, n in out for b in range(off, off + n)} == want
    assert all(n > 0 for _, n in out)
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(out))  # sorted, apart


def test_changed_extents_file_validation(tmp_path: Path) -> None:
    f = tmp_path / "ce.json"
    f.write_text("[[0, 10], [100, 0]]")
    assert load_changed_extents(f, ["a"]) == {"a": [(0, 10)]}
    f.write_text('{"a": [[5, 5]]}')
    assert load_changed_extents(f, ["a", "b"]) == {"a": [(5, 5)], "b": []}
    for bad in ("[[0, -1]]", "[[0]]", '[["0", 1]]', "{", "[[true, 1]]", '{"zzz": []}'):
        f.write_text(bad)
        with pytest.raises(BadInput):
            load_changed_extents(f, ["a"])
    f.write_text("[[0, 1]]")
    with pytest.raises(BadInput, match="2 disks"):
        load_changed_extents(f, ["a", "b"])


def _pt(i: int, when: datetime) -> Point:
    return Point(f"p{i:03d}", "vm", when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), None, "full", {})


def test_prune_policy_like_borg() -> None:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    # two points a day for 70 days
    pts = [_pt(i, start + timedelta(hours=12 * i)) for i in range(140)]
    keep, drop = select(pts, Policy(last=3))
    assert [p.id for p in keep] == ["p139", "p138", "p137"] and len(drop) == 137
    keep, _ = select(pts, Policy(daily=7))
    assert len(keep) == 7 and len({p.created_dt.astimezone().date() for p in keep}) == 7
    keep, _ = select(pts, Policy(weekly=4, monthly=3))
    weeks = {p.created_dt.astimezone().isocalendar()[:2] for p in keep}
    assert len(keep) <= 7 and len(weeks) >= 4
    keep, _ = select(pts, Policy(last=1, daily=1))
    assert [p.id for p in keep] == ["p139"]  # both rules keep the newest point
    with pytest.raises(UsageError):
        select(pts, Policy())


@pytest.mark.parametrize("name", ["web-01", "db.example.com", "VM with spaces", "x" * 200])
def test_good_names(name: str) -> None:
    assert check_name("VM", name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-opt", "a/b", "a@b", "a\\b", "a\nb", "x" * 201])
def test_bad_names(name: str) -> None:
    with pytest.raises(BadInput):
        check_name("VM", name)


class _CountingPool(ThreadPoolExecutor):
    """A pool that records how many submitted calls were not yet consumed at each submit."""

    def __init__(self) -> None:
        super().__init__(2)
        self.submitted = 0
        self.most_ahead = 0
        self.consumed = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.submitted += 1
        self.most_ahead = max(self.most_ahead, self.submitted - self.consumed)
        return super().submit(fn, *args, **kwargs)


def test_ordered_map_keeps_order_and_a_bounded_number_of_calls_in_flight() -> None:
    """Results come in the items' order whatever order the calls end in, and no more than *window*
    calls are submitted ahead of the one the consumer works on (Executor.map would have submitted all
    200 at once)."""
    with _CountingPool() as pool:
        out = []
        for x in ordered_map(pool, lambda i: (time.sleep(0.001 * (i % 3)), i * i)[1], range(200), window=5):
            pool.consumed += 1
            out.append(x)
        assert out == [i * i for i in range(200)]
        assert pool.submitted == 200 and pool.most_ahead == 5 + 1, pool.most_ahead


def test_ordered_map_answers_skipped_items_without_a_call_and_without_waiting() -> None:
    """A skipped item (a disk's hole) yields None in its place and never reaches the pool, and a
    skipped item at the head comes out before the window fills: a restore of a sparse disk pays no
    thread hop per hole and does not hold holes back behind a window's worth of reads."""
    with _CountingPool() as pool:
        items = [0, 0, 1, 0, 2, 0, 0, 0, 3] + [0] * 50 + [4]
        it = ordered_map(pool, lambda x: x * 10, iter(items), window=4, skip=lambda x: x == 0)
        assert [next(it), next(it)] == [None, None] and pool.submitted == 0  # came out at once
        out = [None, None, *it]
        assert out == [None if x == 0 else x * 10 for x in items]
        assert pool.submitted == 4


def test_ordered_map_closed_early_cancels_the_rest_and_raises_what_a_call_raised() -> None:
    started: list[int] = []

    def slow(i: int) -> int:
        started.append(i)
        time.sleep(0.02)
        if i == 3:
            raise CorruptChunk(bytes(32), "damaged")
        return i

    with ThreadPoolExecutor(1) as pool:
        it = ordered_map(pool, slow, range(1000), window=4)
        assert next(it) == 0
        it.close()  # the rest of the window: cancelled, or waited for if it started
        time.sleep(0.1)
        assert started in ([0], [0, 1]), started  # 2 and 3 were queued: cancelled, never run
        with pytest.raises(CorruptChunk):
            list(ordered_map(pool, slow, range(10), window=4))


def test_parse_size() -> None:
    assert parse_size("1M") == 2**20 and parse_size("64K") == 65536 and parse_size("4MiB") == 4 * 2**20
    assert parse_size("1048576") == 2**20
    with pytest.raises(BadInput):
        parse_size("lots")


def test_empty_chunk_file_is_not_trusted_for_dedup(tmp_path: Path) -> None:
    """A chunk file left empty (power loss after a killed backup) is written again, not deduplicated onto."""
    from vmrecover.repo.chunkstore import ChunkStore

    ChunkStore.create_layout(tmp_path)
    store = ChunkStore(tmp_path, CODECS[0])
    data = b"payload" * 1000
    d = store.codec.digest(data)
    store.path(d).write_bytes(b"")
    assert not store.has(d)
    store.put(d, data)
    assert store.has(d) and store.get(d) == data


# ------------------------------------------------------------------------------------ qemu accelerator
def _fake_qemu(bin_dir: Path, monkeypatch: pytest.MonkeyPatch, script: str, *, kvm_device: bool) -> None:
    """A qemu-system-x86_64 running *script* first on PATH, /dev/kvm accessible or not, and no verdict
    remembered."""
    from vmrecover import qemu

    bin_dir.mkdir()
    tool = bin_dir / "qemu-system-x86_64"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(qemu, "_kvm_verdict", None)
    monkeypatch.setattr(qemu, "KVM_VERDICT_FILE", bin_dir / "verdict" / "kvm-verdict.json")
    monkeypatch.delenv("VMRECOVER_ACCEL", raising=False)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: kvm_device if p == "/dev/kvm" else real_access(p, m))


def test_kvm_is_used_only_where_a_qemu_with_kvm_really_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    from vmrecover import qemu

    # a qemu that aborts with KVM, as Debian 12's does on some hosts (MSR 0x10a): TCG, and the reason
    args = tmp_path / "args"
    aborts = f'echo "$@" > {args}\necho "kvm_buf_set_msrs: Assertion failed" >&2\nexit 134\n'
    _fake_qemu(tmp_path / "aborts", monkeypatch, aborts, kvm_device=True)
    assert qemu.accelerator() == "tcg"
    ok, why = qemu.kvm_works()
    assert not ok and "exit 134" in why and "kvm_buf_set_msrs" in why
    argv = args.read_text().split()
    assert "-accel kvm -cpu host" in args.read_text() and "-no-reboot" in argv
    kernel = qemu._probe_kernel()
    assert kernel is not None, "the test machine has a kernel in /boot (linux-image-amd64, make setup)"
    assert argv[argv.index("-kernel") + 1] == str(kernel) and "panic=-1" in argv  # a guest really runs
    args.unlink()
    assert qemu.accelerator() == "tcg" and not args.exists()  # asked once per process
    monkeypatch.setattr(qemu, "_kvm_verdict", None)
    assert qemu.kvm_works() == (ok, why) and not args.exists()  # and once per boot: another process
    assert (tmp_path / "aborts" / "verdict" / "kvm-verdict.json").exists()

    # one whose guest boots and ends: KVM; an explicit choice or VMRECOVER_ACCEL wins over the probe
    _fake_qemu(tmp_path / "starts", monkeypatch, "cat >/dev/null\nexit 0\n", kvm_device=True)
    assert qemu.accelerator() == "kvm" and qemu.accelerator("tcg") == "tcg"
    monkeypatch.setenv("VMRECOVER_ACCEL", "tcg")
    assert qemu.accelerator() == "tcg" and qemu.accelerator("kvm") == "kvm"
    with pytest.raises(BadInput, match="unknown qemu accelerator 'hax'"):
        qemu.accelerator("hax")

    # one that does not answer within the probe's time: TCG, and the reason names the time
    monkeypatch.setattr(qemu, "KVM_PROBE_TIMEOUT_S", 0.5)
    _fake_qemu(tmp_path / "hangs", monkeypatch, "exec sleep 30\n", kvm_device=True)
    t = time.monotonic()
    assert qemu.kvm_works() == (
        False,
        f"a qemu with KVM did not boot {kernel.name} to its panic within 0.5 s",
    )
    assert time.monotonic() - t < 10

    # without a kernel to boot, qemu starting with its vCPU and quitting is the answer
    _fake_qemu(
        tmp_path / "nokernel", monkeypatch, f'echo "$@" > {args}\ncat >/dev/null\nexit 0\n', kvm_device=True
    )
    monkeypatch.setattr(qemu, "_probe_kernel", lambda: None)
    assert qemu.kvm_works() == (True, "qemu runs with KVM")
    assert "-S" in args.read_text().split() and "-kernel" not in args.read_text().split()


def test_the_accelerator_chosen_here_really_runs_a_guest(monkeypatch: pytest.MonkeyPatch) -> None:
    """On this machine, for real: the accelerator the probe picks boots the host's kernel to its
    panic.  (A probe that only started qemu picked KVM on a kvm-pvm host, where every guest then
    hung: libguestfs, recover boot and the console's file browser with it.)"""
    from vmrecover import qemu

    monkeypatch.setattr(qemu, "_kvm_verdict", None)
    monkeypatch.delenv("VMRECOVER_ACCEL", raising=False)
    accel, kernel = qemu.accelerator(), qemu._probe_kernel()
    assert kernel is not None
    argv = ["qemu-system-x86_64", "-accel", accel, "-machine", "q35", "-m", "128", "-display", "none",
            "-nodefaults", "-no-user-config", "-no-reboot", "-kernel", str(kernel),
            "-append", "panic=-1"]  # fmt: skip
    if accel == "kvm":
        argv[3:3] = ["-cpu", "host"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=qemu.KVM_PROBE_TIMEOUT_S, check=False)
    assert proc.returncode == 0, (accel, qemu.kvm_works(), proc.stderr[-2000:])


def test_no_kvm_device_means_tcg_without_starting_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    from vmrecover import qemu

    ran = tmp_path / "ran"
    _fake_qemu(tmp_path / "bin", monkeypatch, f"touch {ran}\nexit 0\n", kvm_device=False)
    assert qemu.accelerator() == "tcg"
    assert "/dev/kvm" in qemu.kvm_works()[1] and not ran.exists()


# -------------------------------------------------------------------------- boot health check's judges
def test_the_screen_judge_wants_a_picture_unchanged_and_not_blank() -> None:
    from vmrecover.recovery.healthcheck import Screen, blank, png, read_ppm

    black, text = b"\0" * 3 * 4 * 2, b"\0" * 3 * 7 + b"\xaa\xaa\xaa"
    assert blank(black) and not blank(text)
    assert read_ppm(b"P6\n4 2\n255\n" + text) == (4, 2, text)
    with pytest.raises(BadInput, match="truncated"):
        read_ppm(b"P6\n4 2\n255\n" + text[:-1])
    with pytest.raises(BadInput, match="P6"):
        read_ppm(b"P3\n4 2\n255\n")
    s = Screen(stable_s=10)
    s.see(0, 4, 2, black)
    assert not s.stable(30)  # blank, however long
    s.see(31, 4, 2, text)
    assert not s.stable(40) and s.stable(41)
    s.see(42, 4, 2, black[:-3] + b"\1\1\1")  # changed: the clock starts again
    assert not s.stable(51) and s.stable(52)
    image = s.png()
    assert image is not None and image == png(4, 2, black[:-3] + b"\1\1\1") and image[12:16] == b"IHDR"


def test_why_a_boot_check_ended_is_read_from_qemus_events() -> None:
    from vmrecover.recovery.healthcheck import _why_ended

    def shutdown(reason: str) -> dict[str, object]:
        return {"event": "SHUTDOWN", "data": {"guest": True, "reason": reason}}

    assert _why_ended([{"event": "GUEST_PANICKED", "data": {}}, shutdown("guest-panic")], 1)[0] == "panic"
    assert _why_ended([shutdown("guest-reset")], 0)[0] == "reset"
    assert _why_ended([shutdown("guest-shutdown")], 0)[0] == "stopped"
    verdict, detail = _why_ended([], 137)
    assert verdict == "stopped" and "exit 137" in detail
