"""appliance/formats.py: the OVA (OVF 1.0 + streamOptimized VMDKs) and the Vagrant box made from an
image, checked with the real qemu-img: what the archives hold, in which order, that the manifest and
the descriptor agree with the files, that the disks read back as the image, and that two packings of
one image are the same bytes."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import sha256_file

MiB = 1 << 20
FORMATS = Path(__file__).resolve().parents[1] / "appliance" / "formats.py"
NS = {
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "vmw": "http://www.vmware.com/schema/ovf",
}
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
VMW = "{http://www.vmware.com/schema/ovf}"


def run(*args: str | Path, epoch: int = 1_700_000_000) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
    subprocess.run([sys.executable, FORMATS, *map(str, args)], check=True, env=env, capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small qcow2 'system disk' with data here and there and a hole."""
    d = tmp_path_factory.mktemp("img")
    raw = d / "sys.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        for off in (0, 5 * MiB, 40 * MiB):
            f.seek(off)
            f.write(hashlib.sha256(str(off).encode()).digest() * 4096)
    img = d / "sys.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", raw, img], check=True)
    return img


def _raw_sha(path: Path, tmp: Path) -> str:
    out = tmp / (path.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-q", "-O", "raw", path, out], check=True)
    return sha256_file(out)


def test_the_ova_holds_the_descriptor_first_a_true_manifest_and_stream_optimized_disks(
    image: Path, tmp_path: Path
) -> None:
    ova = tmp_path / "a.ova"
    run("ova", image, ova, "--name", "vmr", "--version", "9.9", "--repo-disk", "100G")
    with tarfile.open(ova) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["vmr.ovf", "vmr.mf", "vmr-disk1.vmdk", "vmr-disk2.vmdk"]
        assert all(m.mtime == 1_700_000_000 and m.uid == 0 and m.isfile() for m in members)
        tar.extractall(tmp_path / "x")
    x = tmp_path / "x"
    for line in (x / "vmr.mf").read_text().splitlines():  # SHA256(name)= hex, for every other file
        name, digest = line.removeprefix("SHA256(").split(")= ")
        assert sha256_file(x / name) == digest
    assert len((x / "vmr.mf").read_text().splitlines()) == 3

    root = ET.parse(x / "vmr.ovf").getroot()
    files = {f.get(f"{OVF}id"): f for f in root.find("ovf:References", NS)}  # type: ignore[union-attr]
    for f in files.values():
        assert int(f.get(f"{OVF}size")) == (x / f.get(f"{OVF}href")).stat().st_size  # type: ignore[arg-type,operator]
    disks = root.findall("ovf:DiskSection/ovf:Disk", NS)
    assert [int(d.get(f"{OVF}capacity")) for d in disks] == [64 * MiB, 100 << 30]  # type: ignore[arg-type]
    assert all(d.get(f"{OVF}format", "").endswith("#streamOptimized") and d.get(f"{OVF}fileRef") in files
               for d in disks)  # fmt: skip
    hw = root.find("ovf:VirtualSystem/ovf:VirtualHardwareSection", NS)
    assert hw is not None
    items = {int(i.findtext("rasd:ResourceType", namespaces=NS) or 0): i for i in hw.findall("ovf:Item", NS)}
    assert items[3].findtext("rasd:VirtualQuantity", namespaces=NS) == "2"  # vCPUs
    assert items[4].findtext("rasd:VirtualQuantity", namespaces=NS) == "4096"  # MiB
    assert len(hw.findall("ovf:Item[rasd:ResourceType='17']", NS)) == 2  # the system and repository disks
    assert items[10].findtext("rasd:Connection", namespaces=NS) == "VM Network"
    assert root.findtext("ovf:VirtualSystem/ovf:ProductSection/ovf:Version", namespaces=NS) == "9.9"
    # ESXi: BIOS, and hardware virtualization passed through where the host allows it (libguestfs and
    # boot checks in the appliance then run with KVM), optional for hosts that cannot
    config = {c.get(f"{VMW}key"): (c.get(f"{VMW}value"), c.get(f"{OVF}required"))
              for c in hw.findall("vmw:Config", NS)}  # fmt: skip
    assert config == {"firmware": ("bios", "false"), "nestedHVEnabled": ("true", "false")}, config

    for vmdk in ("vmr-disk1.vmdk", "vmr-disk2.vmdk"):
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", x / vmdk], check=True,
                                         capture_output=True).stdout)  # fmt: skip
        assert (
            info["format"] == "vmdk" and info["format-specific"]["data"]["create-type"] == "streamOptimized"
        )
    assert _raw_sha(x / "vmr-disk1.vmdk", tmp_path) == _raw_sha(image, tmp_path)  # the same disk


def test_packing_one_image_twice_gives_the_same_bytes(image: Path, tmp_path: Path) -> None:
    for kind in ("ova", "box"):
        a, b = tmp_path / f"a.{kind}", tmp_path / f"b.{kind}"
        run(kind, image, a)
        run(kind, image, b)
        assert sha256_file(a) == sha256_file(b), kind


def test_the_box_is_a_libvirt_box_of_the_image(image: Path, tmp_path: Path) -> None:
    box = tmp_path / "a.box"
    run("box", image, box)
    with gzip.open(box) as gz, tarfile.open(fileobj=gz) as tar:
        assert sorted(tar.getnames()) == ["Vagrantfile", "box.img", "metadata.json"]
        meta = json.load(tar.extractfile("metadata.json"))  # type: ignore[arg-type]
        assert meta == {"provider": "libvirt", "format": "qcow2", "virtual_size": 1}
        assert b"lv.memory = 4096" in tar.extractfile("Vagrantfile").read()  # type: ignore[union-attr]
        tar.extract("box.img", tmp_path)
    assert sha256_file(tmp_path / "box.img") == sha256_file(image)
    assert not list(tmp_path.glob("*.partial"))


def test_the_vagrantfile_validates_and_makes_the_projects_key_and_token_private(tmp_path: Path) -> None:
    """`vagrant validate` with Debian's vagrant and vagrant-libvirt, on a copy (the Vagrantfile makes
    .vagrant/vmrecover/ beside itself): the key and the first admin token it makes are the project's
    own, readable by its owner only, and reading the file again keeps them."""
    import shutil

    top = Path(__file__).resolve().parents[1]
    for name in ("Vagrantfile", "pyproject.toml"):
        shutil.copy(top / name, tmp_path / name)
    env = {**os.environ, "VAGRANT_CWD": str(tmp_path), "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
           "VAGRANT_DEFAULT_PROVIDER": "libvirt", "VAGRANT_CHECKPOINT_DISABLE": "1"}  # fmt: skip
    res = subprocess.run(["vagrant", "validate"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "validated successfully" in res.stdout, res.stdout + res.stderr
    state = tmp_path / ".vagrant" / "vmrecover"
    assert state.stat().st_mode & 0o777 == 0o700
    token = (state / "admin-token").read_text().strip()
    assert token.startswith("vmr_") and len(token) > 40
    assert all((state / f).stat().st_mode & 0o777 == 0o600 for f in ("admin-token", "id_ed25519"))
    key = (state / "id_ed25519.pub").read_text()
    subprocess.run(["vagrant", "validate"], env=env, check=True, capture_output=True, timeout=300)
    assert (state / "admin-token").read_text().strip() == token and (
        state / "id_ed25519.pub"
    ).read_text() == key
