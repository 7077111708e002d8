"""The ``ngp`` command: for region admins, project leads and platform operators.

``NGP_HOME`` selects the platform's home; ``--json`` gives machine-readable
output. Exit status is 0 on success and 2 on refused or invalid input, with
the reason on stderr.
"""

import argparse
import json
import os
import sys
from datetime import date, datetime

from .audit.report import EARLIEST, LATEST, parse_time, printable  # the report page reads times the same way
from .errors import AuditIntegrityError, NGPError, RefusedError

EXIT_OK = 0
EXIT_REFUSED = 2
EXIT_AUDIT_FAILED = 3


class UsageError(NGPError):
    pass


def _date(text: str) -> date:
    try:
        d = date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None
    if not EARLIEST <= d <= LATEST:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range ({EARLIEST} to {LATEST})")
    return d


def _datetime(text: str, end: bool = False) -> datetime:
    try:
        return parse_time(text, end)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _until(text: str) -> datetime:
    """An exclusive upper bound; a date alone includes that whole day."""
    return _datetime(text, end=True)


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (a whole number, 0 or more)")
    return n


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_REFUSED, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    parser = _Parser(prog="ngp", description=__doc__.splitlines()[0], parents=[common])
    sub = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)

    def group(name, help):
        g = sub.add_parser(name, help=help)
        return g.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def cmd(g, name, help):
        return g.add_parser(name, help=help, parents=[common])

    demo = group("demo", "the demo platform")
    c = cmd(demo, "seed", "seed a demo platform into $NGP_HOME")
    c.add_argument("--samples-per-region", type=int, default=40)
    c.add_argument("--variants", type=int, default=2000)
    c.add_argument("--seed", type=int, default=42)

    c = cmd(demo, "start", "seed if needed, start the identity provider and the hub on 127.0.0.1; Ctrl-C stops")
    c.add_argument("--port", type=int, default=8000, help="the hub's port")
    c.add_argument("--idp-port", type=int, default=5556, help="the identity provider's port")

    region = group("region", "healthcare regions")
    cmd(region, "list", "list the regions")

    user = group("user", "users and their roles")
    c = cmd(user, "add", "add a user")
    c.add_argument("name")
    c.add_argument("--region", required=True, help="the user's home region")
    c.add_argument("--role", action="append", default=[],
                   choices=["region-admin", "project-lead", "researcher", "reviewer", "operator"])
    cmd(user, "list", "list users")

    dataset = group("dataset", "datasets in the regions' areas")
    c = cmd(dataset, "ingest", "validate and register a dataset")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("--region", required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--as", dest="actor", required=True, metavar="ADMIN")
    c.add_argument("--metadata")
    c.add_argument("--reference")
    c = cmd(dataset, "list", "list datasets")
    c.add_argument("--region")
    c = cmd(dataset, "show", "show one dataset")
    c.add_argument("name")

    project = group("project", "research projects")
    c = cmd(project, "create", "register a project with its ethics approval")
    c.add_argument("name")
    c.add_argument("--lead", required=True)
    c.add_argument("--approval", required=True, metavar="NUMBER")
    c.add_argument("--authority", default="Swedish Ethical Review Authority")
    c.add_argument("--valid-from", required=True, type=_date)
    c.add_argument("--valid-until", required=True, type=_date)
    c.add_argument("--title", default="")
    c.add_argument("--as", dest="actor", default=None, metavar="USER")
    cmd(project, "list", "list projects")
    c = cmd(project, "show", "show one project")
    c.add_argument("name")
    c = cmd(project, "add-member", "add a member")
    c.add_argument("name")
    c.add_argument("user")
    c.add_argument("--role", default="member", choices=["member", "lead", "reviewer"])
    c.add_argument("--as", dest="actor", required=True, metavar="USER")
    c = cmd(project, "remove-member", "remove a member")
    c.add_argument("name")
    c.add_argument("user")
    c.add_argument("--as", dest="actor", required=True, metavar="USER")
    c = cmd(project, "suspend", "suspend a project (its workspaces show nothing)")
    c.add_argument("name")
    c.add_argument("--as", dest="actor", default=None, metavar="USER")
    c.add_argument("--reason", default="")

    c = cmd(project, "profile", "set the workspace profile (CPU, memory, idle timeout)")
    c.add_argument("name")
    c.add_argument("--cpu", type=float)
    c.add_argument("--memory", help="like 512M or 4G")
    c.add_argument("--idle-timeout", type=int, metavar="SECONDS")
    c.add_argument("--as", dest="actor", required=True, metavar="USER")

    workspace = group("workspace", "project workspaces")
    c = cmd(workspace, "plan", "what a user's workspace in a project mounts, as whom")
    c.add_argument("project")
    c.add_argument("--user", required=True)
    c = cmd(workspace, "run", "run a command in a user's workspace sandbox (root only)")
    c.add_argument("project")
    c.add_argument("--user", required=True)
    c.add_argument("argv", nargs="*", metavar="COMMAND", help="after --: the command and its arguments")

    tag = group("tag", "tags: a region's grant of a dataset to a project")
    c = cmd(tag, "grant", "tag a dataset for a project")
    c.add_argument("dataset")
    c.add_argument("project")
    c.add_argument("--as", dest="actor", required=True, metavar="ADMIN")
    c.add_argument("--expires", type=_date)
    c.add_argument("--reason", default="")
    c = cmd(tag, "revoke", "revoke a tag")
    c.add_argument("dataset")
    c.add_argument("project")
    c.add_argument("--as", dest="actor", required=True, metavar="ADMIN")
    c.add_argument("--reason", default="")
    c = cmd(tag, "list", "list tags")
    c.add_argument("--project")
    c.add_argument("--region")

    access = group("access", "the access policy")
    c = cmd(access, "files", "the files a user sees in a project's workspace")
    c.add_argument("project")
    c.add_argument("--user", required=True)
    c.add_argument("--at", type=_datetime)

    audit = group("audit", "the audit log")
    c = cmd(audit, "verify", "verify the hash chain and its signed checkpoints")
    c.add_argument("--trusted-key", metavar="KEY_ID",
                   help="the key id checkpoints must be signed with (default $NGP_AUDIT_TRUSTED_KEY)")
    cmd(audit, "checkpoint", "sign the chain head now")
    c = cmd(audit, "report", "a region's access report: who accessed which of its datasets, when, with which code")
    c.add_argument("--region", required=True)
    c.add_argument("--as", dest="actor", metavar="ADMIN",
                   help="the region admin asking (default $NGP_USER, else your login name)")
    c.add_argument("--since", type=_datetime, help="from this time on (ISO 8601; UTC unless a zone is given)")
    c.add_argument("--until", type=_until, help="before this time; a date alone includes that day")
    c.add_argument("--user")
    c.add_argument("--dataset")
    c.add_argument("--format", default="table", choices=["table", "csv", "json", "html"])
    report = group("report", "parameterised clinical review reports")
    cmd(report, "templates", "list the report templates and their parameters")
    c = cmd(report, "run", "run a report template in a member's workspace (the platform must be running)")
    c.add_argument("template")
    c.add_argument("--project", required=True)
    c.add_argument("--as", dest="actor", required=True, metavar="USER")
    c.add_argument("-p", "--parameter", dest="parameters", action="append", default=[], metavar="NAME=VALUE")
    c.add_argument("--format", default="html", choices=["html", "ipynb"], help="which output's path to print")
    c = cmd(report, "show", "the provenance of a report run")
    c.add_argument("run", help="<project>/<template>/<timestamp>")

    c = cmd(audit, "log", "show audit records")
    c.add_argument("--region")
    c.add_argument("--user")
    c.add_argument("--project")
    c.add_argument("--dataset")
    c.add_argument("--action")
    c.add_argument("--since", type=_datetime)
    c.add_argument("--until", type=_until)
    c.add_argument("--limit", type=_count, help="show at most this many entries, oldest first")
    return parser


# -- output ------------------------------------------------------------------


def _login_name() -> str | None:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry): --as is then needed
        return None


