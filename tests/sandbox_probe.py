"""Escape attempts run INSIDE a workspace sandbox, with the standard library only.

Run as ``python3 -I -c "$(cat sandbox_probe.py)" PARAMS_JSON``. Prints one JSON
object: attempt name -> {"held": bool, "detail": str}. "held" means the
sandbox stopped the attempt (or showed only what it should).
"""

import ctypes
import errno
import json
import os
import socket
import sys

P = json.loads(sys.argv[1])
results = {}
libc = ctypes.CDLL(None, use_errno=True)


def attempt(name):
    def wrap(fn):
        try:
            held, detail = fn()
        except Exception as e:  # an attempt that raises was stopped, unless it says otherwise
            held, detail = True, f"{type(e).__name__}: {e}"
        results[name] = {"held": bool(held), "detail": str(detail)[:500]}
        return fn
    return wrap


def absent(path):
    try:
        os.stat(path)
        return False
    except OSError:
        return True


def cannot_open(path, mode="rb"):
    try:
        with open(path, mode) as f:
            f.read(1) if "r" in mode else f.write(b"x")
        return False, f"opened {path}"
    except OSError as e:
        return True, f"{path}: {e.strerror}"


@attempt("data_shows_exactly_the_tagged_files")
def _():
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk("/data") for f in fs)
    return found == sorted(P["tagged"]), found


@attempt("tagged_file_is_readable")
def _():
    with open(P["tagged"][0], "rb") as f:
        head = f.read(2)
    return head == b"\x1f\x8b", head


@attempt("untagged_datasets_are_absent")
def _():
    paths = P["untagged_workspace_paths"] + P["untagged_host_paths"]
    present = [p for p in paths if not absent(p)]
    return not present, present


@attempt("other_regions_areas_are_absent")
def _():
    present = [p for p in P["other_region_dirs"] if not absent(p)] + [p for p in P["untagged_region_data"] if
                                                                   not absent(p)]
    return not present, present


@attempt("platform_home_and_state_are_absent")
def _():
    present = [p for p in (P["ngp_home"], P["state_dir"], P["hub_db"], P["signing_key"]) if not absent(p)]
    return not present, present


@attempt("dotdot_does_not_leave_data")
def _():
    base = os.path.dirname(P["tagged"][0])
    tries = [base + "/../../../" + P["signing_key"].lstrip("/"), base + "/../../../../../../" + P["state_dir"]]
    opened = [t for t in tries if not cannot_open(t)[0] and not absent(t)]
    return not opened and absent("/data/../" + P["state_dir"].lstrip("/")), tries


@attempt("symlink_to_host_path_does_not_resolve")
def _():
    link = "/project/.probe-link"
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(P["untagged_host_paths"][0], link)
    held, detail = cannot_open(link)
    os.unlink(link)
    return held, detail


@attempt("proc_root_shows_only_the_sandbox")
def _():
    leaks = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        root = f"/proc/{pid}/root"
        for p in (P["ngp_home"], P["untagged_host_paths"][0], "/root"):
            if not absent(root + p):
                leaks.append(root + p)
    return not leaks, leaks


@attempt("proc_cwd_stays_inside")
def _():
    seen = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            seen[pid] = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            pass
    return all(not v.startswith(P["ngp_home"]) for v in seen.values()), seen


@attempt("proc_environ_holds_no_secrets")
def _():
    leaks = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        except OSError:
            continue
        for secret in P["secrets"]:
            if secret in env:
                leaks.append((pid, secret[:12]))
        for name in ("JPY_COOKIE_SECRET", "CONFIGPROXY_AUTH_TOKEN", "JUPYTERHUB_CRYPT_KEY", "NGP_DATABASE_URL"):
            if name + "=" in env:
                leaks.append((pid, name))
    return not leaks, leaks


@attempt("proc_fd_holds_no_host_files")
def _():
    bad = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith((P["ngp_home"], "/root", "/work", "/tmp/")) and not target.startswith("/tmp/."):
                bad.append((pid, fd, target))
            if P["host_log"] in target:
                bad.append((pid, fd, target))
    return not bad, bad


@attempt("only_sandbox_processes_are_visible")
def _():
    uids = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("Uid:"):
                    uids[pid] = line.split()[1]
        except OSError:
            pass
    return set(uids.values()) == {str(os.getuid())} and len(uids) < 10, uids


def syscall_fails(fn, *args):
    ctypes.set_errno(0)
    rc = fn(*args)
    err = ctypes.get_errno()
    return rc != 0, f"rc={rc} errno={errno.errorcode.get(err, err)}"


@attempt("mount_tmpfs_over_data_is_refused")
def _():
    return syscall_fails(libc.mount, b"none", b"/data", b"tmpfs", ctypes.c_ulong(0), None)


@attempt("remount_tagged_file_read_write_is_refused")
def _():
    MS_REMOUNT, MS_BIND = 32, 4096
    return syscall_fails(libc.mount, None, P["tagged"][0].encode(), None, ctypes.c_ulong(MS_REMOUNT | MS_BIND), None)


@attempt("umount_tagged_file_is_refused")
def _():
    return syscall_fails(libc.umount2, P["tagged"][0].encode(), 0)


@attempt("unshare_user_namespace_is_refused")
def _():
    return syscall_fails(libc.unshare, 0x10000000)  # CLONE_NEWUSER


