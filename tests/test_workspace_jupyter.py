"""A real Jupyter server in alice's cardio-gwas sandbox, reached from the host through the socket bridges.

The server (plain ``jupyter server``: no hub here) runs inside a bubblewrap sandbox behind
``ngp_research.workspace.launch`` and listens on ``/run/ngp/server/server.sock``; the host reaches it through
a :class:`TcpToUnix` relay, and the kernel reaches a stand-in for the hub API through the launcher's
relay (127.0.0.1:8081 inside -> ``hub.sock``) and the host's :class:`UnixToTcp`. Everything is
checked over HTTP and the kernel websocket, as a browser would.

Needs root and bubblewrap (like tests/test_sandbox.py) and the workspace environment
(``make workspace-env``; built here once if ``$NGP_WORKSPACE_ENV`` has none).
"""

import asyncio
import base64
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ngp_research.workspace import plan_for
from ngp_research.workspace.plan import INSIDE_AUDIT_SOCKET
from ngp_research.workspace.bridge import TcpToUnix, UnixToTcp
from ngp_research.workspace.environment import (
    build_workspace_env,
    config_dir,
    default_workspace_env,
    is_built,
)
from ngp_research.workspace.jupyter import (
    jupyter_mounts,
    singleuser_command,
    singleuser_environment,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None,
                                reason="the workspace Jupyter tests need root and bubblewrap (make test installs it)")


