"""The local workspace sandbox, attacked from inside.

One real bubblewrap sandbox is started for alice's cardio-gwas workspace on a
seeded demo platform, and ``sandbox_probe.py`` tries to escape from inside it.
Each attempt is its own assertion. Host-side checks follow.

Needs root (the executor drops to the member's uid) and bubblewrap, both of
which `make test` provides in CI.
"""

import ctypes
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from ngp_research.catalog import Catalog
from ngp_research.demo.seed import seed_demo
from ngp_research.platform import Platform
from ngp_research.workspace import WorkspaceRefused, plan_for
from ngp_research.workspace.sandbox import LocalSandbox, bwrap_argv, prepare_areas

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                                reason="the sandbox tests need root and bubblewrap (make test installs it)")

PROBE = (Path(__file__).with_name("sandbox_probe.py")).read_text()

ATTEMPTS = [
    "data_shows_exactly_the_tagged_files", "tagged_file_is_readable", "untagged_datasets_are_absent",
    "other_regions_areas_are_absent", "platform_home_and_state_are_absent", "dotdot_does_not_leave_data",
    "symlink_to_host_path_does_not_resolve", "proc_root_shows_only_the_sandbox", "proc_cwd_stays_inside",
    "proc_environ_holds_no_secrets", "proc_fd_holds_no_host_files", "only_sandbox_processes_are_visible",
    "mount_tmpfs_over_data_is_refused", "remount_tagged_file_read_write_is_refused",
    "umount_tagged_file_is_refused", "unshare_user_namespace_is_refused", "unshare_mount_namespace_is_refused",
    "setns_into_pid1_mount_namespace_is_refused", "ptrace_reaches_no_host_process",
    "no_capabilities_and_no_new_privileges", "not_root_inside", "setuid_file_in_project_gives_nothing",
    "proc_sys_is_read_only", "host_shared_memory_is_invisible", "host_sysv_ipc_is_invisible",
    "host_homes_and_jupyter_runtime_are_absent", "system_paths_are_read_only", "tagged_data_is_read_only",
    "hard_link_of_tagged_file_is_refused", "host_loopback_services_are_unreachable",
    "mountinfo_names_no_other_dataset_or_project", "devices_are_minimal", "other_projects_area_is_absent",
    "manifest_lists_the_tagged_datasets", "home_and_project_are_writable",
]


@pytest.fixture(scope="module")
def world():
    base = tempfile.mkdtemp(prefix="ngp-sandbox-")
    os.chmod(base, 0o711)  # the member's uid must reach $NGP_HOME's gate, nothing more
    platform = Platform(home=os.path.join(base, "ngp"))
    seed_demo(platform, samples_per_region=5, variants=60)
    catalog = Catalog.open(platform)
    plan = plan_for(catalog, "alice", "cardio-gwas")
    other = plan_for(catalog, "alice", "rare-disease")
    prepare_areas(platform, plan)
    prepare_areas(platform, other)
    (platform.projects_dir / "rare-disease" / "shared" / "other-project-secret.txt").write_text("not ours")
    (platform.projects_dir / "cardio-gwas" / "shared" / "README-project.txt").write_text("cardio-gwas area")
    (platform.state_dir / "jupyterhub.sqlite").write_bytes(b"hub db")
    log = open(platform.state_dir / "hub.log", "a")
    os.set_inheritable(log.fileno(), True)  # a careless spawner would hand this to the sandbox

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    shm_file = Path(f"/dev/shm/ngp-host-{os.getpid()}")
    shm_file.write_bytes(b"host shm")
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x6E67 << 8 | (os.getpid() & 0xFF)
    shmid = libc.shmget(key, 4096, 0o1000 | 0o600)  # IPC_CREAT

    secrets_in_env = {"JPY_COOKIE_SECRET": secrets.token_hex(16), "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16),
                      "NGP_TEST_CANARY": secrets.token_hex(16)}
    saved = {k: os.environ.get(k) for k in secrets_in_env}
    os.environ.update(secrets_in_env)

    tagged = sorted(m.target for m in plan.data_files)
    untagged = [d for d in catalog.datasets() if d.name not in {m.target.split("/")[3] for m in plan.data_files}]
    params = {
        "tagged": tagged,
        "uid": plan.uid,
        "user": "alice",
        "project": "cardio-gwas",
        "untagged_workspace_paths": [f"/data/{d.region.name}/{d.name}" for d in untagged],
        "untagged_host_paths": [str(platform.dataset_dir(d.region.name, d.name) / d.files[0].name)
                                for d in untagged],
        "other_region_dirs": [str(platform.regions_dir), str(platform.region_area("vast"))],
        "untagged_region_data": ["/data/vast", "/data/orebro", "/data/ost"],
        "ngp_home": str(platform.home_path),
        "state_dir": str(platform.state_dir),
        "hub_db": str(platform.state_dir / "jupyterhub.sqlite"),
        "signing_key": str(platform.keys_dir / "audit-signing.key"),
        "secrets": list(secrets_in_env.values()),
        "host_log": str(platform.state_dir / "hub.log"),
        "sysv_key": key,
        "other_home": str(platform.projects_dir / "cardio-gwas" / "home" / "bob"),
        "python_env": "/usr/lib/python3",
        "host_ports": [listener.getsockname()[1]],
        "host_pids": [os.getpid(), os.getppid()],
        "foreign_names": ["vast-cohort", "orebro-cohort", "ost-cohort", "rare-disease", "legacy-study"],
        "other_project_paths": [str(platform.projects_dir / "rare-disease"), "/project/../rare-disease"],
        "project_marker": "README-project.txt",
    }
    digests = {m.target: hashlib.sha256(Path(m.source).read_bytes()).hexdigest() for m in plan.data_files}
    try:
        code, out, err = LocalSandbox().run(plan, ["/usr/bin/python3", "-I", "-c", PROBE, json.dumps(params)],
                                         timeout=60)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        listener.close()
        shm_file.unlink()
        if shmid >= 0:
            libc.shmctl(shmid, 0, None)  # IPC_RMID
        log.close()
    assert code == 0, err.decode()
    yield {"results": json.loads(out), "plan": plan, "platform": platform, "catalog": catalog, "digests": digests}
    catalog.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("name", ATTEMPTS)
