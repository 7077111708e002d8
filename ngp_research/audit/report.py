"""Region access reports: who accessed which of a region's datasets, when, from which project, with which code.

A region admin sees only records that touch their own region's data; anyone
else is refused. Each file or data record is joined to the write-ahead
``query.execute`` record of the cell that caused it (same user, same
``msg_id``), so the report carries the code. Reading a report is itself
recorded (``report.read``).

A cell can name more than one region's data. Its code, and the detail of an access (a program's
command line), are shown to each region's admin with the other regions' data hidden (see
:class:`OtherRegions`): a region reads its own audit only.
"""

import asyncio
import csv
import html
import io
import json
import re
from datetime import date, datetime, timedelta, timezone

from .records import AuditRecord
from .service import _plain

ACCESS_ACTIONS = ("file.open", "file.list", "file.link", "data.open", "server.file", "process.exec")
FORMATS = ("table", "csv", "json", "html")
COLUMNS = ("time", "user", "project", "region", "dataset", "action", "path", "detail", "code", "flag", "seq")
EARLIEST, LATEST = date(1900, 1, 1), date(9000, 12, 31)  # what --since and --until accept


def parse_time(text: str, end: bool = False) -> datetime:
    """``text`` as an aware datetime (ISO 8601; UTC when it names no zone); ValueError saying why not.

    With ``end`` (an ``--until``, which is exclusive), a date alone stands for the whole of that day:
    the bound is the next midnight.

    >>> parse_time("2026-11-29"), parse_time("2026-11-29T10:00:00+01:00").utcoffset().seconds
    (datetime.datetime(2026, 11, 29, 0, 0, tzinfo=datetime.timezone.utc), 3600)
    >>> parse_time("2026-11-29", end=True), parse_time("2026-11-29T10:00", end=True).hour
    (datetime.datetime(2026, 11, 30, 0, 0, tzinfo=datetime.timezone.utc), 10)
    >>> parse_time("yesterday")
    Traceback (most recent call last):
    ...
    ValueError: 'yesterday' is not a date or time (ISO 8601)
    """
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a date or time (ISO 8601)") from None
    if not EARLIEST <= t.date() <= LATEST:
        raise ValueError(f"{text!r} is out of range ({EARLIEST} to {LATEST})")
    if end and "T" not in text.upper() and " " not in text.strip() and t.date() < LATEST:
        t += timedelta(days=1)  # a date alone: until the end of that day
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def printable(text: str) -> str:
    """``text`` for a terminal: line breaks as spaces, other control characters escaped, so a member's
    code or file name cannot move the cursor or hide what follows.

    >>> printable("a\\nb\\x1b[8mhidden\\rX")
    'a b\\\\x1b[8mhidden\\\\rX'
    """
    text = text.replace("\n", " ")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def csv_cell(value):
    """A CSV cell that a spreadsheet shows as text: one starting with ``=``, ``+``, ``-``, ``@``, a tab or a
    carriage return (a formula to Excel or LibreOffice) gets a leading ``'``. A cell's code is the
    member's own text, and region admins open these reports in spreadsheets.

    >>> csv_cell("=1+1"), csv_cell("-1; open(f)"), csv_cell("open(f)"), csv_cell(7)
    ("'=1+1", "'-1; open(f)", 'open(f)', 7)
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class OtherRegions:
    r"""Hides, in text a region's admin reads, the names of the platform's other regions' datasets.

    Hiding must never help a member hide from a region's admin what a cell did with that region's
    data, and a path's text cannot say where it leads (links a member made, ``..`` after one, a
    working folder), so only names are hidden, never whole paths: a name (a run of the characters
    names are made of, inside a path or not) becomes ``HIDDEN_DATASET`` when it is another region's
    dataset name, or that name followed by a data file's suffix (``DATA_SUFFIXES``: ``norr-cohort.vcf.gz``).
    Never hidden: a dataset name that is a plain word (letters only: ``cases``, so another region's
    names cannot blank out ordinary words of the code), ``data``, and the reader's region's name.

    What stays readable: region names (they are public), other file names, names a cell builds from
    parts or encodes. In ``value``, the values of keys the kernel fills from a fixed vocabulary
    (``NAME_FREE_KEYS``) are left as they are. Every step is linear in the text; results are kept
    for the report's lifetime, so one cell's code, or one run's detail, is looked at once.

    >>> hide = OtherRegions("syd", {"norr": ["norr-cohort", "cases"], "syd": ["syd-cohort"]})
    >>> hide.text("open('/data/norr/norr-cohort/norr-cohort.vcf.gz'); open('/data/syd/syd-cohort/b')")
    ("open('/data/norr/[another region's dataset]/[another region's dataset]'); open('/data/syd/syd-cohort/b')", True)
    >>> hide.text("Cohort(['norr-cohort', 'syd-cohort']); cases = 1; norr-cohorts; norr-cohort.evil.example")[0]
    "Cohort(['[another region's dataset]', 'syd-cohort']); cases = 1; norr-cohorts; norr-cohort.evil.example"
    >>> hide.value({"argv": ["cat", "/data/norr/norr-cohort/x"], "event": "norr-cohort", "n": 1})
    ({'argv': ['cat', "/data/norr/[another region's dataset]/x"], 'event': 'norr-cohort', 'n': 1}, True)
    >>> OtherRegions("syd", {}).text("/data/norr/norr-cohort/x")
    ('/data/norr/norr-cohort/x', False)
    """

    HIDDEN_DATASET = "[another region's dataset]"
    #: What follows a dataset's name in its files' names (not a top-level domain: ``.mt`` and ``.ht`` are not here).
    DATA_SUFFIXES = frozenset({".vcf", ".vcf.gz", ".vcf.bgz", ".bcf", ".tbi", ".csi", ".vcf.gz.tbi", ".vcf.gz.csi",
                               ".bam", ".bai", ".bam.bai", ".cram", ".crai", ".cram.crai", ".bgen", ".bgen.bgi",
                               ".bed", ".bim", ".fam", ".pgen", ".pvar", ".psam", ".fa", ".fasta", ".fai", ".tsv",
                               ".csv", ".json", ".txt"})
    #: Detail keys whose values the kernel takes from a fixed vocabulary (event names, open modes, ids).
    NAME_FREE_KEYS = frozenset({"event", "mode", "msg_type", "msg_id", "cell_id", "action", "library", "object",
                                "what", "hook", "status", "flags", "sender", "contig"})
    _NAME = re.compile(r"[A-Za-z0-9._-]+")
    _LONGEST = 128 + max(len(x) for x in DATA_SUFFIXES)  # a dataset name is at most 128 characters

    def __init__(self, region: str, datasets: dict):
        self.region = region
        self._hidden = frozenset(name for r, names in datasets.items() if r != region for name in names
                                 if not name.isalpha() and name not in ("data", region))
        self._seen: dict = {}  # (text, names) -> (hidden, changed)
        self._walked: dict = {}  # id(list or dict) -> (it, its hidden copy, changed): shared parts walked once

    @classmethod
    def of(cls, catalog, region: str) -> "OtherRegions":
        """The regions of ``catalog`` and their datasets, as read by ``region``'s admin."""
        from sqlalchemy import select  # noqa: PLC0415

        from ..catalog.models import Dataset, Region  # noqa: PLC0415 (the catalog imports this package)

        with catalog.session() as s:
            datasets = {name: [] for name in s.scalars(select(Region.name))}
            for d, r in s.execute(select(Dataset.name, Region.name).join(Dataset.region)):
                datasets.setdefault(r, []).append(d)
        return cls(region, datasets)

    def _foreign(self, match) -> str:
        run = match.group()
        if len(run) <= self._LONGEST:
            if run in self._hidden:
                return self.HIDDEN_DATASET
            dot = run.find(".", 1)
            while dot != -1:
                if run[:dot] in self._hidden and run[dot:] in self.DATA_SUFFIXES:
                    return self.HIDDEN_DATASET
                dot = run.find(".", dot + 1)
        return run

    def text(self, text: str) -> tuple[str, bool]:
        """``text`` with the other regions' dataset names hidden, and whether anything was."""
        if not self._hidden or not text:
            return text, False
        hit = self._seen.get(text)
        if hit is None:
            hidden = self._NAME.sub(self._foreign, text)
            hit = self._seen[text] = (hidden, hidden != text)
        return hit

    def value(self, value) -> tuple:
        """A JSON value with the other regions' data hidden in its strings and keys, and whether anything
        was. Walked without recursion: a detail can be nested as deep as the service stores. A list or
        dict already walked in this report (a run's detail, shared by its rows) is not walked again."""
        hidden = 0  # strings and keys hidden so far
        root = [None]
        stack = [(value, root, 0, None)]
        while stack:
            item, into, slot, key = stack.pop()
            if into is None:  # the end of the list or dict ``item``: (item, copy, hidden before it)
                it, copy, before = slot
                self._walked[id(it)] = (it, copy, hidden > before)
            elif isinstance(item, str):
                if key not in self.NAME_FREE_KEYS:
                    item, hid = self.text(item)
                    hidden += hid
                into[slot] = item
            elif isinstance(item, (list, dict)):
                done = self._walked.get(id(item))
                if done is not None and done[0] is item:
                    into[slot] = done[1]
                    hidden += done[2]
                    continue
                copy = [None] * len(item) if isinstance(item, list) else {}
                into[slot] = copy
                stack.append((None, None, (item, copy, hidden), None))  # popped after all it holds
                if isinstance(item, list):
                    stack.extend((v, copy, i, key) for i, v in enumerate(item))
                    continue
                taken = {}
                for k, v in item.items():
                    new_k, hid = self.text(k) if isinstance(k, str) else (k, False)
                    if new_k in copy:  # two keys hidden alike: both kept
                        base, n = new_k, taken.get(new_k, 1)
                        while new_k in copy:
                            n += 1
                            new_k = f"{base} ({n})"
                        taken[base] = n
                    hidden += hid
                    copy[new_k] = None
                    stack.append((v, copy, new_k, k))
            else:
                into[slot] = item
        return root[0], hidden > 0


