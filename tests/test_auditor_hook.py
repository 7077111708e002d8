"""The kernel's audit hook in-process: the C hot path records what the Python hook records.

``ngp_research.kernel.auditor.install`` adds an audit hook that cannot be removed, so each case runs
in a fresh interpreter (the project's venv python) with a small HTTP collector in the same process
standing in for the audit service. The same operations run once with the C hook
(``ngp_research.kernel._hook``, built by ``setup.py``) and once with the Python hook alone; the
records must be the same, in the same order.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ngp_research.workspace.environment import default_workspace_env, is_built

PRELUDE = r'''
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ngp_research.kernel.auditor as auditor

received = []
sizes = []

class Collector(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        sizes.append(len(raw))
        if len(raw) > 16 * 1024 * 1024:  # as the audit service refuses one
            self.send_response(400)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        body = json.loads(raw)
        n = 0
        for r in body["records"]:
            for p in r.pop("paths", None) or [r.get("path")]:
                received.append({**r, "path": p})
                n += 1
        out = json.dumps({"acknowledged": n}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
threading.Thread(target=server.serve_forever, daemon=True).start()
URL = f"http://127.0.0.1:{server.server_address[1]}/"
if os.environ["HOOK"] == "python":
    auditor._hook = None
elif os.environ["HOOK"] == "c-python-sender":  # the C hook, records delivered by the Python sender
    import functools
    auditor.install = functools.partial(auditor.install, sender_c=False)
'''


def run_case(body: str, hook: str, tmp_path, python=sys.executable) -> dict:
    code = PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "HOOK": hook, "D": str(tmp_path)}
    proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


OPERATIONS = r'''
a = auditor.install(URL, "tok", linger=0.001)
d = os.environ["D"]
a.begin("m1", "c1")
for i in range(3):
    with open(os.path.join(d, f"f{i}.txt"), "w") as f:
        f.write("x")
with open(d + "/sub/../f0.txt") as f:  # not a plain path: normalised by the Python side
    pass
with open(os.fsencode(d + "/f1.txt"), "rb") as f:  # bytes (FileIO raises the event with mode "r")
    pass
os.chdir(d)
with open("f2.txt") as f:  # relative
    pass
os.close(os.open(d + "/f0.txt", os.O_RDONLY))
os.listdir(d)
detail = {"library": "pysam", "contig": "chr1", "start": 1}
sys.audit("ngp.data.open", d + "/f1.txt", detail)  # as the pysam/Hail wrappers raise it
detail["contig"] = "changed later"  # the record keeps what was passed
sys.audit("ngp.data.open", "f2.txt", {"library": "hail"})  # relative: made absolute by the Python side
with open(sys.prefix + "/pyvenv.cfg") as f:  # the kernel's own environment: not recorded
    pass
a.begin("m2", None)
for i in range(3):
    with open(os.path.join(d, f"f{i}.txt")) as f:
        pass
assert a.flush(10) is None
mine = [r for r in received if (r.get("path") or "").startswith(d) or r["action"] == "file.list"]
stats = a.stats()
print(json.dumps({"records": mine, "stats": stats, "all_paths": [r.get("path") for r in received]}))
'''


@pytest.fixture
def files(tmp_path):
    (tmp_path / "sub").mkdir()
    return tmp_path


def test_the_c_hook_records_exactly_what_the_python_hook_records(files):
    c = run_case(OPERATIONS, "c", files)
    py = run_case(OPERATIONS, "python", files)
    c_list = run_case(OPERATIONS, "c-python-sender", files)
    assert (c["stats"]["hook"], c["stats"]["sender"]) == ("c", "c")
    assert (py["stats"]["hook"], py["stats"]["sender"]) == ("python", "python")
    assert (c_list["stats"]["hook"], c_list["stats"]["sender"]) == ("c", "python")
    assert c["records"] == py["records"] == c_list["records"]
    d = str(files)
    opens = [(r["path"], r["detail"]["mode"], r["detail"]["msg_id"], r["detail"]["cell_id"])
             for r in c["records"] if r["action"] == "file.open"]
    assert opens == [(f"{d}/f{i}.txt", "w", "m1", "c1") for i in range(3)] + [
        (f"{d}/f0.txt", "r", "m1", "c1"), (f"{d}/f1.txt", "r", "m1", "c1"), (f"{d}/f2.txt", "r", "m1", "c1"),
        (f"{d}/f0.txt", None, "m1", "c1")] + [(f"{d}/f{i}.txt", "r", "m2", None) for i in range(3)]
    assert [r["path"] for r in c["records"] if r["action"] == "file.list"] == [d]
    data = [(r["path"], r["detail"]) for r in c["records"] if r["action"] == "data.open"]
    assert data == [(f"{d}/f1.txt", {"library": "pysam", "contig": "chr1", "start": 1, "msg_id": "m1", "cell_id": "c1"}),
                    (f"{d}/f2.txt", {"library": "hail", "msg_id": "m1", "cell_id": "c1"})]
    assert not any(p and p.endswith("pyvenv.cfg") for p in c["all_paths"])


STARTED_ON_DATA = r'''
import subprocess, tempfile
datasets = {"syd": ["syd-cohort", "syd-rna"], "norr": ["norr-cohort"], "uppsala": ["uppsala-cohort"],
            "vast": ["vast-cohort"]}
a = auditor.install(URL, "tok", linger=0.001, datasets=datasets)
d = os.environ["D"]
a.begin("m1", "c1")
subprocess.run(["true", "/data/syd/syd-cohort/syd-phenopackets.json", "--out=" + d + "/o.txt"])
subprocess.run("true < /data/norr/norr-cohort/norr-cohort.vcf.gz | true", shell=True)
os.system("true '/project/../data/uppsala/uppsala-cohort/u.json'")
subprocess.run(["true", "x.vcf.gz"], cwd="/")  # a relative word that does not mention data: names nothing
subprocess.run(["true", "-i/data/vast/vast-cohort/v.json"] + [f"/data/made/up{i}" for i in range(300)])
subprocess.run(["ls", "/data/syd/syd-*"])  # a glob: each mounted dataset it matches
gone = tempfile.mkdtemp()
os.chdir(gone)
os.rmdir(gone)  # a removed working folder: absolute paths still count
os.system("true /data/norr/norr-cohort/again.vcf.gz")
os.chdir("/")
a.flush(10)
os.spawnv(os.P_WAIT, "/bin/true", ["true", "../data/uppsala/uppsala-cohort/w.json"])  # read from the cwd
a.flush(10)
subprocess.run(["true"], env={"IN": "/data/norr/norr-cohort/e.vcf"})  # cat $IN: its environment counts
os.environ["VCF"] = "/data/syd/syd-rna/r.vcf"
os.system("true $VCF")  # the kernel's own environment, inherited
del os.environ["VCF"]
class Sneaky:
    def __fspath__(self):
        return "/data/syd/syd-cohort/f"
try:
    subprocess.run(["cat", Sneaky()])
    refused = False
except auditor.AuditUnavailable:
    refused = True
assert a.flush(10) is None
print(json.dumps({"records": [r for r in received if r["action"] == "process.exec"], "stats": a.stats(),
                  "refused": refused}))
'''


@pytest.mark.parametrize("hook", ["c", "python"])
def test_a_program_started_on_a_dataset_is_recorded_under_that_dataset(files, hook):
    """``cat /data/...`` in a subprocess opens the file where Python cannot see it: the program's start is
    also recorded under each dataset its arguments or shell command name, for the cell."""
    out = run_case(STARTED_ON_DATA, hook, files)
    named = sorted((r["path"], r["detail"]["named"], r["detail"]["msg_id"]) for r in out["records"]
                   if "named" in r["detail"])
    assert named == sorted([("/data/syd/syd-cohort/syd-phenopackets.json", "argument", "m1"),
                            ("/data/norr/norr-cohort/norr-cohort.vcf.gz", "argument", "m1"),
                            ("/data/uppsala/uppsala-cohort/u.json", "argument", "m1"),
                            ("/data/vast/vast-cohort/v.json", "argument", "m1"),
                            ("/data/syd/syd-cohort", "argument", "m1"), ("/data/syd/syd-rna", "argument", "m1"),
                            ("/data/norr/norr-cohort/again.vcf.gz", "argument", "m1"),
                            ("/data/uppsala/uppsala-cohort/w.json", "argument", "m1")]
                           + [(f"/data/made/up{i}", "argument", "m1") for i in range(16)]  # a few attempts kept
                           + [("/data/norr/norr-cohort/e.vcf", "argument", "m1"),
                              ("/data/syd/syd-rna/r.vcf", "argument", "m1")])
    programs = [r for r in out["records"] if "named" not in r["detail"] and r["detail"]["event"] != "os.fork"]
    assert len(programs) == 10 and all(r["detail"]["msg_id"] == "m1" for r in programs)  # os.spawnv forks too
    assert programs[0]["detail"]["argv"][1] == "/data/syd/syd-cohort/syd-phenopackets.json"
    assert out["refused"] and out["stats"]["errors"] == 0  # a path-like that could name another path: refused


def test_a_forked_child_delivers_each_record_before_its_open(files):
    """A child of ``os.fork`` has no sender thread and may leave with ``os._exit`` at once: each of its
    records is delivered before its access happens, on its own connection."""
    body = r'''
    a = auditor.install(URL, "tok", linger=0.001)
    d = os.environ["D"]
    a.begin("m-fork", "c-fork")
    for i in range(3):
        open(d + f"/before-{i}.txt", "w").close()  # pending in the parent at the fork: the parent's to deliver
    pid = os.fork()
    if pid == 0:
        n = len(received)  # the collector thread is gone here; the parent's collector still counts
        with open(d + "/child.txt", "w") as f:
            f.write("x")
        os._exit(0)  # no atexit, no flush: the record must already be delivered
    os.waitpid(pid, 0)
    with open(d + "/parent.txt", "w") as f:
        f.write("x")
    assert a.flush(10) is None
    print(json.dumps({"records": [(r["action"], r.get("path"), (r.get("detail") or {}).get("msg_id"))
                                  for r in received], "hook": a.stats()["hook"]}))
    '''
    for hook in ("c", "c-python-sender", "python"):
        out = run_case(body, hook, files)
        assert out["hook"] == hook.split("-")[0]
        paths = [p for _, p, _ in out["records"]]
        assert ["process.exec", None, "m-fork"] in out["records"]  # os.fork
        assert [f"{files}/child.txt", f"{files}/parent.txt"] == [p for p in paths if p and p.endswith(("child.txt",
                                                                                                       "parent.txt"))]
        assert ["file.open", f"{files}/child.txt", "m-fork"] in out["records"]
        assert sorted(p for p in paths if p and "/before-" in p) == [f"{files}/before-{i}.txt" for i in range(3)]


def test_a_connect_says_when_its_statements_databases_are_not_watched(files):
    """Where SQLite's VFSes cannot be wrapped (here: the Python hook alone), ATTACH and VACUUM INTO open files
    unrecorded; the connection's record says so, instead of the kernel's docstring being silently untrue."""
    body = r'''
    import sqlite3
    a = auditor.install(URL, "tok", linger=0.001)
    d = os.environ["D"]
    sqlite3.connect(d + "/db.sqlite").close()
    assert a.flush(10) is None
    print(json.dumps({"records": [r for r in received if r.get("path") == d + "/db.sqlite"], "stats": a.stats()}))
    '''
    for hook, watched in (("c", True), ("python", False)):
        out = run_case(body, hook, files)
        (rec,) = [r for r in out["records"] if r["detail"]["event"] == "sqlite3.connect"]
        assert ("statements" not in rec["detail"]) is watched, (hook, rec)


def test_with_the_buffer_full_and_no_service_an_open_is_refused(files):
    body = r'''
    a = auditor.install("http://127.0.0.1:9/", "tok", capacity=5, timeout=0.2)
    d = os.environ["D"]
    opened, refused = 0, None
    for i in range(20):
        try:
            with open(f"{d}/f{i}.txt", "w") as f:
                f.write("x")
            opened += 1
        except PermissionError as e:
            refused = str(e)
            break
    print(json.dumps({"opened": opened, "refused": refused, "exists": os.path.exists(f"{d}/f{opened}.txt"),
                      "stats": a.stats()}))
    '''
    for hook in ("c", "c-python-sender", "python"):
        out = run_case(body, hook, files)
        assert out["stats"]["hook"] == hook.split("-")[0]
        assert out["opened"] <= 5 and "audit buffer full" in out["refused"], out
        assert not out["exists"]  # the refused open did not happen
        assert out["stats"]["blocked"]


def test_records_piled_up_past_the_services_request_limit_are_delivered(files):
    """After an outage a kernel's buffer can hold far more than the service takes in one request
    (16 MiB): long records are cut to a deliverable size and requests split, with each hook and sender,
    so that no record is lost and none blocks delivery for good."""
    body = r"""
    import subprocess
    a = auditor.install(URL, "tok", linger=3600, batch=10**6, capacity=100000)
    d = os.environ["D"]
    a.begin("m1", "c1")
    for i in range(1000):  # ~24 kB of JSON each once escaped: ~24 MB waiting
        try:
            open(d + "/odd-" + "\x01" * (4000 - len(d)) + str(i))
        except OSError:
            pass
    try:
        open(d + "/long-" + "b" * 9000)
    except OSError:
        pass
    try:
        subprocess.run(["true"] + ["c" * 100000] * 40)
    except OSError:
        pass
    # A working folder deeper than PATH_MAX, and a short relative path out of it through /proc/self/root
    # (which the kernel does not normalise): what is recorded is where it leads, not a cut path.
    with open(d + "/target.txt", "w") as f:
        f.write("x")
    os.chdir(d)
    for i in range(20):  # one step at a time: the whole path is too long for mkdir
        os.makedirs("q" * 250, exist_ok=True)
        os.chdir("q" * 250)
    with open("../" * 40 + "proc/self/root" + os.path.realpath(d) + "/target.txt") as f:
        pass
    # forged events, each over the service's limit in one part or another
    sys.audit("ngp.data.open", d + "/forged", {str(i): "v" * 4096 for i in range(4500)})
    sys.audit("ngp.data.open", d + "/forged", {"event": "e" * 17_000_000})
    sys.audit("ngp.data.open", d + "/forged", {"k" * 17_000_000: 1})
    sys.audit("open", d + "/forged", "r" * 17_000_000, 0)
    sys.audit("ngp.data.open", d + "/forged", {f"{i:x}": 10 ** 4000 for i in range(5000)})  # 20 MB of digits
    sys.audit("ngp.data.open", d + "/forged", {1: "v" * 17_000_000})  # a key that is not a str
    a.begin("m" * 17_000_000, "c" * 17_000_000)
    with open(d + "/ids.txt", "w") as f:
        pass
    a.begin("m1", "c1")
    try:
        __import__("ngp_research.kernel" + "x" * 17_000_000)
    except ImportError:
        pass
    reason = a.flush(60)
    forged = [r for r in received if r.get("path") == d + "/forged"]
    tampered = [r for r in received if r["action"] == "audit.tamper"]
    long_ids = [r for r in received if r.get("path") == d + "/ids.txt"]
    target = [r for r in received if r.get("path") == os.path.realpath(d) + "/target.txt" and r["detail"].get("mode") == "r"]
    odd = sorted(int(r["path"].rsplit("\x01", 1)[1]) for r in received if "/odd-" in (r.get("path") or ""))
    long = [r for r in received if "/long-" in (r.get("path") or "")]
    execs = [r for r in received if r["action"] == "process.exec" and "cut" in r["detail"]]
    print(json.dumps({"reason": reason, "odd": odd, "long": long, "execs": execs, "sizes": sizes, "stats": a.stats(),
                      "target": target, "forged": len(forged), "tampered": len(tampered),
                      "long_ids": [(len(r["detail"]["msg_id"]), len(r["detail"]["cell_id"])) for r in long_ids]}))
    """
    for hook in ("c", "c-python-sender", "python"):
        out = run_case(body, hook, files)
        assert out["reason"] is None, (hook, out["reason"])
        assert out["odd"] == list(range(1000)), hook
        assert max(out["sizes"]) <= 16 * 1024 * 1024 and len(out["sizes"]) > 2, (hook, out["sizes"])
        [long] = out["long"]
        assert long["detail"]["cut"] == f"the path was {len(str(files)) + 9006} characters", hook
        assert long["path"].startswith(f"{files}/long-bbb") and "…[cut: " in long["path"]
        [ex] = out["execs"]
        assert ex["detail"]["event"] == "subprocess.Popen" and ex["detail"]["detail_head"].startswith('{"event"')
        assert len(out["target"]) == 1, hook
        assert out["forged"] == 6 and out["tampered"] == 1, hook
        assert len(out["long_ids"]) == 1 and max(out["long_ids"][0]) < 300, hook


def test_a_path_through_the_working_folder_or_an_open_folder_is_recorded_where_it_leads(files):
    """``/proc/self/cwd/x``, ``/proc/self/fd/N/x`` and ``/dev/fd/N/x`` open what the process's working folder
    or open folder holds: only the process can say where that is, so the kernel sends the path it leads to
    (the service could only flag the path as leading it does not know where)."""
    body = r"""
    a = auditor.install(URL, "tok", linger=0.001)
    d = os.path.realpath(os.environ["D"])
    for n in ("x.txt", "y.txt", "z.txt"):
        with open(f"{d}/sub/{n}", "w") as f:
            f.write(n)
    os.chdir(d + "/sub")
    folder = os.open(d + "/sub", os.O_RDONLY)
    a.begin("m1", "c1")
    for p in ("/proc/self/cwd/x.txt", f"/proc/self/fd/{folder}/y.txt", f"/dev/fd/{folder}/z.txt",
              f"/proc/{os.getpid()}/cwd/../sub/x.txt"):
        with open(p) as f:
            f.read()
    # the same, spelled so that /proc or /dev is not where the text starts, or through a chain of links
    selfdir = os.open("/proc/self", os.O_RDONLY)
    spelled = ["/./proc/self/cwd/x.txt", "//proc/self/cwd/x.txt", "/tmp/../proc/self/cwd/x.txt",
               "../" * 40 + "proc/self/cwd/x.txt", "/proc/self/root/proc/self/cwd/x.txt",
               f"/proc/self/fd/{selfdir}/" + f"fd/{selfdir}/" * 9 + "cwd/x.txt"]
    stdin = os.dup(0)
    os.close(0)
    os.open(d + "/sub", os.O_RDONLY)  # takes descriptor 0: /dev/stdin is the folder now
    spelled.append("/dev/stdin/x.txt")
    for p in spelled:
        with open(p) as f:
            f.read()
    os.dup2(stdin, 0)
    # a bytes subclass says another name than the one Linux gets; the working folder removed
    class B(bytes):
        def __bytes__(self):
            return b"/tmp/innocent.txt"
    with open(B((d + "/sub/y.txt").encode())) as f:
        f.read()
    os.mkdir(d + "/gone")
    os.chdir(d + "/gone")
    os.rmdir(d + "/gone")
    with open("../sub/z.txt") as f:
        f.read()
    os.chdir(d + "/sub")
    r, w = os.pipe()
    try:
        open(f"/proc/self/fd/{r}/nothing")  # a pipe: no path to read, sent as it is
    except OSError:
        pass
    assert a.flush(10) is None
    print(json.dumps({"paths": [r["path"] for r in received if r["detail"].get("msg_id") == "m1"
                                and r["path"].endswith(("x.txt", "y.txt", "z.txt", "nothing"))], "d": d, "pipe": r}))
    """
    for hook in ("c", "c-python-sender", "python"):
        out = run_case(body, hook, files)
        d = out["d"]
        assert out["paths"][:4] == [f"{d}/sub/x.txt", f"{d}/sub/y.txt", f"{d}/sub/z.txt", f"{d}/sub/x.txt"], hook
        assert out["paths"][4:11] == [f"{d}/sub/x.txt"] * 7, (hook, out["paths"][4:11])
        assert out["paths"][11:13] == [f"{d}/sub/y.txt", f"{d}/sub/z.txt"], hook
        assert len(out["paths"]) == 14 and "pipe:[" in out["paths"][13], hook  # a pipe: no file behind it


def test_a_database_sqlite_opens_for_a_statement_is_refused_when_it_cannot_be_recorded(files):
    """``ATTACH DATABASE`` opens its file in C (``_hook.watch_sqlite`` raises ``ngp.sqlite3.open`` for it): with
    the buffer full and no service, the attach fails and SQLite never opens, or creates, the file."""
    body = r'''
    import sqlite3
    a = auditor.install("http://127.0.0.1:9/", "tok", capacity=3, timeout=0.2)
    d = os.environ["D"]
    con = sqlite3.connect(":memory:")
    attached, refused = 0, None
    for i in range(20):
        try:
            con.execute(f"ATTACH DATABASE ? AS a{i}", (f"{d}/attached-{i}.db",))
            attached += 1
        except sqlite3.OperationalError as e:
            refused = str(e)
            break
    # a connect refused by the hook (never reaching SQLite) must not leave its path as "already recorded":
    # the same path attached next, on this thread, is refused too
    outcomes = []
    for step in (lambda: sqlite3.connect(f"{d}/later.db"),
                 lambda: con.execute("ATTACH DATABASE ? AS later", (f"{d}/later.db",))):
        try:
            step()
            outcomes.append("done")
        except Exception as e:
            outcomes.append(type(e).__name__)
    print(json.dumps({"attached": attached, "refused": refused, "stats": a.stats(), "later": outcomes,
                      "exists": os.path.exists(f"{d}/attached-{attached}.db") or os.path.exists(f"{d}/later.db")}))
    '''
    for hook in ("c", "c-python-sender"):
        out = run_case(body, hook, files)
        assert out["attached"] <= 3 and out["refused"].startswith("unable to open database"), out
        assert "done" not in out["later"], out
        assert not out["exists"]  # refused before SQLite opened (and so created) it
        assert out["stats"]["blocked"]
        assert f"SQLite may not open {files}/attached-{out['attached']}.db: the audit service cannot be reached" in out["stderr"]


@pytest.mark.skipif(not is_built(default_workspace_env()), reason="needs the workspace environment")
def test_the_workspace_kernels_use_the_c_hook(files):
    python = os.path.join(default_workspace_env(), "bin", "python")
    out = run_case(OPERATIONS, "c", files, python=python)
    assert out["stats"]["hook"] == "c"


ATTACKS = r'''
import io, signal, time
a = auditor.install(URL, "tok", linger=0.001)
d = os.environ["D"]
secret = d + "/secret.txt"
ran = []

# /proc/self/root and /dev/shm lead anywhere: recorded, not ignored as the kernel's own
open("/proc/self/root" + secret).read()
open("/proc/self/root/.." + secret).read()  # sent as it is: only Linux knows ".." of a process's root is "/"
# links: recorded under what they lead to, so opens through them cannot hide which data was reached
for n in ("alias.txt", "dirlink", "hard.txt"):  # left by the run with the other hook
    if os.path.lexists(d + "/" + n):
        os.unlink(d + "/" + n)
os.symlink("secret.txt", d + "/alias.txt")
os.symlink(d, d + "/dirlink")
os.link(secret, d + "/hard.txt")
# two leading slashes: normpath keeps them (POSIX), Linux opens the single-slash path; recorded as that
open("/" + secret).read()
with open("//" + secret.lstrip("/") + "x", "w"):
    pass
shm = f"/dev/shm/ngp-test-{os.getpid()}"
os.symlink(d, shm)
try:
    open(shm + "/secret.txt").read()
finally:
    os.unlink(shm)

# a str subclass cannot steer the ignore check, a bytes subclass cannot change what is decoded
class S(str):
    def startswith(self, *a):
        ran.append("startswith"); return True
    def __contains__(self, x):
        ran.append("contains"); return True
open(S(secret)).read()
class B(bytes):
    def decode(self, *a, **k):
        ran.append("decode"); return "/usr/lib/x"
open(B(os.fsencode(secret))).read()

# a path-like handed straight to FileIO: what its __fspath__ says later may not be what was opened
class P:
    calls = 0
    def __fspath__(self):
        P.calls += 1
        return secret if P.calls == 1 else "/usr/lib/x"
try:
    io.FileIO(P()).read()
    fileio = "read"
except PermissionError as e:
    fileio = str(e)

# user objects in a library record are not run (repr/str), by the hook or by the sender
class R:
    def __repr__(self):
        ran.append("repr"); return open(secret).read()
    __str__ = __repr__
sys.audit("ngp.data.open", R(), {"library": "x"})
sys.audit("ngp.data.open", d + "/f0.txt", {"library": "x", "value": R()})
loop = {}; loop["self"] = loop
sys.audit("ngp.data.open", d + "/f1.txt", {"library": "x", "loop": loop})  # not encodable as it is

# a subinterpreter would run without the hook
try:
    import _xxsubinterpreters as interpreters
    interpreters.create()
    sub = "created"
except (PermissionError, RuntimeError) as e:  # _xxsubinterpreters reports "interpreter creation failed"
    sub = str(e)

# an interrupted exchange does not leave the connection out of step (a later answer taken for another)
def interrupt(*_):
    raise KeyboardInterrupt
signal.signal(signal.SIGALRM, interrupt)
SLOW.append("slow-A")
signal.setitimer(signal.ITIMER_REAL, 0.1)
try:
    a.write_ahead({"action": "query.execute", "path": None, "detail": {"code": "slow-A"}})
    interrupted = False
except KeyboardInterrupt:
    interrupted = True
signal.setitimer(signal.ITIMER_REAL, 0)
REFUSE.append("refused-B")
b = a.write_ahead({"action": "query.execute", "path": None, "detail": {"code": "refused-B"}})
c = a.write_ahead({"action": "query.execute", "path": None, "detail": {"code": "fine-C"}})

assert a.flush(10) is None, a.stats()
# after close(), a record is delivered before the access happens
a.close()
n = len(received)
open(d + "/after-close.txt", "w").close()
after_close = [r.get("path") for r in received[n:]]
print(json.dumps({"received": received, "ran": ran, "fileio": fileio, "sub": sub, "interrupted": interrupted,
                  "b": b, "c": c, "after_close": after_close, "stats": a.stats()}))
'''

SLOW_COLLECTOR = r'''
SLOW, REFUSE = [], []
_orig = Collector.do_POST
def do_POST(self):
    body = self.rfile.read(int(self.headers["Content-Length"]))
    codes = [((r.get("detail") or {}).get("code")) for r in json.loads(body)["records"]]
    if any(c in SLOW for c in codes):
        time.sleep(0.4)
    if any(c in REFUSE for c in codes):
        out = b'{"error": "refused"}'
        self.send_response(503)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
        return
    import io as _io
    self.rfile = _io.BytesIO(body)
    self.headers.replace_header("Content-Length", str(len(body)))
    _orig(self)
Collector.do_POST = do_POST
'''


def test_attacks_on_the_hook_are_recorded_or_refused(files):
    (files / "secret.txt").write_text("secret\n")
    for hook in ("c", "python"):
        out = run_case("import time\n" + SLOW_COLLECTOR + ATTACKS, hook, files)
        assert out["stats"]["hook"] == hook
        secret = str(files / "secret.txt")
        paths = [r.get("path") for r in out["received"]]
        # /proc/self/root + secret and /proc/self/root/.. + secret: read where they lead (not hidden as the
        # kernel's own /proc/self, not normalised into /proc/self/<secret>)
        assert not any(p and p.startswith("/proc/self/root") for p in paths)
        # those two, /dev/shm/<a link to d>/secret.txt (read where it leads, as /dev paths are), "//"+secret, and
        # the str and bytes subclasses as the characters they hold
        assert paths.count(secret) >= 6
        assert secret + "x" in paths and not any(p and p.startswith("//") for p in paths)
        links = [(r["path"], r["detail"]["link"], r["detail"]["event"]) for r in out["received"]
                 if r["action"] == "file.link"]
        assert links[:3] == [(secret, f"{files}/alias.txt", "os.symlink"),
                             (str(files), f"{files}/dirlink", "os.symlink"), (secret, f"{files}/hard.txt", "os.link")]
        assert links[3][0] == str(files) and links[3][1].startswith("/dev/shm/ngp-test-")  # the /dev/shm one below
        assert out["ran"] == []  # no user method ran: not startswith, decode, repr or str
        assert "cannot record this path" in out["fileio"]
        data = [r for r in out["received"] if r["action"] == "data.open"]
        assert any(r["path"] is None and "R object at" in r["detail"]["object"] for r in data)
        assert any(r["path"] == f"{files}/f0.txt" and "R object at" in r["detail"]["value"] for r in data)
        assert any(r["path"] == f"{files}/f1.txt" for r in data)  # the self-referencing detail, cut and kept
        assert out["sub"] != "created"
        assert any(r["detail"].get("event") == "cpython.PyInterpreterState_New" and r["detail"].get("refused")
                   for r in out["received"])
        assert out["interrupted"] is True
        assert out["b"] and "503" in out["b"]  # refused by the service: not taken for an acknowledgement
        assert out["c"] is None
        assert out["after_close"] == [f"{files}/after-close.txt"]
        assert out["stats"]["blocked"] is None


def test_a_fetch_records_the_file_it_reads_whatever_the_object_says(files):
    """pysam's wrapped fetch keeps each file's path where a cell cannot rewrite it."""
    from ngp_research.testing import write_vcf

    vcf = write_vcf(files / "real.vcf.gz", ["s1"], [("chr1", p, "A", "G", ["0/1"]) for p in range(1, 500, 10)],
                    contigs=(("chr1", 1000),))
    body = rf'''
    import pysam
    from ngp_research.kernel.entrypoints import wrap_pysam
    a = auditor.install(URL, "tok", linger=0.001)
    wrap_pysam()
    vf = pysam.VariantFile({str(vcf)!r})
    vf._ngp_path = (vf.filename, "/project/decoy.vcf.gz")  # what a cell could set on the object
    n = len(list(vf.fetch("chr1", 1, 200)))
    assert a.flush(10) is None
    print(json.dumps({{"n": n, "fetches": [r.get("path") for r in received
                                          if r["detail"].get("entry_point") == "VariantFile.fetch"]}}))
    '''
    out = run_case(body, "c", files)
    assert out["n"] > 0 and out["fetches"] == [str(vcf)]


def test_the_c_encoder_gives_the_service_what_the_python_encoder_gives():
    """``_hook.encode`` builds the POST body in C; it must carry the same records as :func:`encode_items`."""
    from ngp_research.kernel import _hook
    from ngp_research.kernel.auditor import encode_items

    if _hook is None:
        pytest.skip("the package was built without its C extension")
    ids, other = ("m1", "c1"), ("m2", {"cellId": [1, "x"]})
    items = [
        ("o", "/data/r/d/a.vcf.gz", "rb", 0, ids), ("o", "/data/r/d/b.vcf.gz", "rb", 0, ids),
        ("o", '/project/quote"back\\slash\nnewline\x7f', "r", 524288, ids),  # escapes
        ("o", "/project/caf\u00e9 \u2603", "r", 524288, ids), ("o", "/project/caf\udce9", "r", 524288, ids),
        ("o", "/project/x", None, -1, other), ("o", "/project/y", None, -1, other),
        ("d", "/data/r/d/a.vcf.gz", {"contig": "chr1", "start": 5, "ratio": 0.5, "nan": float("nan"),
                                     "ok": True, "none": None, "msg_id": "forged"}, ids, None),
        ("r", {"action": "file.list", "path": "/data/r", "detail": {"event": "os.listdir", "n": [1, 2]}}, None, None,
         None),
        ("r", {"action": "process.exec", "path": None, "detail": {"argv": [object()]}}, None, None, None),
        ("o", "/project/z", "w", 1, ids),
    ]

    def record_text(rec):
        try:
            return json.dumps(rec)
        except TypeError:
            return json.dumps({"action": rec["action"], "path": None, "detail": {"error": "not encodable"}})

    c = json.loads(_hook.encode(items, json.dumps, json.encoder.encode_basestring_ascii, record_text))
    py_items = [(t, p, dict(d), i, x) if t == "d" else (t, p, d, i, x) for t, p, d, i, x in items]
    py = [json.loads(record_text(r)) if r.get("action") == "process.exec" else r for r in encode_items(py_items)]
    py = json.loads(json.dumps({"records": py}))
    assert c == py
    assert [len(r.get("paths", [r.get("path")])) for r in c["records"]] == [2, 3, 2, 1, 1, 1, 1]
    with pytest.raises(ValueError):
        _hook.encode([("x", 1, 2, 3, 4)], json.dumps, json.encoder.encode_basestring_ascii, record_text)


def test_the_c_sender_delivers_every_record_once_in_order_through_refusals_and_closed_connections(files):
    """The C sender (no GIL) against a collector that refuses the first requests with 503 and closes
    every third connection: four threads' opens, a run longer than one POST, and records from Python
    all arrive once, each thread's in its order, and a POST never carries more than ``max_post``."""
    body = r'''
    import threading
    state = {"n": 0, "sizes": []}
    class Flaky(Collector):
        def do_POST(self):
            state["n"] += 1
            if state["n"] <= 3:  # the service is not there yet: nothing is taken
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            before = len(received)
            Collector.do_POST(self)
            state["sizes"].append(len(received) - before)
            if state["n"] % 3 == 0:
                self.close_connection = True

    flaky = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=flaky.serve_forever, daemon=True).start()
    a = auditor.install(f"http://127.0.0.1:{flaky.server_address[1]}/", "tok", linger=0.001, max_post=700)
    d = os.environ["D"]
    a.begin("m1", None)
    for i in range(2500):  # one long run of one cell: more than three POSTs' worth
        open(f"{d}/run-{i}.txt", "w").close()
    def opener(t):
        for i in range(300):
            open(f"{d}/t{t}-{i}.txt", "w").close()
    threads = [threading.Thread(target=opener, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    os.listdir(d)  # handed to the Python side, queued in between
    for t in threads:
        t.join()
    reason = None
    for _ in range(50):  # the first waits see the 503s
        reason = a.flush(2)
        if reason is None:
            break
    print(json.dumps({"paths": [r.get("path") for r in received if r["action"] == "file.open"],
                      "lists": [r.get("path") for r in received if r["action"] == "file.list"],
                      "sizes": state["sizes"], "stats": a.stats(), "reason": reason}))
    '''
    out = run_case(body, "c", files)
    assert out["reason"] is None and out["stats"]["sender"] == "c" and out["stats"]["pending"] == 0
    paths = [p for p in out["paths"] if p.startswith(str(files))]
    assert len(paths) == len(set(paths)) == 2500 + 4 * 300  # every open once
    assert paths[:2500] == [f"{files}/run-{i}.txt" for i in range(2500)]
    for t in range(4):
        assert [p for p in paths if f"/t{t}-" in p] == [f"{files}/t{t}-{i}.txt" for i in range(300)]
    assert out["lists"] == [str(files)]
    assert max(out["sizes"]) <= 700 and out["stats"]["failures"] >= 1


