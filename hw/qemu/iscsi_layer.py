"""What the iSCSI real-kernel test adds to the base guest: Linux's own initiator, open-iscsi.

- the kernel side: `scsi_transport_iscsi`, `libiscsi`, `libiscsi_tcp`, `iscsi_tcp` from Debian's kernel
  package (the base layer already has the SCSI midlayer and `sd_mod`);
- the user side: `iscsid` and `iscsiadm` from Debian's open-iscsi, with the shared libraries they need
  that the base layer does not have (libisns, libopeniscsiusr, libsystemd and what it links);
- `/etc/iscsi/`: an initiator name and an `iscsid.conf` with the defaults a server would use (manual
  node start-up, a 120 s replacement timeout so a restarted target is waited for, NOP-Out pings).

They travel as `extra_files` of the per-run layer, cached under the guest cache. The guest script gets
`iscsi_start` (load the modules, start iscsid) and `iscsi_login PORTAL` (SendTargets discovery, then log
in to every target found). The guest reaches the target as `10.0.2.100:3240`, relayed by
`hw.qemu.guest` to the loopback port given as `usbip_port`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hw.qemu.build_guest import (
    BuildError,
    GuestBuilder,
    GuestImage,
    cache_dir,
    download,
    read_elf_dynamic,
    resolve_packages,
    unpack,
)
from hw.qemu.gadget_layer import extract_modules, kernel_deb
from hw.qemu.guest import GuestResult, run_guest

# Relative to lib/modules/<kver>/, in load order.
ISCSI_MODULES = (
    "kernel/drivers/scsi/scsi_transport_iscsi.ko",
    "kernel/drivers/scsi/libiscsi.ko",
    "kernel/drivers/scsi/libiscsi_tcp.ko",
    "kernel/drivers/scsi/iscsi_tcp.ko",
)
TOOLS = ("sbin/iscsid", "sbin/iscsiadm")
# open-iscsi and the library packages whose files it links beyond the base layer.
PACKAGES = ("open-iscsi", "libisns0", "libopeniscsiusr", "libsystemd0", "liblz4-1", "libgcrypt20",
            "libgpg-error0", "libcap2")
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
GUEST_LIB_DIR = "/usr/lib/x86_64-linux-gnu"
INITIATOR = "iqn.2026-01.net.usbmirror:guest-initiator"

ISCSID_CONF = """\
iscsid.startup = /bin/false
node.startup = manual
node.session.scan = auto
node.session.timeo.replacement_timeout = 120
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.logout_timeout = 15
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 10
node.session.initial_login_retry_max = 8
node.session.cmds_max = 128
node.session.queue_depth = 32
node.session.iscsi.InitialR2T = No
node.session.iscsi.ImmediateData = Yes
node.session.iscsi.FirstBurstLength = 262144
node.session.iscsi.MaxBurstLength = 1048576
node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144
node.conn[0].iscsi.HeaderDigest = None
node.session.auth.authmethod = None
discovery.sendtargets.auth.authmethod = None
"""

ISCSI_FUNCTIONS = r"""
iscsi_start() {
    KVER=$(cat /etc/kernel-version)
    for m in $(cat /etc/iscsi-modules.order); do
        insmod "/lib/modules/$KVER/$m" || die "insmod_${m##*/}"
    done
    mkdir -p /var/lib/iscsi/nodes /var/lib/iscsi/send_targets /var/lib/iscsi/ifaces /var/lib/iscsi/isns \
        /var/lib/iscsi/static /run/lock/iscsi /etc/iscsi/ifaces
    /sbin/iscsid -f > /tmp/iscsid.log 2>&1 &
    sleep 0.5
}
# iscsi_login PORTAL: discover the targets behind PORTAL and log in to them
iscsi_login() {
    n=0
    until /sbin/iscsiadm -m discovery -t sendtargets -p "$1" > /tmp/discovery 2>&1; do
        n=$((n + 1)); [ $n -lt 10 ] || { cat /tmp/discovery; die discovery; }
        sleep 1
    done
    cat /tmp/discovery
    # the target names the portal it listens on (behind the relay: a loopback address); the guest
    # reaches it only through PORTAL, so the node records are made for PORTAL
    for iqn in $(awk '{print $2}' /tmp/discovery); do
        /sbin/iscsiadm -m node -o new -T "$iqn" -p "$1" > /dev/null || die "node_$iqn"
        /sbin/iscsiadm -m node -T "$iqn" -p "$1" --login || { tail -20 /tmp/iscsid.log; die login; }
    done
}
"""


def _unpack(builder: GuestBuilder, root: Path) -> None:
    pkgs = resolve_packages(PACKAGES)
    unpack(download([pkgs[name] for name in PACKAGES], builder.debdir), root)


def _find_library(root: Path, soname: str) -> bytes | None:
    for d in LIB_DIRS:
        path = root / d / soname
        if path.exists():
            return path.resolve().read_bytes()
    return None


def _collect(root: Path, base_files: set[str]) -> dict[str, bytes]:
    """The tools and every shared library they need (recursively) that the base layer lacks."""
    files: dict[str, bytes] = {}
    todo: list[bytes] = []
    for tool in TOOLS:
        data = (root / tool).read_bytes()
        files["/" + tool] = data
        todo.append(data)
    have = {Path(f).name for f in base_files}
    while todo:
        elf = read_elf_dynamic(todo.pop())
        for soname in elf.needed if elf is not None else ():
            guest = f"{GUEST_LIB_DIR}/{soname}"
            if soname in have or guest in files:
                continue
            lib = _find_library(root, soname)
            if lib is None:
                raise BuildError(f"iSCSI tools need {soname}: in none of {PACKAGES} nor the base layer")
            files[guest] = lib
            todo.append(lib)
    return files


def iscsi_extra_files(image: GuestImage) -> dict[str, bytes]:
    """Extra guest files (absolute guest path -> content) for the iSCSI test, cached on disk."""
    builder = GuestBuilder()
    deb, version = kernel_deb(builder)
    tools_version = resolve_packages(["open-iscsi"])["open-iscsi"].version
    cache = cache_dir() / f"iscsi-extra-{version}-{tools_version}"
    if not cache.exists():
        base_meta = json.loads(image.base_initrd.with_suffix(".json").read_text())
        base_files = {str(f) for f in base_meta["files"]}
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="iscsi-stage-") as tmp:
            root = Path(tmp) / "root"
            _unpack(builder, root)
            collected = _collect(root, base_files)
            collected.update({"/" + rel: data for rel, data in extract_modules(deb, ISCSI_MODULES).items()})
            staged = Path(tmp) / "out"
            for guest, data in collected.items():
                out = staged / guest.lstrip("/")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(data)
            staged.rename(cache)
    files = {"/" + str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}
    files["/etc/iscsi-modules.order"] = ("\n".join(ISCSI_MODULES) + "\n").encode()
    files["/etc/iscsi/initiatorname.iscsi"] = f"InitiatorName={INITIATOR}\n".encode()
    files["/etc/iscsi/iscsid.conf"] = ISCSID_CONF.encode()
    return files


def run_iscsi_guest(script: str, *, target_port: int, timeout: float, image: GuestImage | None = None,
                    memory: int = 512) -> GuestResult:
    """Boot the base guest with open-iscsi and run `script`; `10.0.2.100:3240` in the guest reaches the
    iSCSI target listening on 127.0.0.1:`target_port`."""
    image = image or GuestBuilder().build()
    return run_guest(ISCSI_FUNCTIONS + script, usbip_port=target_port, timeout=timeout,
                     extra_files=iscsi_extra_files(image), memory=memory, image=image)