@attempt("unshare_mount_namespace_is_refused")
def _():
    return syscall_fails(libc.unshare, 0x00020000)  # CLONE_NEWNS


@attempt("setns_into_pid1_mount_namespace_is_refused")
def _():
    fd = os.open("/proc/1/ns/mnt", os.O_RDONLY)
    try:
        return syscall_fails(libc.setns, fd, 0)
    finally:
        os.close(fd)


@attempt("ptrace_reaches_no_host_process")
def _():
    # Host processes are not in the sandbox's pid namespace: attaching to one (by its host pid) finds nothing.
    PTRACE_SEIZE, PTRACE_DETACH = 0x4206, 17
    outcomes = []
    for pid in P["host_pids"]:
        held, detail = syscall_fails(libc.ptrace, ctypes.c_long(PTRACE_SEIZE), pid, None, None)
        if not held:
            libc.ptrace(ctypes.c_long(PTRACE_DETACH), pid, None, None)
        outcomes.append((pid, held, detail))
    return all(o[1] for o in outcomes), outcomes


@attempt("no_capabilities_and_no_new_privileges")
def _():
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    caps = {k: status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    return all(int(v, 16) == 0 for v in caps.values()) and status["NoNewPrivs"].strip() == "1", caps


@attempt("not_root_inside")
def _():
    return os.getuid() == P["uid"] and os.geteuid() != 0, (os.getuid(), os.geteuid())


@attempt("setuid_file_in_project_gives_nothing")
def _():
    path = "/project/.probe-suid"
    with open(path, "w") as f:
        f.write("#!/bin/sh\nid\n")
    os.chmod(path, 0o4755)
    st = os.stat(path)
    mounts = [line.split() for line in open("/proc/self/mountinfo")]
    project_opts = [m[5] for m in mounts if m[4] == "/project"]
    return st.st_uid == os.getuid() and all("nosuid" in o for o in project_opts), (st.st_uid, project_opts)


@attempt("proc_sys_is_read_only")
def _():
    return cannot_open("/proc/sys/kernel/core_pattern", "wb")


@attempt("host_shared_memory_is_invisible")
def _():
    shm = os.listdir("/dev/shm")
    libc.shmget.restype = ctypes.c_int
    rc = libc.shmget(P["sysv_key"], 0, 0)
    return shm == [] and rc == -1, (shm, rc)


@attempt("host_sysv_ipc_is_invisible")
def _():
    text = open("/proc/sysvipc/shm").read().splitlines()[1:]
    return not text, text


@attempt("host_homes_and_jupyter_runtime_are_absent")
def _():
    present = [p for p in ("/root", "/root/.local/share/jupyter/runtime", "/work", P["other_home"]) if not absent(p)]
    home_entries = os.listdir("/home")
    return not present and home_entries == [P["user"]], (present, home_entries)


@attempt("system_paths_are_read_only")
def _():
    tries = ["/usr/.probe", "/etc/.probe", "/usr/share/jupyter/kernels/.probe", "/.probe", P["python_env"] + "/.probe"]
    written = [t for t in tries if not cannot_open(t, "wb")[0]]
    return not written, written


@attempt("tagged_data_is_read_only")
def _():
    tries = [cannot_open(P["tagged"][0], "ab"), cannot_open(os.path.dirname(P["tagged"][0]) + "/new", "wb"),
             cannot_open("/data/new", "wb")]
    try:
        os.chmod(P["tagged"][0], 0o666)
        tries.append((False, "chmod worked"))
    except OSError as e:
        tries.append((True, e.strerror))
    try:
        os.rename(P["tagged"][0], P["tagged"][0] + ".x")
        tries.append((False, "rename worked"))
    except OSError as e:
        tries.append((True, e.strerror))
    return all(t[0] for t in tries), tries


@attempt("hard_link_of_tagged_file_is_refused")
def _():
    try:
        os.link(P["tagged"][0], "/project/.probe-hardlink")
        return False, "linked"
    except OSError as e:
        return True, e.strerror


@attempt("host_loopback_services_are_unreachable")
def _():
    reached = []
    for port in P["host_ports"]:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", port))
            reached.append(port)
        except OSError:
            pass
        finally:
            s.close()
    return not reached, reached


@attempt("mountinfo_names_no_other_dataset_or_project")
def _():
    text = open("/proc/self/mountinfo").read()
    leaks = [n for n in P["foreign_names"] if n in text]
    return not leaks, leaks


@attempt("devices_are_minimal")
def _():
    devs = sorted(os.listdir("/dev"))
    bad = [d for d in devs if d.startswith(("sd", "vd", "nvme", "mem", "kmem", "port", "loop", "dm-"))]
    return not bad, devs


@attempt("other_projects_area_is_absent")
def _():
    present = [p for p in P["other_project_paths"] if not absent(p)]
    return not present and P["project_marker"] in os.listdir("/project"), (present, os.listdir("/project"))


@attempt("manifest_lists_the_tagged_datasets")
def _():
    m = json.load(open("/etc/ngp/workspace.json"))
    paths = sorted(f["path"] for d in m["datasets"] for f in d["files"])
    return paths == sorted(P["tagged"]) and m["project"] == P["project"], m["project"]


@attempt("home_and_project_are_writable")
def _():
    for path in (f"/home/{P['user']}/.probe", "/project/.probe-written"):
        with open(path, "w") as f:
            f.write("ok")
    return True, "written"


print(json.dumps(results))
