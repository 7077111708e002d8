"""CPU, memory and process limits of a workspace, enforced with cgroups.

The hub (root) creates one cgroup per running workspace and moves the
sandbox into it before bubblewrap starts, so every process of the workspace
is counted. cgroup v2 (one unified hierarchy with the cpu, memory and pids
controllers) is used where the host has it, else the v1 hierarchies
``memory``, ``cpu`` and ``pids``.
"""

import os
import re
from pathlib import Path

CPU_PERIOD_US = 100_000
DEFAULT_PIDS_MAX = 1024
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class LimitsUnavailable(RuntimeError):
    """The host offers no cgroup hierarchy this process may manage."""


class CgroupLimits:
    """Create, join and remove the cgroup of one workspace.

    Parameters
    ----------
    root : path
        Where the cgroup file systems are mounted.
    prefix : str
        The parent group of all workspaces.
    """

    def __init__(self, root="/sys/fs/cgroup", prefix="ngp-workspaces"):
        self.root = Path(root)
        self.prefix = prefix

    def layout(self) -> str | None:
        """``"v2"``, ``"v1"`` or None when no usable hierarchy is mounted or we are not root."""
        if os.geteuid() != 0:
            return None
        controllers = self.root / "cgroup.controllers"
        if controllers.exists() and {"cpu", "memory", "pids"} <= set(controllers.read_text().split()):
            return "v2"
        if all((self.root / c / "cgroup.procs").exists() for c in ("memory", "cpu", "pids")):
            return "v1"
        return None

    def _dirs(self, name: str, layout: str) -> dict:
        if not _NAME.match(name):
            raise ValueError(f"cgroup name {name!r} is not allowed")
        if layout == "v2":
            return {"v2": self.root / self.prefix / name}
        return {c: self.root / c / self.prefix / name for c in ("memory", "cpu", "pids")}

    def create(self, name: str, profile, pids_max: int = DEFAULT_PIDS_MAX) -> list[str]:
        """Create the group with ``profile``'s limits; returns the ``cgroup.procs`` files to join."""
        layout = self.layout()
        if layout is None:
            raise LimitsUnavailable("no writable cgroup hierarchy with cpu, memory and pids controllers "
                                    f"under {self.root} (or not running as root)")
        quota = max(1000, int(profile.cpu * CPU_PERIOD_US))
        dirs = self._dirs(name, layout)
        if layout == "v2":
            parent = self.root / self.prefix
            parent.mkdir(exist_ok=True)
            (parent / "cgroup.subtree_control").write_text("+cpu +memory +pids")
            d = dirs["v2"]
            d.mkdir(exist_ok=True)
            (d / "memory.max").write_text(str(profile.memory_bytes))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            (d / "pids.max").write_text(str(pids_max))
            return [str(d / "cgroup.procs")]
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        (dirs["memory"] / "memory.limit_in_bytes").write_text(str(profile.memory_bytes))
        (dirs["cpu"] / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
        (dirs["pids"] / "pids.max").write_text(str(pids_max))
        return [str(d / "cgroup.procs") for d in dirs.values()]

    def remove(self, name: str) -> None:
        """Remove the group once its processes have ended (a group with processes stays)."""
        layout = self.layout()
        if layout is None:
            return
        for d in self._dirs(name, layout).values():
            try:
                d.rmdir()
            except OSError:
                pass

    def memory_failures(self, name: str) -> int:
        """How often the workspace hit its memory limit (for tests and the admin page)."""
        layout = self.layout()
        if layout == "v2":
            events = (self._dirs(name, layout)["v2"] / "memory.events").read_text()
            return sum(int(line.split()[1]) for line in events.splitlines() if line.startswith(("max ", "oom_kill ")))
        if layout == "v1":
            return int((self._dirs(name, layout)["memory"] / "memory.failcnt").read_text())
        return 0
