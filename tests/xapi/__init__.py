"""A XenServer / XCP-ng pool for the tests: a XAPI simulator speaking XenAPI's real wire protocol.

XML-RPC over HTTPS at ``/`` (as xapi on port 443) with XAPI's answers (``{"Status": "Success", "Value":
...}`` / ``{"Status": "Failure", "ErrorDescription": [CODE, ...]}``, int64 values as strings, refs
``OpaqueRef:<uuid4>``), the ``/export_raw_vdi`` and ``/import_raw_vdi`` HTTP handlers, and for
``VDI.get_nbd_info`` a real TLS NBD server (qemu-nbd) per export; so the product and the tests use the
unmodified ``XenAPI`` client from PyPI and libnbd.  VDIs are sparse raw files; changed block tracking
comes from the files' contents (per-64 KiB block hash maps taken at each snapshot, tests/vsphere/cbt.py),
so "changed blocks" are exactly what a test wrote.  Tests take the ``xapi`` fixture (tests/conftest.py),
an :class:`XapiSim` started once per run; its fault switches are reset after each test, the VMs stay
(give them unique names)::

    def test_incremental(xapi, tmp_path):
        vm = xapi.make_vm("web1", [image_path, 64 * MiB], cbt=True)    # -> "OpaqueRef:…"
        with xapi.session() as s:                                      # XenAPI.Session, logged in
            snap1 = s.xenapi.VM.snapshot(vm, "backup-1")
            ...
        (vdi,) = xapi.vm_disks(vm)[:1]
        with open(xapi.vdi_file(vdi), "r+b") as f:                     # the VDI's bytes: change them
            f.seek(5 * MiB); f.write(b"new")
        ...                                                            # snapshot again, then
        bitmap = s.xenapi.VDI.list_changed_blocks(snap1_vdi, snap2_vdi)   # base64, bit i = 64 KiB block i
        assert xapi.calls("VDI.list_changed_blocks", ok=True)

What a test has:
- ``url`` (https://127.0.0.1:PORT/), ``host``, ``port``, ``user`` ("root"), ``password`` (random per
  run: give it to the product through stdin or the environment, never a command line), ``ca_file``:
  the CA that signed the host's certificate (verification fails without it, as against a XenServer
  whose certificate a client does not know; ``XenAPI.Session(url, ignore_ssl=True)`` skips it).
- ``session(verify=True)``: a logged-in ``XenAPI.Session`` that is a context manager (logout + close).
- Inventory: pool (``pool``), one host ``xcp-sim-host`` (``host_ref``) with its control domain (a VM with
  ``is_control_domain``), the template "Other install media", SR "Local storage" (type ext, ``local_sr``;
  ``add_sr(name, "nfs")`` for a shared one), networks "Pool-wide network associated with eth0" (xenbr0),
  "...eth1" (xenbr1, purpose ``["nbd"]``: what makes ``VDI.get_nbd_info`` answer) and "Host internal
  management network" (not on the host); ``sr(name)``, ``network(name)``, ``add_network(name, bridge,
  purpose)``.
- ``make_vm(name, disks=[path or size, ...], sr=, nics=[network names], power_state="Running", cbt=,
  memory=, vcpus=, other_config=, cd=)`` -> VM ref; ``vm_disks(vm)`` (VDI refs, userdevice order),
  ``vdi_file(vdi)`` (the VDI's bytes), ``record(cls, ref)`` (as the API gives it), ``exists(cls, ref)``.
- ``calls(method, **match)`` / ``log``: what was answered (API calls by name with ``args``, ``ok``,
  ``result``/``error``, ``session``, ``task``; "GET /export_raw_vdi" and "PUT /import_raw_vdi" with
  ``vdi`` and ``bytes``; "nbd-export", "nbd-connect", "nbd-drop", "nbd-refused"; "refused").
- Faults (reset after each test): ``refuse[method] = n`` (the next n calls fail with
  OTHER_OPERATION_IN_PROGRESS) or ``= (n, ["CODE", ...])``; ``expire_sessions()`` (every session becomes
  SESSION_INVALID: XenAPI.Session logs in again by itself, an NBD export of an old session refuses new
  connections); ``nbd_drop_after(bytes, times=1)`` (the next NBD connections are cut after that many
  bytes from the server); ``nbd_slow(seconds)`` (each 256 KiB piece of NBD waits that long, so a
  test can catch a backup reading); ``disable_cbt_behind_back(vdi)`` (CBT off without an API call: the next
  list_changed_blocks against a later snapshot is SR_BACKEND_FAILURE_460, "unrelated").

Calls beyond the generic ``get_all``/``get_all_records``/``get_record``/``get_by_uuid``/
``get_by_name_label``/``get_<field>``/``set_<field>``/``add_to_<map>``/``remove_from_<map>``: see api.py
(``x_<Class>__<method>``).  Each simplification against XAPI is marked "SIMPLIFIED" in the sources.
"""

from tests.xapi.harness import XapiSim, running

__all__ = ["XapiSim", "running"]