def _cell(r) -> tuple:
    """(user, project, msg_id) of a record's cell; a msg_id that is not a string names no cell."""
    msg_id = r.detail.get("msg_id")
    return r.actor, r.project, msg_id if isinstance(msg_id, str) else None


def region_report(store, catalog, actor: str, region: str, since: datetime | None = None,
                  until: datetime | None = None, user: str | None = None, dataset: str | None = None) -> list[dict]:
    """The access report of ``region`` for its admin ``actor``; raises RefusedError for anyone else."""
    with catalog.session() as s:
        catalog._region(s, region)
        catalog.require_region_admin(s, actor, region, f"read the audit of region {region!r}")
    hide = OtherRegions.of(catalog, region)
    rows = []
    # One row per access: a stored record that lists a run of paths gives one row per path.
    records = [a for r in store.records(region=region, actor=user, dataset=dataset, since=since, until=until)
               if r.action in ACCESS_ACTIONS for a in r.accesses()]
    # Each access is joined to the FIRST query.execute with the same user, project and msg_id that precedes
    # it: a later record reusing a msg_id cannot change the code shown, and is flagged.
    wanted = {_cell(r) for r in records if _cell(r)[2]}
    queries: dict = {}
    if wanted:
        for q in store.records(action="query.execute", since=None, until=until):
            key = _cell(q)
            if key in wanted:
                queries.setdefault(key, []).append(q)
    for r in records:
        cell = _cell(r)
        cell_queries = queries.get(cell, [])  # in chain order: the first one, if it precedes this access
        first = cell_queries[0] if cell_queries and cell_queries[0].seq < r.seq else None
        flags = [r.detail.get("flag")] if r.detail.get("flag") else []
        if first is not None and first.detail.get("flag"):
            flags.append("cell: " + first.detail["flag"])
        if len(cell_queries) > 1:
            flags.append("another record reused this cell's msg_id")
        if first is None and cell[2] is not None:  # every execution is recorded before it runs
            flags.append("no execution of this msg_id was recorded before it (attribution forged or lost)")
        detail, hid_detail = hide.value(r.detail)  # the record's own dict: a run's rows share one walk
        detail = {k: v for k, v in detail.items() if k != "flag"}
        code, hid_code = hide.text(first.detail["code"]) if first is not None and \
            isinstance(first.detail.get("code"), str) else (None, False)
        path, hid_path = hide.text(r.path) if r.path and not _plain(r.path) else (r.path, False)
        flag, hid_flag = hide.text("; ".join(flags))
        if hid_detail or hid_code or hid_path or hid_flag:
            flag = "; ".join(filter(None, [flag, "other regions' data named here are hidden"]))
        rows.append({
            "time": r.time,
            "user": r.actor,
            "project": r.project,
            "region": r.region,
            "dataset": r.dataset,
            "action": r.action,
            "path": path,
            "detail": detail,
            "code": code,
            "flag": flag or None,
            "seq": r.seq,
        })
    store.append(AuditRecord("report.read", actor, region=region,
                             detail={"rows": len(rows), "user": user, "dataset": dataset,
                                     "since": since.isoformat() if since else None,
                                     "until": until.isoformat() if until else None}))
    return rows


