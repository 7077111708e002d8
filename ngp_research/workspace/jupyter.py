"""How the single-user Jupyter server is started inside a workspace sandbox.

Pure functions for the spawner (:func:`singleuser_environment`, :func:`singleuser_command`,
:func:`jupyter_mounts`); the hub's side of the sockets is in :mod:`.bridge`. Inside the sandbox::

    <env>/bin/python -P -s -m ngp_research.workspace.launch \\
        --tcp-to-unix 127.0.0.1:8081=/run/ngp/hub.sock -- \\
        <env>/bin/jupyterhub-singleuser --sock=/run/ngp/server/server.sock --ServerApp.sock_mode=0600 \
        --ServerApp.port=8888 ...

The launcher relays the hub API into the sandbox (127.0.0.1:8081 inside -> ``hub.sock``, which the
hub creates outside); the server listens on ``server.sock`` (created inside by the member's uid,
0600) and the hub reaches it through a :class:`~.bridge.TcpToUnix` outside.

Also defines the contents and kernelspec managers the platform's Jupyter config names (loaded lazily:
this module is imported by the hub, which has no jupyter_server).
"""

from .environment import config_dir
from .plan import RUNTIME_PATH, Mount

HUB_SOCKET = f"{RUNTIME_PATH}/hub.sock"  # created by the hub, outside, owned by the member, 0600
SERVER_SOCKET = f"{RUNTIME_PATH}/server/server.sock"  # created by the server, inside, as the member, 0600
INSIDE_HUB_API = ("127.0.0.1", 8081)  # where the server finds the hub API inside (JUPYTERHUB_API_URL)
#: Folders at the top of the file browser; the rest of / stays reachable by path, read-only.
SHOWN_AT_ROOT = ("data", "home", "project")


def singleuser_environment(plan_user: str, workspace_env: str) -> dict:
    """Environment of the single-user server and its kernels (merged into the plan's environment).

    Config and kernelspecs come only from the workspace environment, which is read-only inside;
    nothing under the member's home (``~/.jupyter``, ``~/.local``) is read as configuration.

    Examples
    --------
    >>> env = singleuser_environment("alice", "/opt/ngp-research/envs/abc")
    >>> env["JUPYTER_CONFIG_DIR"], env["JUPYTER_PATH"], env["PATH"].split(":")[0]
    ('/opt/ngp-research/envs/abc/etc/ngp-jupyter', '/opt/ngp-research/envs/abc/share/jupyter', '/opt/ngp-research/envs/abc/bin')
    """
    env = workspace_env.rstrip("/")
    home = f"/home/{plan_user}"
    share = f"{env}/share/jupyter"
    return {
        "JUPYTER_CONFIG_DIR": config_dir(env),
        "JUPYTER_PATH": share,
        "JUPYTER_DATA_DIR": share,
        "JUPYTER_RUNTIME_DIR": "/tmp/jupyter-runtime",  # connection files stay in the sandbox's private /tmp
        "JUPYTER_PREFER_ENV_PATH": "1",
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTERHUB_DISABLE_USER_CONFIG": "1",
        "JUPYTERLAB_SETTINGS_DIR": f"{home}/.jupyter/lab/user-settings",
        "JUPYTERLAB_WORKSPACES_DIR": f"{home}/.jupyter/lab/workspaces",
        "IPYTHONDIR": "/tmp/ipython",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": f"{env}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
    }


def singleuser_command(workspace_env: str, extra_args=(), server: str = "jupyterhub-singleuser",
                       relays=()) -> list[str]:
    """The command line that starts the server inside the sandbox, behind the launcher's hub relay.

    ``server`` is ``jupyterhub-singleuser`` under the hub, ``jupyter-server`` without one (tests).
    ``relays`` adds inside relays, ``HOST:PORT=SOCKET`` each (the audit service's, for example).

    Examples
    --------
    >>> singleuser_command("/e", ["--debug"])[-5:]
    ['/e/bin/jupyterhub-singleuser', '--sock=/run/ngp/server/server.sock', '--ServerApp.sock_mode=0600', '--ServerApp.port=8888', '--debug']
    """
    env = workspace_env.rstrip("/")
    host, port = INSIDE_HUB_API
    return [f"{env}/bin/python", "-P", "-s", "-m", "ngp_research.workspace.launch",
            "--tcp-to-unix", f"{host}:{port}={HUB_SOCKET}",
            *[arg for spec in relays for arg in ("--tcp-to-unix", spec)], "--",
            f"{env}/bin/{server}", f"--sock={SERVER_SOCKET}", "--ServerApp.sock_mode=0600",
            # jupyter_server aborts when a port other than its default is set together with --sock, and
            # jupyterhub-singleuser sets the port from JUPYTERHUB_SERVICE_URL; the command line wins.
            "--ServerApp.port=8888", *extra_args]