class _FakeHub(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hub-api-reached"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Loop:
    """An asyncio loop in a thread, where the host's relays run (as they will in the hub's loop)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def __call__(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Client:
    def __init__(self, port, token):
        self.base, self.token = f"http://127.0.0.1:{port}", token
        self.port = port

    def request(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read()
                return r.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def websocket(self, path):
        return WebSocket(self.port, path, self.token)


class WebSocket:
    """Just enough of RFC 6455 (client side) to talk to a kernel."""

    def __init__(self, port, path, token):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           f"Authorization: token {token}\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        self.status = int(head.split()[1]) if head else 0

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, obj):
        self._send_frame(0x1, json.dumps(obj).encode())

    def recv(self):
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the server")
            message += payload
            if b0 & 0x80:
                return json.loads(message)

    def execute(self, code, timeout=60):
        """Run ``code`` in the kernel; returns (stdout, error or None)."""
        msg_id, session = uuid.uuid4().hex, uuid.uuid4().hex
        self.send({"header": {"msg_id": msg_id, "username": "test", "session": session, "msg_type": "execute_request",
                              "version": "5.3", "date": ""},
                   "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                   "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                               "allow_stdin": False, "stop_on_error": True}})
        out, error, deadline = [], None, time.time() + timeout
        while time.time() < deadline:
            msg = self.recv()
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                error = "\n".join(msg["content"]["traceback"])
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(out), error
        raise TimeoutError("no reply from the kernel")

    def close(self):
        self.sock.close()


KERNEL_PROBE = r"""
import json, os, site, sys, urllib.request
cfg = os.environ["JUPYTER_CONFIG_DIR"]
try:
    open(os.path.join(cfg, "jupyter_server_config.py"), "a").close()
    config_writable = True
except OSError:
    config_writable = False
try:
    open("/data/new-file", "w").close()
    data_writable = True
except OSError:
    data_writable = False
print(json.dumps({
    "data": sorted(os.path.join(d, f) for d, _, fs in os.walk("/data") for f in fs),
    "json_file": json.__file__,
    "shadowed": hasattr(json, "SHADOWED"),
    "cwd": os.getcwd(),
    "sys_path": sys.path,
    "user_site": site.ENABLE_USER_SITE,
    "uid": os.getuid(),
    "executable": sys.executable,
    "hub": urllib.request.urlopen("http://127.0.0.1:8081/hub/api", timeout=10).read().decode(),
    "config_writable": config_writable,
    "data_writable": data_writable,
    "evil_ran": os.path.exists("/home/alice/evil-ran"),
    "ngp_research": __import__("ngp_research").__file__,
}))
"""


@pytest.fixture(scope="module")
def workspace():
    from ngp_research.catalog import Catalog
    from ngp_research.demo.seed import seed_demo
    from ngp_research.platform import Platform
    from ngp_research.workspace.limits import CgroupLimits
    from ngp_research.workspace.sandbox import LocalSandbox, prepare_areas

    env = default_workspace_env()
    timings = {}
    if not is_built(env):
        t = time.monotonic()
        build_workspace_env(env)
        timings["env_build"] = time.monotonic() - t
    base = tempfile.mkdtemp(prefix="ngp-jupyter-")
    os.chmod(base, 0o711)
    platform = Platform(home=os.path.join(base, "ngp"))
    seed_demo(platform, samples_per_region=5, variants=60)
    catalog = Catalog.open(platform)
    token = secrets.token_hex(24)
    kernel_token = secrets.token_hex(24)
    environment = dict(singleuser_environment("alice", env), JUPYTER_TOKEN=token, JUPYTERHUB_API_TOKEN=kernel_token,
                       NGP_AUDIT_URL="http://127.0.0.1:8082/services/audit/", NGP_AUDIT_SOCKET=INSIDE_AUDIT_SOCKET)
    plan = plan_for(catalog, "alice", "cardio-gwas", python_env=env, runtime=True, environment=environment,
                    extra_mounts=jupyter_mounts(env))
    prepare_areas(platform, plan)
    shared = platform.projects_dir / "cardio-gwas" / "shared"
    home = platform.projects_dir / "cardio-gwas" / "home" / "alice"
    runtime = platform.home_path / "runtime" / "cardio-gwas" / "alice"
    (shared / "json.py").write_text("SHADOWED = True\n")
    # What a user might plant in their home to get around the platform's Jupyter config.
    evil = ["/bin/sh", "-c", "touch /home/alice/evil-ran; exec " + env + "/bin/python -m ipykernel_launcher -f "
            "{connection_file}"]
    planted = {
        ".local/share/jupyter/kernels/evil/kernel.json": json.dumps({"argv": evil, "display_name": "evil",
                                                                     "language": "python"}),
        ".local/share/jupyter/kernels/ngp-python/kernel.json": json.dumps({"argv": evil, "display_name": "NGP",
                                                                           "language": "python"}),
        ".jupyter/jupyter_server_config.json": json.dumps({"ServerApp": {"terminals_enabled": True},
                                                           "KernelSpecManager": {"allowed_kernelspecs": []}}),
        ".local/etc/jupyter/jupyter_server_config.json": json.dumps({"ServerApp": {"terminals_enabled": True}}),
    }
    for rel, text in planted.items():
        path = home / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d, dirs, files in os.walk(home):
        for name in dirs + files:
            os.chown(os.path.join(d, name), plan.uid, plan.gid)

    hub = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    loop = Loop()
    hub_relay = UnixToTcp(str(runtime / "hub.sock"), "127.0.0.1", hub.server_address[1], owner=plan.uid)
    server_relay = TcpToUnix(str(runtime / "server" / "server.sock"), owner=plan.uid)
    loop(hub_relay.start())
    loop(server_relay.start())
    # The audited kernel refuses to run code without the audit service: a real service app, whose token
    # check is a stand-in for the hub's.
    from ngp_research.audit.service import Caller, ServiceContext

    from .test_audit_service import ServiceThread

    async def auth(t):
        return Caller("alice", "cardio-gwas") if t == kernel_token else None

    # It listens on its own socket, as the hub-managed service does; the sandbox binds that socket's folder.
    services = [ServiceThread(ServiceContext(catalog.audit, auth, catalog), platform.audit_socket).__enter__()]

    def restart_audit():
        services[-1].__exit__(None, None, None)
        services.append(ServiceThread(ServiceContext(catalog.audit, auth, catalog), platform.audit_socket).__enter__())

    cgroup = f"test-jupyter-{os.getpid()}"
    t = time.monotonic()
    log_path = os.path.join(base, "server.log")
    with open(log_path, "wb") as log:
        proc = LocalSandbox().start(plan, singleuser_command(env, ["--ServerApp.log_level=WARN"], server="jupyter-server",
                                                                relays=["127.0.0.1:8082=/run/ngp/nowhere.sock"]),
                                    cgroup=cgroup, stdout=log, stderr=subprocess.STDOUT)
    client = Client(server_relay.port, token)
    deadline = time.time() + 60

    def log_tail():
        with open(log_path) as f:
            return f.read()[-3000:]

    while True:
        if proc.poll() is not None:
            pytest.fail("the server ended: " + log_tail())
        if (runtime / "server" / "server.sock").exists():
            try:
                if client.request("GET", "/api/status")[0] == 200:
                    break
            except OSError:
                pass
        if time.time() > deadline:
            pytest.fail("the server did not answer: " + log_tail())
        time.sleep(0.2)
    timings["server_start"] = time.monotonic() - t
    print(f"\nworkspace jupyter timings: {timings}")
    try:
        yield {"client": client, "plan": plan, "platform": platform, "env": env, "runtime": runtime, "home": home,
               "catalog": catalog, "restart_audit": restart_audit}
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        loop(server_relay.stop())
        loop(hub_relay.stop())
        services[-1].__exit__(None, None, None)
        loop.close()
        hub.shutdown()
        time.sleep(0.2)
        CgroupLimits().remove(cgroup)
        catalog.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def kernel(workspace):
    client = workspace["client"]
    status, model = client.request("POST", "/api/kernels", {"name": "ngp-python", "path": "project"})
    assert status == 201, model
    ws = client.websocket(f"/api/kernels/{model['id']}/channels")
    assert ws.status == 101
    out, error = ws.execute(KERNEL_PROBE)
    assert error is None, error
    yield {"id": model["id"], "probe": json.loads(out), "ws": ws}
    ws.close()
    client.request("DELETE", f"/api/kernels/{model['id']}")


def test_only_the_platform_kernelspec_is_listed(workspace):
    status, specs = workspace["client"].request("GET", "/api/kernelspecs")
    assert status == 200
    assert set(specs["kernelspecs"]) == {"ngp-python"} and specs["default"] == "ngp-python"
    argv = specs["kernelspecs"]["ngp-python"]["spec"]["argv"]
    assert argv[0] == workspace["env"] + "/bin/python" and "-P" in argv and "-s" in argv


@pytest.mark.parametrize("name", ["python3", "evil"])
def test_other_kernels_cannot_be_started(workspace, name):
    status, body = workspace["client"].request("POST", "/api/kernels", {"name": name, "path": "project"})
    assert status >= 400, body
    assert not (workspace["home"] / "evil-ran").exists()


def test_terminals_are_off(workspace):
    client = workspace["client"]
    assert client.request("GET", "/api/terminals")[0] == 404
    assert client.request("POST", "/api/terminals")[0] == 404


def test_only_jupyterlab_is_loaded_as_a_server_extension(workspace):
    client = workspace["client"]
    assert client.request("GET", "/lab/api/settings")[0] == 200  # JupyterLab is on
    assert client.request("GET", "/lsp/status")[0] == 404  # jupyter_lsp, installed with JupyterLab, is off
    enabled = os.listdir(os.path.join(workspace["env"], "etc", "jupyter", "jupyter_server_config.d"))
    assert enabled == ["jupyterlab.json"]


def test_kernel_sees_exactly_the_tagged_files(workspace, kernel):
    assert kernel["probe"]["data"] == sorted(m.target for m in workspace["plan"].data_files)
    assert kernel["probe"]["uid"] == workspace["plan"].uid
    assert kernel["probe"]["executable"] == workspace["env"] + "/bin/python"


def test_working_directory_does_not_shadow_modules(kernel):
    p = kernel["probe"]
    assert p["cwd"] == "/project"
    assert not p["shadowed"] and p["json_file"].startswith("/usr/lib/python3.11/")
    assert "" not in p["sys_path"] and "/project" not in p["sys_path"] and not p["user_site"]


def test_planted_user_kernelspec_does_not_replace_the_platform_one(workspace, kernel):
    assert not kernel["probe"]["evil_ran"] and not (workspace["home"] / "evil-ran").exists()


def test_the_repository_is_not_needed_inside(workspace, kernel):
    assert kernel["probe"]["ngp_research"].startswith(workspace["env"] + "/lib/")


def test_hub_api_is_reachable_from_inside_through_the_bridges(kernel):
    assert kernel["probe"]["hub"] == "hub-api-reached"


def test_kernel_runs_code_over_the_websocket(kernel):
    out, error = kernel["ws"].execute("print(sum(range(10)))")
    assert (out, error) == ("45\n", None)


def test_config_and_data_are_read_only_from_inside(workspace, kernel):
    assert not kernel["probe"]["config_writable"] and not kernel["probe"]["data_writable"]
    client = workspace["client"]
    cfg = config_dir(workspace["env"]).lstrip("/")
    assert client.request("PUT", f"/api/contents/{cfg}/x.py", {"type": "file", "format": "text", "content": "x"})[0] >= 400


def test_contents_api_reads_data_and_cannot_write_it(workspace):
    client = workspace["client"]
    target = min(m.target for m in workspace["plan"].data_files)
    status, model = client.request("GET", "/api/contents" + target + "?content=0")
    assert status == 200 and model["type"] == "file"
    status, _ = client.request("GET", "/api/contents" + target + "?content=1&format=base64")
    assert status == 200
    status, _ = client.request("PUT", "/api/contents" + target,
                               {"type": "file", "format": "text", "content": "overwritten"})
    assert status >= 400
    status, _ = client.request("PUT", "/api/contents/data/new.txt", {"type": "file", "format": "text", "content": "x"})
    assert status >= 400
    status, _ = client.request("PUT", "/api/contents/project/notes.txt",
                               {"type": "file", "format": "text", "content": "ok"})
    assert status in (200, 201)


def test_file_browser_root_shows_data_project_and_home(workspace):
    status, model = workspace["client"].request("GET", "/api/contents/")
    assert status == 200
    assert sorted(m["name"] for m in model["content"]) == ["data", "home", "project"]


def test_bridge_sockets_are_private(workspace):
    import stat

    for name in ("hub.sock", "server/server.sock"):
        st = os.stat(workspace["runtime"] / name)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == workspace["plan"].uid


def test_the_kernels_file_opens_reach_the_audit_service_with_the_cells_code(workspace, kernel):
    kernel["ws"].execute("open('/data/syd/syd-cohort/syd-cohort.vcf.gz', 'rb').read(2)")
    catalog = workspace["catalog"]
    opens = [a for r in catalog.audit.records(action="file.open", actor="alice") for a in r.accesses()
             if a.path == "/data/syd/syd-cohort/syd-cohort.vcf.gz"]
    assert opens, "no file.open record"
    rec = opens[-1]
    assert (rec.project, rec.region, rec.dataset) == ("cardio-gwas", "syd", "syd-cohort")
    queries = {q.detail.get("msg_id"): q.detail.get("code") for q in catalog.audit.records(action="query.execute")}
    assert "syd-cohort.vcf.gz" in queries[rec.detail["msg_id"]]


def test_the_servers_own_file_operations_are_recorded_before_they_happen(workspace):
    client, catalog = workspace["client"], workspace["catalog"]
    target = min(m.target for m in workspace["plan"].data_files)
    status, _ = client.request("GET", "/api/contents" + target + "?content=1&format=base64")
    assert status == 200
    status, _ = client.request("PUT", "/api/contents/project/audited.txt",
                               {"type": "file", "format": "text", "content": "x"})
    assert status in (200, 201)
    status, _ = client.request("PATCH", "/api/contents/project/audited.txt", {"path": "project/renamed.txt"})
    assert status == 200
    records = [(r.detail.get("operation"), r.path, r.dataset) for r in catalog.audit.records(action="server.file")]
    assert ("open", target, target.split("/")[3]) in records
    assert ("save", "/project/audited.txt", None) in records
    assert ("rename", "/project/audited.txt", None) in records
    rec = [r for r in catalog.audit.records(action="server.file") if r.path == target][-1]
    assert (rec.actor, rec.project) == ("alice", "cardio-gwas")


def test_the_hubs_sockets_cannot_be_replaced_from_inside(kernel):
    out, error = kernel["ws"].execute(
        "import os, socket\n"
        "r = []\n"
        "def listen(path):\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.bind(path)\n"
        "for f in (lambda: os.rename('/run/ngp/audit/audit.sock', '/run/ngp/audit/x'),\n"
        "          lambda: os.unlink('/run/ngp/audit/audit.sock'), lambda: os.unlink('/run/ngp/hub.sock'),\n"
        "          lambda: open('/run/ngp/audit/audit.sock.new', 'w'), lambda: open('/run/ngp/hub.sock.new', 'w'),\n"
        "          lambda: listen('/run/ngp/audit/fake.sock'), lambda: os.chmod('/run/ngp/audit', 0o777),\n"
        "          lambda: os.rename('/run/ngp/audit', '/run/ngp/elsewhere')):\n"
        "    try:\n"
        "        f(); r.append('done')\n"
        "    except OSError as e:\n"
        "        r.append(e.strerror)\n"
        "print(r, sorted(os.listdir('/run/ngp/audit')))")
    assert error is None and "done" not in out, out
    assert "['audit.sock']" in out, out  # the service's socket is there, and nothing else


def test_the_kernel_reaches_the_audit_service_on_its_own_socket_not_the_loopback_relay(kernel):
    """The kernel's records go to the service's socket (its folder bound read-only from outside), not to the
    relay on 127.0.0.1:8082 that the member's own processes run: no TCP connection of the kernel's leads
    there, and one of its sockets is a unix stream socket."""
    out, error = kernel["ws"].execute(
        "import os\n"
        "open('/project/touch-for-audit', 'w').close()\n"  # a file record, so the C sender has connected
        "mine = set()\n"
        "for fd in os.listdir('/proc/self/fd'):\n"
        "    try:\n"
        "        link = os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError:\n"
        "        continue\n"  # the listing's own descriptor, closed by now
        "    if link.startswith('socket:['):\n"
        "        mine.add(link[8:-1])\n"
        "def rows(table):\n"
        "    return [line.split() for line in open(table).read().splitlines()[1:]]\n"
        "to_relay = [r for r in rows('/proc/self/net/tcp') if r[2].endswith(':1F92') and r[9] in mine]\n"
        "unix = [r for r in rows('/proc/self/net/unix') if r[6] in mine and r[4] == '0001']\n"
        "print('relay', len(to_relay), 'unix', len(unix), os.environ['NGP_AUDIT_SOCKET'])")
    assert error is None, error
    assert "relay 0 " in out and "/run/ngp/audit/audit.sock" in out, out


def test_a_cell_cannot_point_what_it_starts_at_another_audit_service(workspace, kernel):
    """What a cell starts (a Dask worker, a server) finds the service's socket from the bound folder, not
    from the environment the cell controls; the cell itself is flagged."""
    code = ("import os\n"
            "saved = os.environ.get('NGP_AUDIT_SOCKET')\n"
            "os.environ['NGP_AUDIT_SOCKET'] = '/tmp/fake.sock'\n"
            "from ngp_research.workspace.plan import audit_socket\n"
            "print('socket', audit_socket())\n"
            "os.environ.pop('NGP_AUDIT_SOCKET')\n"
            "print('socket', audit_socket())\n"
            "os.environ['NGP_AUDIT_SOCKET'] = saved\n")
    out, error = kernel["ws"].execute(code)
    assert error is None, error
    assert out.split() == ["socket", "/run/ngp/audit/audit.sock", "socket", "/run/ngp/audit/audit.sock"], out
    [rec] = [r for r in workspace["catalog"].audit.records(action="query.execute") if r.detail.get("code") == code]
    assert "possible tampering" in rec.detail["flag"]


def test_a_python_program_a_cell_starts_in_the_sandbox_records_its_own_opens(workspace, kernel):
    """A Python program a cell starts inside the sandbox installs the hook before its code runs (the
    environment's ``.pth``): its own open of a dataset's file reaches the service under the region and the
    cell. Started without the kernel's environment (``env={}``), it has no token: its first recorded access
    (here, reading its own script) is refused, so it never runs unrecorded."""
    script = workspace["home"].parent.parent / "shared" / "child_reads.py"
    script.write_text("open('/data/syd/syd-cohort/syd-cohort.vcf.gz', 'rb').read(2)\nprint('child ran')\n")
    code = ("import subprocess, sys\n"
            "p = subprocess.run([sys.executable, '/project/child_reads.py'], capture_output=True, text=True)\n"
            "q = subprocess.run([sys.executable, '/project/child_reads.py'], capture_output=True, text=True, env={})\n"
            "print(p.returncode, p.stdout.strip(), '|', q.returncode, q.stdout.strip(), '|', q.stderr.strip()[-300:])\n")
    out, error = kernel["ws"].execute(code)
    assert error is None, error
    first, second, _ = out.split("|", 2)
    assert first.strip() == "0 child ran", out
    # refused at its first recorded access, reading its own script (not a failure to start: that is 126)
    assert second.split() == ["2"] and "/project/child_reads.py" in out.rsplit("|", 1)[1], out
    catalog = workspace["catalog"]
    [query] = [r for r in catalog.audit.records(action="query.execute") if r.detail.get("code") == code]
    opens = [a for r in catalog.audit.records(action="file.open", actor="alice") for a in r.accesses()
             if a.path == "/data/syd/syd-cohort/syd-cohort.vcf.gz" and a.detail.get("msg_id") == query.detail["msg_id"]]
    assert len(opens) == 1, opens  # the first program's; the second never reached its code
    assert (opens[0].project, opens[0].region, opens[0].dataset) == ("cardio-gwas", "syd", "syd-cohort")


def test_a_restarted_audit_service_is_reached_again_through_the_bound_folder(workspace, kernel):
    """A restarted service binds a new socket at the same path: the sandbox, which binds the folder and
    not the socket, reaches it, for the kernel's records and the server's alike."""
    workspace["restart_audit"]()
    out, error = kernel["ws"].execute("open('/project/after-restart', 'w').close()\nprint('ran')")
    assert error is None and "ran" in out, (out, error)
    catalog = workspace["catalog"]
    assert any(a.path == "/project/after-restart" for r in catalog.audit.records(action="file.open", actor="alice")
               for a in r.accesses())
    status, _ = workspace["client"].request("GET", "/api/contents/project/after-restart?content=1")
    assert status == 200
    assert any(r.path == "/project/after-restart" for r in catalog.audit.records(action="server.file"))


def test_the_server_relay_never_follows_a_planted_link(tmp_path):
    import asyncio
    import socket as _socket

    victim = tmp_path / "victim.sock"
    listener = _socket.socket(_socket.AF_UNIX)
    listener.bind(str(victim))
    listener.listen()
    (tmp_path / "server.sock").symlink_to(victim)

    async def attempt():
        relay = TcpToUnix(str(tmp_path / "server.sock"), owner=os.getuid())
        await relay.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(100), 5)
            except ConnectionResetError:
                data = b""
            writer.close()
            return data
        finally:
            await relay.stop()

    assert asyncio.run(attempt()) == b""  # the relay refused to connect through the link
    listener.settimeout(0.5)
    with pytest.raises(OSError):
        listener.accept()
    listener.close()
