"""The audited kernel (ngp_research.kernel) against a stub audit service.

The kernel runs as a real process of the workspace environment (``make workspace-env``), started
from its installed kernelspec by jupyter_client in a driver process of that environment (the
project's own venv has no jupyter_client). The stub is a threaded ``http.server`` that records
every POST (a record with ``paths`` as one access per path, as the service reports it), checks the
token, and can be stopped, restarted or made to refuse.

No sandbox here: the files are in tmp_path (the hook records every path outside the kernel's own
environment; /data, /project and /home always).
"""

import json
import os
import socket
import subprocess
import textwrap
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ngp_research.audit.service import MAX_BODY
from ngp_research.workspace.environment import default_workspace_env, is_built, kernel_dir

ENV = default_workspace_env()
PYTHON = os.path.join(ENV, "bin", "python")
TOKEN = "test-token-" + uuid.uuid4().hex

pytestmark = pytest.mark.skipif(not is_built(ENV), reason="needs the workspace environment (make workspace-env)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StubAudit:
    """A stand-in for the audit service: POST /records, GET /health; up, down or refusing."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lock = threading.Lock()
        self.records, self.posts, self.post_bytes = [], [], []
        self.refuse = False
        self.probe = None  # called with each record as it arrives; its result is kept with the record
        self.conns = set()
        self.server = None
        self.start()

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = -1  # one write per response (no Nagle + delayed-ACK stall on keep-alive)

            def setup(self):
                super().setup()
                with stub.lock:
                    stub.conns.add(self.connection)

            def finish(self):
                with stub.lock:
                    stub.conns.discard(self.connection)
                super().finish()

            def _reply(self, status, obj):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._reply(200, {"ok": True}) if self.path == "/health" else self._reply(404, {})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stub.lock:
                    stub.post_bytes.append(len(body))
                if len(body) > MAX_BODY:  # as the real service (tornado's max_body_size) refuses one
                    return self._reply(400, {"error": "request too large"})
                if self.path != "/records":
                    return self._reply(404, {})
                if self.headers.get("Authorization") != f"token {TOKEN}":
                    return self._reply(403, {"error": "bad token"})
                if stub.refuse:
                    return self._reply(503, {"error": "refused"})
                records = []
                for r in json.loads(body)["records"]:  # a record with "paths" is one access per path
                    if "paths" in r:
                        records += [{**{k: v for k, v in r.items() if k != "paths"}, "path": p,
                                     "detail": dict(r.get("detail") or {})} for p in r["paths"]]
                    else:
                        records.append(r)
                with stub.lock:
                    first = len(stub.records) + 1
                    for r in records:
                        r["_seen_at"] = time.time()
                        if stub.probe:
                            r["_probe"] = stub.probe(r)
                        stub.records.append(r)
                    stub.posts.append(len(records))
                self._reply(200, {"acknowledged": len(records), "first_seq": first, "last_seq": first + len(records) - 1})

            def log_message(self, *args):
                pass

        return Handler

    def start(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            for c in list(self.conns):
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def find(self, action=None, **detail):
        with self.lock:
            return [r for r in self.records if (action is None or r["action"] == action)
                    and all(r["detail"].get(k) == v for k, v in detail.items())]


DRIVER = r'''
import json, os, sys, time
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

kernels_dir, cwd = sys.argv[1], sys.argv[2]
km = KernelManager(kernel_name="ngp-python", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels_dir]))
km.start_kernel(env=json.loads(os.environ["DRIVER_KERNEL_ENV"]), cwd=cwd)
kc = km.client()
kc.start_channels()
kc.wait_for_ready(timeout=60)
out = sys.stdout
out.write(json.dumps({"ready": True}) + "\n"); out.flush()
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "stop":
        break
    if cmd.get("msg_type", "execute_request") == "execute_request":
        content = {"code": cmd["code"], "silent": cmd.get("silent", False),
                   "store_history": cmd.get("store_history", not cmd.get("silent", False)),
                   "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
    else:
        content = cmd["content"]
    msg = kc.session.msg(cmd.get("msg_type", "execute_request"), content, metadata={"cellId": cmd.get("cell_id")} if cmd.get("cell_id") else {})
    kc.shell_channel.send(msg)
    msg_id = msg["header"]["msg_id"]
    outputs, reply, idle, t0 = [], None, False, time.monotonic()
    while (reply is None or not idle) and time.monotonic() - t0 < cmd.get("timeout", 30):
        if reply is None:
            try:
                m = kc.get_shell_msg(timeout=0.05)
                if m["parent_header"].get("msg_id") == msg_id:
                    reply = m["content"]
            except Exception:
                pass
        try:
            m = kc.get_iopub_msg(timeout=0.05)
        except Exception:
            continue
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True
        elif m["msg_type"] in ("stream", "error", "execute_result"):
            outputs.append({"type": m["msg_type"], **m["content"]})
    out.write(json.dumps({"msg_id": msg_id, "reply": reply, "outputs": outputs,
                          "seconds": time.monotonic() - t0}) + "\n")
    out.flush()
kc.stop_channels()
km.shutdown_kernel(now=True)
'''


class Kernel:
    """The audited kernel, driven through jupyter_client in a workspace-environment process."""

    def __init__(self, tmp, stub, cwd, ipython_dir=None, env=None):
        driver = tmp / "driver.py"
        driver.write_text(DRIVER)
        extra = env or {}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV", "NGP_AUDIT"))}
        env.update(NGP_AUDIT_URL=stub.url, JUPYTERHUB_API_TOKEN=TOKEN,
                   IPYTHONDIR=str(ipython_dir or tmp / "ipython"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
        env.update(extra)
        env.pop("PYTHONPATH", None)
        denv = dict(os.environ, DRIVER_KERNEL_ENV=json.dumps(env), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
        denv.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen([PYTHON, str(driver), os.path.dirname(kernel_dir(ENV)), str(cwd)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=denv,
                                     cwd=str(tmp))
        assert json.loads(self.proc.stdout.readline()).get("ready"), "the kernel did not start"

    def run(self, code, **kw):
        self.proc.stdin.write(json.dumps({"op": "execute", "code": textwrap.dedent(code), **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the driver died"
        return json.loads(line)

    def request(self, msg_type, content, **kw):
        """Another shell request (``complete_request``, ``inspect_request``): its reply and outputs."""
        return self.run("", msg_type=msg_type, content=content, **kw)

    def close(self):
        try:
            self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(15)
        except Exception:
            self.proc.kill()


@pytest.fixture(scope="module")
def stub():
    s = StubAudit()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kernel")
    project = d / "project"
    project.mkdir()
    # A /project/json.py-style shadow, and a member-written IPython startup file: neither may run.
    (project / "json.py").write_text(f"open({str(d / 'SHADOWED')!r}, 'w').close()\n")
    startup = d / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-evil.py").write_text(f"open({str(d / 'STARTUP_RAN')!r}, 'w').close()\n")
    data = d / "data"
    data.mkdir()
    for i in range(5):
        (data / f"f{i}.txt").write_text(f"file {i}\n")
    return d


@pytest.fixture(scope="module")
def kernel(workdir, stub):
    k = Kernel(workdir, stub, workdir / "project")
    yield k
    k.close()


def ok(result):
    assert result["reply"] is not None, result
    assert result["reply"]["status"] == "ok", result
    return result


def wait_for(predicate, timeout=10):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def test_code_is_recorded_before_it_runs(kernel, stub, workdir):
    marker = workdir / "ran-1"
    stub.probe = lambda r: os.path.exists(marker)
    try:
        r = ok(kernel.run(f"open({str(marker)!r}, 'w').close()", cell_id="cell-A"))
    finally:
        stub.probe = None
    [rec] = stub.find("query.execute", msg_id=r["msg_id"])
    assert rec["path"] is None
    assert rec["detail"]["cell_id"] == "cell-A" and rec["detail"]["silent"] is False
    assert "ran-1" in rec["detail"]["code"]
    assert rec["_probe"] is False, "the code ran before its record arrived"
    assert marker.exists()
    assert "user" not in rec and "project" not in rec
    # the shadowing json.py in the kernel's cwd and the member's startup file never ran
    assert not (workdir / "SHADOWED").exists()
    assert not (workdir / "STARTUP_RAN").exists()
    ok(kernel.run("import json, sys; assert json.__file__.startswith(sys.prefix) or json.__file__.startswith(sys.base_prefix), json.__file__"))


def test_silent_execution_is_recorded(kernel, stub, workdir):
    r = kernel.run("x_silent = 41 + 1", silent=True)
    assert r["reply"]["status"] == "ok"
    [rec] = stub.find("query.execute", msg_id=r["msg_id"])
    assert rec["detail"]["silent"] is True and rec["detail"]["code"] == "x_silent = 41 + 1"


def test_refused_record_means_the_cell_does_not_run(kernel, stub, workdir):
    marker = workdir / "ran-refused"
    stub.refuse = True
    try:
        r = kernel.run(f"open({str(marker)!r}, 'w').close()")
    finally:
        stub.refuse = False
    assert r["reply"]["status"] == "error" and r["reply"]["ename"] == "AuditUnavailable"
    assert "no code was run" in r["reply"]["evalue"] and "503" in r["reply"]["evalue"]
    assert not marker.exists()
    ok(kernel.run(f"open({str(marker)!r}, 'w').close()"))
    assert marker.exists()


def test_service_down_refuses_then_resumes(kernel, stub, workdir):
    marker = workdir / "ran-down"
    stub.stop()
    try:
        r = kernel.run(f"open({str(marker)!r}, 'w').close()", cell_id="cell-down")
        assert r["reply"]["status"] == "error"
        assert r["reply"]["ename"] == "AuditUnavailable"
        assert r["reply"]["evalue"].startswith("the audit service cannot be reached; no code was run")
        [err] = [o for o in r["outputs"] if o["type"] == "error"]  # shown to the user
        assert err["ename"] == "AuditUnavailable"
        assert not marker.exists()
        assert not stub.find("query.execute", cell_id="cell-down")
    finally:
        stub.start()
    r = ok(kernel.run(f"open({str(marker)!r}, 'w').close()", cell_id="cell-up"))
    assert marker.exists()
    assert stub.find("query.execute", cell_id="cell-up")
    assert any(x["path"] == str(marker) for x in stub.find("file.open", msg_id=r["msg_id"]))


def test_file_access_records(kernel, stub, workdir):
    data = workdir / "data"
    vcf = data / "tiny.vcf.gz"
    code = f"""
        import os, pathlib, subprocess, pysam
        d = {str(data)!r}
        with open(os.path.join(d, "f0.txt")) as f: f.read()
        os.close(os.open(os.path.join(d, "f1.txt"), os.O_RDONLY))
        pathlib.Path(d, "f2.txt").read_bytes()
        os.listdir(d)
        subprocess.run(["cat", os.path.join(d, "f3.txt")], check=True, capture_output=True)
        vcf = {str(vcf)!r}
        with open(vcf[:-3], "w") as f:
            f.write("##fileformat=VCFv4.2\\n##contig=<ID=chr1,length=1000>\\n"
                    "#CHROM\\tPOS\\tID\\tREF\\tALT\\tQUAL\\tFILTER\\tINFO\\n" +
                    "".join(f"chr1\\t{{p}}\\t.\\tA\\tG\\t.\\tPASS\\t.\\n" for p in (50, 150, 250)))
        pysam.tabix_index(vcf[:-3], preset="vcf", force=True)
        assert isinstance(pysam.VariantFile(vcf), pysam.libcbcf.VariantFile)
        n = len(list(pysam.VariantFile(vcf).fetch("chr1", 100, 200)))
        assert n == 1, n
    """
    r = ok(kernel.run(code, cell_id="cell-files"))
    msg_id = r["msg_id"]
    mine = [x for x in stub.records if x["detail"].get("msg_id") == msg_id]
    assert all(x["detail"]["cell_id"] == "cell-files" for x in mine)

    def has(action, path, **detail):
        return any(x["action"] == action and x["path"] == path
                   and all(x["detail"].get(k) == v for k, v in detail.items()) for x in mine)

    assert has("file.open", str(data / "f0.txt"), mode="r")
    assert has("file.open", str(data / "f1.txt"))  # os.open
    assert has("file.open", str(data / "f2.txt"), mode="r")  # pathlib (FileIO raises the event: "r", not "rb")
    assert has("file.list", str(data))
    execs = [x for x in mine if x["action"] == "process.exec"]
    assert any(x["detail"]["argv"] == ["cat", str(data / "f3.txt")] for x in execs), execs
    assert has("data.open", str(vcf), mode="r", entry_point="VariantFile")
    assert has("data.open", str(vcf), contig="chr1", start=100, stop=200, entry_point="VariantFile.fetch")


def test_a_sqlite_database_opened_in_c_is_recorded(kernel, stub, workdir):
    """SQLite opens its database in C, without an ``open`` event: ``sqlite3.connect`` is recorded as the
    open of that file, by name or as a ``file:`` URI; a database in memory opens no file."""
    import sqlite3

    db = workdir / "data" / "cohort.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE IF NOT EXISTS t (x)")
    con.close()
    r = ok(kernel.run(f"""
        import pathlib, sqlite3
        con = sqlite3.connect({str(db)!r})
        con.execute("SELECT count(*) FROM t").fetchone()
        con.close()
        sqlite3.connect("file:" + {str(db)!r} + "?mode=ro", uri=True).close()
        sqlite3.connect(pathlib.Path({str(db)!r})).close()
        sqlite3.connect(":memory:").close()
    """))
    opened = [x for x in stub.find("file.open", msg_id=r["msg_id"]) if x["detail"].get("event") == "sqlite3.connect"]
    assert [x["path"] for x in opened] == [str(db)] * 3, opened
    assert opened[1]["detail"]["as_given"] == f"file:{db}?mode=ro"
    assert not [x for x in stub.find("file.open", msg_id=r["msg_id"]) if x["detail"].get("event") == "ngp.sqlite3.open"]


def test_a_sqlite_database_a_statement_opens_is_recorded(kernel, stub, workdir):
    """SQLite also opens files a statement names, in C and without any Python event: ``ATTACH DATABASE``
    and ``VACUUM INTO``, through any of SQLite's VFSes (``?vfs=`` in a URI). Each is recorded as the
    open of that file (``ngp.sqlite3.open``) before SQLite opens it; the connection's own database
    once, at ``sqlite3.connect``."""
    import sqlite3

    data = workdir / "data"
    main, other = data / "main.db", data / "cohort-attached.db"
    for db in (main, other):
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE IF NOT EXISTS t (x)")
        con.close()
    copy = workdir / "project" / "vacuumed.db"
    copy.parent.mkdir(exist_ok=True)
    r = ok(kernel.run(f"""
        import sqlite3
        con = sqlite3.connect({str(main)!r})
        con.execute("ATTACH DATABASE ? AS other", ({str(other)!r},))
        n = con.execute("SELECT count(*) FROM other.t").fetchone()
        con.execute("VACUUM other INTO ?", ({str(copy)!r},))
        con.close()
        con = sqlite3.connect("file:" + {str(main)!r} + "?vfs=unix-none", uri=True)
        con.execute("ATTACH DATABASE 'file:' || ? || '?vfs=unix-dotfile' AS o2", ({str(other)!r},))
        con.close()
    """))
    found = stub.find("file.open", msg_id=r["msg_id"])
    by_statement = [x["path"] for x in found if x["detail"].get("event") == "ngp.sqlite3.open"]
    assert by_statement == [str(other), str(copy), str(other)], found
    connected = [x["path"] for x in found if x["detail"].get("event") == "sqlite3.connect"]
    assert connected == [str(main)] * 2, found  # the connection's own database: not a second time


def test_pysams_other_c_readers_and_its_samtools_and_bcftools_are_recorded(kernel, stub, workdir):
    """Beyond the four file classes: FASTQ readers, BGZF files, tabix's indexer and compressor, and the
    samtools/bcftools commands pysam runs in the kernel's own process all open files in C."""
    data = workdir / "data"
    fq = data / "reads.fq"
    fq.write_text("@r1\nACGT\n+\nIIII\n@r2\nTTGA\n+\nIIII\n")
    vcf = data / "calls.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chr1,length=1000>\n"
                   "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
                   "chr1\t50\t.\tA\tG\t.\tPASS\t.\nchr1\t150\t.\tA\tG\t.\tPASS\t.\n")
    r = ok(kernel.run(f"""
        import pysam, pysam.bcftools
        assert sum(1 for _ in pysam.FastxFile({str(fq)!r})) == 2
        assert isinstance(pysam.FastxFile({str(fq)!r}), pysam.libcfaidx.FastxFile)
        pysam.tabix_compress({str(fq)!r}, {str(fq) + ".bgz"!r}, force=True)
        with pysam.BGZFile({str(fq) + ".bgz"!r}, "rb") as f:
            assert f.read().startswith(b"@r1")
        gz = pysam.tabix_index({str(vcf)!r}, preset="vcf", force=True)
        assert len(pysam.bcftools.view("-H", gz).splitlines()) == 2
        import inspect  # nothing leads past a wrapper to the function that records nothing
        assert inspect.unwrap(pysam.tabix_index) is pysam.tabix_index
        assert "preset" in inspect.signature(pysam.tabix_index).parameters
    """))
    mine = [x for x in stub.find("data.open", msg_id=r["msg_id"])]
    seen = {(x["path"], x["detail"]["entry_point"]) for x in mine}
    gz = str(vcf) + ".gz"
    for expected in ((str(fq), "FastxFile"), (str(fq), "tabix_compress"), (str(fq) + ".bgz", "BGZFile"),
                     (str(vcf), "tabix_index"), (gz, "bcftools.view")):
        assert expected in seen, (expected, sorted(seen))
    [view] = [x for x in mine if x["detail"]["entry_point"] == "bcftools.view"]
    assert view["detail"]["argv"] == ["-H", gz]


