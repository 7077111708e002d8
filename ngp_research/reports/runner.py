"""Run a report template for a project member, inside their workspace, and record its provenance.

:func:`plan_report` is pure: it checks the parameters against the template and names the run.
:func:`run_report` carries a plan out through the running hub:

1. the access policy must let the user see the project's data now (else the policy's reasons);
2. the template is copied into ``/project/reports/<template>/<timestamp>/`` (owned by the member);
3. the member's workspace server for the project is started if needed (the spawner asks the
   policy again), and a cell in its audited kernel runs :mod:`ngp_research.reports.execute`, which
   runs papermill with the audited kernel inside the sandbox; its progress is streamed back;
4. the runner hashes what was written and appends a ``report.run`` audit record: template and its
   sha256, parameters, the input datasets with their checksums, the user, the outputs' sha256.

The runner talks to the hub with the ``reports`` service's token (``state/reports_api_token``),
whose role may start servers and reach them; the records the report's kernel writes are still
the member's, because the kernel holds the member's server token.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..audit.records import AuditRecord
from ..errors import RefusedError
from .templates import parse_parameters, template_hash, template_parameters, template_path

__all__ = ["ReportPlan", "HubSession", "plan_report", "run_report", "run_in_kernel", "find_run", "REPORTS_DIR"]

REPORTS_DIR = "reports"  # inside the project's shared area: /project/reports/<template>/<timestamp>/


class ReportError(RefusedError):
    """The report could not be run or did not finish; the message says why."""


@dataclass(frozen=True)
class ReportPlan:
    """One report run: what runs, for whom, with which parameters, written where."""

    template: str
    template_file: Path
    template_sha256: str
    project: str
    user: str
    parameters: dict
    stamp: str
    formats: tuple = ("html", "ipynb")

    @property
    def run(self) -> str:
        """The run's name: ``<project>/<template>/<timestamp>``."""
        return f"{self.project}/{self.template}/{self.stamp}"

    @property
    def relative_dir(self) -> str:
        return f"{REPORTS_DIR}/{self.template}/{self.stamp}"


def plan_report(template: str, project: str, user: str, given: dict, at: datetime | None = None,
                templates_dir=None) -> ReportPlan:
    """Check ``given`` (name -> text) against ``template``'s parameters and name the run; runs nothing.

    >>> plan = plan_report("variant-review", "cardio-gwas", "rita", {"max_af": "0.5"},
    ...                    at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    >>> plan.run, plan.parameters
    ('cardio-gwas/variant-review/20260102T030405000Z', {'max_af': 0.5})
    """
    path = template_path(template, templates_dir)
    parameters = parse_parameters(template_parameters(path), dict(given))
    at = at or datetime.now(timezone.utc)
    return ReportPlan(template, path, template_hash(path), project, user, parameters,
                      at.strftime("%Y%m%dT%H%M%S") + f"{at.microsecond // 1000:03d}Z")


