#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine: apt packages, then .venv/ with vmrecover in it.
# Re-running it does nothing that is already done.  Extra apt packages can be passed as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3-venv python3-dev   # Debian's Python 3.11: its dist-packages hold the libnbd (and later libguestfs) bindings
  qemu-utils                 # qemu-img, qemu-nbd: read and write qcow2/vmdk/vhd/vhdx images
  python3-libnbd             # libnbd's Python binding, talks to qemu-nbd
  e2fsprogs                  # mkfs.ext4 -d: the demo and tests build real filesystems without mounting
  qemu-system-x86            # qemu-system-x86_64 (TCG): boots the test guest from a disk image or backup
  linux-image-amd64          # the guest's kernel and initrd (/boot/vmlinuz-*, /boot/initrd.img-*)
  busybox-static             # the guest's whole userland: a static busybox as /bin/sh and the init script
  syslinux                   # syslinux --install onto the guest's FAT boot partition (via mtools, no mount)
  syslinux-common            # mbr.bin (MBR boot code) and ldlinux.c32 for the guest disk
  mtools                     # mcopy/mmd: write the FAT boot partition without mounting it
  dosfstools                 # mkfs.fat for the guest's boot partition
  fdisk                      # sfdisk: the guest disk's MBR partition table
  fuse3                      # fusermount3 and /etc/fuse.conf for the FUSE datastore
  python3-pyfuse3 python3-trio  # the FUSE binding (built against Debian's libfuse3) and its event loop
  fio                        # tests: randrw with verify=crc32c on recovery-session disks
  libnfs-utils               # nfs-ls, nfs-cat, nfs-cp: real NFSv3 clients for the NFS datastore's tests
  qemu-block-extra           # qemu's nfs:// block driver (libnfs): qemu-img and qemu boot from the NFS export
  libguestfs-tools python3-guestfs libguestfs-xfs  # single-file restore: guest filesystems (NTFS via ntfs-3g)
  golang-go golang-github-vmware-govmomi-dev  # tests: VMware's vCenter simulator, built by tests/vsphere/build.py
  systemd                    # tests: systemd-analyze verifies the service's unit (appliance/systemd/)
  vagrant vagrant-libvirt openssh-client  # tests: vagrant validate checks the top-level Vagrantfile (it makes a key)
  mmdebstrap grub-pc-bin grub-efi-amd64-bin ovmf genisoimage  # tests: build and boot the appliance (appliance/)
  chromium chromium-driver   # tests: Selenium drives the web console in a real (headless) browser
  "$@"
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv sees Debian's dist-packages (nbd, guestfs); packages installed in it take precedence.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
