# The two commands of the README: `make demo` (the main job) and `make test`.  Both run `make setup`
# first, which installs what is missing (apt packages, .venv/) and is a no-op when all is there.
.PHONY: setup demo test lint bench bench-fuse bench-nfs bench-files bench-vmware bench-xen bench-service bench-healthcheck bench-console appliance appliance-boot-test

setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo.sh

lint: setup
	.venv/bin/ruff check vmrecover nfs_export tests bench appliance

test: setup lint
	.venv/bin/python -m pytest -q

bench: setup
	@scripts/setup.sh borgbackup
	.venv/bin/python bench/backup_bench.py

bench-fuse: setup
	@scripts/setup.sh borgbackup python3-llfuse  # borg mount's FUSE binding, as measured
	.venv/bin/python bench/fuse_bench.py

bench-nfs: setup
	@scripts/setup.sh nfs-ganesha nfs-ganesha-vfs rpcbind  # the NFS server measured against
	.venv/bin/python bench/nfs_bench.py
	.venv/bin/python -m tests.nfs_fuzz

bench-files: setup
	.venv/bin/python bench/files_bench.py

bench-vmware: setup  # vcsim and its Go build come with setup (the tests use them too)
	.venv/bin/python bench/hypervisor_bench.py --platform vmware

bench-xen: setup  # the XAPI simulator of the tests, qemu-nbd from setup
	.venv/bin/python bench/hypervisor_bench.py --platform xen

bench-service: setup
	@scripts/setup.sh borgbackup  # borg, for the compression comparison
	.venv/bin/python bench/service_bench.py

bench-healthcheck: setup
	.venv/bin/python bench/healthcheck_bench.py

bench-console: setup  # chromium and its driver come with setup (the console's tests use them too)
	.venv/bin/python bench/console_bench.py

# The appliance image (appliance/README.md): dist/vmrecover-appliance-<version>.qcow2.  As root.  Its host
# tools (mmdebstrap, GRUB's images, OVMF, genisoimage...) come with setup: the tests build it too.
appliance: setup
	appliance/build.sh

appliance-boot-test: setup  # boots the built image under qemu (TCG) and checks it serves
	.venv/bin/python appliance/boot_test.py
	.venv/bin/python appliance/boot_test.py --seed   # configured by a cloud-init NoCloud seed, as by vagrant up
