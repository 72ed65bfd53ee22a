"""Compiling, pinning and attaching the datapath programs (bcc + tc).

The programs are compiled once (bcc, 1-5 s, run in an executor by the agent) and pinned under
`<pin root>/progs/<source hash>/`; an agent restart, or a test fixture, finds them there and skips
the compile. What differs per endpoint lives in maps, so attaching an endpoint is two
`tc filter replace` calls on its host-side veth.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cilia.errors import CiliaError
from services.datapath import maps

log = logging.getLogger("cilia.datapath.loader")

BPF_DIR = Path(__file__).resolve().parent / "bpf"
MAIN_SOURCE = BPF_DIR / "cilia.c"
PROGRAMS = ("from_container", "to_container", "to_overlay", "from_overlay", "from_netdev")
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')


class LoaderError(CiliaError):
    """The programs could not be compiled, loaded or attached."""


def expand_source(path: Path = MAIN_SOURCE, seen: set[Path] | None = None) -> str:
    """The program with its local headers inlined: bcc rewrites map calls only in the main file."""
    seen = set() if seen is None else seen
    out = []
    for line in path.read_text().splitlines():
        m = _INCLUDE.match(line)
        if m:
            inc = (path.parent / m.group(1)).resolve()
            if inc not in seen:
                seen.add(inc)
                out.append(expand_source(inc, seen))
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def cflags(root: Path) -> list[str]:
    return [f'-DPIN_ROOT="{root}"', "-Wno-unused-function"]


def source_hash(root: Path) -> str:
    digest = hashlib.sha256(expand_source().encode())
    digest.update("\0".join(cflags(root)).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class LoadedPrograms:
    root: Path
    hash: str
    paths: dict[str, Path]  # program name -> pin path
    compiled: bool  # False when pinned programs were reused


def ensure_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        raise LoaderError(
            "bpffs is not mounted at /sys/fs/bpf (run `make bootstrap` or `mount -t bpf bpf /sys/fs/bpf`)"
        )


def load(root: Path) -> LoadedPrograms:
    """Compile and pin the programs, or reuse the ones pinned for this exact source. Blocking."""
    ensure_bpffs()
    root.mkdir(parents=True, exist_ok=True)
    h = source_hash(root)
    prog_dir = root / "progs" / h
    paths = {name: prog_dir / name for name in PROGRAMS}
    if all(p.exists() for p in paths.values()) and (root / maps.EVENTS).exists():
        return LoadedPrograms(root, h, paths, compiled=False)
    try:
        from bcc import BPF  # Debian's python3-bpfcc, through the venv's system site packages
    except ImportError as err:
        raise LoaderError(f"bcc is not importable ({err}): install python3-bpfcc (make bootstrap)") from None
    try:
        bpf = BPF(text=expand_source(), cflags=cflags(root))
        fns = {name: bpf.load_func(name, BPF.SCHED_CLS) for name in PROGRAMS}
    except Exception as err:
        raise LoaderError(f"compiling the datapath programs failed: {err}") from None
    prog_dir.mkdir(parents=True, exist_ok=True)
    for name, fn in fns.items():
        if paths[name].exists():
            paths[name].unlink()
        maps.obj_pin(fn.fd, paths[name])
    events = root / maps.EVENTS
    if events.exists():
        events.unlink()
    maps.obj_pin(bpf["events"].map_fd, events)
    # Older program versions of this node are no longer needed once the new ones are attached.
    for old in (root / "progs").iterdir():
        if old.name != h and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log.info("event=programs-compiled hash=%s root=%s", h, root)
    return LoadedPrograms(root, h, paths, compiled=True)


def in_netns(argv: list[str], netns: str | None) -> list[str]:
    """`argv` run in the node's network namespace; nsenter, not `ip netns exec`, which would
    remount /sys and hide the bpffs the programs are pinned on."""
    if not netns:
        return argv
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    return ["nsenter", f"--net={path}", "--", *argv]


def _tc(args: list[str], netns: str | None = None) -> None:
    argv = in_netns(["tc", *args], netns)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise LoaderError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")


def attach(programs: LoadedPrograms, ifname: str, netns: str | None = None) -> None:
    """Attach from_container at TC ingress and to_container at TC egress of a host-side veth.

    `tc filter replace` swaps programs atomically, so re-attaching after a restart or an upgrade
    never leaves the interface without a program.
    """
    _attach_pair(programs, ifname, netns, (("ingress", "from_container"), ("egress", "to_container")))


def _attach_pair(
    programs: LoadedPrograms, ifname: str, netns: str | None, hooks: tuple[tuple[str, str], ...]
) -> None:
    qdisc = subprocess.run(
        in_netns(["tc", "qdisc", "show", "dev", ifname], netns),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if "clsact" not in qdisc.stdout:
        _tc(["qdisc", "add", "dev", ifname, "clsact"], netns)
    for hook, name in hooks:
        _tc(
            [
                "filter", "replace", "dev", ifname, hook, "prio", "1", "handle", "1",
                "bpf", "da", "object-pinned", str(programs.paths[name]),
            ],
            netns,
        )  # fmt: skip


def attach_overlay(programs: LoadedPrograms, ifname: str, netns: str | None = None) -> None:
    """Attach from_overlay at TC ingress and to_overlay at TC egress of the node's tunnel device."""
    _attach_pair(programs, ifname, netns, (("ingress", "from_overlay"), ("egress", "to_overlay")))


def attach_netdev(programs: LoadedPrograms, ifname: str, netns: str | None = None) -> None:
    """Attach from_netdev at TC ingress of a node uplink (outside traffic to service frontends)."""
    _attach_pair(programs, ifname, netns, (("ingress", "from_netdev"),))


def detach(ifname: str, netns: str | None = None) -> None:
    """Remove the programs (the clsact qdisc and its filters); a missing device is not an error."""
    subprocess.run(
        in_netns(["tc", "qdisc", "del", "dev", ifname, "clsact"], netns), capture_output=True, timeout=30
    )


def remove_pins(root: Path) -> None:
    """Delete every pinned map and program of a node (its bpffs directory)."""
    if root.exists():
        shutil.rmtree(root, ignore_errors=True)
