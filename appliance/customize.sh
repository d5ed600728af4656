#!/usr/bin/env bash
# mmdebstrap's customize hook of appliance/build.sh: turns the bootstrapped Debian in ROOT into the
# appliance.  Runs on the host with ROOT's /dev, /proc and /sys mounted by mmdebstrap (root mode), so
# `chroot ROOT ...` works.   customize.sh ROOT PIPDIR ROOT_UUID
#   PIPDIR: the vmrecover wheel, constraints.txt, the first-boot files and README.md (build.sh step 1)
set -euo pipefail
ROOT=$1 PIPDIR=$2 ROOT_UUID=$3
HERE=$(cd "$(dirname "$0")" && pwd)
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-}" LC_ALL=C.UTF-8 "$@"; }

echo "customize: vmrecover in /opt/vmrecover"
rm -rf "$ROOT/opt/vmrecover" "$ROOT/tmp/vmrecover-pip"
cp -a "$PIPDIR" "$ROOT/tmp/vmrecover-pip"
# systemd-resolved made /etc/resolv.conf a link to its stub in /run: the host's, while pip runs.
rm -f "$ROOT/etc/resolv.conf"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
in_root python3 -m venv --system-site-packages /opt/vmrecover
# Dependencies from PyPI (Debian's python3-pyfuse3, -trio, -cryptography, -guestfs and -libnbd are
# seen through the system site-packages and satisfy their requirements), pinned by constraints.txt.
# The host's CA bundle for that (a TLS-intercepting proxy's CA may be in it); not left in the image.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/tmp/vmrecover-pip/host-ca.crt"
in_root /opt/vmrecover/bin/pip install -q --no-cache-dir --disable-pip-version-check \
  --cert /tmp/vmrecover-pip/host-ca.crt \
  -c /tmp/vmrecover-pip/constraints.txt "/tmp/vmrecover-pip/$(basename "$PIPDIR"/vmrecover-*.whl)"
# pip and setuptools stay: vmrecover-upgrade (appliance/sbin/) installs a newer wheel with them.
ln -sf /opt/vmrecover/bin/vmrecover "$ROOT/usr/local/bin/vmrecover"  # the unit's and the admin's path
mkdir -p "$ROOT/opt/vmrecover/appliance" "$ROOT/usr/share/doc/vmrecover"
install -m 0644 "$PIPDIR/vmrecover.toml.in" "$ROOT/opt/vmrecover/appliance/"
install -m 0644 "$PIPDIR/README.md" "$ROOT/usr/share/doc/vmrecover/README.md"
install -m 0755 "$PIPDIR/vmrecover-firstboot" "$ROOT/usr/local/sbin/vmrecover-firstboot"
install -m 0755 "$PIPDIR/vmrecover-nocloud" "$ROOT/usr/local/sbin/vmrecover-nocloud"
install -m 0755 "$PIPDIR/vmrecover-upgrade" "$ROOT/usr/local/sbin/vmrecover-upgrade"  # appliance/README.md
rm -rf "$ROOT/tmp/vmrecover-pip"

echo "customize: systemd units"
install -m 0644 "$HERE/systemd/vmrecover.service" "$ROOT/etc/systemd/system/vmrecover.service"
install -m 0644 "$PIPDIR/vmrecover-firstboot.service" "$ROOT/etc/systemd/system/"
mkdir -p "$ROOT/etc/logrotate.d" && install -m 0644 "$HERE/logrotate/vmrecover" "$ROOT/etc/logrotate.d/vmrecover"
mkdir -p "$ROOT/etc/vmrecover" "$ROOT/var/lib/vmrecover"
chmod 0755 "$ROOT/etc/vmrecover"; chmod 0700 "$ROOT/var/lib/vmrecover"

# Network: DHCP (v4 and v6) on the Ethernet interfaces, with systemd-networkd and systemd-resolved.
mkdir -p "$ROOT/etc/systemd/network"
cat >"$ROOT/etc/systemd/network/20-dhcp.network" <<'EOF'
# The appliance's network: DHCP on every Ethernet interface (replace with a static [Network] if needed).
[Match]
Type=ether
Name=en* eth*

[Network]
DHCP=yes

[DHCPv4]
UseDomains=yes
EOF
# network-online.target (vmrecover.service wants it) is reached as soon as one interface is up,
# and after 30 s without one: the appliance then still starts (and can be fixed on the console).
mkdir -p "$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat >"$ROOT/etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
EOF
ln -sf ../run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"

echo "vmrecover" >"$ROOT/etc/hostname"
cat >"$ROOT/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	vmrecover
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
cat >"$ROOT/etc/fstab" <<EOF
# The root filesystem; first boot grows it to the disk.  A repository disk (LABEL=vmrecover-repo)
# is added below by the first boot.
UUID=$ROOT_UUID / ext4 errors=remount-ro,noatime 0 1
EOF

# No password anywhere: root is locked (SSH with keys only; Debian's sshd refuses root passwords).
in_root usermod -p '!' root
# SSH: keys are made at first boot (vmrecover-firstboot, before ssh.service); none in the image.
rm -f "$ROOT"/etc/ssh/ssh_host_*
mkdir -p "$ROOT/etc/ssh/sshd_config.d"
cat >"$ROOT/etc/ssh/sshd_config.d/vmrecover.conf" <<'EOF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
EOF

# GRUB: images made by build.sh (grub-mkimage); here the modules and the menu.  /etc/default/grub
# makes update-grub (run by a kernel upgrade inside the appliance) write an equivalent menu.
CMDLINE="console=tty0 console=ttyS0,115200n8 modprobe.blacklist=floppy"
mkdir -p "$ROOT/boot/grub"
rm -rf "$ROOT/boot/grub/i386-pc" "$ROOT/boot/grub/x86_64-efi"
cp -a "$ROOT/usr/lib/grub/i386-pc" "$ROOT/usr/lib/grub/x86_64-efi" "$ROOT/boot/grub/"
rm -f "$ROOT"/boot/grub/*/*.image "$ROOT"/boot/grub/*/*.module "$ROOT"/boot/grub/*/grub-bios-setup \
  "$ROOT"/boot/grub/*/*.exec "$ROOT"/boot/grub/*/*.efi
cat >"$ROOT/etc/default/grub" <<EOF
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR="vmrecover appliance (Debian 12)"
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="$CMDLINE"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
EOF
cat >"$ROOT/boot/grub/grub.cfg" <<EOF
# Written by appliance/build.sh; update-grub (a kernel upgrade) replaces it from /etc/default/grub.
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set default=0
set timeout=1
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root $ROOT_UUID
menuentry 'vmrecover appliance (Debian 12)' {
  insmod gzio
  linux /vmlinuz root=UUID=$ROOT_UUID ro $CMDLINE
  initrd /initrd.img
}
EOF

echo "customize: services"
in_root systemctl enable systemd-networkd.service systemd-resolved.service \
  vmrecover-firstboot.service vmrecover.service >/dev/null 2>&1
in_root systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
in_root systemctl mask apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1 || true

echo "customize: clean"
in_root apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/apt/* \
  "$ROOT"/var/cache/debconf/*-old "$ROOT"/var/lib/dpkg/*-old "$ROOT"/var/cache/ldconfig/aux-cache
find "$ROOT/var/log" -type f -exec truncate -s 0 {} +
: >"$ROOT/etc/machine-id"
rm -f "$ROOT/var/lib/dbus/machine-id" "$ROOT/var/lib/systemd/random-seed"
