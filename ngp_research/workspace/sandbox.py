"""The local executor: a workspace plan carried out as a bubblewrap sandbox.

:func:`bwrap_argv` (pure) turns a plan into bubblewrap's command line;
:class:`LocalSandbox` starts it. The rules, each of which was measured to
matter on this kind of machine (see the workspaces issue):

- bwrap is never started by root: it runs as the member's own unprivileged
  host uid, in its own user namespace, with every capability dropped and
  further user namespaces disabled;
- it is started with a clean environment holding only what the workspace
  needs (``/proc/1/environ`` inside shows bwrap's own environment);
- its standard streams are pipes, never host files (``/proc/<pid>/fd``);
- own pid, ipc, uts, network and cgroup namespaces; the network namespace has
  only loopback, and allowed services are bridged in explicitly;
- exactly the tagged files are bound read-only at ``/data/...``; the root is
  an empty tmpfs remounted read-only; ``/proc/sys`` is read-only.
"""

import os
import shutil
import subprocess

from traitlets import Bool, Unicode, default
from traitlets.config import Configurable

from .limits import CgroupLimits, LimitsUnavailable
from .plan import MANIFEST_PATH, WorkspacePlan

#: Merged-/usr symlinks every Debian 12 root needs.
USR_SYMLINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64"))


def generated_files(plan: WorkspacePlan) -> dict:
    """Files the sandbox gets as content, not as host paths: passwd, group, hosts, the manifest."""
    passwd = (
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
        f"{plan.user}:x:{plan.uid}:{plan.gid}:{plan.user}:{plan.home}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\n{plan.project}:x:{plan.gid}:{plan.user}\nnogroup:x:65534:\n"
    hosts = f"127.0.0.1\tlocalhost {plan.hostname}\n::1\tlocalhost\n"
    return {
        "/etc/passwd": passwd.encode(),
        "/etc/group": group.encode(),
        "/etc/hosts": hosts.encode(),
        MANIFEST_PATH: plan.manifest_json(),
    }


def bwrap_argv(plan: WorkspacePlan, command, fds: dict, bwrap: str = "bwrap") -> list[str]:
    """bubblewrap's argument list for ``plan`` running ``command``.

    ``fds`` maps each path of :func:`generated_files` to an open file
    descriptor holding its content.

    Examples
    --------
    >>> from ngp_research.workspace.plan import Mount, WorkspacePlan
    >>> p = WorkspacePlan("alice", "cardio", 200001, 300001, (199999,), "ngp-cardio", "/home/alice", "/project",
    ...                   (Mount("/h/f.vcf.gz", "/data/syd/d/f.vcf.gz", False, "data"),), (), {})
    >>> argv = bwrap_argv(p, ["python3"], {})
    >>> i = argv.index("/h/f.vcf.gz")
    >>> argv[i - 1:i + 2]
    ['--ro-bind', '/h/f.vcf.gz', '/data/syd/d/f.vcf.gz']
    >>> "--share-net" in argv, argv[1:4]
    (False, ['--unshare-user', '--uid', '200001'])
    """
    a = [bwrap,
         "--unshare-user", "--uid", str(plan.uid), "--gid", str(plan.gid), "--disable-userns",
         "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try",
         "--die-with-parent", "--new-session", "--cap-drop", "ALL",
         "--hostname", plan.hostname]
    for m in plan.mounts:
        if m.kind not in ("data", "project", "home", "runtime"):
            a += ["--ro-bind", m.source, m.target]
    for target, link in USR_SYMLINKS:
        a += ["--symlink", target, link]
    a += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys",
          "--dev", "/dev", "--tmpfs", "/dev/shm", "--tmpfs", "/tmp", "--dir", "/data"]
    for m in plan.mounts:
        if m.kind == "data":
            a += ["--ro-bind", m.source, m.target]
        elif m.kind in ("project", "home", "runtime"):
            a += ["--bind" if m.writable else "--ro-bind", m.source, m.target]
    for target in sorted(fds):
        a += ["--perms", "0444", "--ro-bind-data", str(fds[target]), target]
    a += ["--remount-ro", "/", "--chdir", plan.workdir, "--"]
    a += list(command)
    return a


#: Joins the cgroups named in its arguments, then executes the rest: run as root, before privileges drop.
_JOIN_CGROUPS = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'