def test_attacks_on_the_c_queue_are_refused_or_caught(files):
    """A review's attacks on the C sender, from a cell's side (no ctypes):

    - ``_hook.put`` of raw JSON text that would open a record swallowing the real opens after it;
    - ``os.dup2`` of a socketpair over the sender's connection, answered by a fake service;
    - a forged ``open`` audit event whose mode is a str subclass with a ``__del__`` that opens a file;
    - a finalizer that opens a file while the queue's status is being built (once a deadlock).
    """
    body = r'''
    import gc, socket
    from ngp_research.kernel import _hook
    a = auditor.install(URL, "tok", linger=0.001)
    d = os.environ["D"]
    a.begin("m1", None)
    open(d + "/before", "w").close()
    assert a.flush(5) is None
    query = lambda m: {"action": "query.execute", "path": None, "detail": {"code": "1", "msg_id": m}}
    assert a.write_ahead(query("w1"), 5) is None  # the Python connection that carries write-ahead records
    out = {}
    try:
        _hook.put(b'{"action":"file.open","path":null,"detail":{"junk":[0', 1)
        out["put_text"] = "accepted"
    except TypeError as e:
        out["put_text"] = "refused"

    port = int(URL.rsplit(":", 1)[1].strip("/"))
    victims = []
    for fd in range(3, 256):
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if s.family == socket.AF_INET and s.getpeername()[1] == port:
                victims.append(fd)
        except OSError:
            pass
        finally:
            s.detach()
    fake_a, fake_b = socket.socketpair()
    def fake():
        buf = b""
        while True:
            chunk = fake_b.recv(1 << 20)
            if not chunk:
                return
            buf += chunk
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
                if len(rest) < n:
                    break
                body, buf = rest[:n], rest[n:]
                k = sum(len(r.get("paths") or [0]) for r in json.loads(body)["records"])
                ans = json.dumps({"acknowledged": k}).encode()
                fake_b.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(ans) + ans)
    threading.Thread(target=fake, daemon=True).start()
    for fd in victims:
        os.dup2(fake_a.fileno(), fd)
    open(d + "/secret", "w").close()
    out["swapped"] = len(victims)
    out["wait_swapped"] = a.flush(5)
    out["wait_after"] = a.flush(5)
    out["write_ahead_swapped"] = a.write_ahead(query("w2"), 5)  # not acknowledged by the fake: refused
    out["write_ahead_after"] = a.write_ahead(query("w3"), 5)
    out["queries"] = [r["detail"]["msg_id"] for r in received if r["action"] == "query.execute"]

    class S(str):
        def __del__(self):
            open(d + "/from-del", "w").close()
    sys.audit("open", d + "/forged", S("r"), 524865)
    open(d + "/outer", "w").close()

    class C:
        def __del__(self):
            open(d + "/finalizer").close()
    open(d + "/finalizer", "w").close()
    for i in range(300):
        keep = [{} for _ in range(100)]
        c = C(); c.me = c; del c
        gc.set_threshold(1)
        _hook.sender_status()
        gc.set_threshold(700)
    out["flush"] = a.flush(5)
    out["records"] = [(r.get("path"), (r.get("detail") or {}).get("mode")) for r in received]
    print(json.dumps(out))
    '''
    out = run_case(body, "c", files)
    d = str(files)
    assert out["put_text"] == "refused"
    assert out["swapped"] >= 2 and "replaced or closed" in out["wait_swapped"] and out["wait_after"] is None
    assert "replaced" in out["write_ahead_swapped"] and out["write_ahead_after"] is None
    assert out["queries"] == ["w1", "w3"]
    modes = dict((p, m) for p, m in out["records"] if p)
    assert modes[f"{d}/secret"] == "w"  # the real service got it, on a new connection
    assert (modes[f"{d}/forged"], modes[f"{d}/from-del"], modes[f"{d}/outer"]) == ("r", "w", "w")
    assert out["flush"] is None and f"{d}/finalizer" in modes