def test_sparks_readers_record_the_files_they_are_given(kernel, stub, workdir):
    """pyspark (Hail's engine) reads files in its JVM. Its readers record every path given, when pyspark is
    imported after the kernel started. The calls here fail after recording (no JVM is started)."""
    data = workdir / "data"
    r = ok(kernel.run(f"""
        import pyspark
        from pyspark.sql.readwriter import DataFrameReader
        for call in (lambda: DataFrameReader.csv(object(), {str(data / "a.csv")!r}),
                     lambda: DataFrameReader.parquet(object(), {str(data / "p1")!r}, {str(data / "p2")!r}),
                     lambda: pyspark.SparkContext.textFile(object(), "file://" + {str(data / "t.txt")!r})):
            try:
                call()
            except Exception:
                pass
    """))
    seen = [(x["path"], x["detail"]["entry_point"]) for x in stub.find("data.open", msg_id=r["msg_id"])]
    assert seen == [(str(data / "a.csv"), "DataFrameReader.csv"), (str(data / "p1"), "DataFrameReader.parquet"),
                    (str(data / "p2"), "DataFrameReader.parquet"), (str(data / "t.txt"), "SparkContext.textFile")], seen


def test_more_readers_in_c_and_in_child_processes_are_recorded(kernel, stub, workdir):
    """scipy's Matrix Market reader (C++), a FASTA index named apart, a samtools/bcftools option's joined file,
    Spark's ``option("path", ...)`` and stream readers, a dask.bag read in the local process scheduler's
    (forked) children, and the start of a multiprocessing ``spawn`` child."""
    data = workdir / "data"
    mtx = data / "matrix.mtx"
    mtx.write_text("%%MatrixMarket matrix coordinate integer general\n2 2 2\n1 1 5\n2 2 7\n")
    fa = data / "ref.fa"
    fa.write_text(">chr1\n" + "ACGT" * 30 + "\n")
    regions = data / "regions.txt"
    regions.write_text("chr1\t1\t100\n")
    vcf = data / "for-options.vcf"
    vcf.write_text("##fileformat=VCFv4.2\n##contig=<ID=chr1,length=1000>\n"
                   "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\nchr1\t50\t.\tA\tG\t.\tPASS\t.\n")
    lines = data / "lines.txt"
    lines.write_text("a\nb\nc\n")
    r = ok(kernel.run(f"""
        import multiprocessing, os, dask, dask.bag, pysam, pysam.bcftools, scipy.io
        assert scipy.io.mmread({str(mtx)!r}).sum() == 12
        pysam.faidx({str(fa)!r})
        with pysam.FastaFile({str(fa)!r}, filepath_index={str(fa) + ".fai"!r}) as f:
            assert f.fetch("chr1", 0, 4) == "ACGT"
        gz = pysam.tabix_index({str(vcf)!r}, preset="vcf", force=True)
        assert len(pysam.bcftools.view("-H", "--regions-file=" + {str(regions)!r}, gz).splitlines()) == 1
        import pyspark
        from pyspark.sql.readwriter import DataFrameReader
        from pyspark.sql.streaming.readwriter import DataStreamReader
        for call in (lambda: DataFrameReader.option(object(), "path", {str(data / "opt.csv")!r}),
                     lambda: DataFrameReader.option(object(), key="path", value={str(data / "kw.csv")!r}),
                     lambda: pyspark.SparkContext.textFile(object(), {str(data / "c1.txt")!r} + "," + {str(data / "c2.txt")!r}),
                     lambda: DataStreamReader.csv(object(), {str(data / "stream")!r})):
            try:
                call()
            except Exception:
                pass
        assert dask.bag.read_text({str(lines)!r}).count().compute(scheduler="processes") == 3  # spawned children
        import io
        p = multiprocessing.get_context("spawn").Process(target=io.open, args=({str(data / "f4.txt")!r},))
        p.start()
        p.join()
        assert p.exitcode == 0
        from concurrent.futures import ProcessPoolExecutor
        import pathlib
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver")) as pool:
            assert pool.submit(pathlib.Path({str(data / "f3.txt")!r}).read_text).result().startswith("file 3")
        pool = multiprocessing.get_context("spawn").Pool(1)
        assert pool.apply(pathlib.Path({str(data / "f2.txt")!r}).read_text).startswith("file 2")
        pool.terminate()  # SIGTERM: what the worker buffered still goes out
        pool.join()
    """, timeout=120))
    mine = [x for x in stub.records if x["detail"].get("msg_id") == r["msg_id"]]
    data_opens = {(x["path"], x["detail"].get("entry_point")) for x in mine if x["action"] == "data.open"}
    for expected in ((str(mtx), "mmread"), (str(fa) + ".fai", "FastaFile"), (str(regions), "bcftools.view"),
                     (str(data / "opt.csv"), "DataFrameReader.option"), (str(data / "kw.csv"), "DataFrameReader.option"),
                     (str(data / "c1.txt"), "SparkContext.textFile"), (str(data / "c2.txt"), "SparkContext.textFile"),
                     (str(data / "stream"), "DataStreamReader.csv")):
        assert expected in data_opens, (expected, sorted(data_opens))
    assert any(x["action"] == "file.open" and x["path"] == str(lines) for x in mine), "dask's process child's open"
    starts = [x for x in mine if x["action"] == "process.exec" and x["detail"].get("event") == "ngp.process.start"]
    assert starts and any("spawn_main" in " ".join(x["detail"]["argv"]) for x in starts), starts
    for name in ("f4.txt", "f3.txt", "f2.txt"):  # opened in a spawn, a forkserver and a terminated pool child
        assert any(x["action"] == "file.open" and x["path"] == str(data / name) for x in mine), name