def test_escape_attempt_is_stopped(world, name):
    result = world["results"].get(name)
    assert result is not None, f"the probe did not run {name}"
    assert result["held"], result["detail"]


def test_every_probe_attempt_is_asserted(world):
    assert sorted(world["results"]) == sorted(ATTEMPTS)


def test_tagged_files_are_unchanged_on_the_host(world):
    for m in world["plan"].data_files:
        assert hashlib.sha256(Path(m.source).read_bytes()).hexdigest() == world["digests"][m.target]


def test_files_written_inside_belong_to_the_member_and_the_project(world):
    shared = world["platform"].projects_dir / "cardio-gwas" / "shared"
    plan = world["plan"]
    for name in (".probe-written", ".probe-suid"):
        st = (shared / name).stat()
        assert (st.st_uid, st.st_gid) == (plan.uid, plan.gid)
        assert st.st_uid != 0
    home = world["platform"].projects_dir / "cardio-gwas" / "home" / "alice"
    assert (home / ".probe").stat().st_uid == plan.uid
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_host_folders_are_gated(world):
    p = world["platform"]
    assert stat.S_IMODE(p.state_dir.stat().st_mode) == 0o700
    st = p.home_path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, p.workspace_data_gid)


def test_distinct_users_get_distinct_uids_and_projects_distinct_gids(world):
    catalog = world["catalog"]
    uids = {catalog.workspace_identity(u, "cardio-gwas")[0] for u in ("alice", "lars", "clara")}
    gids = {catalog.workspace_identity("alice", p)[1] for p in ("cardio-gwas", "rare-disease")}
    assert len(uids) == 3 and len(gids) == 2 and min(uids) >= 200000


@pytest.mark.parametrize("user, project, reason", [
    ("bob", "cardio-gwas", "bob is not a member"),
    ("alice", "legacy-study", "expired on 2023-12-31"),
    ("mallory", "cardio-gwas", "mallory is not a member"),
])
def test_refused_workspaces_are_never_planned(world, user, project, reason):
    with pytest.raises(WorkspaceRefused, match=reason):
        plan_for(world["catalog"], user, project)


def test_bwrap_is_never_started_as_root(world):
    argv = bwrap_argv(world["plan"], ["true"], {})
    assert "--share-net" not in argv and "--unshare-net" in argv and "--disable-userns" in argv
    assert argv[argv.index("--uid") + 1] != "0"


