"""The plan of a workspace: what it mounts where, as whom, with which environment and limits.

:func:`plan_workspace` is pure: it turns the access policy's decision (the
exact files a user may see in a project now) and the identities and areas
of the user and project into a :class:`WorkspacePlan`. Executors carry a plan
out: the local one (:mod:`ngp_research.workspace.sandbox`) as a bubblewrap
sandbox; a Kubernetes one will turn the same mounts into volumes. Nothing
here assumes a local host.

Inside every workspace the layout is the same (design, section 4)::

    /data/<region>/<dataset>/<file>   tagged files only, read-only
    /project                          the project's shared area, writable by members
    /home/<user>                      the member's home in this project
    /reference                        non-patient reference files (panels, annotations), read-only
    /etc/ngp/workspace.json           the manifest: project, datasets, files, checksums
"""

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ..errors import RefusedError
from ..names import check_name

MANIFEST_PATH = "/etc/ngp/workspace.json"
PROJECT_PATH = "/project"
REFERENCE_PATH = "/reference"  # shared non-patient reference files (gene panels, annotations)
RUNTIME_PATH = "/run/ngp"  # sockets that bridge allowed services into the sandbox's own network namespace
#: The audit service's own socket inside a sandbox (the folder of Platform.audit_socket, bound read-only).
INSIDE_AUDIT_SOCKET = f"{RUNTIME_PATH}/audit/audit.sock"


def audit_socket(environ=None) -> str | None:
    """Where this process sends audit records: the service's socket, or None for ``NGP_AUDIT_URL``.

    Inside a workspace (its ``/run/ngp/audit`` folder exists, bound read-only from outside; a member
    can neither make nor remove it) always :data:`INSIDE_AUDIT_SOCKET`, whatever the environment
    says: a cell that drops or changes ``NGP_AUDIT_SOCKET`` before starting a Dask cluster or a
    server cannot send their records to a process of its own. Elsewhere ``NGP_AUDIT_SOCKET``.

    >>> audit_socket({"NGP_AUDIT_SOCKET": "/srv/audit.sock"})  # outside a workspace
    '/srv/audit.sock'
    >>> audit_socket({}) is None
    True
    """
    import os  # noqa: PLC0415

    if os.path.isdir(os.path.dirname(INSIDE_AUDIT_SOCKET)):
        return INSIDE_AUDIT_SOCKET
    return (os.environ if environ is None else environ).get("NGP_AUDIT_SOCKET") or None


class WorkspaceRefused(RefusedError):
    """The access policy gives this user nothing in this project; ``reasons`` says why."""

    def __init__(self, user, project, reasons):
        self.user, self.project, self.reasons = user, project, tuple(reasons)
        super().__init__(f"{user} cannot start a workspace for project {project!r}: " + "; ".join(self.reasons))


@dataclass(frozen=True)
class Mount:
    """One path inside the workspace and where it comes from.

    ``kind`` is ``data`` (a tagged file), ``project``, ``home``, ``system``
    (the operating system and the Python environment), ``reference``
    (non-patient reference files) or ``runtime``.
    """

    source: str
    target: str
    writable: bool = False
    kind: str = "system"


@dataclass(frozen=True)
class Profile:
    """Resources of a workspace, set by the project lead.

    Examples
    --------
    >>> Profile(cpu=2, memory="4G").memory_bytes
    4294967296
    """

    cpu: float = 1.0
    memory: str = "2G"
    idle_timeout: int = 3600  # seconds without activity before the hub stops the workspace

    def __post_init__(self):
        if not (isinstance(self.cpu, (int, float)) and 0 < self.cpu <= 256):
            raise ValueError(f"cpu: must be a number of cores between 0 and 256, got {self.cpu!r}")
        self.memory_bytes  # validates
        if not (isinstance(self.idle_timeout, int) and 60 <= self.idle_timeout <= 7 * 86400):
            raise ValueError(f"idle_timeout: must be whole seconds between 60 and 604800, got {self.idle_timeout!r}")

    @property
    def memory_bytes(self) -> int:
        text = str(self.memory).strip().upper()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        try:
            value = int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)
        except (ValueError, IndexError):
            raise ValueError(f"memory: {self.memory!r} is not a size like 512M or 4G") from None
        if value < 64 << 20:
            raise ValueError(f"memory: {self.memory!r} is below the 64M minimum")
        return value

    def to_json(self) -> dict:
        return {"cpu": self.cpu, "memory": self.memory, "idle_timeout": self.idle_timeout}