def test_completion_and_inspection_are_recorded_before_they_run(kernel, stub, workdir):
    """Inspecting ``s.other`` calls the object's ``__getattr__``: user code, which opens a file."""
    target = workdir / "data" / "f4.txt"
    ok(kernel.run(f"""
        class Sneaky:
            def __getattr__(self, name):
                if name == "other":
                    open({str(target)!r}).close()
                raise AttributeError(name)
        s = Sneaky()
    """))
    r = kernel.request("inspect_request", {"code": "s.other", "cursor_pos": 7, "detail_level": 0})
    assert r["reply"]["status"] == "ok", r
    (rec,) = stub.find("query.execute", msg_id=r["msg_id"])
    assert rec["detail"]["msg_type"] == "inspect_request" and rec["detail"]["code"] == "s.other"
    opens = wait_for(lambda: stub.find("file.open", msg_id=r["msg_id"]))
    assert opens and opens[0]["path"] == str(target)
    assert stub.records.index(rec) < stub.records.index(opens[0])  # the request first, then what it opened

    c = kernel.request("complete_request", {"code": "s.oth", "cursor_pos": 5})
    assert c["reply"]["status"] == "ok", c
    (rec,) = stub.find("query.execute", msg_id=c["msg_id"])
    assert rec["detail"]["msg_type"] == "complete_request" and rec["detail"]["cursor_pos"] == 5

    stub.refuse = True
    try:
        before = sum(r["path"] == str(target) for r in stub.find("file.open"))
        refused = kernel.request("inspect_request", {"code": "s.other", "cursor_pos": 7, "detail_level": 0})
        assert refused["reply"]["status"] == "error" and refused["reply"]["ename"] == "AuditUnavailable"
        assert refused["reply"]["found"] is False
        assert kernel.request("complete_request", {"code": "s.oth", "cursor_pos": 5})["reply"]["matches"] == []
    finally:
        stub.refuse = False
    assert sum(r["path"] == str(target) for r in stub.find("file.open")) == before  # refused: nothing ran