@dataclass
class HubSession:
    """The hub's public URL and the reports service's token."""

    url: str
    token: str
    log: list = field(default_factory=list)

    @classmethod
    def from_platform(cls, platform) -> "HubSession":
        st = platform.state_dir
        try:
            hub = json.loads((st / "hub.json").read_text())
            token = (st / "reports_api_token").read_text().strip()
        except FileNotFoundError:
            raise ReportError("the platform is not running: reports run in the member's workspace, through "
                              "the hub (start it with `ngp demo start` or `make demo`)") from None
        return cls(hub["url"].rstrip("/"), token)

    def api(self, path, method="GET", body=None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}/hub/api{path}", data=data, method=method,
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                text = r.read()
                return r.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"message": text.decode(errors="replace")}
        except urllib.error.URLError as e:
            raise ReportError(f"the hub at {self.url} cannot be reached ({e.reason}): is the platform running?") \
                from None

    def ensure_server(self, user: str, project: str, timeout: float = 180) -> str:
        """Start ``user``'s workspace server for ``project`` if it is not running; return its URL."""
        status, model = self.api(f"/users/{user}/servers/{project}", method="POST", body={})
        if status not in (201, 202, 400):
            message = (model or {}).get("message", "")
            raise ReportError(f"the workspace of {user} in {project} could not start: {message or status}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, model = self.api(f"/users/{user}")
            server = ((model or {}).get("servers") or {}).get(project) or {}
            if server.get("ready"):
                return self.url + server["url"]
            if status == 200 and not server.get("pending") and not server:
                raise ReportError(f"the workspace of {user} in {project} stopped while starting")
            time.sleep(1)
        raise ReportError(f"the workspace of {user} in {project} did not start within {timeout:.0f} s")


async def run_in_kernel(server_url: str, token: str, code: str, echo=None, timeout: float = 60,
                        kernel: str = "ngp-python", username: str = "ngp-reports") -> tuple[str, str | None]:
    """Run ``code`` in a new kernel (the audited one by default) of a single-user server.

    Streams the cell's output to ``echo`` while it runs; returns (all its output, the error or None).
    """
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    from tornado.websocket import websocket_connect

    client = AsyncHTTPClient()
    headers = {"Authorization": f"token {token}"}
    r = await client.fetch(HTTPRequest(f"{server_url}api/kernels", method="POST", headers=headers,
                                       body=json.dumps({"name": kernel}), request_timeout=60))
    kernel = json.loads(r.body)
    ws = await websocket_connect(HTTPRequest(server_url.replace("http", "ws", 1) + f"api/kernels/{kernel['id']}/channels",
                                             headers=headers, request_timeout=60))
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({
        "header": {"msg_id": msg_id, "username": username, "session": uuid.uuid4().hex,
                   "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    out, error = [], None
    replied = idle = False
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = f"the cell did not finish within {timeout:.0f} s"
                break
            raw = await asyncio.wait_for(ws.read_message(), remaining)
            if raw is None:
                error = "the connection to the workspace kernel closed"
                break
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
                if echo is not None:
                    echo(msg["content"]["text"])
            elif kind == "error":
                error = f"{msg['content']['ename']}: {msg['content']['evalue']}"
            elif kind == "execute_reply":
                replied = True
            elif kind == "status" and msg["content"].get("execution_state") == "idle":
                idle = True  # iopub may deliver the last output after the shell reply: wait for idle too
            if replied and idle:
                break
    except asyncio.TimeoutError:
        error = f"the cell did not finish within {timeout:.0f} s"
    finally:
        ws.close()
        try:
            await client.fetch(HTTPRequest(f"{server_url}api/kernels/{kernel['id']}", method="DELETE",
                                           headers=headers, request_timeout=30))
        except Exception:
            pass
    return "".join(out), error


_DRIVER = """
import subprocess, sys
_ngp_report = subprocess.Popen([sys.executable, "-m", "ngp_research.reports.execute", {spec!r}],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
for _line in _ngp_report.stdout:
    print(_line, end="", flush=True)
_ngp_report.wait()
"""


def _inputs(manifest: dict) -> list[dict]:
    return [{"dataset": d["name"], "region": d["region"],
             "files": [{"name": f["name"], "sha256": f.get("sha256")} for f in d.get("files", [])]}
            for d in manifest.get("datasets", [])]


def run_report(catalog, plan: ReportPlan, hub: HubSession, echo=print, timeout: float = 1800) -> dict:
    """Run ``plan`` in the member's workspace and record its provenance; returns the provenance.

    Raises :class:`~ngp_research.workspace.WorkspaceRefused` (with the access policy's reasons)
    before anything runs when the user may not see the project's data, and :class:`ReportError`
    when the run fails (its ``report.run`` record then says ``failed``).
    """
    from ..workspace import plan_for
    from ..workspace.sandbox import prepare_areas

    workspace = plan_for(catalog, plan.user, plan.project)  # refuses with the policy's reasons
    prepare_areas(catalog.platform, workspace)
    shared = catalog.platform.projects_dir / plan.project / "shared"
    run_dir = shared / plan.relative_dir
    for parent in (shared / REPORTS_DIR, shared / REPORTS_DIR / plan.template):
        parent.mkdir(exist_ok=True)
        os.chown(parent, 0, workspace.gid)  # every member of the project reads the project's reports
        os.chmod(parent, 0o2755)
    run_dir.mkdir()
    shutil.copyfile(plan.template_file, run_dir / "template.ipynb")
    provenance = {
        "run": plan.run, "template": plan.template, "template_sha256": plan.template_sha256,
        "parameters": plan.parameters, "inputs": _inputs(workspace.manifest), "user": plan.user,
        "project": plan.project, "started_at": datetime.now(timezone.utc).isoformat(),
    }
    (run_dir / "spec.json").write_text(json.dumps({"template": "template.ipynb", "parameters": plan.parameters,
                                                   "kernel": "ngp-python", "provenance": provenance}, indent=2))
    for path in [run_dir, *run_dir.iterdir()]:  # the report runs as the member: the folder is theirs
        os.chown(path, workspace.uid, workspace.gid)
    os.chmod(run_dir, 0o2775)

    echo(f"running report {plan.template} for {plan.user} in project {plan.project} ({plan.run})\n")
    server = hub.ensure_server(plan.user, plan.project)
    inside = f"/project/{plan.relative_dir}/spec.json"
    out, error = asyncio.run(run_in_kernel(server, hub.token, _DRIVER.format(spec=inside), echo, timeout))
    result = {}
    for line in reversed(out.splitlines()):
        if line.startswith('{"ngp_report"'):
            result = json.loads(line)["ngp_report"]
            break
    error = error or result.get("error") or (None if result else "the report runner printed no result")

    from .execute import _sha256

    outputs = {name: _sha256(run_dir / name) for name in ("report.ipynb", "report.html") if (run_dir / name).exists()}
    provenance.update(finished_at=datetime.now(timezone.utc).isoformat(), outputs=outputs,
                      status="failed" if error else "ok", folder=f"/project/{plan.relative_dir}")
    if error:
        provenance["error"] = error
    catalog.audit.append(AuditRecord("report.run", plan.user, project=plan.project, detail=provenance))
    if error:
        raise ReportError(f"report {plan.run} failed: {error}")
    return provenance


def find_run(catalog, run: str) -> dict:
    """The provenance recorded for run ``<project>/<template>/<timestamp>``."""
    found = [r for r in catalog.audit.records(action="report.run") if r.detail.get("run") == run]
    if not found:
        raise RefusedError(f"run: no report run {run!r} in the audit log")
    record = found[-1]
    return dict(record.detail, seq=record.seq, recorded_at=record.time)
