"""A vCenter for the tests: VMware's simulator (vcsim) behind an HTTPS/SOAP proxy of ours.

vcsim is built from tests/vcsim/main.go against Debian's govmomi sources (cached in build/vcsim/, see
build.py) and started once per test run; the proxy (proxy.py) forwards every request to it and answers
itself the calls vcsim lacks (changed block tracking, datastore removal, NFS datastores, guest file
transfer, relocation with files), from the real files.  Tests use the ``vsphere`` fixture
(tests/conftest.py), a :class:`VSphere`:

    def test_backup(vsphere, cli, tmp_path):
        vm = vsphere.make_vm("web1", [image_path], cbt=True)          # -> "vm-57"
        env = {"VMRECOVER_VSPHERE_PASSWORD": vsphere.password}         # never on a command line
        ... vmrecover hypervisor add vc1 {vsphere.vmware_url} --insecure ...
        vsphere.disk_file(vm, 0)                                       # the disk's flat file
        assert vsphere.answered("QueryChangedDiskAreas", vm=vm)
"""

from tests.vsphere.harness import VSphere, running

__all__ = ["VSphere", "running"]