def _table(rows, headers) -> str:
    rows = [[("" if v is None else printable(str(v))) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _emit(args, data, text):
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def _iso(t):
    return t.isoformat() if t is not None else None


def user_json(u):
    return {"username": u.username, "region": u.home_region.name, "roles": u.role_labels()}


def dataset_json(d, with_samples=False):
    out = {
        "name": d.name,
        "region": d.region.name,
        "kind": d.kind,
        "genome_build": d.genome_build,
        "registered_at": _iso(d.registered_at),
        "registered_by": d.registered_by.username,
        "samples": len(d.samples),
        "files": [
            {"name": f.name, "role": f.role, "size": f.size, "sha256": f.sha256,
             "index_for": f.index_for.name if f.index_for else None}
            for f in d.files
        ],
    }
    if with_samples:
        out["sample_ids"] = [s.sample_id for s in d.samples]
        out["sexes"] = {s.sample_id: s.sex for s in d.samples if s.sex}
    return out


def tag_json(t, now):
    state = "active" if t.is_active(now) else (
        "revoked" if t.revoked_at else ("expired" if t.expires_at and t.expires_at <= now else "pending"))
    return {
        "dataset": t.dataset.name,
        "region": t.dataset.region.name,
        "project": t.project.name,
        "granted_by": t.granted_by.username,
        "granted_at": _iso(t.granted_at),
        "expires_at": _iso(t.expires_at),
        "reason": t.reason,
        "revoked_at": _iso(t.revoked_at),
        "revoked_by": t.revoked_by.username if t.revoked_by else None,
        "revoke_reason": t.revoke_reason,
        "state": state,
    }


def project_json(p, now=None):
    out = {
        "name": p.name,
        "title": p.title,
        "lead": p.lead.username,
        "approval": {"number": p.approval_number, "authority": p.approval_authority,
                     "valid_from": p.valid_from.isoformat(), "valid_until": p.valid_until.isoformat()},
        "status": p.status,
        "members": [{"user": m.user.username, "role": m.role} for m in p.memberships],
    }
    if now is not None:
        out["tags"] = [tag_json(t, now) for t in p.tags]
    return out


# -- commands ----------------------------------------------------------------


def run(args) -> int:
    from .access import AccessPolicy
    from .audit.store import AuditStore
    from .catalog import Catalog
    from .platform import Platform

    platform = Platform()
    g, c = args.group, args.command
    if g == "report":
        return report_command(platform, args)

    if g == "audit" and c == "verify":
        if args.trusted_key:
            platform.audit_trusted_key_id = args.trusted_key
        store = AuditStore.for_platform(platform, create_key=False)
        report = store.verify()
        store.engine.dispose()
        trust = "trusted" if platform.audit_trusted_key_id else "not pinned: pass --trusted-key to pin it"
        text = (
            f"audit chain OK: {report.records} records, {report.checkpoints} signed checkpoints, "
            f"last checkpoint at record {report.last_checkpoint_seq}, head {report.head_hash[:16]}, "
            f"signing key {report.key_id} ({trust})"
            if report.ok
            else "audit chain FAILED verification:\n" + "\n".join(f"  - {p}" for p in report.problems)
        )
        if report.ok:
            _emit(args, report.to_json(), text)
            return EXIT_OK
        if getattr(args, "json", False):
            print(json.dumps(report.to_json(), indent=2))
        print(text, file=sys.stderr)
        return EXIT_AUDIT_FAILED

    if g == "audit" and c == "log":
        store = AuditStore.for_platform(platform, create_key=False)
        recs = store.records(region=args.region, actor=args.user, project=args.project, dataset=args.dataset,
                             action=args.action, since=args.since, until=args.until, limit=args.limit)
        store.engine.dispose()
        # A record the service stored for a run of accesses (paths, or fetches of one file) is one
        # entry per access, in the table and in --json alike, each with the stored record's seq and
        # hash; --limit counts entries. Each stored record gives at least one, so the query's limit
        # fetches enough.
        views = [a for r in recs for a in r.accesses()][:args.limit]
        rows = [[a.seq, a.time, a.actor, a.action, a.project, a.region, a.dataset, a.path or ""] for a in views]
        _emit(args, [a.to_json() for a in views],
              _table(rows, ["seq", "time", "actor", "action", "project", "region", "dataset", "path"]))
        return EXIT_OK

    if g == "demo" and c == "seed":
        from .demo.seed import seed_demo

        summary = seed_demo(platform, samples_per_region=args.samples_per_region, variants=args.variants,
                            seed=args.seed)
        _emit(args, summary.to_json(), summary.text())
        return EXIT_OK

    if g == "demo" and c == "start":
        return demo_start(platform, args)

    catalog = Catalog.open(platform)
    try:
        catalog.ensure_regions()
        now = catalog.clock()
        if g == "audit" and c == "report":
            from .audit.report import region_report, render

            args.actor = args.actor or os.environ.get("NGP_USER") or _login_name()
            if not args.actor:
                raise RefusedError("say which region admin is asking: --as ADMIN (or set NGP_USER)")
            rows = region_report(catalog.audit, catalog, args.actor, args.region, since=args.since,
                                 until=args.until, user=args.user, dataset=args.dataset)
            fmt = "json" if getattr(args, "json", False) else args.format
            text = render(rows, fmt, args.region)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")  # CSV ends its own last line
        elif g == "audit" and c == "checkpoint":
            cp = catalog.audit.checkpoint()
            _emit(args, cp.to_json() if cp else None,
                  f"signed checkpoint at record {cp.seq}" if cp else "the chain head is already signed")
        elif g == "region":
            regions = catalog.regions()
            counts = {}
            for d in catalog.datasets():
                counts[d.region.name] = counts.get(d.region.name, 0) + 1
            _emit(args, [{"name": r.name, "datasets": counts.get(r.name, 0)} for r in regions],
                  _table([[r.name, counts.get(r.name, 0)] for r in regions], ["region", "datasets"]))
        elif g == "user" and c == "add":
            u = catalog.add_user(args.name, args.region, args.role)
            u = catalog.user(u.username)
            _emit(args, user_json(u), f"added user {u.username} ({u.home_region.name}): {', '.join(u.role_labels())}")
        elif g == "user" and c == "list":
            users = catalog.users()
            _emit(args, [user_json(u) for u in users],
                  _table([[u.username, u.home_region.name, ", ".join(u.role_labels())] for u in users],
                         ["user", "region", "roles"]))
        elif g == "dataset" and c == "ingest":
            from .ingest import ingest_dataset

            ds = ingest_dataset(catalog, args.region, args.name, args.files, args.actor,
                                metadata=args.metadata, reference=args.reference)
            _emit(args, dataset_json(ds),
                  f"registered dataset {ds.name} in region {ds.region.name}: {ds.kind}, "
                  f"{len(ds.samples)} samples, {len(ds.files)} files")
        elif g == "dataset" and c == "list":
            ds = catalog.datasets(args.region)
            _emit(args, [dataset_json(d) for d in ds],
                  _table([[d.name, d.region.name, d.kind, d.genome_build, len(d.samples), len(d.files),
                           d.registered_by.username, d.registered_at.strftime("%Y-%m-%d %H:%M")] for d in ds],
                         ["dataset", "region", "kind", "build", "samples", "files", "registered by", "at"]))
        elif g == "dataset" and c == "show":
            d = catalog.dataset(args.name)
            data = dataset_json(d, with_samples=True)
            data["tags"] = [tag_json(t, now) for t in d.tags]
            lines = [f"dataset {d.name}  region {d.region.name}  kind {d.kind}  build {d.genome_build or '-'}",
                     f"registered {d.registered_at.isoformat()} by {d.registered_by.username}",
                     f"samples ({len(d.samples)}): " + ", ".join(s.sample_id for s in d.samples[:10])
                     + (" ..." if len(d.samples) > 10 else ""), "",
                     _table([[f.name, f.role, f.size, f.sha256] for f in d.files], ["file", "role", "size", "sha256"])]
            if d.tags:
                lines += ["", _table([[t["project"], t["state"], t["granted_by"], t["granted_at"]] for t in data["tags"]],
                                     ["project", "tag", "granted by", "granted at"])]
            _emit(args, data, "\n".join(lines))
        elif g == "project" and c == "create":
            p = catalog.create_project(args.name, args.lead, args.approval, args.valid_from, args.valid_until,
                                       title=args.title, authority=args.authority, actor=args.actor)
            p = catalog.project(p.name)
            _emit(args, project_json(p), f"created project {p.name} led by {p.lead.username}, approval "
                  f"{p.approval_number} valid {p.valid_from} to {p.valid_until}")
        elif g == "project" and c == "list":
            ps = catalog.projects()
            _emit(args, [project_json(p) for p in ps],
                  _table([[p.name, p.lead.username, p.approval_number, p.valid_from, p.valid_until, p.status,
                           len(p.memberships)] for p in ps],
                         ["project", "lead", "approval", "valid from", "valid until", "status", "members"]))
        elif g == "project" and c == "show":
            p = catalog.project(args.name)
            data = project_json(p, now)
            _emit(args, data, json.dumps(data, indent=2))
        elif g == "project" and c == "add-member":
            catalog.add_member(args.name, args.user, args.role, actor=args.actor)
            _emit(args, {"project": args.name, "user": args.user, "role": args.role},
                  f"{args.user} is now a {args.role} of project {args.name}")
        elif g == "project" and c == "remove-member":
            catalog.remove_member(args.name, args.user, actor=args.actor)
            _emit(args, {"project": args.name, "user": args.user, "removed": True},
                  f"{args.user} is no longer a member of project {args.name}")
        elif g == "project" and c == "suspend":
            catalog.set_project_status(args.name, "suspended", actor=args.actor, reason=args.reason)
            _emit(args, {"project": args.name, "status": "suspended"}, f"project {args.name} is suspended")
        elif g == "project" and c == "profile":
            prof = catalog.set_workspace_profile(args.name, args.actor, cpu=args.cpu, memory=args.memory,
                                                 idle_timeout=args.idle_timeout)
            _emit(args, {"project": args.name, **prof.to_json()},
                  f"workspace profile of {args.name}: {prof.cpu} CPU, {prof.memory} memory, "
                  f"idle timeout {prof.idle_timeout} s")
        elif g == "workspace" and c == "plan":
            from .workspace import plan_for

            plan = plan_for(catalog, args.user, args.project)
            data = {
                "user": plan.user, "project": plan.project, "uid": plan.uid, "gid": plan.gid,
                "groups": list(plan.groups), "hostname": plan.hostname, "workdir": plan.workdir,
                "profile": plan.profile.to_json(),
                "mounts": [{"source": m.source, "target": m.target, "writable": m.writable, "kind": m.kind}
                           for m in plan.mounts],
                "environment": dict(plan.environment), "manifest": plan.manifest,
            }
            text = (f"workspace of {plan.user} in {plan.project}: host uid {plan.uid}, group {plan.gid}, "
                    f"{plan.profile.cpu} CPU, {plan.profile.memory}\n"
                    + _table([[m.target, "rw" if m.writable else "ro", m.kind, m.source] for m in plan.mounts],
                             ["inside", "mode", "kind", "host"]))
            _emit(args, data, text)
        elif g == "workspace" and c == "run":
            from .audit.records import AuditRecord
            from .workspace import plan_for
            from .workspace.limits import CgroupLimits
            from .workspace.sandbox import LocalSandbox, prepare_areas

            command = args.argv
            if not command:
                raise UsageError("give the command after --")
            plan = plan_for(catalog, args.user, args.project)
            prepare_areas(platform, plan)
            # The operator's command reaches the member's data: recorded (durably) before it starts.
            catalog.audit.append(AuditRecord(
                "workspace.run", catalog.actor_label(None), project=plan.project,
                detail={"as_user": plan.user, "command": command,
                        "datasets": sorted(f"{d['region']}/{d['name']}" for d in plan.manifest["datasets"])}))
            cgroup = f"{plan.project}.{plan.user}.run{os.getpid()}"
            proc = LocalSandbox().start(plan, command, stdout=None, stderr=None, cgroup=cgroup)
            try:
                return proc.wait()
            finally:
                CgroupLimits().remove(cgroup)
        elif g == "tag" and c == "grant":
            catalog.grant_tag(args.dataset, args.project, args.actor, expires=args.expires, reason=args.reason)
            _emit(args, {"dataset": args.dataset, "project": args.project, "granted": True},
                  f"tagged dataset {args.dataset} for project {args.project}")
        elif g == "tag" and c == "revoke":
            catalog.revoke_tag(args.dataset, args.project, args.actor, reason=args.reason)
            _emit(args, {"dataset": args.dataset, "project": args.project, "revoked": True},
                  f"revoked the tag of dataset {args.dataset} for project {args.project}")
        elif g == "tag" and c == "list":
            tags = [tag_json(t, now) for t in catalog.tags(project=args.project, region=args.region)]
            _emit(args, tags, _table([[t["dataset"], t["region"], t["project"], t["state"], t["granted_by"],
                                       t["granted_at"][:10], (t["expires_at"] or "")[:10]] for t in tags],
                                     ["dataset", "region", "project", "state", "granted by", "granted", "expires"]))
        elif g == "access" and c == "files":
            decision = AccessPolicy(catalog).files(args.user, args.project, args.at)
            if decision.allowed:
                text = _table([[f.workspace_path, f.host_path] for f in decision.files],
                              ["in workspace", "on host"])
                if decision.withheld:
                    text += "\nnot shown:\n" + "\n".join(f"  - {w}" for w in decision.withheld)
            else:
                text = f"{args.user} sees nothing in project {args.project}:\n" + "\n".join(
                    f"  - {r}" for r in decision.reasons)
            _emit(args, decision.to_json(), text)
        else:  # pragma: no cover - argparse requires a known command
            raise UsageError(f"unknown command {g} {c}")
    finally:
        catalog.close()
    return EXIT_OK


def report_command(platform, args) -> int:
    """`ngp report templates|run|show`."""
    from .catalog import Catalog
    from .reports.runner import HubSession, find_run, plan_report, run_report
    from .reports.templates import template_names, template_parameters, template_path

    if args.command == "templates":
        out = {n: [p.to_json() for p in template_parameters(template_path(n)).values()] for n in template_names()}
        lines = []
        for name, params in out.items():
            lines.append(name)
            lines += [f"  {p['name']:<14} {p['type']:<6} default {p['default']!r:<40} {p['help']}" for p in params]
        _emit(args, out, "\n".join(lines))
        return EXIT_OK
    if args.command == "run":
        given = {}
        for item in args.parameters:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise UsageError(f"-p {item!r}: give parameters as NAME=VALUE")
            given[name.strip()] = value
        plan = plan_report(args.template, args.project, args.actor, given)  # refuses before anything runs
        catalog = Catalog.open(platform)
        try:
            progress = sys.stderr if getattr(args, "json", False) else sys.stdout  # --json: stdout is the JSON
            provenance = run_report(catalog, plan, HubSession.from_platform(platform),
                                    echo=lambda text: print(text, end="", flush=True, file=progress))
        finally:
            catalog.close()
        name = "report.html" if args.format == "html" else "report.ipynb"
        _emit(args, provenance, f"\nreport {plan.run} written to {provenance['folder']}/{name}\n"
                                f"  (on this host: {platform.projects_dir / plan.project / 'shared' / plan.relative_dir / name})")
        return EXIT_OK
    catalog = Catalog.open(platform)
    try:
        provenance = find_run(catalog, args.run)
    finally:
        catalog.close()
    text = [f"run           {provenance['run']} ({provenance.get('status')})",
            f"template      {provenance['template']} sha256 {provenance['template_sha256']}",
            f"parameters    {json.dumps(provenance.get('parameters', {}), sort_keys=True)}",
            f"user          {provenance['user']} in project {provenance['project']}",
            f"started       {provenance.get('started_at')}  finished {provenance.get('finished_at')}",
            "inputs"]
    for d in provenance.get("inputs", []):
        for f in d.get("files", []):
            text.append(f"  {d['region']}/{d['dataset']}/{f['name']}  sha256 {f.get('sha256')}")
    text.append("outputs")
    for name, digest in (provenance.get("outputs") or {}).items():
        text.append(f"  {provenance.get('folder')}/{name}  sha256 {digest}")
    _emit(args, provenance, "\n".join(text))
    return EXIT_OK


def demo_start(platform, args) -> int:
    """`ngp demo start`: the demo platform, served until Ctrl-C."""
    import signal
    import time

    from .catalog import Catalog
    from .demo.seed import seed_demo
    from .hub.launcher import DEMO_PASSWORD, PlatformProcesses

    summary = seed_demo(platform)
    print(summary.text())
    catalog = Catalog.open(platform)
    procs = PlatformProcesses(platform, hub_port=args.port, idp_port=args.idp_port)
    stop = {"now": False}

    def _stop(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        procs.start(catalog)
        print()
        print(f"ngp-research is running: log in at {procs.url}/hub/login")
        print(f"identity provider: {procs.idp.issuer}   password for every demo user: {DEMO_PASSWORD}")
        for u in catalog.users():
            print(f"  {u.username:<18} {', '.join(u.role_labels())}")
        if os.geteuid() != 0:
            print("note: not running as root, so workspaces cannot start their sandboxes")
        from .workspace.areas import check_reachable

        try:
            check_reachable(platform.home_path)
        except PermissionError as e:
            print(f"note: {e}")
        print("Ctrl-C stops everything.", flush=True)
        while not stop["now"] and procs.hub.poll() is None:
            time.sleep(0.5)
        if procs.hub.poll() is not None:
            print(f"the hub stopped (exit {procs.hub.returncode}); its log: {procs.hub_log}", file=sys.stderr)
            return 1
        return EXIT_OK
    finally:
        print("stopping the hub and the identity provider ...", flush=True)
        procs.stop()
        catalog.close()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if "--" in argv:  # `ngp workspace run P --user U -- CMD ...`: everything after -- is the command
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    if command:
        args.argv = list(getattr(args, "argv", [])) + command
    try:
        return run(args)
    except AuditIntegrityError as e:
        print(f"ngp: audit verification failed: {e}", file=sys.stderr)
        return EXIT_AUDIT_FAILED
    except NGPError as e:
        print(f"ngp: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as e:
        print(f"ngp: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except OverflowError:
        print("ngp: a date or time is out of range", file=sys.stderr)
        return EXIT_REFUSED
    except BrokenPipeError:  # output piped into head(1)
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
