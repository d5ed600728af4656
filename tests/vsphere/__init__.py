"""A vCenter for the tests: VMware's simulator (vcsim) behind an HTTPS/SOAP proxy of ours.

vcsim is built from tests/vcsim/main.go against Debian's govmomi sources (``make setup`` installs them;
the binary is cached in build/vcsim/, ~15 s to build once, see build.py) and started once per test run;
the proxy (proxy.py, its docstring lists what it answers itself) forwards every request to it and
answers from the real files the calls vcsim lacks.  Tests take the ``vsphere`` fixture
(tests/conftest.py), a :class:`VSphere`; its fault switches are reset after each test, while VMs and
datastores stay for the run (give them unique names)::

    def test_incremental(vsphere, cli, tmp_path):
        vm = vsphere.make_vm("web1", [image_path, 64 * MiB], cbt=True)   # -> "vm-57"
        env = {"SOME_PASSWORD_VARIABLE": vsphere.password}   # never on a command line (ps shows it)
        cli.run("hypervisor", "add", "vc1", vsphere.vmware_url, "--insecure", input=..., env=...)
        ...                                                    # backup vmware://vc1/web1
        with open(vsphere.disk_file(vm, 0), "r+b") as f:      # the disk's flat file: change it
            f.seek(5 * MiB); f.write(b"new")
        ...                                                    # backup again: incremental
        (q,) = [e for e in vsphere.answered("QueryChangedDiskAreas", vm=vm) if e["change_id"] != "*"]
        assert q["areas"] == [(5 * MiB, 64 * 1024)]

What a test has:
- ``vsphere.url`` (https://127.0.0.1:PORT/sdk), ``host``, ``port``, ``user``, ``password`` (random per
  run), ``vmware_url`` (vmware://user@127.0.0.1:PORT), ``ca_file``: the CA that signed the proxy's
  certificate (without it verification fails, as against a vCenter with its own CA; with it, it passes
  for 127.0.0.1, ::1 and localhost).
- Inventory: datacenter ``DC0``; hosts ``DC0_C0_H0``, ``DC0_C0_H1`` (cluster ``DC0_C0``) and standalone
  ``DC0_H0``; datastores ``LocalDS_0`` and ``LocalDS_1`` on every host (``datastore_dir(name)``);
  network ``VM Network``; no VMs until a test makes them.
- ``make_vm(name, disks, datastore=, host=, cbt=, power_on=, guest_os=, memory_mb=, cpus=)``, then
  ``disk_path(vm, i)`` ('[LocalDS_0] name/name.vmdk'), ``disk_descriptor``, ``disk_file`` (flat),
  ``obj(kind, moref)``, ``props(obj, *paths)``, ``wait(task)``, ``find(kind, name)``, ``si``,
  ``connect()``: pyvmomi through the proxy.
- ``answered(method, **match)`` / ``log``: what the proxy answered or completed itself, with the disk
  files and areas involved; ``proxy.folder_bytes``: body bytes of /folder GETs and PUTs per path.
- Faults: ``proxy.refuse[method] = n`` (the next n calls of a SOAP method fail with InvalidState),
  ``proxy.drop_folder_gets(after_bytes, times=1)``, ``proxy.misrange_folder_gets(times=1)``
  (a whole 206 of another range, its Content-Range saying so), ``proxy.delays[method or "/folder" or
  "*"] = seconds``, ``proxy.tracker.reject_all = True`` (every changeId refused: FileFault),
  ``proxy.cbt_piece`` (bytes one QueryChangedDiskAreas answer covers, 16 MiB).
- Guest operations: ``set_guest_credentials(vm, user, password)`` (no credentials: every login is
  refused), ``guest_root(vm)`` is the guest's "/" ('C:\\x' is ``guest_root(vm) / "C:/x"``); the VM
  must be powered on.

**An NFS datastore from the appliance** (instant recovery): ESXi mounts ``nfs://HOST/vmrecover`` from
the appliance's ``nfs serve``; vcsim can only use a local folder.  A test therefore also mounts the same
repository with FUSE and tells the harness which folder the export serves::

    def test_recover_on_esxi(vsphere, cli, mounted, nfs_server):   # conftest fixtures
        server = nfs_server()   # or the product's own nfs serve (then with --portmapper on 111)
        vsphere.add_nfs_export(mounted.path, nfs_port=server.port, mount_port=server.mount_port)

``CreateNasDatastore(remoteHost, remotePath, localPath=NAME)`` then checks the export for real with
``nfs-ls`` (as root, so from a privileged port; the ports registered, else the portmapper on 111; a
failure is a PlatformConfigFault as ESXi's mount error) and makes datastore NAME a symlink to
``mounted.path / <remotePath below /vmrecover>``: vcsim reads and writes the recovery session's files
through the FUSE mount, so what the product writes over /folder or NFS and what vcsim creates
(``<name>.nvram``, ``vmware.log``) are in the session.  The same export under the same name from a
second host is the same datastore (mounted on both), another clash is DuplicateName; RemoveDatastore
unmounts from its host (ResourceInUse while VMs are registered there) and the datastore disappears
with its last mount.
"""

from tests.vsphere.harness import VSphere, running

__all__ = ["VSphere", "running"]
