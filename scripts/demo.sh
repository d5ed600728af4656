#!/usr/bin/env bash
# The main job, end to end on real images: make a VM disk with a real ext4 filesystem, back it up,
# change it, back up only the changed blocks, list, restore both points and check every byte; then
# back up a bootable guest, boot it from the backup (instant recovery) via FUSE and via NFS, read a file from
# it, migrate it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=${DEMO_DIR:-$PWD/work/demo}
# a previous run that was interrupted may have left its mounts (datastore, file-restore service)
if [ -d "$work/repo" ]; then VMRECOVER_REPO="$work/repo" vmrecover files stop >/dev/null 2>&1 || true; fi
awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | xargs -r -n1 fusermount3 -u -z 2>/dev/null || true
rm -rf "$work" && mkdir -p "$work/files"
export VMRECOVER_REPO="$work/repo"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a 512 MiB VM disk holding an ext4 filesystem with some files"
for i in $(seq 1 40); do head -c $((256 * 1024)) /dev/urandom > "$work/files/blob$i.bin"; done
seq 1 200000 > "$work/files/numbers.txt"
echo "hello from the first backup" > "$work/files/hello.txt"
truncate -s 512M "$work/vm-disk0.raw"
mkfs.ext4 -q -F -d "$work/files" "$work/vm-disk0.raw"
qemu-img convert -O qcow2 "$work/vm-disk0.raw" "$work/vm-disk0.qcow2"
ls -lsh "$work/vm-disk0.raw" "$work/vm-disk0.qcow2"

step "vmrecover init"
vmrecover init
step "full backup of the qcow2 image (only allocated clusters are read)"
vmrecover backup "$work/vm-disk0.qcow2" --vm demo-vm --disk-name disk0

step "the VM writes 8 MiB at 100 MiB; the hypervisor's change tracking reports that range"
qemu-io -f qcow2 -c "write -P 0x5a 100M 8M" "$work/vm-disk0.qcow2" >/dev/null
echo '[[104857600, 8388608]]' > "$work/changed.json"
step "incremental backup: only the changed range is read"
vmrecover backup "$work/vm-disk0.qcow2" --vm demo-vm --disk-name disk0 --changed-extents "$work/changed.json"

step "vmrecover list"
vmrecover list
vmrecover list demo-vm
first=$(vmrecover list demo-vm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["points"][0]["id"])')

step "restore both points and compare with the sources"
vmrecover restore "demo-vm@$first" --to "$work/restored-first.raw"
vmrecover restore demo-vm@latest --to "$work/restored-latest.qcow2" --format qcow2
qemu-img compare -q "$work/vm-disk0.raw" "$work/restored-first.raw" && echo "first point: identical to the original disk"
qemu-img compare -q "$work/vm-disk0.qcow2" "$work/restored-latest.qcow2" && echo "latest point: identical to the changed disk"
echo "sha256 original:  $(sha256sum < "$work/vm-disk0.raw" | cut -c1-16)…"
echo "sha256 restored:  $(sha256sum < "$work/restored-first.raw" | cut -c1-16)…"
du -h --apparent-size "$work/restored-first.raw" | sed 's/^/apparent size: /'
du -h "$work/restored-first.raw" | sed 's/^/on disk (sparse): /'

step "vmrecover verify"
vmrecover verify

step "instant recovery: a bootable Linux guest disk (MBR, syslinux, the host's kernel, busybox)"
python -m tests.testkit.guest build "$work/guest.raw"
vmrecover backup "$work/guest.raw" --vm web01 --format raw
mkdir -p "$work/mnt"
trap 'vmrecover umount "$work/mnt" 2>/dev/null || true' EXIT
vmrecover mount "$work/mnt"
ls -l "$work/mnt/vms/web01/latest/"
step "recover start: a writable session of the backup; boot it with qemu straight from the datastore"
vmrecover recover start web01 --name web01-rescue
ls -l "$work/mnt/recover/web01-rescue/"
time vmrecover recover boot web01-rescue --serial "$work/serial.log" --timeout 300
grep VMRECOVER-GUEST-BOOT "$work/serial.log"
step "the guest wrote to its disk; the backup did not change"
vmrecover recover list
qemu-img compare -q "$work/guest.raw" "$work/mnt/vms/web01/latest/guest.raw" && echo "backup: unchanged"
step "a file from the running session's disk: the guest's own boot log"
python -m tests.testkit.guest log "$work/mnt/recover/web01-rescue/guest.raw"
step "the same session over NFS, as a hypervisor's datastore mounts it: boot it again over nfs://"
vmrecover nfs serve --port 0 --portmapper --json > "$work/nfs.json" 2> "$work/nfs.log" &
nfs_pid=$!
trap 'kill $nfs_pid 2>/dev/null || true; vmrecover files stop >/dev/null 2>&1 || true; vmrecover umount "$work/mnt" 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$work/nfs.json" ] && break; sleep 0.1; done
cat "$work/nfs.json"
nfs-ls nfs://127.0.0.1/vmrecover/recover/web01-rescue
python -m tests.testkit.guest boot --timeout 300 --serial-log "$work/serial-nfs.log" \
  --drive "file=nfs://127.0.0.1/vmrecover/recover/web01-rescue/guest.raw,format=raw,if=virtio,cache=none"
kill $nfs_pid && wait $nfs_pid || true
echo "the boot log now, through FUSE (the NFS boot wrote its line into the same session):"
python -m tests.testkit.guest log "$work/mnt/recover/web01-rescue/guest.raw"
step "single-file restore: libguestfs opens the backup's disk; copy a file out of it"
vmrecover files inspect web01
vmrecover files ls web01 /sda2/etc
mkdir -p "$work/restored-files"
vmrecover files get web01 /sda2/etc/hostname /sda2/etc/vmrecover-guest --to "$work/restored-files"
echo "restored /etc/hostname: $(cat "$work/restored-files/hostname")"
vmrecover files stop
step "migrate the session to a standalone qcow2 for production, then discard the session"
vmrecover recover migrate web01-rescue --to "$work/web01-production.qcow2"
vmrecover recover stop web01-rescue
vmrecover umount "$work/mnt"
trap - EXIT
printf '\n\033[1mdemo finished: files are in %s\033[0m\n' "$work"
