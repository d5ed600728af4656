#!/usr/bin/env bash
# Builds the vmrecover appliance: dist/vmrecover-appliance-<version>.qcow2, and from it the .ova and the
# Vagrant .box (appliance/formats.py) (make appliance; as root).
#
# A minimal Debian 12 from Debian's packages (mmdebstrap, into a directory), vmrecover from this
# checkout in a venv at /opt/vmrecover (a wheel built here; its dependencies from PyPI, pinned to the
# versions of this checkout's .venv), `vmrecover serve` as a systemd service, first-boot set-up
# (appliance/firstboot/), BIOS and UEFI boot, serial console, DHCP.  Nothing is mounted and no loop
# device is used: the filesystems are written into the image file (mkfs.ext4 -d at an offset, a FAT
# image filled with mtools), GRUB's images are made with grub-mkimage and the BIOS one is set up by
# appliance/grub_bios_setup.py (what grub-bios-setup does, for a file).
#
# Disk layout (GPT; the identifiers are derived from the commit, so fixed for one commit):
#   1  1 MiB   BIOS boot partition: GRUB's core.img (MBR boot.img points at it)
#   2  64 MiB  EFI system partition (FAT): EFI/BOOT/BOOTX64.EFI, GRUB with the same early config
#   3  rest    ext4 root, sized to its content plus room; first boot grows it to the disk
# The disk's virtual size is APPLIANCE_DISK_SIZE (8G); the qcow2 is compressed.
#
# Reproducibility: SOURCE_DATE_EPOCH is the commit's time (file times newer than it are clamped to it
# before mkfs; pip's .pyc files are then hash-checked, not time-stamped; the wheel's zip times follow
# it), the filesystems' UUIDs and hash seed and the GPT's GUIDs come from the commit, and mkfs.ext4 is
# given E2FSPROGS_FAKE_TIME.  Two builds of one commit were compared file by file (content, mode,
# owner, time: all the same once times were clamped).  What still differs between two builds:
#   - newer Debian packages (security updates) and PyPI releases the constraints do not pin
#     (the constraints are this checkout's .venv: `pip freeze --local`);
#   - the FAT filesystem's directory-entry times (mtools writes the current time);
#   - ext4 internals mke2fs randomises despite the fixed UUID/seed (the journal and orphan file
#     blocks' contents are zero; inode generation numbers are random);
#   - (none were found in the files themselves: the days-since-epoch fields of /etc/shadow follow
#     SOURCE_DATE_EPOCH, and /var/log/* is emptied).
# What must differ and so is not in the image at all: /etc/machine-id (empty: systemd makes one at
# first boot), SSH host keys (none: first boot makes them), the API's TLS key and certificate, the
# admin API token, the repository's id (all made at first boot).
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$PWD