def jupyter_mounts(workspace_env: str) -> tuple[Mount, ...]:
    """Read-only mounts the server needs beyond :func:`~ngp_research.workspace.system_mounts`: its config.

    Examples
    --------
    >>> jupyter_mounts("/e")
    (Mount(source='/e/etc/ngp-jupyter', target='/e/etc/ngp-jupyter', writable=False, kind='system'),)
    """
    cfg = config_dir(workspace_env.rstrip("/"))
    return (Mount(cfg, cfg, False, "system"),)


def _contents_manager_class():
    import json
    import os

    import socket

    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from tornado import web
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    from tornado.netutil import Resolver

    class ServiceSocket(Resolver):
        """Every host name resolves to the audit service's own unix socket (``NGP_AUDIT_SOCKET``)."""

        def initialize(self, path):
            self.path = path

        async def resolve(self, host, port, family=socket.AF_UNSPEC):
            return [(socket.AF_UNIX, self.path)]

    clients = []  # the client on the service's socket, made on first use (the path is looked up once)

    def audit_client():
        """The HTTP client for the audit service: on its unix socket when ``NGP_AUDIT_SOCKET`` names one
        (in a workspace: bound read-only from outside, so no process in the sandbox can stand in for the
        service, as one could on a loopback port), else the shared client for ``NGP_AUDIT_URL``."""
        if not clients:
            from ngp_research.workspace.plan import audit_socket

            path = audit_socket()
            clients.append(AsyncHTTPClient(force_instance=True, resolver=ServiceSocket(path=path)) if path else None)
        return clients[0] or AsyncHTTPClient()

    class WorkspaceContentsManager(AsyncLargeFileManager):
        """Lists only /data, /home and /project at the root of the file browser, and records every file
        the server itself opens, lists, saves, renames or deletes (JupyterLab's file browser, editors,
        downloads and uploads) in the audit service *before* doing it. Without an acknowledgement the
        operation is refused (503), as the audited kernel refuses a cell.
        """

        async def _audit(self, action, path, **detail):
            url = os.environ.get("NGP_AUDIT_URL")
            token = os.environ.get("JUPYTERHUB_API_TOKEN")
            reason = "NGP_AUDIT_URL is not set"
            if url and token:
                body = json.dumps({"records": [{"action": "server.file", "path": "/" + path.strip("/"),
                                                "detail": {"operation": action, **detail}}]})
                try:
                    r = await audit_client().fetch(HTTPRequest(
                        url + "records", method="POST", body=body, request_timeout=10,
                        headers={"Authorization": f"token {token}", "Content-Type": "application/json"}),
                        raise_error=False)
                    if r.code == 200:
                        return
                    reason = f"the service answered {r.code}"
                except Exception as e:  # connection refused, timeout
                    reason = str(e)
            raise web.HTTPError(503, f"the audit service cannot be reached; the file operation was refused ({reason})")

        async def get(self, path, content=True, type=None, format=None, **kwargs):
            if content:
                is_dir = await self.dir_exists(path)
                await self._audit("list" if is_dir else "open", path, type=type)
            model = await super().get(path, content=content, type=type, format=format, **kwargs)
            if path.strip("/") == "" and model.get("type") == "directory" and isinstance(model.get("content"), list):
                model["content"] = [m for m in model["content"] if m["name"] in SHOWN_AT_ROOT]
            return model

        async def save(self, model, path=""):
            await self._audit("save", path, type=model.get("type"), chunk=model.get("chunk"))
            return await super().save(model, path)

        async def rename_file(self, old_path, new_path):
            await self._audit("rename", old_path, to="/" + new_path.strip("/"))
            return await super().rename_file(old_path, new_path)

        async def delete_file(self, path):
            await self._audit("delete", path)
            return await super().delete_file(path)

    return WorkspaceContentsManager


def _kernel_spec_manager_class():
    import os
    import sys

    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    class WorkspaceKernelSpecManager(KernelSpecManager):
        """Finds kernelspecs only in the environment's read-only ``share/jupyter/kernels`` and starts only
        ``allowed_kernelspecs``.

        jupyter_client applies ``allowed_kernelspecs`` to the listing only, and starts ipykernel's built-in
        ``python3`` by name even with ``ensure_native_kernel = False``; this closes both.
        """

        def _kernel_dirs_default(self):
            return [os.path.join(sys.prefix, "share", "jupyter", "kernels")]

        def _find_spec_directory(self, kernel_name):
            for kernel_dir in self.kernel_dirs:
                path = os.path.join(kernel_dir, kernel_name)
                if os.path.isfile(os.path.join(path, "kernel.json")):
                    return path
            return None

        def get_kernel_spec(self, kernel_name):
            if kernel_name not in self.allowed_kernelspecs:
                raise NoSuchKernel(kernel_name)
            return super().get_kernel_spec(kernel_name)

    return WorkspaceKernelSpecManager


_LAZY = {"WorkspaceContentsManager": _contents_manager_class, "WorkspaceKernelSpecManager": _kernel_spec_manager_class}


def __getattr__(name):
    if name in _LAZY:
        cls = globals()[name] = _LAZY[name]()
        return cls
    raise AttributeError(name)
