"""Workspaces: the plan of a (user, project) workspace and the executors that carry it out."""

from datetime import datetime

from .plan import REFERENCE_PATH, DatasetSummary, Mount, Profile, WorkspacePlan, WorkspaceRefused, plan_workspace

__all__ = [
    "DatasetSummary", "Mount", "Profile", "WorkspacePlan", "WorkspaceRefused", "plan_for", "plan_workspace",
    "system_mounts",
]


def system_mounts(python_env: str | None = None) -> tuple[Mount, ...]:
    """The read-only system paths a workspace needs: /usr, a few /etc files, and the Python environment."""
    mounts = [Mount("/usr", "/usr")]
    import os

    for path in ("/etc/ld.so.cache", "/etc/localtime", "/etc/ssl", "/etc/ca-certificates", "/etc/alternatives",
                 "/etc/nsswitch.conf", "/etc/mime.types"):
        if os.path.exists(path):
            mounts.append(Mount(path, path))
    import glob

    for path in sorted(glob.glob("/etc/java-*")):  # the JVM's configuration (Hail runs on it)
        mounts.append(Mount(path, path))
    if python_env and not python_env.startswith("/usr/"):
        mounts.append(Mount(python_env, python_env))
    return tuple(mounts)


def plan_for(catalog, user: str, project: str, at: datetime | None = None, python_env: str | None = None,
             environment: dict | None = None, runtime: bool = False, extra_mounts=()) -> WorkspacePlan:
    """Plan ``user``'s workspace in ``project`` from the catalog and the access policy, now (or at ``at``).

    Raises :class:`WorkspaceRefused` with the policy's reasons when the user may see nothing.
    ``extra_mounts`` are further read-only system mounts (for example :func:`.jupyter.jupyter_mounts`).
    """
    from ..access import AccessPolicy

    decision = AccessPolicy(catalog).files(user, project, at)
    if not decision.allowed:
        raise WorkspaceRefused(user, project, decision.reasons)
    uid, gid = catalog.workspace_identity(user, project)
    p = catalog.project(project)
    summaries = {}
    for _region, name in decision.datasets:
        ds = catalog.dataset(name)
        summaries[name] = DatasetSummary(
            name, ds.region.name, ds.kind, len(ds.samples),
            {f.name: {"size": f.size, "sha256": f.sha256, "role": f.role} for f in ds.files},
            ds.genome_build,
        )
    platform = catalog.platform
    if platform.reference_dir.is_dir():  # non-patient reference files: every workspace sees them, read-only
        extra_mounts = (Mount(str(platform.reference_dir), REFERENCE_PATH, False, "reference"), *extra_mounts)
    python_bin = f"{python_env}/bin" if python_env else "/usr/bin"
    return plan_workspace(
        decision,
        uid=uid,
        project_gid=gid,
        data_gid=platform.workspace_data_gid,
        shared_area=str(platform.projects_dir / project / "shared"),
        home_area=str(platform.projects_dir / project / "home" / user),
        datasets=summaries,
        runtime_area=str(platform.home_path / "runtime" / project / user) if runtime else None,
        audit_area=str(platform.audit_socket.parent) if runtime else None,
        system_mounts=system_mounts(python_env) + tuple(extra_mounts),
        profile=Profile(p.workspace_cpu, p.workspace_memory, p.workspace_idle_timeout),
        environment=environment,
        python_bin=python_bin,
    )