class LocalSandbox(Configurable):
    """Starts workspace plans as bubblewrap sandboxes on this host, within their resource limits."""

    bwrap = Unicode(help="Path of the bubblewrap executable.").tag(config=True)

    @default("bwrap")
    def _default_bwrap(self):
        return shutil.which("bwrap") or "/usr/bin/bwrap"

    setpriv = Unicode(help="Path of util-linux's setpriv, which drops root to the member's uid.").tag(config=True)

    @default("setpriv")
    def _default_setpriv(self):
        return shutil.which("setpriv") or "/usr/bin/setpriv"

    require_limits = Bool(
        True,
        help="Refuse to start a workspace whose CPU and memory limits cannot be enforced (no cgroups). "
        "Turn off only on a developer's machine.",
    ).tag(config=True)

    def command(self, plan: WorkspacePlan, command, fds: dict, cgroup_procs=()) -> list[str]:
        """The full command line: join the cgroups (as root), drop to the member's uid, start bwrap."""
        inner = bwrap_argv(plan, command, fds, bwrap=self.bwrap)
        if os.geteuid() != 0:
            return inner
        drop = [self.setpriv, f"--reuid={plan.uid}", f"--regid={plan.gid}",
                "--groups=" + ",".join(str(g) for g in plan.groups), "--"]
        return ["/bin/sh", "-c", _JOIN_CGROUPS, "ngp-join", str(len(cgroup_procs)), *cgroup_procs, *drop, *inner]

    def start(self, plan: WorkspacePlan, command, stdin=subprocess.DEVNULL, cgroup: str | None = None,
              **popen) -> subprocess.Popen:
        """Start ``command`` in the sandbox of ``plan``; stdout and stderr are pipes unless given.

        ``cgroup`` names the workspace's cgroup (limits from ``plan.profile``). The caller must be root
        (to become the member's uid) or already be that uid.
        """
        if os.geteuid() not in (0, plan.uid):
            raise PermissionError("the local sandbox is started by root (it drops to the member's uid) "
                                  f"or by uid {plan.uid} itself")
        if plan.uid == 0 or plan.gid == 0:
            raise PermissionError("a workspace never runs as root")
        procs = []
        if cgroup is not None:
            try:
                procs = CgroupLimits().create(cgroup, plan.profile)
            except LimitsUnavailable:
                if self.require_limits:
                    raise
        elif self.require_limits:
            raise LimitsUnavailable("start(): name the workspace's cgroup so its limits are enforced")
        fds = {}
        try:
            for target, content in generated_files(plan).items():
                fd = os.memfd_create(f"ngp{target.replace('/', '-')}")
                os.write(fd, content)
                os.lseek(fd, 0, os.SEEK_SET)
                fds[target] = fd
            return subprocess.Popen(
                self.command(plan, command, fds, procs),
                env=dict(plan.environment),
                pass_fds=tuple(fds.values()),
                stdin=stdin,
                stdout=popen.pop("stdout", subprocess.PIPE),
                stderr=popen.pop("stderr", subprocess.PIPE),
                cwd="/",
                start_new_session=True,
                umask=0o007,
                **popen,
            )
        finally:
            for fd in fds.values():
                os.close(fd)

    def run(self, plan: WorkspacePlan, command, input: bytes | None = None, timeout: float = 120,
            cgroup: str | None = None):
        """Run ``command`` to completion in the sandbox; returns (returncode, stdout, stderr)."""
        cgroup = cgroup or f"{plan.project}.{plan.user}.{os.getpid()}.{id(plan):x}"
        proc = self.start(plan, command, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          cgroup=cgroup)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, err = proc.communicate()
            raise
        finally:
            CgroupLimits().remove(cgroup)
        return proc.returncode, out, err


def prepare_areas(platform, plan: WorkspacePlan) -> None:
    """Create the host folders a plan binds, with their owners and modes (see :mod:`.areas`)."""
    from . import areas

    areas.secure_platform_home(platform)
    areas.project_area(platform, plan.project, plan.gid)
    areas.member_home(platform, plan.project, plan.user, plan.uid, plan.gid)
    if any(m.kind == "runtime" for m in plan.mounts):
        areas.runtime_area(platform, plan.project, plan.user, plan.uid, plan.gid)