def test_records_are_batched(kernel, stub, workdir):
    data = workdir / "data"
    before = len(stub.posts)
    r = ok(kernel.run(f"""
        import os
        for i in range(1000):
            with open(os.path.join({str(data)!r}, f"f{{i % 5}}.txt")) as f: pass
    """))
    opens = [x for x in stub.find("file.open", msg_id=r["msg_id"])]
    assert len(opens) == 1000
    posts = len(stub.posts) - before
    assert posts <= 12, f"{posts} POSTs for 1000 records"


def test_records_too_large_for_the_service_are_cut_and_a_cell_too_large_to_record_is_refused(kernel, stub, workdir):
    """The service takes at most 16 MiB per request. A record that could never be delivered would
    leave the kernel refusing every later cell, so: a cell whose own record is too large is refused,
    saying why; a path longer than any Linux opens, and an argument list past what exec takes, are
    recorded cut (with their length and hash); opens whose paths need escaping go out in several
    requests. Nothing is lost and the kernel goes on running code."""
    marker = uuid.uuid4().hex
    big = f"print('ran {marker}')\n# " + "a" * (17 * 2**20)
    r = kernel.run(big, timeout=120)
    assert r["reply"]["status"] == "error", r
    assert r["reply"]["evalue"].startswith("this cell is too large to record"), r["reply"]
    assert "16 MiB" in r["reply"]["evalue"] and "no code was run" in r["reply"]["evalue"]
    assert not any(marker in (o.get("text") or "") for o in r["outputs"])
    assert not [x for x in stub.find("query.execute") if marker in (x["detail"].get("code") or "")]

    data = str(workdir / "data")

    def refuse_after_this_cell(record):  # an outage: the cell's records pile up in the kernel
        if record["action"] == "query.execute" and f"pile-{marker}" in (record["detail"].get("code") or ""):
            stub.refuse = True

    stub.probe = refuse_after_this_cell
    try:
        r = kernel.run(f"""
            # pile-{marker}
            import subprocess
            try:
                open({data!r} + "/long-" + "b" * 9000)
            except OSError as e:
                print(type(e).__name__)
            for i in range(1000):  # each path escapes to ~24 kB of JSON: ~24 MB in all
                try:
                    open({data!r} + "/odd-{marker}-" + "\\x01" * (4000 - {len(data) + 40}) + str(i))
                except OSError:
                    pass
            try:
                subprocess.run(["true", "{marker}"] + ["c" * 100000] * 40)
            except OSError as e:
                print(type(e).__name__)
        """, timeout=120)
        assert r["reply"]["status"] == "ok", r
        assert any("could not be delivered" in o.get("text", "") for o in r["outputs"])
    finally:
        stub.probe = None
        stub.refuse = False
    ok(kernel.run("print('still running')"))
    # a crafted cell id of 3 MB (it rides on every record of the cell): cut, the same in the code's record
    r = ok(kernel.run(f"for i in range(5): open({data!r} + '/f%d.txt' % i).close()", cell_id="c" * 3_000_000,
                      timeout=120))
    [query] = stub.find("query.execute", msg_id=r["msg_id"])
    assert len(query["detail"]["cell_id"]) < 300 and query["detail"]["cell_id"].startswith("ccc")
    assert len(stub.find("file.open", msg_id=r["msg_id"], cell_id=query["detail"]["cell_id"])) == 5
    ok(kernel.run("print('still running')"))
    assert max(stub.post_bytes) <= MAX_BODY
    cut = [x for x in stub.find("file.open") if (x["path"] or "").startswith(data + "/long-b")]
    assert len(cut) == 1 and cut[0]["detail"]["cut"] == f"the path was {len(data) + 9006} characters"
    assert "…[cut: " in cut[0]["path"] and len(cut[0]["path"]) < 4200
    odd = [x for x in stub.find("file.open") if (x["path"] or "").startswith(f"{data}/odd-{marker}-")]
    assert sorted(int(x["path"].rsplit("\x01", 1)[1]) for x in odd) == list(range(1000))
    execs = [x for x in stub.find("process.exec") if marker in x["detail"].get("detail_head", "")]
    assert len(execs) == 1 and execs[0]["detail"]["cut"].startswith("the record's detail was 40")
    assert execs[0]["detail"]["event"] == "subprocess.Popen"


