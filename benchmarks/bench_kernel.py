"""Audited kernel overhead: the same cells in the audited kernel and in a plain ipykernel, side by side.

One run starts the real audit service (its own process, durable SQLite store in a temporary NGP_HOME,
the stand-in token check of tests/test_audit_service.py) and two kernels of the workspace
environment through jupyter_client: the audited kernel (``python -P -s -m ngp_research.kernel``) and
a plain ``python -m ipykernel_launcher``. The two are interleaved (A, P, P, A, ...) and the medians
over the repeats are reported:

(a) one cell opening and reading N small files (10,000) in a temporary folder. Outside a sandbox
    the hook records every path that is not the kernel's own environment / stdlib / runtime dirs
    (/data, /project, /home always), so files under the system temp dir are recorded: every open
    is one ``file.open`` record, delivered to the service before the reply;
(b) pysam: 2,000 ``fetch(contig, start, stop)`` calls on one open VariantFile (a bgzipped, tabix
    indexed VCF from ngp_research.testing.write_vcf) plus 50 VariantFile opens (each is a
    ``data.open`` record in the audited kernel, plus the htslib-level ``open`` events);
(c) the empty cell: execute_request -> execute_reply for ``pass``, 200 times each.

For (a) and (b) two times are given: "cell" (measured inside the cell with perf_counter: what the
hook and the concurrent delivery of records cost while the code runs) and "round trip"
(execute_request sent -> execute_reply received: also the write-ahead ``query.execute`` and the
delivery of the cell's remaining records before the reply). A third kernel, the audited one with
``NGP_AUDIT_LINGER=3600`` (and a batch and capacity larger than any cell here), delivers its records
only at the cell's end: its in-cell time is what the hook alone costs, its round trip what
delivering everything after the cell costs.
At the end the store is counted, so the records the run produced are shown to be there.

    python benchmarks/bench_kernel.py [--files 10000] [--fetches 2000] [--opens 50] [--repeats 5]
        [--pings 200] [--path socket|port|relays] [--out results.json]

``--path`` is how the audited kernels reach the service:

- ``socket`` (the default, what a workspace's kernels do): the service's own unix socket
  (``NGP_AUDIT_SOCKET``);
- ``port``: its TCP port on 127.0.0.1;
- ``relays``: what a workspace's kernel went through before the service had a socket of its own,
  two relays as separate processes: the sandbox's ``TcpToUnix`` (workspace environment) to a unix
  socket, and the hub's ``UnixToTcp`` from it to the service's port (ngp_research.workspace.bridge).

Targets (from the issue): (a), (b) audited/plain <= 1.05; (c) < 2 ms added at the median.
Numbers only; nothing here asserts on timing.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import save  # noqa: E402

from ngp_research.platform import Platform  # noqa: E402
from ngp_research.testing import write_vcf  # noqa: E402
from ngp_research.workspace.environment import default_workspace_env  # noqa: E402
from tests.test_audit_service import free_port, start_service  # noqa: E402

TOKEN = "tok-alice"  # the stand-in token check of tests/test_audit_service.py knows this one

# Runs in the workspace environment (jupyter_client lives there, not in the project's venv).
DRIVER = r'''
import json, os, sys, time
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

cfg = json.loads(sys.argv[1])
ksm = KernelSpecManager(kernel_dirs=[cfg["kernels"]])


def start(name, env):
    km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
    km.start_kernel(env=env, cwd=cfg["cwd"])
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    return km, kc


def execute(kc, code, user_expressions=None, timeout=600):
    """Seconds from execute_request sent to execute_reply received, and the reply's content."""
    msg = kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                             "user_expressions": user_expressions or {},
                                             "allow_stdin": False, "stop_on_error": True})
    t0 = time.perf_counter()
    kc.shell_channel.send(msg)
    while True:
        reply = kc.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            break
    t = time.perf_counter() - t0
    while kc.iopub_channel.msg_ready():  # keep iopub drained (outside the timed part)
        kc.iopub_channel.get_msg(timeout=0)
    content = reply["content"]
    if content["status"] != "ok":
        raise SystemExit(f"cell failed: {content.get('ename')}: {content.get('evalue')}\n{code}")
    return t, content


def cell_time(content):
    return float(content["user_expressions"]["t"]["data"]["text/plain"])


base = {k: v for k, v in os.environ.items() if not k.startswith(("NGP_AUDIT", "JUPYTERHUB"))}
audited_env = {**base, "NGP_AUDIT_URL": cfg["url"], "JUPYTERHUB_API_TOKEN": cfg["token"]}
if cfg.get("socket"):
    audited_env["NGP_AUDIT_SOCKET"] = cfg["socket"]
