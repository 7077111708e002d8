"""Start the whole platform on 127.0.0.1: the identity provider, then the hub (with its proxy).

Used by ``ngp demo start`` (and so ``make demo``) and by the end-to-end tests.
The identity provider's roster is the catalog's users, each with the demo
password and their catalog roles as group claims.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..identity.devprovider import DevIdentityProvider, ensure_node_modules, roster_from_users
from .config import CLIENT_ID, REPO
from .state import secret_file

DEMO_PASSWORD = "ngp-demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PlatformProcesses:
    """The identity provider and the hub of one platform home, as child processes.

    Parameters
    ----------
    platform : ngp_research.platform.Platform
    hub_port, idp_port : int
        Public ports on 127.0.0.1 (0: pick free ones).
    """

    def __init__(self, platform, hub_port=8000, idp_port=5556, hub_api_port=0, proxy_api_port=0,
                 password=DEMO_PASSWORD, workspace_env=None, extra_env=None, extra_users=()):
        self.platform = platform
        self.hub_port = hub_port or free_port()
        self.idp_port = idp_port or free_port()
        self.hub_api_port = hub_api_port or free_port()
        self.proxy_api_port = proxy_api_port or free_port()
        self.audit_port = free_port()
        self.reports_port = free_port()
        self.password = password
        self.workspace_env = workspace_env
        self.extra_env = extra_env or {}
        self.extra_users = list(extra_users)  # (username, roles) known to the provider only (tests)
        self.idp = None
        self.hub = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    @property
    def hub_log(self) -> Path:
        return self.platform.state_dir / "hub.log"

    def roster(self, catalog):
        users = [(u.username, u.role_labels()) for u in catalog.users()] + self.extra_users
        return roster_from_users(users, self.password)

    def start(self, catalog) -> None:
        st = self.platform.state_dir
        ensure_node_modules()
        self.idp = DevIdentityProvider(state_dir=str(st / "idp"), port=self.idp_port)
        client = {
            "client_id": CLIENT_ID,
            "client_secret": secret_file(st / "oidc_client_secret"),
            "redirect_uris": [f"{self.url}/hub/oauth_callback"],
        }
        self.idp.write_config(self.roster(catalog), [client])
        self.idp.start()

        env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "JPY_", "CONFIGPROXY_"))}
        env.update({
            "NGP_HOME": str(self.platform.home_path),
            "NGP_OIDC_ISSUER": self.idp.issuer,
            "NGP_HUB_PORT": str(self.hub_port),
            "NGP_HUB_API_PORT": str(self.hub_api_port),
            "NGP_PROXY_API_PORT": str(self.proxy_api_port),
            "NGP_AUDIT_PORT": str(self.audit_port),
            "NGP_REPORTS_PORT": str(self.reports_port),
        })
        if self.workspace_env:
            env["NGP_WORKSPACE_ENV"] = self.workspace_env
        env.update(self.extra_env)
        self._log = open(self.hub_log, "ab")
        self.hub = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(REPO / "hub" / "jupyterhub_config.py")],
            cwd=str(st), env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._wait_for(f"{self.url}/hub/api", 90)
        # Where the running hub answers, for commands that work through it (ngp report run).
        (st / "hub.json").write_text(json.dumps({"url": self.url}) + "\n")

    def _wait_for(self, url, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.hub.poll() is not None:
                raise RuntimeError(f"the hub exited with {self.hub.returncode}; see {self.hub_log}:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the hub did not answer at {url} within {timeout} s:\n" + self.log_tail())

    def log_tail(self, n=40) -> str:
        try:
            return "\n".join(self.hub_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.hub is not None and self.hub.poll() is None:
            os.killpg(self.hub.pid, signal.SIGTERM)
            try:
                self.hub.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.hub.pid, signal.SIGKILL)
                self.hub.wait()
        # The proxy runs in the hub's session; make sure it is gone too.
        pid_file = self.platform.state_dir / "proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
        if self.idp is not None:
            self.idp.stop()
        if self._log:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