def test_tampering_with_the_execute_path_is_refused_and_recorded(workdir, stub):
    k = Kernel(workdir, stub, workdir / "project")
    try:
        marker = workdir / "ran-after-tamper"
        ok(k.run("""
            k = get_ipython().kernel
            k.do_execute = lambda *a, **kw: {"status": "ok"}
        """, cell_id="cell-tamper"))
        r = k.run(f"open({str(marker)!r}, 'w').close()")
        assert r["reply"]["status"] == "error" and "audit machinery was modified" in r["reply"]["evalue"], r
        assert not marker.exists()
        tampers = wait_for(lambda: stub.find("audit.tamper", cell_id="cell-tamper"))
        assert tampers and "kernel.do_execute was replaced" in tampers[0]["detail"]["what"]
        assert k.run("1")["reply"]["status"] == "error"  # refused for good: restart the kernel
    finally:
        k.close()


def test_importing_pysam_past_the_finder_that_wraps_it_is_refused_and_recorded(workdir, stub):
    """pysam is wrapped when it is imported; a cell that takes the finder out of ``sys.meta_path`` first gets
    pysam's own classes, which open files in htslib unrecorded. The auditor's integrity checks (run by its
    sender thread, at least once a second) record it, and from then on every cell is refused."""
    k = Kernel(workdir, stub, workdir / "project")
    try:
        marker = workdir / "ran-after-pysam"
        ok(k.run("""
            import sys
            sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_WrapAfterImport"]
            import pysam
        """, cell_id="cell-finder"))
        # the stub serves the whole module: this kernel's record is the one naming pysam
        assert wait_for(lambda: [t for t in stub.find("audit.tamper")
                                 if "pysam's readers are not wrapped" in t["detail"]["what"]])
        r = k.run(f"open({str(marker)!r}, 'w').close()")
        assert r["reply"]["status"] == "error" and "audit machinery was modified" in r["reply"]["evalue"], r
        assert not marker.exists()
    finally:
        k.close()


def test_replacing_the_clients_send_is_refused_and_recorded(workdir, stub):
    k = Kernel(workdir, stub, workdir / "project")
    try:
        marker = workdir / "ran-after-send"
        ok(k.run("""
            k = get_ipython().kernel
            f = type(k).do_execute
            for name, cell in zip(f.__code__.co_freevars, f.__closure__):
                if name == "write_ahead":
                    cell.cell_contents = lambda *a, **kw: None
        """, cell_id="cell-send"))
        r = k.run(f"open({str(marker)!r}, 'w').close()", cell_id="cell-after-send")
        assert r["reply"]["status"] == "error" and "write_ahead" in r["reply"]["evalue"], r
        assert not marker.exists()
        assert wait_for(lambda: stub.find("audit.tamper"))
        assert stub.find("query.execute", cell_id="cell-after-send") == []
    finally:
        k.close()