def render(rows: list[dict], fmt: str, region: str) -> str:
    """The report as ``table``, ``csv``, ``json`` or ``html``."""
    if fmt not in FORMATS:
        raise ValueError(f"format: one of {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(rows, indent=2, sort_keys=True)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_cell(v) for k, v in {**r, "detail": json.dumps(r["detail"], sort_keys=True)}.items()})
        return out.getvalue()
    if fmt == "table":
        head = ["time", "user", "project", "dataset", "action", "path", "code"]
        cells = [[printable(str(r[k] or ""))[:60] for k in head] for r in rows]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
        line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r[k] or ''))}</td>" for k in
                         ("time", "user", "project", "dataset", "action", "path"))
        + f"<td><pre>{html.escape(str(r['code'] or ''))}</pre></td>"
        + f"<td class='flag'>{html.escape(str(r['flag'] or ''))}</td></tr>"
        for r in rows)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Access report: {html.escape(region)}"
            "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}pre{margin:0;max-width:40em;"
            "white-space:pre-wrap}.flag{color:#b00}</style></head><body>"
            f"<h1>Access report for region {html.escape(region)}</h1><p>{len(rows)} accesses.</p>"
            "<table id='ngp-report'><thead><tr><th>time</th><th>user</th><th>project</th><th>dataset</th>"
            "<th>action</th><th>path</th><th>code</th><th>flag</th></tr></thead>"
            f"<tbody>{body}</tbody></table></body></html>")