[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (mmdebstrap --mode=root, chroot)" >&2; exit 1; }

VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
COMMIT=$(git rev-parse HEAD)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}
WORK=${APPLIANCE_WORK:-/var/tmp/vmrecover-appliance}
DISK_SIZE=${APPLIANCE_DISK_SIZE:-8G}
MIRROR=${APPLIANCE_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${APPLIANCE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
OUT=$TOP/dist/vmrecover-appliance-$VERSION.qcow2
REUSE_ROOTFS=0
[ "${1:-}" = --reuse-rootfs ] && REUSE_ROOTFS=1  # developers: skip mmdebstrap, re-apply customize

# Debian packages in the image.  The variant "apt" is Essential: yes plus apt; nothing is installed
# for Recommends unless listed here.
PACKAGES=(
  systemd systemd-sysv systemd-resolved udev dbus libpam-systemd   # init; networkd (DHCP) is in systemd
  linux-image-amd64 initramfs-tools zstd                           # kernel, initrd (zstd-compressed)
  grub2-common grub-pc-bin grub-efi-amd64-bin                      # GRUB (no grub-pc: its postinst installs to a disk)
  openssh-server                                                    # keys made at first boot
  cloud-guest-utils e2fsprogs fdisk                                 # growpart, resize2fs, sfdisk
  ca-certificates iproute2 iputils-ping less procps nano kmod netbase
  python3 python3-venv                                              # /opt/vmrecover's venv (system site-packages)
  python3-pyfuse3 python3-trio python3-cryptography                 # vmrecover's Debian-provided dependencies
  python3-libnbd qemu-utils qemu-block-extra                        # qemu-img, qemu-nbd, nfs:// (libnfs)
  python3-guestfs libguestfs-xfs                                    # single-file restore
  fuse3 libnfs-utils                                                # FUSE datastore; NFS client tools
  python3-yaml                                                      # vmrecover-nocloud (cloud-init NoCloud seed)
)

STAGE=$WORK/rootfs
SRC=$WORK/src
PIPDIR=$WORK/pip
IMG=$WORK/disk.raw
ESP=$WORK/esp.img
T0=$(date +%s)
step() { echo "== build.sh [$(( $(date +%s) - T0 ))s] $*"; }

cleanup() {
  # Nothing is mounted by this script (mmdebstrap unmounts what it mounted in its chroot, also on
  # failure); leave the work folder for inspection on failure.
  local rc=$?
  [ $rc = 0 ] || echo "build.sh: FAILED (exit $rc); work files in $WORK" >&2
}
trap cleanup EXIT

# Names derived from the commit: fixed for one commit, different for another.
uuid_for() { python3 -c 'import sys, uuid; print(uuid.uuid5(uuid.NAMESPACE_URL, "vmrecover-appliance:" + sys.argv[1] + ":" + sys.argv[2]))' "$COMMIT" "$1"; }
ROOT_UUID=$(uuid_for root)
ROOT_HASH_SEED=$(uuid_for root-hash-seed)
DISK_GUID=$(uuid_for disk)
ESP_SERIAL=$(uuid_for esp | tr -d - | cut -c1-8 | tr a-f A-F)  # FAT volume id, 8 hex digits

mkdir -p "$WORK" "$TOP/dist"

# --- 1. the vmrecover wheel and pinned dependencies ------------------------------------------------
step "wheel from this checkout ($COMMIT, SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
rm -rf "$SRC" "$PIPDIR"
mkdir -p "$SRC" "$PIPDIR"
# The checkout's files as they are now (tracked and new, not ignored ones), without the build
# writing into the checkout (setuptools' build/ and *.egg-info stay in $SRC).
git ls-files -z --cached --others --exclude-standard | tar -c --null -T - --ignore-failed-read -f - 2>/dev/null \
  | tar -x -C "$SRC"
"$TOP/.venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$PIPDIR" "$SRC"
# Pin what PyPI gives to the versions this checkout's tests ran with.
"$TOP/.venv/bin/pip" freeze --local --exclude-editable | grep -v '^-e ' >"$PIPDIR/constraints.txt"
cp appliance/firstboot/* appliance/sbin/* README.md "$PIPDIR/"

# --- 2. the root filesystem ----------------------------------------------------------------------
if [ "$REUSE_ROOTFS" = 1 ] && [ -d "$STAGE/usr" ]; then
  step "re-using $STAGE (--reuse-rootfs): customize only"
  mount --bind /dev "$STAGE/dev" && trap 'umount "$STAGE/dev" 2>/dev/null || true; cleanup' EXIT
  "$TOP/appliance/customize.sh" "$STAGE" "$PIPDIR" "$ROOT_UUID"
  umount "$STAGE/dev"; trap cleanup EXIT
else
  step "mmdebstrap (Debian 12, ${#PACKAGES[@]} packages and their dependencies)"
  rm -rf "$STAGE"
  IFS=,; include="${PACKAGES[*]}"; unset IFS
  mmdebstrap --mode=root --variant=apt --format=directory --components=main \
    --include="$include" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --essential-hook='echo "vmrecover" >"$1/etc/hostname"' \
    --customize-hook="\"$TOP/appliance/customize.sh\" \"\$1\" \"$PIPDIR\" \"$ROOT_UUID\"" \
    bookworm "$STAGE" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main" </dev/null
fi
# mmdebstrap leaves the host's resolv.conf/hostname out again, only what the image should carry stays.
rm -f "$STAGE"/etc/ssh/ssh_host_*
: >"$STAGE/etc/machine-id"

# Times: mmdebstrap clamps them only in tarballs; in a directory, what maintainer scripts and the
# customize hook wrote carries the build's time, and mkfs.ext4 -d copies it.  Clamped here, two
# builds of one commit have the same files, modes, owners and times (compared: 27517 entries).
step "file times clamped to SOURCE_DATE_EPOCH"
find "$STAGE" -xdev -newermt "@$SOURCE_DATE_EPOCH" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +

# --- 3. the disk image ---------------------------------------------------------------------------
step "disk image"
KVER=$(basename "$(readlink -f "$STAGE/vmlinuz")" | sed 's/^vmlinuz-//')
used_mib=$(( $(du -sx --block-size=1M "$STAGE" | cut -f1) ))
ROOT_MIB=$(( used_mib * 5 / 4 + 256 ))          # content plus room for the first boot's writes
BIOS_START=2048; BIOS_SECTORS=2048              # 1 MiB at 1 MiB
ESP_START=4096; ESP_SECTORS=$(( 64 * 2048 ))    # 64 MiB
ROOT_START=$(( ESP_START + ESP_SECTORS ))
ROOT_SECTORS=$(( ROOT_MIB * 2048 ))
rm -f "$IMG"
truncate -s "$DISK_SIZE" "$IMG"
min_bytes=$(( (ROOT_START + ROOT_SECTORS + 2048) * 512 ))
[ "$(stat -c %s "$IMG")" -ge "$min_bytes" ] || truncate -s "$min_bytes" "$IMG"
sfdisk -q --no-reread --no-tell-kernel "$IMG" <<EOF
label: gpt
label-id: $DISK_GUID
start=$BIOS_START, size=$BIOS_SECTORS, type=21686148-6449-6E6F-744E-656564454649, uuid=$(uuid_for part-bios), name="bios"
start=$ESP_START, size=$ESP_SECTORS, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$(uuid_for part-esp), name="esp"
start=$ROOT_START, size=$ROOT_SECTORS, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$(uuid_for part-root), name="root"
EOF

step "root filesystem: ext4, ${ROOT_MIB} MiB, from $STAGE"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mkfs.ext4 -q -F -d "$STAGE" -L vmrecover-root -U "$ROOT_UUID" \
  -E "offset=$(( ROOT_START * 512 )),hash_seed=$ROOT_HASH_SEED,root_owner=0:0" \
  -O ^orphan_file "$IMG" "$(( ROOT_MIB ))M"

step "GRUB (BIOS and UEFI; kernel $KVER)"
G=$WORK/grub
rm -rf "$G"; mkdir -p "$G"
cat >"$G/early.cfg" <<EOF
search.fs_uuid $ROOT_UUID root
set prefix=(\$root)/boot/grub
EOF
# The chroot's grub-mkimage and modules, so the images match the modules /boot/grub holds.
cp "$G/early.cfg" "$STAGE/tmp/early.cfg"
chroot "$STAGE" grub-mkimage -O i386-pc -o /tmp/core.img -c /tmp/early.cfg -p /boot/grub \
  biosdisk part_gpt ext2 search_fs_uuid
chroot "$STAGE" grub-mkimage -O x86_64-efi -o /tmp/BOOTX64.EFI -c /tmp/early.cfg -p /boot/grub \
  part_gpt ext2 search_fs_uuid
mv "$STAGE/tmp/core.img" "$STAGE/tmp/BOOTX64.EFI" "$G/"
rm -f "$STAGE/tmp/early.cfg"
python3 "$TOP/appliance/grub_bios_setup.py" "$IMG" "$STAGE/usr/lib/grub/i386-pc/boot.img" "$G/core.img" \
  "$BIOS_START" "$BIOS_SECTORS"

rm -f "$ESP"
mkfs.fat -C -F 32 -S 512 -s 1 -i "$ESP_SERIAL" -n EFI "$ESP" $(( ESP_SECTORS / 2 )) >/dev/null
touch -d "@$SOURCE_DATE_EPOCH" "$G/BOOTX64.EFI"
MTOOLS_SKIP_CHECK=1 mmd -i "$ESP" ::/EFI ::/EFI/BOOT
MTOOLS_SKIP_CHECK=1 mcopy -m -i "$ESP" "$G/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
dd if="$ESP" of="$IMG" bs=512 seek="$ESP_START" conv=notrunc,sparse status=none

# --- 4. qcow2 --------------------------------------------------------------------------------------
step "qcow2 (compressed)"
rm -f "$OUT.tmp"
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zlib "$IMG" "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
rm -f "$IMG" "$ESP"
step "OVA (ESXi, XenServer) and Vagrant box (libvirt), from the qcow2"
python3 "$TOP/appliance/formats.py" ova "$OUT" "${OUT%.qcow2}.ova" --version "$VERSION"
python3 "$TOP/appliance/formats.py" box "$OUT" "${OUT%.qcow2}.box"
T1=$(date +%s)
echo "$(( T1 - T0 ))" >"$OUT.build-seconds"
# What it was built from: the commit, "-dirty" when the checkout had changes (tests/test_appliance.py
# re-uses an image only when this is the clean HEAD).
dirty=$(git status --porcelain --untracked-files=no | head -c1)
echo "$COMMIT${dirty:+-dirty}" >"$OUT.source"
step "done: $OUT"
printf '  %-28s %s\n' "image" "$OUT" "virtual size" "$DISK_SIZE" "root filesystem" "${ROOT_MIB} MiB (${used_mib} MiB used)" \
  "qcow2 (compressed)" "$(( $(stat -c %s "$OUT") / 1048576 )) MiB" \
  "OVA" "$(( $(stat -c %s "${OUT%.qcow2}.ova") / 1048576 )) MiB" \
  "Vagrant box" "$(( $(stat -c %s "${OUT%.qcow2}.box") / 1048576 )) MiB" "build time" "$(( T1 - T0 )) s" \
  "kernel" "$KVER" "root UUID" "$ROOT_UUID"