@dataclass(frozen=True)
class DatasetSummary:
    """What the manifest says of one dataset: kind, sample count and each file's size and checksum."""

    name: str
    region: str
    kind: str
    samples: int
    files: dict  # file name -> {"size": int, "sha256": str, "role": str}
    genome_build: str | None = None


@dataclass(frozen=True)
class WorkspacePlan:
    """Everything an executor needs to start one (user, project) workspace."""

    user: str
    project: str
    uid: int  # the member's own unprivileged host uid
    gid: int  # the project's group: files written in /project belong to it
    groups: tuple[int, ...]  # supplementary host groups (the data group, to reach the tagged files)
    hostname: str
    home: str
    workdir: str
    mounts: tuple[Mount, ...]
    environment: tuple[tuple[str, str], ...]
    manifest: dict
    profile: Profile = field(default_factory=Profile)

    @property
    def data_files(self) -> tuple[Mount, ...]:
        return tuple(m for m in self.mounts if m.kind == "data")

    def manifest_json(self) -> bytes:
        return json.dumps(self.manifest, indent=2, sort_keys=True).encode("utf-8")


def _safe_target(path: str) -> str:
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts:
        raise ValueError(f"mount target {path!r} must be absolute and free of '..'")
    return str(p)


def plan_workspace(
    decision,
    *,
    uid: int,
    project_gid: int,
    data_gid: int,
    shared_area: str,
    home_area: str,
    datasets: dict,
    runtime_area: str | None = None,
    audit_area: str | None = None,
    system_mounts=(),
    profile: Profile | None = None,
    environment: dict | None = None,
    python_bin: str = "/usr/bin",
) -> WorkspacePlan:
    """Plan the workspace the access decision allows, or raise :class:`WorkspaceRefused`.

    Parameters
    ----------
    decision : ngp_research.access.AccessDecision
        The policy's answer for (user, project) now: exactly the files to show.
    uid, project_gid, data_gid : int
        The member's host uid, the project's group, the group that may reach region files.
    shared_area, home_area : str
        Host folders of the project's shared area and of this member's home in it.
    runtime_area : str, optional
        Host folder bound at ``/run/ngp`` for the sockets that bridge the hub's API in and the
        server out (the sandbox has its own network namespace).
    audit_area : str, optional
        With ``runtime_area``: the host folder of the audit service's own unix socket, bound
        read-only at ``/run/ngp/audit`` (a folder, not the socket: a restarted service's new
        socket shows through it).
    datasets : dict
        Dataset name -> :class:`DatasetSummary`, for the manifest.
    system_mounts : sequence of Mount
        Read-only operating system and Python environment paths.
    environment : dict, optional
        Extra environment for the workspace's processes (for example the hub's API URL).
    python_bin : str
        The folder of the workspace's Python, first on ``PATH``.

    Examples
    --------
    >>> from datetime import datetime, timezone
    >>> from ngp_research.access import AccessDecision, VisibleFile
    >>> f = VisibleFile("syd", "syd-cohort", "c.vcf.gz", "/ngp/regions/syd/datasets/syd-cohort/c.vcf.gz",
    ...                 "/data/syd/syd-cohort/c.vcf.gz")
    >>> d = AccessDecision("alice", "cardio", datetime.now(timezone.utc), (f,), ())
    >>> ds = {"syd-cohort": DatasetSummary("syd-cohort", "syd", "vcf", 40, {"c.vcf.gz": {"size": 1, "sha256": "0", "role": "data"}})}
    >>> plan = plan_workspace(d, uid=200001, project_gid=300001, data_gid=199999, shared_area="/ngp/projects/cardio/shared",
    ...                       home_area="/ngp/projects/cardio/home/alice", datasets=ds)
    >>> [(m.target, m.writable) for m in plan.mounts]
    [('/data/syd/syd-cohort/c.vcf.gz', False), ('/project', True), ('/home/alice', True)]
    >>> plan.manifest["datasets"][0]["files"][0]["path"]
    '/data/syd/syd-cohort/c.vcf.gz'
    """
    if not decision.allowed:
        raise WorkspaceRefused(decision.user, decision.project, decision.reasons)
    user = check_name(decision.user, "user name")
    project = check_name(decision.project, "project name")
    for value, what in ((uid, "uid"), (project_gid, "project_gid"), (data_gid, "data_gid")):
        if not isinstance(value, int) or value < 1000:
            raise ValueError(f"{what}: must be an unprivileged id (>= 1000), got {value!r}")
    home = f"/home/{user}"
    mounts = [Mount(f.host_path, _safe_target(f.workspace_path), False, "data") for f in decision.files]
    mounts.append(Mount(shared_area, PROJECT_PATH, True, "project"))
    mounts.append(Mount(home_area, home, True, "home"))
    if runtime_area is not None:
        # The hub's socket (hub.sock) and the audit service's folder sit where only root writes, bound
        # read-only, so the member cannot replace them; the server's own socket gets a folder of the member's.
        mounts.append(Mount(runtime_area, RUNTIME_PATH, False, "runtime"))
        mounts.append(Mount(f"{runtime_area}/server", f"{RUNTIME_PATH}/server", True, "runtime"))
        if audit_area is not None:
            mounts.append(Mount(audit_area, f"{RUNTIME_PATH}/audit", False, "runtime"))
    for m in system_mounts:
        if m.writable:
            raise ValueError(f"system mount {m.target} must be read-only")
        mounts.append(Mount(m.source, _safe_target(m.target), False, m.kind))
    targets = [m.target for m in mounts]
    if len(set(targets)) != len(targets):
        raise ValueError("two mounts share a target")

    manifest = {
        "project": project,
        "user": user,
        "decided_at": decision.at.isoformat(),
        "datasets": [],
    }
    for region, name in decision.datasets:
        summary = datasets[name]
        files = [f for f in decision.files if f.dataset == name]
        manifest["datasets"].append({
            "name": name,
            "region": region,
            "kind": summary.kind,
            "samples": summary.samples,
            "genome_build": summary.genome_build,
            "files": [{"name": f.name, "path": f.workspace_path, **summary.files.get(f.name, {})} for f in files],
        })

    env = {
        "HOME": home,
        "USER": user,
        "LOGNAME": user,
        "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "SHELL": "/bin/sh",
        "PYTHONNOUSERSITE": "1",
        "NGP_PROJECT": project,
        "NGP_WORKSPACE_MANIFEST": MANIFEST_PATH,
        # Every Dask worker started in the workspace runs the audit hook (ngp_research.kernel.worker).
        "DASK_DISTRIBUTED__WORKER__PRELOAD": '["ngp_research.kernel.worker"]',
    }
    env.update(environment or {})
    return WorkspacePlan(
        user=user,
        project=project,
        uid=uid,
        gid=project_gid,
        groups=(data_gid,),
        hostname=f"ngp-{project}"[:63],
        home=home,
        workdir=PROJECT_PATH,
        mounts=tuple(mounts),
        environment=tuple(sorted(env.items())),
        manifest=manifest,
        profile=profile or Profile(),
    )
