"""Project workspaces as JupyterHub named servers, one per (user, project), in bubblewrap sandboxes.

The server's name is the project's name. Every start asks the access policy
again; a refusal is shown on the spawn page with the policy's reasons. While
a workspace runs, each :meth:`WorkspaceSpawner.poll` (every ``poll_interval``
seconds) asks again: when a tag is revoked, a membership removed or the
approval ends, and the workspace would lose files, it is stopped and an
audit record says why. Reconciling in ``poll`` rather than in a separate
service keeps the bound on the delay explicit (``poll_interval``) and needs
no extra process with rights over every workspace.

The sandbox has its own network namespace with only loopback. Sockets in
the runtime folder bound at ``/run/ngp`` cross it: ``hub.sock`` (a bridge
created here, outside, in a folder only root writes, bound read-only) leads
to the hub's API; ``audit/audit.sock`` is the audit service's own socket
(its folder bound read-only), which kernels use directly
(``NGP_AUDIT_SOCKET``) and other clients through ``NGP_AUDIT_URL``, a relay
on 127.0.0.1 inside; ``server/server.sock`` (created inside by the
workspace, in the member's own folder) is where the proxy's traffic goes,
through a TCP port on 127.0.0.1 that this spawner opens. That relay connects
only to a socket owned by the member, never through a link they planted.
Audit records never pass through the hub's process.
"""

import asyncio
import html
from datetime import datetime, timezone
import os
import signal
import threading
from urllib.parse import urlparse

from jupyterhub.spawner import Spawner
from tornado import web
from traitlets import Bool, Integer, Unicode, default

from ..access import AccessPolicy
from ..audit.records import AuditRecord
from ..errors import NotFoundError
from ..workspace import WorkspaceRefused, plan_for
from ..workspace.limits import CgroupLimits
from ..workspace.plan import INSIDE_AUDIT_SOCKET, RUNTIME_PATH
from ..workspace.sandbox import LocalSandbox, prepare_areas
from . import state


#: Where clients inside a sandbox reach the audit service over HTTP (a relay to INSIDE_AUDIT_SOCKET).
INSIDE_AUDIT = ("127.0.0.1", 8082)


def idle_seconds(last_activity, now) -> float | None:
    """Seconds since the hub last saw activity on a server (JupyterHub keeps naive UTC times).

    >>> from datetime import datetime, timedelta
    >>> t = datetime(2026, 1, 1, 12, 0)
    >>> idle_seconds(t, t + timedelta(minutes=90))
    5400.0
    >>> idle_seconds(None, t) is None
    True
    """
    if last_activity is None:
        return None
    if getattr(last_activity, "tzinfo", None) is not None:
        last_activity = last_activity.replace(tzinfo=None)
    if getattr(now, "tzinfo", None) is not None:
        now = now.replace(tzinfo=None)
    return (now - last_activity).total_seconds()


def _reasons_html(reasons) -> str:
    return "".join(f"<li>{html.escape(r)}</li>" for r in reasons)


