"""Host folders behind a workspace, with owners and modes that keep them apart.

Run as root (the hub), these give::

    $NGP_HOME                  0710 root:<data group>   only sandboxed workspaces traverse it
      state/                   0700 root                never reachable from a workspace uid
      regions/, projects/      0710 root:<data group>
      run/                     0710 root:<data group>
        audit/                 0755 root                the audit service's socket, /run/ngp/audit (read-only) inside
      runtime/<p>/<user>/      0750 root:<project group>   the hub's bridge sockets, /run/ngp (read-only) inside
        server/                0700 <user uid>   the server's socket, /run/ngp/server inside
        audit/                 0755 root          where run/audit/ is bound
      projects/<p>/            0710 root:<project group>
        shared/               02770 root:<project group> members write, files keep the project group
        home/                  0710 root:<project group>
          <user>/              0700 <user uid>:<project group>

Without root (a developer's machine), folders are only created. Workspaces
still see only what is bound into them; these modes are a second line.
"""

import os
from pathlib import Path


def _own(path: Path, mode: int, uid: int | None = None, gid: int | None = None) -> None:
    if os.geteuid() == 0:
        os.chown(path, 0 if uid is None else uid, 0 if gid is None else gid)
    os.chmod(path, mode)


def check_reachable(path: Path) -> None:
    """Refuse a platform home that workspace uids cannot reach: every folder above it needs o+x.

    bubblewrap binds the tagged files as the member's uid, so it must be able to walk down to them.
    """
    for parent in Path(path).resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise PermissionError(
                f"workspaces cannot reach {path}: {parent} is not searchable by other users (mode "
                f"{oct(mode & 0o777)}). Put NGP_HOME somewhere every user can traverse, e.g. /srv/ngp")


def secure_platform_home(platform) -> None:
    """Gate the platform's home behind the data group; keep the state private."""
    platform.ensure_layout()
    check_reachable(platform.home_path)
    gid = platform.workspace_data_gid
    _own(platform.home_path, 0o710, gid=gid)
    _own(platform.regions_dir, 0o710, gid=gid)
    _own(platform.projects_dir, 0o710, gid=gid)
    _own(platform.state_dir, 0o700)
    if platform.reference_dir.is_dir():
        _own(platform.reference_dir, 0o750, gid=gid)
    for region in platform.regions_dir.iterdir():
        if region.is_dir():
            _own(region, 0o710, gid=gid)
            datasets = region / "datasets"
            if datasets.is_dir():
                _own(datasets, 0o710, gid=gid)


def project_area(platform, project: str, project_gid: int) -> Path:
    """The project's shared area (created if missing)."""
    root = platform.projects_dir / project
    shared, homes = root / "shared", root / "home"
    for p in (root, shared, homes):
        p.mkdir(parents=True, exist_ok=True)
    _own(root, 0o710, gid=project_gid)
    _own(shared, 0o2770, gid=project_gid)
    _own(homes, 0o710, gid=project_gid)
    return shared


def member_home(platform, project: str, user: str, uid: int, project_gid: int) -> Path:
    """A member's home in one project (created if missing)."""
    home = platform.projects_dir / project / "home" / user
    home.mkdir(parents=True, exist_ok=True)
    _own(home, 0o700, uid=uid, gid=project_gid)
    return home


def runtime_dir(platform, project: str, user: str) -> Path:
    """Host folder of a workspace's bridge sockets (bound at /run/ngp inside)."""
    return platform.home_path / "runtime" / project / user


def runtime_area(platform, project: str, user: str, uid: int, project_gid: int) -> Path:
    """Create the runtime folders: $NGP_HOME/runtime/<project>/<user> (root's: the hub's sockets), its
    ``server/`` (the member's: the server's socket) and ``audit/`` (root's: where the audit service's
    socket folder, ``$NGP_HOME/run/audit``, created here too if the service has not yet, is bound)."""
    root = platform.home_path / "runtime"
    proj = root / project
    path = proj / user
    server = path / "server"
    audit = path / "audit"
    server.mkdir(parents=True, exist_ok=True)
    audit.mkdir(exist_ok=True)
    service = platform.audit_socket.parent
    service.mkdir(parents=True, exist_ok=True)
    _own(root, 0o710, gid=platform.workspace_data_gid)
    _own(proj, 0o710, gid=project_gid)
    _own(path, 0o750, gid=project_gid)
    _own(server, 0o700, uid=uid, gid=project_gid)
    _own(audit, 0o755)
    _own(service.parent, 0o710, gid=platform.workspace_data_gid)  # bwrap, as the member, passes through
    _own(service, 0o755)
    return path
