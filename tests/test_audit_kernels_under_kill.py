"""SIGKILL of the audit service while 50 real audited kernels write records: nothing acknowledged is lost.

The requirement: "Killing the service with SIGKILL during a load of 50 concurrent kernels writing
records: every acknowledged record is in the store after restart, and `ngp audit verify` passes."
``test_audit_service.py::test_sigkill_under_load_loses_no_acknowledged_record`` checks it with 50
HTTP writer threads; this test uses 50 real audited kernels (``python -P -s -m ngp_research.kernel``
of the workspace environment, ``make workspace-env``), so the kernel's own delivery path is the one
under test: the write-ahead ``query.execute`` record, the audit hook's ``file.open`` records, their
delivery before each reply, and the retry of what could not be delivered.

One driver process of the workspace environment (the project's venv has no jupyter_client) starts
the 50 kernels with jupyter_client's ``AsyncKernelManager`` and drives them all at once, one cell
after another per kernel. Each cell writes and then reads a few files whose paths are unique to
(kernel, cell), so each cell makes one ``query.execute`` record (carrying its msg_id and code) and
two ``file.open`` records per file (mode ``w`` and mode ``r``). A cell counts as *acknowledged* only
if its execute_reply is ``ok`` and no "could not be delivered" warning came on iopub before the
kernel went idle: the kernel then had the service's acknowledgement for its code (before running
it) and for all its file records (before replying). The driver prints one JSON line per cell.

The test (the real audit service as its own process, durable SQLite store, with the stand-in token
check of test_audit_service.py):

1. lets the load run until more than 100 cells were acknowledged;
2. SIGKILLs the service; while it is down every cell sent is refused (``AuditUnavailable``, no
   code run), so nothing is acknowledged;
3. restarts it on the same port and the same store; every one of the 50 kernels must then run
   cells again (no kernel restart needed);
4. stops the kernels and checks the store: each acknowledged cell's ``query.execute`` record (by
   msg_id, with its code) and both ``file.open`` records of each of its files (attributed to its
   msg_id) are there, and so are the file records of cells that ran but whose records could not be
   delivered at the time (the kernels delivered them once the service was back); and
   ``ngp audit verify`` exits 0.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from ngp_research.audit import AuditStore
from ngp_research.workspace.environment import default_workspace_env, is_built, kernel_dir
from tests.test_audit_service import free_port, start_service

ENV = default_workspace_env()
PYTHON = os.path.join(ENV, "bin", "python")
TOKEN = "tok-alice"  # the stand-in token check in SERVICE_SCRIPT maps it to alice / cardio-gwas
KERNELS = 50
FILES_PER_CELL = 2
ENAME = "AuditUnavailable"
UNDELIVERED = "could not be delivered"
LOAD_S, DOWN_S, AFTER_S = 4.0, 2.0, 2.0  # seconds of load before the kill, down, and after the restart

pytestmark = pytest.mark.skipif(not is_built(ENV), reason="needs the workspace environment (make workspace-env)")

# Runs with the workspace environment's python. argv[1]: JSON config. stdin: one line "stop" ends
# the load. stdout: JSON lines ({"ready": n}, one {"cell": ...} per executed cell, {"done": true}).
DRIVER = r'''
import asyncio, json, os, sys, time
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

cfg = json.loads(sys.argv[1])
ksm = KernelSpecManager(kernel_dirs=[cfg["kernels"]])
base_env = json.loads(os.environ["DRIVER_KERNEL_ENV"])
stopping = asyncio.Event()


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def start(i, gate):
    async with gate:
        ipython_dir = os.path.join(cfg["tmp"], "ipython", f"k{i}")
        os.makedirs(ipython_dir, exist_ok=True)
        os.makedirs(os.path.join(cfg["files"], f"k{i}"), exist_ok=True)
        # IPC, not TCP: with 50 kernels' ports picked at once and their clients connecting (and
        # reconnecting) from ephemeral ports of the same range, a TCP port was now and then taken
        # before its kernel bound it (the kernel died or never answered kernel_info).
        km = AsyncKernelManager(kernel_name="ngp-python", kernel_spec_manager=ksm, transport="ipc",
                                ip=os.path.join(cfg["ipc"], f"k{i}"))
        await km.start_kernel(env={**base_env, "IPYTHONDIR": ipython_dir}, cwd=cfg["cwd"])
        emit({"kernel_pid": km.provisioner.pid})  # so the test can end it if the driver cannot
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=180)
        return km, kc


async def execute(kc, code, timeout):
    """(msg_id, reply content, iopub stream texts, t_sent, t_idle) of one cell."""
    msg = kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                             "user_expressions": {}, "allow_stdin": False,
                                             "stop_on_error": True})
    msg_id = msg["header"]["msg_id"]
    t_sent = time.time()
    kc.shell_channel.send(msg)
    deadline = time.monotonic() + timeout
    reply = None
    while reply is None:
        m = await kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if m["parent_header"].get("msg_id") == msg_id:
            reply = m["content"]
    streams = []
    while True:  # everything the kernel sent for this cell comes before its idle status
        m = await kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "stream":
            streams.append(m["content"]["text"])
        elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            break
    return msg_id, reply, streams, t_sent, time.time()


async def drive(i, kc):
    n = 0
    while not stopping.is_set():
        paths = [os.path.join(cfg["files"], f"k{i}", f"c{n}-{j}.txt") for j in range(cfg["files_per_cell"])]
        code = (f"for _p in {paths!r}:\n"
                "    with open(_p, 'w') as _f:\n"
                "        _f.write(_p)\n"
                "    with open(_p) as _f:\n"
                "        assert _f.read() == _p\n")
        try:
            msg_id, reply, streams, t_sent, t_idle = await execute(kc, code, cfg["cell_timeout"])
        except Exception as e:  # a kernel that does not answer: the test fails on this line
            emit({"failure": f"kernel {i} cell {n}: {type(e).__name__}: {e}"})
            return
        warned = any(cfg["undelivered"] in s for s in streams)
        acked = reply.get("status") == "ok" and not warned
        emit({"cell": {"kernel": i, "n": n, "msg_id": msg_id, "code": code, "paths": paths,
                       "status": reply.get("status"), "ename": reply.get("ename"),
                       "evalue": reply.get("evalue"), "warned": warned, "acked": acked,
                       "t_sent": t_sent, "t_idle": t_idle}})
        n += 1
        if not acked:
            await asyncio.sleep(0.2)  # the service is down: do not spin


async def main():
    gate = asyncio.Semaphore(cfg["start_concurrency"])
    kernels = await asyncio.gather(*(start(i, gate) for i in range(cfg["n"])))
    emit({"ready": len(kernels)})
    loop = asyncio.get_running_loop()

    async def wait_for_stop():
        await loop.run_in_executor(None, sys.stdin.readline)
        stopping.set()

    stopper = asyncio.ensure_future(wait_for_stop())
    await asyncio.gather(*(drive(i, kc) for i, (km, kc) in enumerate(kernels)))
    stopper.cancel()
    for km, kc in kernels:
        kc.stop_channels()
    await asyncio.gather(*(km.shutdown_kernel(now=True) for km, kc in kernels), return_exceptions=True)
    emit({"done": True})


asyncio.run(main())
os._exit(0)  # the stdin reader thread may still be blocked
'''


class Driver:
    """The driver process and the lines it has printed so far (read by a thread)."""

    def __init__(self, tmp_path, url):
        files, cwd = tmp_path / "files", tmp_path / "cwd"
        files.mkdir()
        cwd.mkdir()
        script = tmp_path / "driver.py"
        self.ipc_dir = tempfile.mkdtemp(prefix="ngp-ipc-")  # short: a unix socket path has at most 107 bytes
        script.write_text(DRIVER)
        runtime = str(tmp_path / "runtime")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST", "COV", "NGP_AUDIT", "JUPYTERHUB")) and k != "PYTHONPATH"}
        kernel_env = dict(env, NGP_AUDIT_URL=url, JUPYTERHUB_API_TOKEN=TOKEN, JUPYTER_RUNTIME_DIR=runtime)
        cfg = {"kernels": os.path.dirname(kernel_dir(ENV)), "cwd": str(cwd), "tmp": str(tmp_path),
               "files": str(files), "n": KERNELS, "files_per_cell": FILES_PER_CELL, "undelivered": UNDELIVERED,
               "start_concurrency": 10, "cell_timeout": 60, "ipc": self.ipc_dir}
        self.stderr_path = tmp_path / "driver.stderr"
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115 (open for the driver's life; closed in kill)
        self.proc = subprocess.Popen(
            [PYTHON, str(script), json.dumps(cfg)], cwd=str(tmp_path), text=True, bufsize=1,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env=dict(env, DRIVER_KERNEL_ENV=json.dumps(kernel_env), JUPYTER_RUNTIME_DIR=runtime))
        self.lines, self.cond = [], threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(json.loads(line))
                self.cond.notify_all()
        with self.cond:
            self.lines.append({"eof": True})
            self.cond.notify_all()

    def cells(self):
        with self.cond:
            return [x["cell"] for x in self.lines if "cell" in x]

    def wait(self, predicate, timeout, what):
        """Wait until predicate(cells) holds; fail on a driver failure, its exit, or the timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                failures = [x["failure"] for x in self.lines if "failure" in x]
                assert not failures, f"{failures}\n{self.stderr_tail()}"
                if predicate([x["cell"] for x in self.lines if "cell" in x], self.lines):
                    return
                assert not any("eof" in x for x in self.lines), f"the driver exited\n{self.stderr_tail()}"
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}\n{self.stderr_tail()}"
                self.cond.wait(min(left, 1.0))

    def stop(self, timeout=120):
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.wait(lambda cells, lines: any("done" in x for x in lines), timeout, "the kernels to shut down")
        self.proc.wait(30)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()  # its kernels see their parent go and exit (ipykernel's parent poller)
            self.proc.wait()
        self.stderr.close()
        # A kernel that failed at start can hang in its exit (zmq context termination); the kernels
        # run in sessions of their own, so end any that is left, by its pid.
        with self.cond:
            pids = [x["kernel_pid"] for x in self.lines if "kernel_pid" in x]
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"ngp_research.kernel" in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def stderr_tail(self, n=6000):
        self.stderr.flush()
        lines = [x for x in self.stderr_path.read_text().splitlines(keepends=True)
                 if "Parent appears to have exited" not in x]  # the kernels going with the driver
        return "driver and kernel stderr (tail):\n" + "".join(lines)[-n:]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sigkill_under_50_kernels_loses_no_acknowledged_record(platform, tmp_path):
    t0 = time.monotonic()
    env = {**os.environ, "NGP_HOME": str(platform.home_path)}
    port = free_port()
    service = start_service(port, platform.home_path)
    driver = Driver(tmp_path, f"http://127.0.0.1:{port}/services/audit/")
    try:
        driver.wait(lambda cells, lines: any("ready" in x for x in lines), 240, "50 kernels to start")
        t_ready = time.monotonic()

        # 1. Load: all 50 kernels running cells, for a few seconds and until more than 100 cells (from
        # every kernel) were acknowledged.
        t_load = time.time()
        driver.wait(lambda cells, _: sum(c["acked"] for c in cells) > 100 and time.time() > t_load + LOAD_S
                    and len({c["kernel"] for c in cells if c["acked"]}) == KERNELS, 120,
                    "more than 100 acknowledged cells, from every kernel")

        # 2. SIGKILL the service mid-load; while it is down, cells are refused.
        service.send_signal(signal.SIGKILL)
        service.wait()
        t_killed = time.time()
        driver.wait(lambda cells, _: sum(c["t_sent"] > t_killed for c in cells) >= KERNELS
                    and time.time() > t_killed + DOWN_S, 120, "cells sent while the service is down")

        # 3. Restart it (same port, same store); every kernel must run cells again.
        t_restart = time.time()
        service = start_service(port, platform.home_path)
        driver.wait(lambda cells, _: len({c["kernel"] for c in cells if c["acked"] and c["t_sent"] > t_restart})
                    == KERNELS and time.time() > t_restart + AFTER_S, 120,
                    "every kernel to run a cell after the restart")

        # 4. Stop the load, then the service.
        driver.stop()
    finally:
        driver.kill()
        service.kill()
        service.wait()
    t_done = time.monotonic()

    cells = driver.cells()
    unexpected = [c for c in cells if c["status"] != "ok" and c["ename"] != ENAME]
    assert unexpected == [], unexpected[:5]
    while_down = [c for c in cells if c["t_sent"] > t_killed and c["t_idle"] < t_restart]
    assert while_down, "no cell ran while the service was down"
    assert [c for c in while_down if c["acked"] or c["status"] != "error"] == [], \
        "a cell was run or acknowledged while the service was down"
    acked = [c for c in cells if c["acked"]]
    # Ran (their code was acknowledged) but their file records could not be delivered at the time:
    # the kernel kept them and delivered them once the service was back.
    undelivered = [c for c in cells if c["status"] == "ok" and c["warned"]]

    store = AuditStore.for_platform(platform)
    try:
        executes = {}
        for r in store.records(action="query.execute"):
            executes.setdefault(r.detail.get("msg_id"), []).append(r)
        opens = {}
        for r in (a for rec in store.records(action="file.open") for a in rec.accesses()):
            opens.setdefault((r.path, r.detail.get("msg_id")), set()).add(r.detail.get("mode"))
        n_stored = len(store.records())
    finally:
        store.engine.dispose()

    missing_code = [c["msg_id"] for c in acked
                    if not any(r.detail.get("code") == c["code"] and r.actor == "alice"
                               for r in executes.get(c["msg_id"], []))]
    assert missing_code == [], \
        f"{len(missing_code)} acknowledged cells have no query.execute record: {missing_code[:5]}"
    missing_opens = [(c["msg_id"], p) for c in acked + undelivered for p in c["paths"]
                     if not {"w", "r"} <= opens.get((p, c["msg_id"]), set())]
    assert missing_opens == [], f"{len(missing_opens)} file.open records are missing: {missing_opens[:5]}"
    refused_ran = [c["msg_id"] for c in while_down if c["msg_id"] in executes]
    assert refused_ran == [], f"cells refused while the service was down have query.execute records: {refused_ran[:5]}"

    verify = subprocess.run([sys.executable, "-m", "ngp_research.cli", "audit", "verify"], env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "audit chain OK" in verify.stdout

    print(f"\n{len(cells)} cells: {len(acked)} acknowledged "
          f"({sum(c['t_sent'] > t_restart for c in acked)} after the restart), "
          f"{len(while_down)} refused while down, {len(undelivered)} ran with undelivered records; "
          f"{n_stored} records stored; kernels started in {t_ready - t0:.1f}s, "
          f"load and shutdown {t_done - t_ready:.1f}s, checks {time.monotonic() - t_done:.1f}s")