kernels = {
    "audited": start("ngp-bench-audited", {**audited_env, "IPYTHONDIR": cfg["ipython"] + "-a"}),
    "plain": start("ngp-bench-plain", {**base, "IPYTHONDIR": cfg["ipython"] + "-p"}),
    # the same audited kernel, its records delivered only at the cell's end: what the hook alone costs
    "deferred": start("ngp-bench-audited", {**audited_env, "IPYTHONDIR": cfg["ipython"] + "-d",
                                             "NGP_AUDIT_LINGER": "3600", "NGP_AUDIT_BATCH": "1000000",
                                             "NGP_AUDIT_CAPACITY": "100000"}),
}
order = ["audited", "plain", "deferred"]

SETUP = f"""
import os as _os, time as _time, pysam as _pysam
_files = [_os.path.join({cfg['files']!r}, _n) for _n in sorted(_os.listdir({cfg['files']!r}))]
_vcf = {cfg['vcf']!r}
_vf = _pysam.VariantFile(_vcf)
_regions = [(s, s + 200) for s in range(1, {cfg['span']}, max(1, {cfg['span']} // {cfg['fetches']}))][:{cfg['fetches']}]
"""
FILES = """
_t0 = _time.perf_counter()
for _p in _files:
    with open(_p, "rb") as _f:
        _f.read()
_t = _time.perf_counter() - _t0
"""
PYSAM = f"""
_t0 = _time.perf_counter()
_n = 0
for _s, _e in _regions:
    for _r in _vf.fetch("chr1", _s, _e):
        _n += 1
for _i in range({cfg['opens']}):
    with _pysam.VariantFile(_vcf) as _v:
        pass
_t = _time.perf_counter() - _t0
"""
for name in order:
    execute(kernels[name][1], SETUP)

out = {name: {"files_cell": [], "files_rt": [], "pysam_cell": [], "pysam_rt": [], "empty_rt": []} for name in order}
for rep in range(cfg["repeats"] + 1):  # the first round warms caches and is not kept
    for name in (order if rep % 2 == 0 else order[::-1]):
        kc = kernels[name][1]
        for key, code in (("files", FILES), ("pysam", PYSAM)):
            rt, content = execute(kc, code, {"t": "_t"})
            if rep:
                out[name][key + "_rt"].append(rt)
                out[name][key + "_cell"].append(cell_time(content))
n_fetched = {name: execute(kernels[name][1], "pass", {"t": "_n"})[1]["user_expressions"]["t"]["data"]["text/plain"]
             for name in order}
for name in order:  # warm-up
    for _ in range(10):
        execute(kernels[name][1], "pass")
for i in range(cfg["pings"]):
    for name in (order[:2] if i % 2 == 0 else order[1::-1]):
        out[name]["empty_rt"].append(execute(kernels[name][1], "pass")[0])