def report_handlers(prefix: str, ctx):
    """The report page behind hub login (HubOAuth), for region admins."""
    from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
    from tornado import web

    from ..errors import NGPError

    class ReportHandler(HubOAuthenticated, web.RequestHandler):
        @web.authenticated
        async def get(self):
            user = self.get_current_user()["name"]
            region = self.get_argument("region", None)
            admin_of = _regions_administered(ctx.catalog, user)
            if region is None and len(admin_of) == 1:
                region = admin_of[0]
            if region is None:
                raise web.HTTPError(403, f"{user} is not a region admin; the audit report is for region admins")
            fmt = self.get_argument("format", "html")
            when = {}
            for name in ("since", "until"):
                text = self.get_argument(name, None)
                try:
                    when[name] = parse_time(text, end=name == "until") if text else None
                except ValueError as e:
                    raise web.HTTPError(400, f"{name}: {e}") from None
            filters = dict(user=self.get_argument("user", None), dataset=self.get_argument("dataset", None), **when)

            def build():  # in a thread: the service's event loop keeps acknowledging records meanwhile
                rows = region_report(ctx.store, ctx.catalog, user, region, **filters)
                return render(rows, fmt if fmt in ("html", "json", "csv") else "html", region)

            try:
                text = await asyncio.get_running_loop().run_in_executor(None, build)
            except NGPError as e:
                raise web.HTTPError(403, str(e)) from None
            self.set_header("Content-Type", {"json": "application/json", "csv": "text/csv"}.get(fmt, "text/html"))
            self.finish(text)

        def write_error(self, status_code, **kwargs):
            exc = kwargs.get("exc_info", (None, None))[1]
            msg = getattr(exc, "log_message", None) or self._reason
            self.finish(f"<!DOCTYPE html><html><body><h1>{status_code}</h1><p id='ngp-error'>{html.escape(msg)}"
                        "</p></body></html>")

    return [(prefix + "report", ReportHandler), (prefix + "oauth_callback", HubOAuthCallbackHandler)]


def _regions_administered(catalog, user) -> list[str]:
    """Regions ``user`` administers; none for a user the catalog does not know."""
    from ..errors import NotFoundError

    try:
        labels = catalog.user(user).role_labels()
    except NotFoundError:
        return []
    return [label.split(":", 1)[1] for label in labels if label.startswith("region-admin:")]