def test_undelivered_file_records_block_the_next_cell_until_delivered(kernel, stub, workdir):
    data = workdir / "data"
    marker = workdir / "ran-blocked"

    def refuse_after_this_cell(record):  # the service fails right after acknowledging the cell's code
        if record["action"] == "query.execute" and "outage-cell" in (record["detail"].get("code") or ""):
            stub.refuse = True

    stub.probe = refuse_after_this_cell
    try:
        r = kernel.run(f"# outage-cell\nopen({str(data / 'f4.txt')!r}).close()", timeout=60)
        assert r["reply"]["status"] == "ok"  # the code ran (its record was acknowledged) ...
        assert any("could not be delivered" in o.get("text", "") for o in r["outputs"])  # ... and the user is told
        first = r["msg_id"]
        r = kernel.run(f"open({str(marker)!r}, 'w').close()")
        assert r["reply"]["status"] == "error" and r["reply"]["ename"] == "AuditUnavailable"
        assert "could not be delivered" in r["reply"]["evalue"]
        assert not marker.exists()
    finally:
        stub.probe = None
        stub.refuse = False
    r = ok(kernel.run(f"open({str(marker)!r}, 'w').close()"))
    assert marker.exists()
    # the held-back record arrived, before the code of the cell that ran next
    [held] = [x for x in stub.find("file.open", msg_id=first) if x["path"] == str(data / "f4.txt")]
    [nxt] = stub.find("query.execute", msg_id=r["msg_id"])
    assert stub.records.index(held) < stub.records.index(nxt)


def test_the_kernel_uses_the_services_own_socket_and_never_falls_back_to_the_url(tmp_path):
    """``NGP_AUDIT_SOCKET`` (a workspace's ``/run/ngp/audit/audit.sock``): the real service listens there.

    The URL names a port nothing listens on, so every acknowledgement came through the socket: the cell's
    code before it ran, its file opens (the C sender) after. A service restarted on the same path (a new
    socket) is reached again. A socket path nobody answers on refuses the cell, even when the URL would
    reach a working service.
    """
    from types import SimpleNamespace

    from ngp_research.audit import AuditStore
    from ngp_research.platform import Platform

    from .test_audit_service import start_service

    home = tmp_path / "home"
    platform = Platform(home=str(home))
    platform.ensure_layout()
    sock = tmp_path / "svc" / "audit.sock"
    port = _free_port()
    service = start_service(port, home, sock)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a\n")
    dead = SimpleNamespace(url=f"http://127.0.0.1:{_free_port()}/services/audit/")
    kernels = []
    try:
        k = Kernel(tmp_path, dead, tmp_path, env={"NGP_AUDIT_SOCKET": str(sock), "JUPYTERHUB_API_TOKEN": "tok-alice"})
        kernels.append(k)
        r = ok(k.run(f"print(open({str(data / 'a.txt')!r}).read())", cell_id="through-the-socket"))
        store = AuditStore.for_platform(platform)
        queries = [q for q in store.records(action="query.execute") if q.detail.get("msg_id") == r["msg_id"]]
        assert queries and "a.txt" in queries[0].detail["code"]
        assert (queries[0].actor, queries[0].project) == ("alice", "cardio-gwas")
        opens = [a for rec in store.records(action="file.open") for a in rec.accesses()
                 if a.path == str(data / "a.txt") and a.detail.get("msg_id") == r["msg_id"]]
        assert opens, "the file open did not reach the service through its socket"

        service.kill()
        service.wait()
        marker = tmp_path / "ran-while-down"
        r = k.run(f"open({str(marker)!r}, 'w').close()")
        assert r["reply"]["status"] == "error" and r["reply"]["ename"] == "AuditUnavailable"
        assert not marker.exists()
        service = start_service(port, home, sock)  # a new socket at the same path
        ok(k.run(f"open({str(marker)!r}, 'w').close()"))
        assert marker.exists()

        live = SimpleNamespace(url=f"http://127.0.0.1:{port}/services/audit/")
        (tmp_path / "second").mkdir()
        k2 = Kernel(tmp_path / "second", live, tmp_path,
                    env={"NGP_AUDIT_SOCKET": str(tmp_path / "nobody.sock"), "JUPYTERHUB_API_TOKEN": "tok-alice"})
        kernels.append(k2)
        marker2 = tmp_path / "ran-without-socket"
        r = k2.run(f"open({str(marker2)!r}, 'w').close()")
        assert r["reply"]["status"] == "error" and r["reply"]["ename"] == "AuditUnavailable", r
        assert not marker2.exists()
        store.engine.dispose()
    finally:
        for k in kernels:
            k.close()
        service.kill()
        service.wait()


