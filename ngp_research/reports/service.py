"""The reports pages: a JupyterHub-managed service, behind hub login, for reviewers.

Under ``/services/reports/``:

- ``GET  /``                                   the templates (a form per template, built from its parameter
                                               documentation) and the finished runs of the user's projects;
- ``POST /run``                                start a run for the logged-in user (parameters checked first);
- ``GET  /runs/<project>/<template>/<stamp>``  a run's progress, then a link to the report;
- ``GET  /view/<project>/<template>/<stamp>``  the rendered report (members of the project only).

A run goes through :func:`~ngp_research.reports.runner.run_report` exactly as ``ngp report run`` does:
in the user's own workspace, with the audited kernel.
"""

from __future__ import annotations

import html
import json
import os
import re
import threading

from tornado import web

from ..errors import NGPError
from .runner import HubSession, plan_report, run_report
from .templates import TEMPLATES_DIR, template_names, template_parameters, template_path

_RUN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)/([A-Za-z0-9][A-Za-z0-9_.-]*)/([0-9TZ]+)$")
_STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:60em} label{display:block;margin:.4em 0}"
          " .help{color:#555;font-size:90%} fieldset{margin:1em 0} table{border-collapse:collapse}"
          " td,th{border:1px solid #ccc;padding:.2em .5em}</style>")