out["records_per_fetch_loop"] = n_fetched
for km, kc in kernels.values():
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print(json.dumps(out))
'''


def _kernelspecs(d: Path, python: str) -> Path:
    kernels = d / "kernels"
    for name, argv in (("ngp-bench-audited", [python, "-P", "-s", "-m", "ngp_research.kernel", "-f", "{connection_file}"]),
                       ("ngp-bench-plain", [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"])):
        (kernels / name).mkdir(parents=True)
        (kernels / name / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name,
                                                                "language": "python"}))
    return kernels


def _start_relays(relays: list, port: int, sock: Path, python: str, env: dict) -> int:
    """The hub's relay (unix socket -> service port) and the sandbox's (a TCP port -> unix socket), each in its
    own process (appended to ``relays``); returns the port the kernels connect to."""
    relays.append(subprocess.Popen([sys.executable, "-m", "ngp_research.workspace.bridge", "unix-to-tcp", str(sock),
                                    f"127.0.0.1:{port}"], cwd=str(ROOT)))
    inner = free_port()
    relays.append(subprocess.Popen([python, "-m", "ngp_research.workspace.bridge", "tcp-to-unix", f"127.0.0.1:{inner}",
                                    str(sock)], env=env))
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", inner), timeout=1):
                if sock.exists():
                    return inner
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the relays did not start")


def _count(home: str, files_dir: str) -> dict:
    """Stored records by action, and the file opens under ``files_dir`` (paths of run records counted)."""
    from ngp_research.audit.store import AuditStore  # noqa: PLC0415

    store = AuditStore(f"sqlite:///{home}/state/audit.sqlite", Path(home) / "state" / "keys", create_key=False)
    by_action, files = {}, 0
    for r in store.records():
        by_action[r.action] = by_action.get(r.action, 0) + 1
        if r.action == "file.open":
            files += sum(1 for p in r.paths if p.startswith(files_dir + "/"))
    store.engine.dispose()
    return {"by_action": by_action, "file_open_in_bench_folder": files}


def _ms(xs):
    return 1000 * statistics.median(xs)


def _p95(xs):
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--fetches", type=int, default=2000)
    ap.add_argument("--opens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--path", choices=("socket", "port", "relays"), default="socket",
                    help="how the kernels reach the service: its unix socket (as in a workspace), its port, or "
                    "the two relays workspaces used before")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    env_dir = os.environ.get("NGP_WORKSPACE_ENV") or default_workspace_env()
    python = os.path.join(env_dir, "bin", "python")
    if not os.path.exists(python):
        print(f"bench_kernel skipped: no workspace environment at {env_dir} (make workspace-env)")
        return None
    with tempfile.TemporaryDirectory(prefix="ngp-bench-kernel-") as d:
        d = Path(d)
        home = d / "home"
        Platform(home=str(home)).ensure_layout()
        files = d / "files"
        files.mkdir()
        for i in range(args.files):
            (files / f"f{i:05d}.txt").write_bytes(b"x" * 64)
        span = 1_000_000
        records = [("chr1", pos, "A", "G", ["0/1", "1/1"]) for pos in range(1, span, 50)]  # 20,000 variants
        vcf = write_vcf(d / "bench.vcf.gz", ["s1", "s2"], records, contigs=(("chr1", span + 1000),))
        port = free_port()
        sock = d / "service" / "audit.sock" if args.path == "socket" else None
        service = start_service(port, home, sock)
        relays = []
        try:
            denv = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            if args.path == "relays":
                port = _start_relays(relays, port, d / "audit.sock", python, denv)
            cfg = {"kernels": str(_kernelspecs(d, python)), "cwd": str(d), "ipython": str(d / "ipython"),
                   "url": f"http://127.0.0.1:{port}/services/audit/", "token": TOKEN, "files": str(files),
                   "vcf": str(vcf), "span": span, "fetches": args.fetches, "opens": args.opens,
                   "repeats": args.repeats, "pings": args.pings, "socket": str(sock) if sock else None}
            denv["JUPYTER_RUNTIME_DIR"] = str(d / "runtime")
            t0 = time.perf_counter()
            proc = subprocess.run([python, "-c", DRIVER, json.dumps(cfg)], env=denv, cwd=str(d),
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"the driver failed:\n{proc.stderr[-4000:]}")
            raw = json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            for p in [*relays, service]:
                p.kill()
                p.wait()
        stored = _count(str(home), str(files))

    a, p, dfr = raw["audited"], raw["plain"], raw["deferred"]
    result = {"files": args.files, "fetches": args.fetches, "opens": args.opens, "repeats": args.repeats,
              "pings": args.pings, "path": args.path,
              "wall_s": wall, "records_stored": stored,
              "expected_file_opens_in_folder": 2 * (args.repeats + 1) * args.files, "raw": raw}
    for key in ("files_cell", "files_rt", "pysam_cell", "pysam_rt"):
        result[f"{key}_ms"] = {"audited": _ms(a[key]), "plain": _ms(p[key]), "ratio": _ms(a[key]) / _ms(p[key]),
                               "deferred": _ms(dfr[key]), "deferred_ratio": _ms(dfr[key]) / _ms(p[key])}
    result["empty_rt_ms"] = {"audited_median": _ms(a["empty_rt"]), "plain_median": _ms(p["empty_rt"]),
                             "added_median": _ms(a["empty_rt"]) - _ms(p["empty_rt"]),
                             "audited_p95": _p95(a["empty_rt"]), "plain_p95": _p95(p["empty_rt"]),
                             "added_p95": _p95(a["empty_rt"]) - _p95(p["empty_rt"])}

    path = {"relays": "through the sandbox's and the hub's relays", "socket": "on its own unix socket",
            "port": "connected directly to its port"}[args.path]
    print(f"audited kernel vs plain ipykernel (medians of {args.repeats}; durable audit service in its own process,"
          f" {path}):")
    labels = {"files_cell": f"(a) {args.files:,} file opens+reads, in-cell",
              "files_rt": f"(a) {args.files:,} file opens+reads, round trip",
              "pysam_cell": f"(b) {args.fetches:,} fetches + {args.opens} opens, in-cell",
              "pysam_rt": f"(b) {args.fetches:,} fetches + {args.opens} opens, round trip"}
    for key, label in labels.items():
        r = result[f"{key}_ms"]
        print(f"  {label:<48} audited {r['audited']:8.1f} ms  plain {r['plain']:8.1f} ms  ratio {r['ratio']:.2f}x"
              f"  (target <= 1.05); delivered at the cell's end: {r['deferred']:.1f} ms, {r['deferred_ratio']:.2f}x")
    e = result["empty_rt_ms"]
    print(f"  (c) empty cell round trip x{args.pings:<4}                     audited {e['audited_median']:.2f} ms"
          f" (p95 {e['audited_p95']:.2f})  plain {e['plain_median']:.2f} ms (p95 {e['plain_p95']:.2f})"
          f"  added {e['added_median']:.2f} ms median, {e['added_p95']:.2f} ms p95  (target < 2 ms median)")
    print(f"  stored: {stored['file_open_in_bench_folder']:,} file.open records for the bench folder "
          f"(expected {result['expected_file_opens_in_folder']:,}); by action {stored['by_action']}")
    return save(args.out, result)


if __name__ == "__main__":
    main()
