"""A XenServer / XCP-ng pool of two hosts for the tests: a XAPI simulator speaking XenAPI's wire protocol.

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
- ``url`` (https://127.0.0.1:PORT/: the master), ``host`` (its address), ``port``, ``member_url``
  (https://127.0.0.2:PORT/, the same port), ``member_address``, ``user`` ("root"), ``password`` (random
  per run: give it to the product through stdin or the environment, never a command line), ``ca_file``:
  the CA that signed both hosts' certificates, each naming its own address (verification fails without
  it, as against a XenServer whose certificate a client does not know; ``XenAPI.Session(url,
  ignore_ssl=True)`` skips it).
- ``session(verify=True, url=)``: a logged-in ``XenAPI.Session`` (to the master; ``url=member_url``
  fails with HOST_IS_SLAVE) that is a context manager (logout + close).
- The pool: two hosts, ``hosts`` (the master first), ``host_ref`` (the master, ``xcp-sim-host``,
  127.0.0.1) and ``member_ref`` (``xcp-sim-host2``, 127.0.0.2), each with its control domain (a VM with
  ``is_control_domain``) and its XML-RPC listener on the same port: a member refuses
  ``session.login_with_password`` with ``HOST_IS_SLAVE [127.0.0.1]`` and answers the other calls (as
  XAPI forwards them to the master).  VMs run on a host (``resident_on``, the host's ``resident_VMs``):
  ``make_vm(host=)`` (default the master), VM.start (its ``affinity`` host if enabled, else the master),
  VM.start_on, VM.pool_migrate (Async too: a running VM moves; VM_BAD_POWER_STATE, HOST_DISABLED after
  host.disable, VM_REQUIRES_SR where its NFS SR is not plugged), ``move_vm(vm, host)`` (HA restarting
  it on *host*: a new domain there, no API call), ``resident_on(vm)``.
- Inventory: pool (``pool``), the template "Other install media", SR "Local storage" (type ext,
  ``local_sr``; ``add_sr(name, "nfs")`` for a shared one: both are folders of the workdir, reachable from
  both hosts), networks "Pool-wide network associated with eth0" (xenbr0), "...eth1" (xenbr1, purpose
  ``["nbd"]``: what makes ``VDI.get_nbd_info`` answer, with the master's address) and "Host internal
  management network" (not on the host); ``sr(name)``, ``network(name)``, ``add_network(name, bridge,
  purpose)``.
- NFS SRs as XenServer attaches them (nfssr.py, the SM's NFSSR over a real NFS client): SR.introduce,
  PBD.create per host, PBD.plug mounting ``serverpath/<SR uuid>`` from the PBD's host's own address (so
  an NFS server must allow every host), SR.scan of its ``<uuid>.raw``/``.vhd`` files, VM.start opening
  the VDIs through the mount of the host the VM runs on, VDI.copy / VDI.pool_migrate reading them,
  PBD.unplug (VDI_IN_USE while a VM on that host uses the SR), SR.forget.  ``guest_write(vdi, offset,
  data)`` / ``guest_read(vdi, offset, length)``: a running guest's I/O (NFS WRITEs + COMMIT, READs through
  its host's mount; a local VDI's file otherwise).  ``boot_guests(True)`` (reset after each test):
  VM.start really boots a VM whose first disk is on an NFS SR in qemu from nfs:// URLs;
  ``serial(vm)`` (= ``guest_serial``) is its console text, ``guest_outcome(vm)`` what qemu did,
  ``wait_halted(vm, timeout)`` waits for the guest to power itself off.
- ``make_vm(name, disks=[path or size, ...], sr=, nics=[network names], power_state="Running", cbt=,
  memory=, vcpus=, other_config=, cd=, host=)`` -> VM ref; ``vm_disks(vm)`` (VDI refs, userdevice
  order), ``vdi_file(vdi)`` (a local VDI's bytes), ``record(cls, ref)`` (as the API gives it),
  ``exists(cls, ref)``, ``vm_ref(ref or uuid)``.
- ``calls(method, **match)`` / ``log``: what was answered, entries tests can count (from a test's
  start: the log spans the run): API calls by name with ``args``, ``ok``, ``result``/``error``,
  ``session``, ``task`` and ``at`` (the address of the host that answered); "GET /export_raw_vdi" and
  "PUT /import_raw_vdi" with ``vdi``, ``bytes`` and ``at``; "nbd-export", "nbd-connect", "nbd-drop",
  "nbd-refused"; "refused"; "sessions-expired"; "sm" (``op`` sr_attach / sr_detach with ``sr`` and
  ``host``, an attach with ``ok`` and, when it worked, ``source``: the address it mounted from; sr_scan;
  vdi_delete), "message" (one the SM created), "vdi-copy"; "guest-start", "guest-exit"; "ha-restart"
  (``vm``, ``host``, ``previous``); "sim-error" (a harness bug: the fixture fails the test).
- Faults (reset after each test, with every host enabled again): ``refuse[method] = n`` (the next n
  calls fail with OTHER_OPERATION_IN_PROGRESS) or ``= (n, ["CODE", ...])``; ``expire_sessions()`` (every
  session becomes SESSION_INVALID: XenAPI.Session logs in again by itself, an NBD export of an old session
  refuses new connections); ``nbd_drop_after(bytes, times=1)`` (the next NBD connections are cut after
  that many bytes from the server); ``nbd_slow(seconds)`` (each 256 KiB piece of NBD waits that long, so
  a test can catch a backup reading); ``disable_cbt_behind_back(vdi)`` (CBT off without an API call: the
  next list_changed_blocks against a later snapshot is SR_BACKEND_FAILURE_460, "unrelated").

Calls beyond the generic ``get_all``/``get_all_records``/``get_record``/``get_by_uuid``/
``get_by_name_label``/``get_<field>``/``set_<field>``/``add_to_<map>``/``remove_from_<map>``: see api.py
(``x_<Class>__<method>``).  Each simplification against XAPI is marked "SIMPLIFIED" in the sources.
"""

from tests.xapi.harness import XapiSim, running

__all__ = ["XapiSim", "running"]