def test_hails_file_reading_entry_points_record_every_file_they_name(monkeypatch):
    """Hail reads files in its JVM, where no audit event is raised: each entry point that names files
    (import_table, import_plink's bed/bim/fam given by position, import_bgen's sample file and index map,
    hadoop_open, ...) records every one of them before the call, under the public name and the defining
    module's. A fake ``hail`` stands in for the real one (whose calls would start a JVM); the wrappers only
    look at the functions' signatures."""
    import sys
    import types

    from ngp_research.kernel import entrypoints

    calls = []

    def make(name, params):
        ns = {}
        exec(f"def {name}({', '.join(p + '=None' for p in params)}, **kwargs):\n    return {name!r}", ns)
        return ns[name]

    fns = {"import_vcf": make("import_vcf", ["path", "force", "header_file"]),
           "import_plink": make("import_plink", ["bed", "bim", "fam", "min_partitions"]),
           "import_bgen": make("import_bgen", ["path", "entry_fields", "sample_file", "n_partitions",
                                               "block_size", "index_file_map"]),
           "import_table": make("import_table", ["paths", "key"]),
           "hadoop_open": make("hadoop_open", ["path", "mode", "buffer_size"]),
           "read_matrix_table": make("read_matrix_table", ["path"])}
    fns["index_bgen"] = make("index_bgen", ["path", "index_file_map", "reference_genome"])
    hail = types.ModuleType("hail")
    impex = types.ModuleType("hail.methods.impex")
    experimental = types.ModuleType("hail.experimental")
    experimental.read_expression = make("read_expression", ["path"])
    hail.experimental = experimental
    vds = types.ModuleType("hail.vds")
    vds.new_combiner = make("new_combiner", ["output_path", "temp_path", "gvcf_paths", "vds_paths", "header_file"])
    hail.vds = vds
    genetics = types.ModuleType("hail.genetics.reference_genome")
    linalg = types.ModuleType("hail.linalg.blockmatrix")

    class ReferenceGenome:
        @classmethod
        def from_fasta_file(cls, name, fasta_file, index_file, x_contigs=()):
            return cls()

        def add_sequence(self, fasta_file, index_file=None):
            return "added"

    class BlockMatrix:
        @classmethod
        def read(cls, path):
            return "read"

    genetics.ReferenceGenome, linalg.BlockMatrix = ReferenceGenome, BlockMatrix
    for name, fn in fns.items():
        setattr(hail, name, fn)
        setattr(impex, name, fn)
    for name, module in (("hail", hail), ("hail.methods.impex", impex), ("hail.experimental", experimental),
                         ("hail.vds", vds), ("hail.genetics.reference_genome", genetics),
                         ("hail.linalg.blockmatrix", linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(entrypoints, "_audit", lambda event, path, detail: calls.append((path, detail)))

    wrapped = entrypoints.wrap_hail()
    assert set(wrapped) == set(fns) | {"experimental.read_expression", "vds.new_combiner", "ReferenceGenome.from_fasta_file",
                                       "ReferenceGenome.add_sequence", "BlockMatrix.read"}
    assert impex.import_table is hail.import_table and hail.import_table._ngp_audited
    assert entrypoints.wrap_hail() == []  # idempotent

    assert hail.import_plink("/data/r/d/x.bed", "/data/r/d/x.bim", "/data/r/d/x.fam") == "import_plink"
    hail.import_table(["/data/r/d/a.tsv", "file:///data/r/d/b.tsv"], key="s")
    impex.import_bgen("/data/r/d/x.bgen", ["GT"], sample_file="/data/r/d/x.sample",
                      index_file_map={"/data/r/d/x.bgen": "/data/r/d/x.idx2"})
    hail.hadoop_open("/data/r/d/notes.txt", "r")
    hail.experimental.read_expression("/data/r/d/e.he")
    calls_before = len(calls)
    hail.index_bgen("/data/r/d/y.bgen")
    hail.vds.new_combiner(output_path="/project/out.vds", temp_path="/tmp/t",
                          gvcf_paths=["/data/r/d/s1.g.vcf.gz", "/data/r/d/s2.g.vcf.gz"])
    rg = ReferenceGenome.from_fasta_file("g", "/data/r/d/g.fa", "/data/r/d/g.fa.fai")
    assert isinstance(rg, ReferenceGenome) and rg.add_sequence("/data/r/d/h.fa") == "added"
    assert BlockMatrix.read("/data/r/d/b.bm") == "read"
    extra = [(p, d["entry_point"]) for p, d in calls[calls_before:]]
    assert extra == [("/data/r/d/y.bgen", "index_bgen"), ("/data/r/d/s1.g.vcf.gz", "new_combiner"),
                     ("/data/r/d/s2.g.vcf.gz", "new_combiner"), ("/data/r/d/g.fa", "ReferenceGenome.from_fasta_file"),
                     ("/data/r/d/g.fa.fai", "ReferenceGenome.from_fasta_file"),
                     ("/data/r/d/h.fa", "ReferenceGenome.add_sequence"), ("/data/r/d/b.bm", "BlockMatrix.read")], extra
    del calls[calls_before:]
    seen = [(p, d["entry_point"], d["argument"]) for p, d in calls]
    assert seen == [
        ("/data/r/d/x.bed", "import_plink", "bed"), ("/data/r/d/x.bim", "import_plink", "bim"),
        ("/data/r/d/x.fam", "import_plink", "fam"),
        ("/data/r/d/a.tsv", "import_table", "paths"), ("/data/r/d/b.tsv", "import_table", "paths"),
        ("/data/r/d/x.bgen", "import_bgen", "path"), ("/data/r/d/x.sample", "import_bgen", "sample_file"),
        ("/data/r/d/x.bgen", "import_bgen", "index_file_map"), ("/data/r/d/x.idx2", "import_bgen", "index_file_map"),
        ("/data/r/d/notes.txt", "hadoop_open", "path"), ("/data/r/d/e.he", "read_expression", "path")]
    assert calls[-2][1]["mode"] == "r" and all(d["library"] == "hail" for _, d in calls)


def test_a_dask_cluster_in_the_kernels_own_process_runs_and_is_recorded(tmp_path, stub, workdir):
    """``Client(processes=False)``: the worker preload runs in the kernel's process, after the first cell. It
    must find the kernel's hook, not import anything that reads as tampering or install a second hook."""
    k = Kernel(tmp_path, stub, workdir / "project",
               env={"DASK_DISTRIBUTED__WORKER__PRELOAD": '["ngp_research.kernel.worker"]'})
    try:
        ok(k.run("x = 1"))
        f = workdir / "data" / "f1.txt"
        r = ok(k.run(f"""
            import pathlib
            from dask.distributed import Client
            client = Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None)
            assert client.submit(pathlib.Path({str(f)!r}).read_text).result().startswith("file 1")
            client.close()
        """, timeout=90))
        after = ok(k.run("print('still runs')"))
        assert any(o.get("text", "").strip() == "still runs" for o in after["outputs"])
        assert not [t for t in stub.find("audit.tamper") if t["detail"].get("msg_id") in (r["msg_id"], after["msg_id"])]
        assert any(x["path"] == str(f) for x in stub.find("file.open") if x["detail"].get("msg_id") == r["msg_id"])
    finally:
        k.close()


def test_a_users_subclass_of_a_wrapped_pysam_class_is_an_ordinary_class(kernel, stub, workdir):
    fa = workdir / "data" / "sub.fa"
    fa.write_text(">chr1\nACGT\n")
    r = ok(kernel.run(f"""
        import pysam
        pysam.faidx({str(fa)!r})
        class MyFasta(pysam.FastaFile):
            pass
        plain, mine = pysam.FastaFile({str(fa)!r}), MyFasta({str(fa)!r})
        print(isinstance(plain, pysam.FastaFile), isinstance(mine, pysam.FastaFile), isinstance(plain, MyFasta),
              issubclass(pysam.FastaFile, MyFasta), isinstance(mine, MyFasta))
    """))
    assert r["outputs"][0]["text"].split() == ["True", "True", "False", "False", "True"], r["outputs"]


def test_a_spawned_dask_worker_delivers_each_tasks_records_in_batches_before_its_result(tmp_path, stub, workdir):
    """A Nanny's worker is a spawned child: the hook goes in first thing, delivering each record before its
    access; the worker preload then returns it to batches (the task's records before its result), so a task
    that opens many files does not pay one round trip per open."""
    many = workdir / "many"
    many.mkdir(exist_ok=True)
    for i in range(200):
        (many / f"m{i:03d}.txt").write_text("x")
    k = Kernel(tmp_path, stub, workdir / "project",
               env={"DASK_DISTRIBUTED__WORKER__PRELOAD": '["ngp_research.kernel.worker"]'})
    try:
        ok(k.run("""
            from dask.distributed import Client
            client = Client(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
        """, timeout=120))
        posts_before = len(stub.posts)
        r = ok(k.run(f"""
            import os
            def read_all(d):
                return sum(len(open(os.path.join(d, n)).read()) for n in sorted(os.listdir(d)))
            assert client.submit(read_all, {str(many)!r}).result() == 200
        """, timeout=120))
        opens = [x for x in stub.find("file.open") if x["path"].startswith(str(many) + "/")
                 and x["detail"].get("msg_id") == r["msg_id"]]
        assert len(opens) == 200, len(opens)  # all there when the cell's result came back, under its cell
        assert len(stub.posts) - posts_before < 40, len(stub.posts) - posts_before
        ok(k.run("client.close()", timeout=60))
    finally:
        k.close()


def test_a_python_program_a_cell_starts_records_its_own_opens(kernel, stub, workdir):
    """``subprocess.run([sys.executable, script])`` and the same through a shell: the program installs the hook
    before its own code runs (the environment's ``00_ngp_research_audit.pth``), so the files it opens are recorded,
    attributed to the cell that started it. Neither the script nor the shell command names the file."""
    data = workdir / "data"
    script = workdir / "project" / "reads_f1.py"
    script.write_text(f"print(open({str(data / 'f1.txt')!r}).read().strip())\n")
    other = workdir / "project" / "reads_f2.py"
    other.write_text(f"print(open({str(data / 'f2.txt')!r}).read().strip())\n")
    r = ok(kernel.run(f"""
        import subprocess, sys
        print(subprocess.run([sys.executable, {str(script)!r}], capture_output=True, text=True, check=True).stdout)
        print(subprocess.run(sys.executable + " " + {str(other)!r}, shell=True, capture_output=True, text=True,
                             check=True).stdout)
    """, cell_id="cell-python-child", timeout=60))
    out = "".join(o.get("text", "") for o in r["outputs"])
    assert "file 1" in out and "file 2" in out, r
    for name in ("f1.txt", "f2.txt"):
        opens = [x for x in stub.find("file.open") if x["path"] == str(data / name)
                 and x["detail"].get("msg_id") == r["msg_id"]]
        assert opens, name
        assert opens[0]["detail"]["cell_id"] == "cell-python-child"
    assert any(x["path"] == str(script) for x in stub.find("file.open", msg_id=r["msg_id"])), "the script's own file"


def test_a_program_cannot_start_without_the_hook_or_run_code_before_it(kernel, stub, workdir):
    """What a cell can set for a program it starts does not get the program's code past the hook:

    - a ``PYTHONPATH`` with an ``ngp_research`` (and a ``json``) of its own: the hook is installed from the
      environment's own files, and the program's open is recorded;
    - the kernel's own command line with an option that runs code (``exec_lines``) does not start;
    - ``python -i -m ngp_research.kernel`` with such an option does not fall into an interactive prompt;
    - ``python -i`` with a setting that fails stops (126) before the prompt could run anything."""
    data = workdir / "data"
    shadow = workdir / "shadow"
    marker = workdir / "shadow-ran"
    r = ok(kernel.run(f"""
        import os, subprocess, sys
        shadow = {str(shadow)!r}
        os.makedirs(shadow + "/ngp_research/kernel", exist_ok=True)
        for name in ("ngp_research/__init__.py", "ngp_research/kernel/__init__.py", "ngp_research/kernel/autostart.py",
                     "json.py"):
            with open(os.path.join(shadow, name), "w") as f:
                f.write("open({str(marker)!r}, 'w').close()\\ndef main(): pass\\n")
        env = {{**os.environ, "PYTHONPATH": shadow}}
        p = subprocess.run([sys.executable, "-c", "print(open({str(data / 'f4.txt')!r}).read().strip())"], env=env,
                           capture_output=True, text=True)
        print("shadowed:", p.returncode, p.stdout.strip(), os.path.exists({str(marker)!r}))
        k = subprocess.run([sys.executable, "-m", "ngp_research.kernel", "-f", shadow + "/k.json",
                            "--IPKernelApp.exec_lines=['open({str(marker)!r}, \\'w\\').close()']"],
                           capture_output=True, text=True, timeout=60)
        print("exec_lines:", k.returncode, "only its connection file" in k.stderr)
        i = subprocess.run([sys.executable, "-i", "-m", "ngp_research.kernel", "-f", shadow + "/k.json"],
                           env={{**os.environ, "NGP_AUDIT_LINGER": "soon"}}, input="open({str(marker)!r}, 'w').close()\\n",
                           capture_output=True, text=True, timeout=60)
        print("interactive:", i.returncode, os.path.exists({str(marker)!r}))
        j = subprocess.run([sys.executable, "-i", "-m", "ngp_research.kernel", "-f", shadow + "/k.json", "--x=1"],
                           input="open({str(marker)!r}, 'w').close()\\n", capture_output=True, text=True, timeout=60)
        print("prompt:", j.returncode, os.path.exists({str(marker)!r}))
    """, cell_id="cell-no-way-around", timeout=120))
    out = "".join(o.get("text", "") for o in r["outputs"])
    assert "shadowed: 0 file 4 False" in out, out
    assert "exec_lines: 2 True" in out, out
    assert "interactive: 126 False" in out, out
    assert "prompt: 2 False" in out, out
    assert not marker.exists()
    opens = [x for x in stub.find("file.open") if x["path"] == str(data / "f4.txt") and x["detail"].get("msg_id") == r["msg_id"]]
    assert opens and opens[0]["detail"]["cell_id"] == "cell-no-way-around", opens


def test_what_a_spark_udf_opens_in_sparks_python_worker_is_recorded(kernel, stub, workdir):
    """Spark's JVM, started from the cell, starts Python workers of its own for a UDF: they install the hook
    too (see test_a_python_program_a_cell_starts_records_its_own_opens), so the file a ``map`` function
    opens there is recorded, under the cell that started the JVM."""
    data = workdir / "data"
    r = ok(kernel.run(f"""
        import os, sys
        os.environ["PYSPARK_PYTHON"] = sys.executable  # what PATH gives in a workspace (its env's bin first)
        from pyspark import SparkConf, SparkContext
        conf = SparkConf().setMaster("local[1]").setAppName("ngp-udf").set("spark.ui.enabled", "false")
        sc = SparkContext(conf=conf)
        try:
            assert sc.parallelize([{str(data / "f3.txt")!r}], 1).map(lambda p: open(p).read()).collect() == ["file 3\\n"]
        finally:
            sc.stop()
    """, cell_id="cell-spark-udf", timeout=240))
    opens = [x for x in stub.find("file.open") if x["path"] == str(data / "f3.txt")
             and x["detail"].get("msg_id") == r["msg_id"]]
    assert opens and opens[0]["detail"]["cell_id"] == "cell-spark-udf", opens