def test_ngp_workspace_run_and_plan_from_the_command_line(world):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("NGP_")}
    env["NGP_HOME"] = str(world["platform"].home_path)
    ngp = [sys.executable, "-m", "ngp_research.cli"]
    p = subprocess.run(ngp + ["workspace", "run", "cardio-gwas", "--user", "alice", "--", "/bin/sh", "-c",
                              "id -un; ls /data"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["alice", "norr", "stockholm", "syd", "uppsala"]
    run = world["catalog"].audit.records(action="workspace.run")[-1]
    assert run.project == "cardio-gwas" and run.detail["as_user"] == "alice"
    assert run.detail["command"] == ["/bin/sh", "-c", "id -un; ls /data"]
    p = subprocess.run(ngp + ["workspace", "run", "cardio-gwas", "--user", "bob", "--", "true"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "bob is not a member of project 'cardio-gwas'" in p.stderr
    p = subprocess.run(ngp + ["project", "profile", "cardio-gwas", "--cpu", "2", "--memory", "3G",
                              "--idle-timeout", "1800", "--as", "alice"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "alice is not the lead" in p.stderr
    p = subprocess.run(ngp + ["project", "profile", "cardio-gwas", "--cpu", "2", "--memory", "3G",
                              "--idle-timeout", "1800", "--as", "lars"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(ngp + ["workspace", "plan", "cardio-gwas", "--user", "alice", "--json"], env=env,
                       capture_output=True, text=True)
    plan = json.loads(p.stdout)
    assert plan["profile"] == {"cpu": 2.0, "memory": "3G", "idle_timeout": 1800}
    assert {m["target"] for m in plan["mounts"] if m["kind"] == "data"} == {m.target for m in
                                                                             world["plan"].data_files}
    p = subprocess.run(ngp + ["project", "profile", "cardio-gwas", "--memory", "lots", "--as", "lars"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "memory: 'lots' is not a size" in p.stderr


def test_memory_limit_is_enforced(world):
    import dataclasses

    from ngp_research.workspace import Profile
    from ngp_research.workspace.limits import CgroupLimits

    plan = dataclasses.replace(world["plan"], profile=Profile(cpu=1, memory="128M"))
    hog = "a = bytearray(512 * 1024 * 1024); a[::4096] = b'x' * len(a[::4096]); print('allocated')"
    limits = CgroupLimits()
    name = "test-memory-limit"
    proc = LocalSandbox().start(plan, ["/usr/bin/python3", "-I", "-c", hog], cgroup=name)
    out, _ = proc.communicate(timeout=120)
    failures = limits.memory_failures(name)
    limits.remove(name)
    assert proc.returncode != 0 and b"allocated" not in out
    assert failures > 0


def test_cpu_and_process_limits_are_set_for_the_whole_sandbox(world):
    import dataclasses

    from ngp_research.workspace import Profile
    from ngp_research.workspace.limits import CgroupLimits

    plan = dataclasses.replace(world["plan"], profile=Profile(cpu=0.5, memory="256M"))
    limits = CgroupLimits()
    name = "test-cpu-limit"
    proc = LocalSandbox().start(plan, ["/bin/sleep", "60"], cgroup=name)
    try:
        layout = limits.layout()
        if layout == "v1":
            group = limits.root / "cpu" / limits.prefix / name
            assert (group / "cpu.cfs_quota_us").read_text().strip() == "50000"
            pids_group = limits.root / "pids" / limits.prefix / name
            assert (pids_group / "pids.max").read_text().strip() == "1024"
        else:
            group = limits.root / limits.prefix / name
            assert (group / "cpu.max").read_text().split() == ["50000", "100000"]
        for _ in range(100):  # wait until bwrap has started the command inside
            members = {int(p) for p in (group / "cgroup.procs").read_text().split()}
            if len(members) >= 3:
                break
            time.sleep(0.05)
        assert proc.pid in members and len(members) >= 3  # bwrap, its init and the command: all counted
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        time.sleep(0.2)
        limits.remove(name)


def test_limits_are_required_by_default(world):
    from ngp_research.workspace.limits import LimitsUnavailable

    with pytest.raises(LimitsUnavailable, match="name the workspace's cgroup"):
        LocalSandbox().start(world["plan"], ["true"])


def test_a_platform_home_workspaces_cannot_reach_is_refused_clearly():
    from ngp_research.workspace.areas import check_reachable

    base = Path(tempfile.mkdtemp(prefix="ngp-reach-"))
    try:
        os.chmod(base, 0o711)
        check_reachable(base / "ngp")  # every folder above is searchable
        private = base / "private"
        private.mkdir(mode=0o700)
        with pytest.raises(PermissionError, match=f"{private} is not searchable by other users"):
            check_reachable(private / "ngp")
    finally:
        shutil.rmtree(base)


def test_the_audit_services_folder_is_bound_read_only_even_under_a_strict_umask(tmp_path):
    """The hub and the service may run with umask 077: the folders on the way to the service's socket still
    get the modes bubblewrap, running as the member, needs to bind it, and inside it is read-only."""
    from ngp_research.audit.service import listen_unix

    base = tempfile.mkdtemp(prefix="ngp-umask-")
    os.chmod(base, 0o711)
    old = os.umask(0o077)
    try:
        platform = Platform(home=os.path.join(base, "ngp"))
        seed_demo(platform, samples_per_region=3, variants=20)
        catalog = Catalog.open(platform)
        listener = listen_unix(str(platform.audit_socket))  # the service first, under the same umask
        plan = plan_for(catalog, "alice", "cardio-gwas", runtime=True)
        prepare_areas(platform, plan)
    finally:
        os.umask(old)
    try:
        run = platform.audit_socket.parent.parent
        assert (stat.S_IMODE(run.stat().st_mode), run.stat().st_gid) == (0o710, platform.workspace_data_gid)
        assert stat.S_IMODE(platform.audit_socket.parent.stat().st_mode) == 0o755
        code, out, err = LocalSandbox().run(plan, ["/usr/bin/python3", "-I", "-c", (
            "import os, socket\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect('/run/ngp/audit/audit.sock')\n"
            "try:\n"
            "    open('/run/ngp/audit/planted', 'w')\n"
            "except OSError as e:\n"
            "    print('refused', e.strerror)\n"
            "print(sorted(os.listdir('/run/ngp/audit')))\n")])
        out = out.decode()
        assert code == 0, err
        assert "refused Read-only file system" in out and "['audit.sock']" in out, out
    finally:
        listener.close()
        catalog.close()
        shutil.rmtree(base, ignore_errors=True)