def _page(title: str, body: str, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{meta}<title>{html.escape(title)}</title>{_STYLE}"
            f"</head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


class Runs:
    """Runs started from the pages of this service process: their progress text and outcome."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state: dict[str, dict] = {}

    def start(self, platform, plan, hub):
        entry = {"log": [], "done": False, "error": None}
        with self.lock:
            self.state[plan.run] = entry

        def work():
            from ..catalog import Catalog

            catalog = Catalog.open(platform)
            try:
                run_report(catalog, plan, hub, echo=entry["log"].append)
            except Exception as e:
                entry["error"] = str(e)
            finally:
                entry["done"] = True
                catalog.close()

        threading.Thread(target=work, name=f"report-{plan.run}", daemon=True).start()


def _projects_of(catalog, user: str) -> list[str]:
    return sorted(p.name for p in catalog.projects() if any(m.user.username == user for m in p.memberships))


def handlers(prefix: str, platform, catalog, hub: HubSession, runs: Runs, templates_dir=None):
    from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated

    templates_dir = templates_dir or TEMPLATES_DIR

    class Base(HubOAuthenticated, web.RequestHandler):
        def user(self) -> str:
            return self.get_current_user()["name"]

        def member_or_403(self, project: str):
            if project not in _projects_of(catalog, self.user()):
                raise web.HTTPError(403, f"{self.user()} is not a member of project {project}")

        def write_error(self, status_code, **kwargs):
            exc = kwargs.get("exc_info", (None, None))[1]
            message = getattr(exc, "log_message", None) or self._reason
            self.finish(_page(f"{status_code}", f"<p id='ngp-error'>{html.escape(message)}</p>"))

    class Index(Base):
        @web.authenticated
        def get(self):
            user = self.user()
            projects = _projects_of(catalog, user)
            forms = []
            for name in template_names(templates_dir):
                spec = template_parameters(template_path(name, templates_dir))
                fields = "".join(
                    f"<label>{html.escape(p.name)} <span class='help'>({p.type}{', required' if p.required else ''})"
                    f" {html.escape(p.help)}</span><br><input name='p.{html.escape(p.name)}' value='"
                    f"{html.escape(_text(p.default))}' size='50'></label>"
                    for p in spec.values())
                options = "".join(f"<option>{html.escape(p)}</option>" for p in projects)
                forms.append(
                    f"<form method='post' action='{prefix}run' id='form-{html.escape(name)}'><fieldset>"
                    f"<legend>{html.escape(name)}</legend><input type='hidden' name='template' value='{html.escape(name)}'>"
                    f"<input type='hidden' name='_xsrf' value='{html.escape(self.xsrf_token.decode())}'>"
                    f"<label>project <select name='project'>{options}</select></label>{fields}"
                    f"<button type='submit'>Run {html.escape(name)}</button></fieldset></form>")
            rows = []
            for record in catalog.audit.records(action="report.run"):
                d = record.detail
                if record.project in projects:
                    link = f"{prefix}view/{d['run']}" if d.get("status") == "ok" else ""
                    rows.append(f"<tr><td>{html.escape(d['run'])}</td><td>{html.escape(record.actor)}</td>"
                                f"<td>{html.escape(d.get('status', ''))}</td><td>"
                                + (f"<a href='{html.escape(link)}'>read</a>" if link else "") + "</td></tr>")
            runs_table = ("<table id='runs'><tr><th>run</th><th>by</th><th>status</th><th></th></tr>"
                          + "".join(reversed(rows)) + "</table>") if rows else "<p>No finished reports yet.</p>"
            self.finish(_page("Reports", f"<p>Logged in as {html.escape(user)}; projects: "
                                         f"{html.escape(', '.join(projects) or 'none')}.</p>"
                                         f"<h2>Run a report</h2>{''.join(forms)}<h2>Finished reports</h2>{runs_table}"))

    class Run(Base):
        @web.authenticated
        def post(self):
            template = self.get_argument("template")
            project = self.get_argument("project")
            self.member_or_403(project)
            given = {}
            try:
                spec = template_parameters(template_path(template, templates_dir))
            except NGPError as e:
                raise web.HTTPError(400, str(e)) from None
            for name, parameter in spec.items():
                value = self.get_argument(f"p.{name}", None)
                if value is not None and value.strip() != _text(parameter.default):
                    given[name] = value
            try:
                plan = plan_report(template, project, self.user(), given, templates_dir=templates_dir)
                from ..access import AccessPolicy

                decision = AccessPolicy(catalog).files(self.user(), project)
                if not decision.allowed:
                    raise web.HTTPError(403, f"{self.user()} cannot run reports in {project}: "
                                             + "; ".join(decision.reasons))
            except NGPError as e:
                raise web.HTTPError(400, str(e)) from None
            runs.start(platform, plan, hub)
            self.redirect(f"{prefix}runs/{plan.run}")

    class Status(Base):
        @web.authenticated
        def get(self, run):
            match = _RUN.match(run)
            if not match:
                raise web.HTTPError(404, "no such run")
            self.member_or_403(match.group(1))
            entry = runs.state.get(run)
            done = entry is None or entry["done"]
            log = html.escape("".join(entry["log"])) if entry else ""
            if entry and entry["error"]:
                body = f"<p id='ngp-error'>{html.escape(entry['error'])}</p>"
            elif done:
                body = f"<p id='ngp-done'>Finished. <a id='ngp-read' href='{prefix}view/{run}'>Read the report</a></p>"
            else:
                body = "<p>Running; this page refreshes itself.</p>"
            self.finish(_page(f"Report {run}", f"{body}<pre id='ngp-progress'>{log}</pre>",
                              refresh=None if done else 3))

    class View(Base):
        @web.authenticated
        def get(self, run):
            match = _RUN.match(run)
            if not match:
                raise web.HTTPError(404, "no such run")
            project, template, stamp = match.groups()
            self.member_or_403(project)
            path = platform.projects_dir / project / "shared" / "reports" / template / stamp / "report.html"
            if not path.is_file() or path.is_symlink():
                raise web.HTTPError(404, f"report {run} has no rendered page")
            self.set_header("Content-Type", "text/html; charset=utf-8")
            # The page was written inside a member's sandbox: show it as a static document in a sandbox of
            # its own (no scripts, an opaque origin), so it cannot act with the reader's hub login.
            self.set_header("Content-Security-Policy", "sandbox; default-src 'none'; style-src 'unsafe-inline'; "
                                                       "img-src data:; font-src data:")
            self.finish(path.read_bytes())

    return [(prefix, Index), (prefix + "run", Run), (prefix + r"runs/(.+)", Status), (prefix + r"view/(.+)", View),
            (prefix + "oauth_callback", HubOAuthCallbackHandler)]


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def main():
    """Run as a JupyterHub-managed service (the hub sets JUPYTERHUB_* variables)."""
    import asyncio
    import signal
    from urllib.parse import urlparse

    from tornado.web import Application

    from ..catalog import Catalog
    from ..platform import Platform

    platform = Platform()
    catalog = Catalog.open(platform)
    hub = HubSession(os.environ["NGP_HUB_PUBLIC_URL"], os.environ["JUPYTERHUB_API_TOKEN"])
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/").rstrip("/") + "/"
    app = Application(handlers(prefix, platform, catalog, hub, Runs()), cookie_secret=os.urandom(32),
                      xsrf_cookies=True)
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8083"))

    async def serve():
        app.listen(url.port, url.hostname)
        print(json.dumps({"service": "reports", "listening": f"{url.hostname}:{url.port}{prefix}"}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