class WorkspaceSpawner(Spawner):
    """Starts a member's project workspace in a bubblewrap sandbox (see the module docstring)."""

    workspace_env = Unicode(
        help="The Python environment the single-user server runs from, readable by every workspace uid "
        "(default: $NGP_WORKSPACE_ENV, built by `make workspace-env`).",
    ).tag(config=True)

    @default("workspace_env")
    def _default_env(self):
        from ..workspace.environment import default_workspace_env

        return default_workspace_env()

    inside_port = Integer(
        8888, help="The port the single-user server listens on inside its own network namespace."
    ).tag(config=True)

    require_limits = Bool(
        True, help="Refuse to start a workspace whose CPU and memory limits cannot be enforced."
    ).tag(config=True)

    @default("poll_interval")
    def _default_poll_interval(self):
        return 10

    @default("options_form")
    def _default_options_form(self):
        return self._options_form

    # -- the access decision, shown and enforced -----------------------------

    def _decision(self):
        return AccessPolicy(state.catalog()).files(self.user.name, self.name)

    def _project(self):
        """The catalog's project named like this server, or None."""
        try:
            return state.catalog().project(self.name) if self.name else None
        except NotFoundError:
            return None

    async def _options_form(self, spawner):
        if not self.name:
            return ("<p>Workspaces belong to projects. Choose a project on the "
                    "<a href='../home'>home page</a>.</p>")
        p = self._project()
        if p is None:
            return f"<p class='alert alert-danger'>There is no project named {html.escape(self.name)}.</p>"
        d = self._decision()
        head = (f"<h2>{html.escape(p.title)}</h2><p>Project <b>{html.escape(p.name)}</b>, ethics approval "
                f"{html.escape(p.approval_number)} valid {p.valid_from} to {p.valid_until}. Workspace: "
                f"{p.workspace_cpu:g} CPU, {html.escape(p.workspace_memory)} memory.</p>")
        if not d.allowed:
            return head + ("<div class='alert alert-danger' id='ngp-refused'><p>This workspace cannot start:</p>"
                           f"<ul>{_reasons_html(d.reasons)}</ul></div>")
        rows = "".join(f"<li>{html.escape(ds)} <span class='text-muted'>(region {html.escape(r)})</span></li>"
                       for r, ds in d.datasets)
        withheld = f"<p>Not shown:</p><ul>{_reasons_html(d.withheld)}</ul>" if d.withheld else ""
        return head + f"<p>The workspace will show these datasets under /data:</p><ul id='ngp-datasets'>{rows}</ul>" \
            + withheld + "<input type='hidden' name='project' value='" + html.escape(self.name) + "'>"

    def options_from_form(self, formdata):
        if self._project() is None:
            raise web.HTTPError(404, f"There is no project named {self.name!r}.")
        d = self._decision()
        if not d.allowed:
            raise web.HTTPError(403, "This workspace cannot start: " + "; ".join(d.reasons))
        return {"project": self.name}

    # -- lifecycle -----------------------------------------------------------------

    proc = None
    _bridges = ()
    _cgroup = None
    _files = None
    _idle_timeout = None

    def _inside_environment(self) -> dict:
        from ..workspace.jupyter import INSIDE_HUB_API, singleuser_environment

        hub = self.get_env()
        keep = {k: v for k, v in hub.items() if k.startswith("JUPYTERHUB_") or k == "JPY_API_TOKEN"}
        prefix = keep.get("JUPYTERHUB_SERVICE_PREFIX", "/")
        keep["JUPYTERHUB_SERVICE_URL"] = f"http://127.0.0.1:{self.inside_port}{prefix}"
        # Inside, the hub's API is the bridge's end at INSIDE_HUB_API, whatever port the hub uses.
        api = urlparse(hub["JUPYTERHUB_API_URL"])
        inside = f"http://{INSIDE_HUB_API[0]}:{INSIDE_HUB_API[1]}"
        for key in ("JUPYTERHUB_API_URL", "JUPYTERHUB_ACTIVITY_URL"):
            if key in keep:
                keep[key] = keep[key].replace(f"{api.scheme}://{api.netloc}", inside, 1)
        env = singleuser_environment(self.user.name, self.workspace_env)
        env.update(keep)
        env["NGP_AUDIT_URL"] = f"http://{INSIDE_AUDIT[0]}:{INSIDE_AUDIT[1]}/services/audit/"
        env["NGP_AUDIT_SOCKET"] = INSIDE_AUDIT_SOCKET
        return env

    def _audit(self, action, required=False, **detail):
        """Append a workspace record. ``required``: a failure propagates (the start is refused)."""
        try:
            state.catalog().audit.append(
                AuditRecord(action, self.user.name, project=self.name or None, detail=detail))
        except Exception:
            if required:
                raise
            # A stop goes ahead whatever the log says: losing access must never wait for it.
            self.log.exception("could not append %s to the audit log", action)

    async def start(self):
        from ..workspace.bridge import TcpToUnix, UnixToTcp
        from ..workspace.environment import is_built
        from ..workspace.jupyter import jupyter_mounts, singleuser_command

        if not self.name:
            raise web.HTTPError(400, "Workspaces belong to projects: start one from the home page.")
        if not is_built(self.workspace_env):  # without its audit .pth, `!python x.py` would run unhooked
            self._audit("workspace.refused", reasons=[f"the workspace environment {self.workspace_env} is not built"])
            raise web.HTTPError(503, f"The workspace environment {self.workspace_env} is not built, or lacks the "
                                     "audit hook: the operator runs `make workspace-env`.")
        catalog = state.catalog()
        try:
            plan = plan_for(catalog, self.user.name, self.name, python_env=self.workspace_env, runtime=True,
                            environment=self._inside_environment(), extra_mounts=jupyter_mounts(self.workspace_env))
        except WorkspaceRefused as e:
            self._audit("workspace.refused", reasons=list(e.reasons))
            raise web.HTTPError(403, "This workspace cannot start: " + "; ".join(e.reasons)) from None
        platform = catalog.platform
        try:
            prepare_areas(platform, plan)
        except PermissionError as e:
            raise web.HTTPError(500, f"The platform is misconfigured: {e}") from None
        runtime = next(m.source for m in plan.mounts if m.target == RUNTIME_PATH)
        for name in ("hub.sock", "server/server.sock", "audit.sock"):  # audit.sock: an older version's bridge
            try:
                os.unlink(os.path.join(runtime, name))
            except FileNotFoundError:
                pass
        api = urlparse(self.hub.api_url)
        hub_bridge = UnixToTcp(os.path.join(runtime, "hub.sock"), api.hostname or "127.0.0.1", api.port,
                               owner=plan.uid)
        await hub_bridge.start()
        server_bridge = TcpToUnix(os.path.join(runtime, "server", "server.sock"), owner=plan.uid)
        await server_bridge.start()
        self._bridges = (hub_bridge, server_bridge)

        datasets = sorted(f"{d['region']}/{d['name']}" for d in plan.manifest["datasets"])
        try:  # the start is recorded before the sandbox exists; no record, no workspace
            self._audit("workspace.start", required=True, uid=plan.uid, datasets=datasets)
        except Exception:
            await self._cleanup()
            raise web.HTTPError(503, "The audit log cannot be written, so the workspace was not started.") from None
        sandbox = LocalSandbox(require_limits=self.require_limits)
        self._cgroup = f"{self.name}.{self.user.name}"
        command = singleuser_command(self.workspace_env, self.get_args(),
                                     relays=[f"{INSIDE_AUDIT[0]}:{INSIDE_AUDIT[1]}={INSIDE_AUDIT_SOCKET}"])
        self.log.info("Starting workspace %s for %s as uid %s", self.name, self.user.name, plan.uid)
        self.proc = sandbox.start(plan, command, cgroup=self._cgroup)
        self._files = {m.target for m in plan.data_files}
        self._idle_timeout = plan.profile.idle_timeout
        # What this workspace was started with, kept with the server so the admin page shows it.
        self.user_options = {
            **(self.user_options or {}),
            "project": self.name,
            "profile": plan.profile.to_json(),
            "datasets": datasets,
            "uid": plan.uid,
        }
        if getattr(self, "orm_spawner", None) is not None:
            self.orm_spawner.user_options = self.user_options
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._drain, args=(stream,), daemon=True).start()
        return ("127.0.0.1", server_bridge.port)

    def _drain(self, stream):
        prefix = f"[{self.name}/{self.user.name}] "
        for line in iter(stream.readline, b""):
            self.log.info(prefix + line.decode(errors="replace").rstrip())
        stream.close()

    async def poll(self):
        if self.proc is None:
            return 0
        status = self.proc.poll()
        if status is not None:
            await self._cleanup()
            return status
        # The lead's idle timeout: a workspace nobody has used for that long is stopped.
        orm = getattr(self, "orm_spawner", None)
        idle = idle_seconds(getattr(orm, "last_activity", None), datetime.now(timezone.utc))
        if idle is not None and self._idle_timeout and idle > self._idle_timeout:
            self.log.info("Stopping %s: idle for %d s (limit %d s)", self._log_name, idle, self._idle_timeout)
            await self.stop(now=True)
            self._audit("workspace.stop", reason="idle", idle_seconds=int(idle), limit=self._idle_timeout)
            return 0
        # Reconcile with the access policy: a workspace that would lose access is stopped now.
        try:
            d = self._decision()
        except Exception:
            self.log.exception("access check failed for %s; stopping its workspace", self._log_name)
            d = None
        if d is None or not d.allowed or not self._files <= {f.workspace_path for f in d.files}:
            reasons = list(d.reasons) if d is not None and d.reasons else (
                list(d.withheld) if d is not None else ["the access check failed"])
            self.log.warning("Stopping %s: access changed (%s)", self._log_name, "; ".join(reasons))
            await self.stop(now=True)
            self._audit("workspace.stop", reason="access changed", reasons=reasons)
            return 1
        return None

    async def stop(self, now=False):
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL if now else signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(50 if not now else 10):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.1)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if not now:
                self._audit("workspace.stop", reason="stopped by the hub")
        await self._cleanup()

    async def _cleanup(self):
        for bridge in self._bridges:
            try:
                await bridge.stop()
            except Exception:
                self.log.exception("could not stop a bridge")
        self._bridges = ()
        if self._cgroup:
            await asyncio.sleep(0.1)
            CgroupLimits().remove(self._cgroup)
            self._cgroup = None

    def clear_state(self):
        super().clear_state()
        self.proc = None
