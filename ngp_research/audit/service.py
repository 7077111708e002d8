"""The audit service: receives records from kernels and servers, appends them durably, serves reports.

It runs as a JupyterHub-managed service, outside every sandbox
(``python -m ngp_research.audit.service``), on its hub URL's port and, when
``NGP_AUDIT_SOCKET`` names one, on a unix socket too (mode 0666, in a folder
of its own). A workspace's folder of that socket is bound read-only into the
sandbox (``/run/ngp/audit``), so kernels reach the service there directly,
with no relay in between, and authenticate with their server's JupyterHub
token, as on the port.

Identity comes from the verified token, never from the payload: the user is
the token's owner, the project is the server named in the token's
``access:servers!server=<user>/<project>`` scope. A record whose payload
claims another user or project is stored under the real identity with
``detail.flag`` saying what was claimed. A path under
``/data/<region>/<dataset>/`` is resolved to its region and dataset, and
flagged when that dataset is not in the project's workspace now.

A request is answered only after its records are committed (SQLite with
``synchronous=FULL`` in WAL mode, or PostgreSQL's commit): concurrent requests
are grouped into one transaction (group commit).

Endpoints (under the service prefix, e.g. ``/services/audit/``):

``POST records``
    ``{"records": [{"action", "path", "detail"}]}`` with ``Authorization: token T``;
    ``200 {"acknowledged": n, "first_seq", "last_seq"}`` once durable. A record may carry
    ``paths`` (a list) instead of ``path``: it stands for one access per path, and ``n`` counts
    them. A run of at least ``GROUP_MIN`` consecutive paths in one dataset (or outside ``/data``)
    is stored as one chained record listing them (``detail["paths"]``); shorter runs as one record
    per path. Likewise ``GROUP_MIN`` or more consecutive plain ``data.open`` records of one path
    (a loop of ``fetch`` calls) are stored as one record of that path listing what differs between
    them (``detail["accesses"]``). Reports show one row per access either way.
``GET health``
    ``200`` when the store is writable.
``GET report?region=R[&since&until&user&dataset&format=html|json|csv]``
    For a region admin logged in to the hub: the region's access report.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import time
import urllib.parse
from dataclasses import dataclass

from tornado import web

from ..kernel.auditor import MAX_REQUEST_BYTES, opened
from .records import NOT_PER_ACCESS, AuditRecord, canonical

MAX_RECORDS_PER_REQUEST = 5000
#: A run of this many paths or more, in one place, is stored as one record listing them (see build_records).
GROUP_MIN = 64
MAX_BODY = MAX_REQUEST_BYTES  # the kernel keeps every request below it
_SERVER_SCOPE = re.compile(r"^access:servers!server=([^/]+)/(.+)$")
ALLOWED_ACTIONS = {"query.execute", "file.open", "file.list", "file.link", "process.exec", "library.load", "socket.connect",
                   "data.open", "server.file", "audit.tamper", "review.mark"}
# report.run is not among them: only the report runner, outside every sandbox, writes provenance.


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the hub vouches for it."""

    user: str
    project: str | None


def identity_from_model(model: dict) -> Caller:
    """The caller from HubAuth's user model: owner of the token, and the server its scopes name.

    >>> identity_from_model({"name": "alice", "scopes": ["access:servers!server=alice/cardio-gwas"]})
    Caller(user='alice', project='cardio-gwas')
    """
    user = model["name"]
    projects = set()
    for scope in model.get("scopes", []):
        m = _SERVER_SCOPE.match(scope)
        if m and m.group(1) == user:
            projects.add(m.group(2))
    return Caller(user, projects.pop() if len(projects) == 1 else None)


def resolve(path):
    """(region, dataset) of a workspace path under /data, else (None, None).

    >>> resolve("/data/syd/syd-cohort/syd-cohort.vcf.gz")
    ('syd', 'syd-cohort')
    >>> resolve("/project/notes.txt"), resolve("/data/syd/"), resolve("/project/../data/syd/ds/x")
    ((None, None), ('syd', None), ('syd', 'ds'))
    >>> resolve("//data/syd/ds/x")  # the kernel opens /data/syd/ds/x
    ('syd', 'ds')

    A region's own folder (listing it shows which of its datasets the workspace has) is the region's:

    >>> resolve("/data/syd"), resolve("/data"), resolve("/data/")
    (('syd', None), (None, None), (None, None))

    Other names of the same file: a process's root (``/proc/self/root``), a ``file:`` URL (pysam and
    Hail take them), and a name cut at a NUL (where C stops reading it):

    >>> resolve("/proc/self/root/data/syd/ds/x"), resolve("/proc/42/root/proc/self/root/data/syd/ds")
    (('syd', 'ds'), ('syd', 'ds'))
    >>> resolve("/proc/self/task/7/root/data/syd/ds/x"), resolve("/proc/self/root/../data/syd/ds/x")
    (('syd', 'ds'), ('syd', 'ds'))
    >>> resolve("file:///data/syd/ds/x"), resolve("file://localhost/data/syd/ds/x"), resolve("file:/data/syd/ds")
    (('syd', 'ds'), ('syd', 'ds'), ('syd', 'ds'))
    >>> resolve("/data/syd/ds/x\\x00/../../../norr/e/y")
    ('syd', 'ds')
    """
    if not isinstance(path, str):
        return None, None
    if not _plain(path):
        path = _opened(path)
    if not path.startswith("/data/"):
        return None, None
    parts = path.split("/", 4)
    if len(parts) >= 4 and parts[2] and parts[3] and len(parts[2]) <= 128 and len(parts[3]) <= 128:
        return parts[2], parts[3]
    if len(parts) == 3 and parts[2] and len(parts[2]) <= 128:
        return parts[2], None
    return None, None


def path_note(path: str) -> str | None:
    """Why ``path`` is not as the kernel sends one (absolute, normalised, storable), or None.

    Region and dataset come from the normalised path (see :func:`resolve`); a report shows the path
    as it was sent, so one in another form is flagged where the region admin reads it.

    >>> path_note("/data/r/d/x") is None, path_note("/project/.hidden") is None
    (True, True)
    >>> path_note("/data/syd/d/../../norr/e/x")
    'the path is not in normal form (it opens /data/norr/e/x)'
    >>> path_note("notes.txt")
    'the path is not absolute'
    """
    if _PROC_LINK.match(path):
        return "the path goes through a process's working folder or open file: where it leads is not known"
    if path.startswith("file:"):
        return f"the path is a file: URL (it opens {_opened(path)})"
    if not path.startswith("/"):
        return "the path is not absolute"
    if not _plain(path):
        norm = _opened(path)
        if norm != path:
            return f"the path is not in normal form (it opens {norm})"
    return None


def _plain(path: str) -> bool:
    """Whether ``path`` is surely the path Linux opens for it (else :func:`_opened` says which)."""
    return not ("/." in path or "//" in path or path.endswith("/") or not path.startswith("/")
                or "\x00" in path or path.startswith(_INDIRECT))


#: Path prefixes that name a file through another name: a ``file:`` URL, a process's root folder.
_INDIRECT = ("file:", "/proc/")
#: Paths through a process's working folder or open files: where they lead cannot be known here.
_PROC_LINK = re.compile(r"^(?:/proc/(?:self|thread-self|[0-9]+)/(?:cwd|fd/[0-9]+|task/[0-9]+/(?:cwd|fd/[0-9]+))|/dev/fd/[0-9]+)(?:/|$)")


def _opened(path: str) -> str:
    """The path Linux opens for ``path``: a ``file:`` URL's path, then as
    :func:`ngp_research.kernel.auditor.opened` reads it (cut at a NUL, a process's root such as
    ``/proc/self/root/x`` as ``/x``, normalised, ``//`` as ``/``), the same reading as the kernel's."""
    if path.startswith("file:"):
        try:
            parts = urllib.parse.urlsplit(path)
        except ValueError:  # "file://[x": not a URL anything opens; the path stays as sent
            parts = None
        if parts is not None and parts.netloc in ("", "localhost"):
            path = urllib.parse.unquote(parts.path)
    return opened(path)


#: Code that reaches into the interpreter or the audit machinery: in-process auditing cannot stop a determined
#: user (see ngp_research.kernel), so such cells are flagged where the region admin reads them.
TAMPERING_SIGNS = ("gc.", "get_objects", "get_referrers", "ctypes", "__closure__", "cell_contents", "__code__",
                   "addaudithook", "ngp_research.kernel", "_ngp", "/run/ngp", "sys.modules[", "__globals__",
                   "_posixsubprocess", "spawnv_passfds",  # starting a program without an audit event
                   "__wrapped__", "__base", "__mro__",  # a library's function or class past the wrapper that records
                   "dup2", "fileno=",  # these two: taking over a connection to the audit service
                   "NGP_AUDIT")  # pointing what a cell starts (a Dask cluster, a server) at another service


def storable(value):
    r"""``value`` with every string storable as UTF-8 text (lone surrogates and NUL escaped), and whether it changed.

    A file name that is not valid UTF-8 reaches Python as surrogate escapes; it is kept as a
    readable escape rather than refused (a refused record would block the kernel that sent it).

    >>> storable("/project/caf\udce9")
    ('/project/caf\\xe9', True)
    >>> storable({"a": ["ok", "nul\x00"]})
    ({'a': ['ok', 'nul\\x00']}, True)
    >>> storable("/data/r/d/f")
    ('/data/r/d/f', False)
    """
    if isinstance(value, str):
        if "\x00" not in value and (value.isascii() or not any("\ud800" <= c <= "\udfff" for c in value)):
            return value, False
        try:  # a file name's undecodable bytes, given back as they were, then escaped
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # other lone surrogates
            raw = value.encode("utf-8", "backslashreplace")
        return raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00"), True
    if isinstance(value, dict):
        changed = False
        out = {}
        for k, v in value.items():
            k2, c1 = storable(k)
            v2, c2 = storable(v)
            out[k2] = v2
            changed = changed or c1 or c2
        return (out if changed else value), changed
    if isinstance(value, list):
        pairs = [storable(v) for v in value]
        changed = any(c for _, c in pairs)
        return ([v for v, _ in pairs] if changed else value), changed
    return value, False


def _checked(caller: Caller, raw: dict, members: set | None) -> tuple[str, dict, list]:
    """Action, detail (identity claims removed) and identity flags of a submitted record."""
    if not isinstance(raw, dict):
        raise ValueError("each record must be an object")
    action = raw.get("action")
    if action not in ALLOWED_ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    detail = raw.get("detail") or {}
    if not isinstance(detail, dict):
        raise ValueError("detail must be an object")
    detail = dict(detail)
    code = detail.get("code")
    if code is not None and not isinstance(code, str):
        raise ValueError("detail.code must be a string")
    flags = []
    detail, escaped = storable(detail)
    if escaped:
        flags.append("text that is not valid UTF-8 (or holds NUL) was escaped")
    flags.extend(_caller_flags(caller, members))
    if code and any(sign in code for sign in TAMPERING_SIGNS):
        flags.append("the code reaches into the interpreter or the audit machinery (possible tampering)")
    for key in ("paths", "accesses", "flag"):  # the service's: the accesses a stored record stands for, its flags
        if key in detail:
            kept = f"claimed_{key}"
            while kept in detail:  # never over another value the payload sent
                kept = f"claimed_{kept}"
            flags.append(f"payload set detail.{key} (kept as {kept})")
            detail[kept] = detail.pop(key)
    msg_id = detail.get("msg_id")
    if msg_id is not None and not isinstance(msg_id, str):  # reports join an access to its cell by it
        flags.append("detail.msg_id was not a string (kept as its JSON text)")
        detail["msg_id"] = json.dumps(msg_id, sort_keys=True, default=repr)
    for key, real in (("user", caller.user), ("actor", caller.user), ("project", caller.project)):
        for claimed in (raw.get(key), detail.get(key)):  # each place on its own: one cannot mask the other
            flag = f"payload claimed {key} {claimed!r}"
            if claimed is not None and claimed != real and flag not in flags:
                flags.append(flag)
        detail.pop(key, None)
    return action, detail, flags


def _caller_flags(caller: Caller, members: set | None) -> list:
    if caller.project is None:
        return ["the token names no workspace"]
    if members is not None and caller.user not in members:
        return [f"{caller.user} is not a member of project {caller.project!r}"]
    return []


def _located(detail: dict, flags: list, region, dataset, visible) -> dict:
    if dataset is not None and visible is not None and (region, dataset) not in visible:
        flags = [*flags, f"{region}/{dataset} is not in this workspace's data"]
    if flags:
        detail = {**detail, "flag": "; ".join(flags)}
    return detail


def build_record(caller: Caller, raw: dict, visible: set | None, members: set | None = None) -> AuditRecord:
    """One stored record from one submitted record: identity from ``caller``, location from the path."""
    action, detail, flags = _checked(caller, raw, members)
    path = raw.get("path")
    if path is not None and not isinstance(path, str):
        raise ValueError("path must be a string")
    region, dataset = resolve(path)  # where the path as sent leads (before NUL or surrogates are escaped)
    path, note = _stored_path(path) if path is not None else (None, None)
    if note:
        flags = [*flags, note]
    return AuditRecord(action, caller.user, project=caller.project, region=region, dataset=dataset, path=path,
                       detail=_located(detail, flags, region, dataset, visible))


def build_records(caller: Caller, raw: list, visible: set | None, members: set | None = None) -> list[AuditRecord]:
    """The stored records of a request's submitted records, in order.

    A submitted record with ``paths`` (a list of strings) instead of ``path`` stands for one access
    per path with the same action and detail: the kernel sends a cell's run of file opens that way.
    Its paths are split into consecutive runs of one place (the same region and dataset, or none).
    A run of ``GROUP_MIN`` paths or more becomes one record whose ``detail["paths"]`` lists them
    (``path`` is None), so a cell that opens 10,000 files costs the chain a few records, not
    10,000; a shorter run becomes one record per path. Either way every path is in the chain,
    under its region, and :attr:`StoredRecord.paths` gives them back.

    Likewise ``GROUP_MIN`` or more consecutive ``data.open`` records of one path (a loop of
    ``fetch`` calls on one file) become one record of that path whose ``detail["accesses"]`` lists
    what differs between them (the regions fetched); what they share stays in ``detail``
    (:meth:`StoredRecord.accesses` puts each back together). See :func:`data_run`.

    >>> recs = build_records(Caller("alice", "p"), [{"action": "file.open", "paths": ["/data/r/d/a", "/project/b"],
    ...                                              "detail": {"mode": "r"}}], None)
    >>> [(r.path, r.region, r.dataset, r.detail) for r in recs]
    [('/data/r/d/a', 'r', 'd', {'mode': 'r'}), ('/project/b', None, None, {'mode': 'r'})]
    >>> many = [f"/data/r/d/part-{i}" for i in range(GROUP_MIN)] + ["/project/b"]
    >>> recs = build_records(Caller("alice", "p"), [{"action": "file.open", "paths": many}], None)
    >>> [(r.path, r.region, len(r.detail.get("paths", []))) for r in recs]
    [(None, 'r', 64), ('/project/b', None, 0)]
    >>> fetches = [{"action": "data.open", "path": "/data/r/d/x.vcf.gz", "detail": {"contig": "chr1", "start": s}}
    ...            for s in range(GROUP_MIN)]
    >>> (rec,) = build_records(Caller("alice", "p"), fetches, None)
    >>> rec.path, rec.detail["contig"], rec.detail["accesses"][:2]
    ('/data/r/d/x.vcf.gz', 'chr1', [{'start': 0}, {'start': 1}])
    """
    out = []
    i, n = 0, len(raw)
    while i < n:
        r = raw[i]
        if isinstance(r, dict) and "paths" in r:
            out.extend(_path_runs(caller, r, visible, members))
            i += 1
            continue
        j = i
        if isinstance(r, dict) and r.get("action") == "data.open" and isinstance(r.get("path"), str):
            path = r["path"]
            j = i + 1
            while j < n and isinstance(raw[j], dict) and raw[j].get("action") == "data.open" \
                    and raw[j].get("path") == path and "paths" not in raw[j]:
                j += 1
        grouped = data_run(caller, raw[i:j], visible, members) if j - i >= GROUP_MIN else None
        if grouped is not None:
            out.append(grouped)
        else:  # the whole run, one by one: each record is looked at once
            out.extend(build_record(caller, x, visible, members) for x in raw[i:max(j, i + 1)])
        i = max(j, i + 1)
    return out


def _path_runs(caller: Caller, r: dict, visible, members) -> list[AuditRecord]:
    """The stored records of one submitted record with ``paths`` (see :func:`build_records`)."""
    out = []
    paths = r["paths"]
    if r.get("path") is not None:
        raise ValueError("a record has a path or paths, not both")
    try:  # one join checks every item (JSON gives no str subclasses), and runs_of_places reuses it
        text = "\n".join(paths) if isinstance(paths, list) and paths else None
    except TypeError:
        text = None
    if text is None:
        raise ValueError("paths must be a non-empty list of strings")
    action, detail, flags = _checked(caller, r, members)
    runs = runs_of_places(paths, text)
    prepared = {}  # (place, note) -> (detail, its canonical text): one encoding per place
    user, project = caller.user, caller.project
    for where, note, run in runs:
        hit = prepared.get((where, note))
        if hit is None:
            located = _located(detail, [*flags, note] if note else flags, *where, visible)
            hit = prepared[(where, note)] = (located, canonical(located).decode("utf-8"))
        if len(run) >= GROUP_MIN:
            out.append(AuditRecord(action, user, project, where[0], where[1], None, {**hit[0], "paths": run}))
        else:
            out.extend(AuditRecord.prepared(action, user, project, where[0], where[1], path, *hit) for path in run)
    return out


_RECORD_KEYS = frozenset({"action", "path", "detail"})
_SHARED_TYPES = (str, int, bool, type(None))


def data_run(caller: Caller, run: list, visible: set | None, members: set | None = None) -> AuditRecord | None:
    """One stored record for consecutive ``data.open`` records of one path, or None to store them one by one.

    Taken only when every record is plain: the keys ``action``, ``path`` and ``detail``, a detail
    with no identity claim, code, flag, reserved name or ``msg_id`` other than a string, no text
    :func:`storable` would change, and a path in normal form: no record would be flagged on its
    own. The values that are the same str, int, bool or None in every record's detail are kept
    once; each access keeps the rest, in order, in ``detail["accesses"]``.

    >>> run = [{"action": "data.open", "path": "/data/r/d/x", "detail": {"contig": "chr1", "start": s, "msg_id": "m"}}
    ...        for s in (5, 9)]
    >>> data_run(Caller("alice", "p"), run, None).detail
    {'contig': 'chr1', 'msg_id': 'm', 'accesses': [{'start': 5}, {'start': 9}]}
    >>> data_run(Caller("alice", "p"), [{**run[0], "detail": {"user": "bob"}}, run[1]], None) is None
    True
    """
    path = run[0]["path"]
    details = []
    for r in run:
        d = r.get("detail")
        if type(d) is not dict or not r.keys() <= _RECORD_KEYS or not NOT_PER_ACCESS.isdisjoint(d) \
                or not isinstance(d.get("msg_id", ""), (str, type(None))):
            return None
        details.append(d)
    if path_note(path) or not _storable_as_is([path, details]):
        return None
    common = {}
    for k, v in details[0].items():
        if not isinstance(v, _SHARED_TYPES):  # floats stay with each access: -0.0 == 0.0
            continue
        values = [d.get(k, _MISSING) for d in details]
        if values.count(v) != len(values):  # == over the list in C; 1 == 1.0 == True, hence the types below
            continue
        if v is None or type(v) is str or all(type(w) is type(v) for w in values):  # only None equals None,
            common[k] = v  # and only a str equals a str (json gives no subclasses)
    accesses = [{k: v for k, v in d.items() if k not in common} for d in details]
    region, dataset = resolve(path)
    detail = _located({**common, "accesses": accesses}, _caller_flags(caller, members), region, dataset, visible)
    return AuditRecord("data.open", caller.user, caller.project, region, dataset, path, detail)


_MISSING = object()


def _storable_as_is(value) -> bool:
    r"""True when :func:`storable` would change nothing in ``value`` (JSON data): no NUL, no lone surrogate.

    One encoding of all of it, rather than a walk over every string.

    >>> _storable_as_is(["/data/r/d/café.vcf.gz", {"contig": "chr1"}]), _storable_as_is(["a\x00"])
    (True, False)
    >>> _storable_as_is([{"k": "caf\udce9"}]), _storable_as_is(["a literal \\u0000"])
    (False, False)
    """
    text = json.dumps(value, ensure_ascii=False)
    if "\\u0000" in text:  # NUL (escaped by JSON); a literal backslash-u0000 is sent the careful way too
        return False
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return False
    return True


def _runs_path_by_path(paths: list) -> list:
    runs = []
    for path in paths:
        where = resolve(path)
        path, note = _stored_path(path)
        if runs and runs[-1][0] == where and runs[-1][1] == note:
            runs[-1][2].append(path)
        else:
            runs.append([where, note, [path]])
    return runs


def _stored_path(path: str) -> tuple[str, str | None]:
    """A submitted path as stored (see :func:`storable`), and the flag it earns, if any: not storable as
    it is, or not in the form the kernel sends."""
    stored, escaped = storable(path)
    notes = ["the path is not valid UTF-8 (or holds NUL): escaped"] if escaped else []
    odd = path_note(path)
    if odd:
        notes.append(odd)
    return stored, "; ".join(notes) or None


def runs_of_places(paths: list, text: str | None = None) -> list:
    r"""``[[(region, dataset), note, [paths]], ...]``: consecutive paths of one place and flag, made storable.

    The same as :func:`storable` and :func:`resolve` path by path, but a list of plain absolute paths
    (no NUL, lone surrogate, ``/.``, ``//`` or trailing slash) is checked in a few passes over all of
    it, and only paths under ``/data/`` are resolved one by one: a cell's 10,000 opens cost the
    service little while the cell still runs. ``text`` is ``"\\n".join(paths)`` when the caller has it.

    >>> runs_of_places(["/project/a", "/project/b", "/data/r/d/x", "/data/r/d/y", "/home/u/z"])
    [[(None, None), None, ['/project/a', '/project/b']], [('r', 'd'), None, ['/data/r/d/x', '/data/r/d/y']], [(None, None), None, ['/home/u/z']]]
    >>> odd = ["/project/../data/r/d/x", "/data/r/d/", "rel", "/project/caf\udce9", "/p\n/data/r/d/q"]
    >>> runs_of_places(odd) == _runs_path_by_path(odd)
    True
    """
    if text is None:
        text = "\n".join(paths)
    plain = (text[:1] == "/" and "\x00" not in text and "/." not in text and "//" not in text
             and "/\n" not in text and text[-1:] != "/" and text.count("\n") == text.count("\n/") == len(paths) - 1
             and "/proc/" not in text and "/dev/fd/" not in text)
    if plain and not text.isascii():
        try:
            text.encode("utf-8")  # lone surrogates (undecodable file names) cannot be: storable escapes them
        except UnicodeEncodeError:
            plain = False
    if not plain:
        return _runs_path_by_path(paths)
    if not (text.startswith("/data/") or "\n/data/" in text):
        return [[(None, None), None, list(paths)]]
    runs, nowhere = [], (None, None)
    for path in paths:
        where = resolve(path) if path.startswith("/data/") else nowhere
        if runs and runs[-1][0] == where:
            runs[-1][2].append(path)
        else:
            runs.append([where, None, [path]])
    return runs


class GroupCommitter:
    """Collects records from concurrent requests and appends them in one transaction.

    ``submit`` returns when the caller's records are durable, with their sequence numbers.
    """

    def __init__(self, store, max_batch=5000, max_wait=0.0, inline_max=64):
        self.store = store
        self.inline_max = inline_max
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = None
        self.busy = False  # a batch is being appended (perhaps in a thread): newcomers queue up
        self.arriving = 0  # requests between entering submit and deciding how to commit

    def start(self):
        self.task = asyncio.ensure_future(self._run())

    async def _append(self, loop, records):
        if len(records) <= self.inline_max:  # a few records: commit here, without a thread hop each way
            return self.store.append_many(records)
        return await loop.run_in_executor(None, self.store.append_many, records)

    async def submit(self, records):
        self.arriving += 1
        try:
            await asyncio.sleep(0)  # requests read in the same turn of the loop get here meanwhile
            alone = self.arriving == 1
        finally:
            self.arriving -= 1
        if alone and not self.busy and self.queue.empty() and len(records) <= self.inline_max:
            # Nothing to share a commit with: append here and now, without the hops through the
            # committer's task (no await below, so nothing else runs on the loop meanwhile).
            return self.store.append_many(records)
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((records, fut))
        return await fut

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            self.busy = True
            try:
                await self._commit(loop, first)
            finally:
                self.busy = False

    async def _commit(self, loop, first):
        """Append ``first`` and whatever else is queued, in one transaction; answer each request."""
        batch = [first]
        size = len(first[0])
        # Whatever queued up while the previous transaction ran joins this one: concurrent writers
        # share commits without a lone writer ever waiting for company (max_wait adds a wait).
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            batch.append(item)
            size += len(item[0])
        records = [r for recs, _ in batch for r in recs]
        try:
            stored = await self._append(loop, records)
        except Exception as e:  # nothing in this batch was stored: each request on its own, so one
            if len(batch) == 1:  # bad request does not fail the others that shared its transaction
                if not batch[0][1].done():
                    batch[0][1].set_exception(e)
                return
            for recs, fut in batch:
                try:
                    mine = await self._append(loop, recs)
                except Exception as e2:
                    if not fut.done():
                        fut.set_exception(e2)
                else:
                    if not fut.done():
                        fut.set_result(mine)
            return
        i = 0
        for recs, fut in batch:
            mine = stored[i:i + len(recs)]
            i += len(recs)
            if not fut.done():
                fut.set_result(mine)


class _Base(web.RequestHandler):
    @property
    def ctx(self):
        return self.settings["ctx"]

    def write_json(self, status, obj):
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))


def _no_constant(name):
    """``NaN`` and ``Infinity`` are not JSON: a record holding one could not be reported as JSON."""
    raise ValueError(f"{name} is not a JSON number")


def _finite(text):
    """A JSON number as a float; one too large for a float (``1e400``) would be stored as infinity."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} is too large a number")
    return value


class RecordsHandler(_Base):
    async def post(self):
        token = self.request.headers.get("Authorization", "")
        token = token[6:].strip() if token.lower().startswith("token ") else ""
        if not token:
            return self.write_json(401, {"error": "a JupyterHub token is required"})
        caller = await self.ctx.authenticate(token)
        if caller is None:
            return self.write_json(401, {"error": "the token is not valid"})
        if len(self.request.body) > MAX_BODY:
            return self.write_json(413, {"error": "request too large"})
        try:
            body = json.loads(self.request.body or b"{}", parse_constant=_no_constant, parse_float=_finite)
            raw = body["records"]
            if not isinstance(raw, list) or not raw or len(raw) > MAX_RECORDS_PER_REQUEST:
                raise ValueError(f"records: a list of 1 to {MAX_RECORDS_PER_REQUEST} records")
            count = sum(len(r["paths"]) if isinstance(r, dict) and isinstance(r.get("paths"), list) else 1 for r in raw)
            if count > MAX_RECORDS_PER_REQUEST:  # counted before anything is built
                raise ValueError(f"records: at most {MAX_RECORDS_PER_REQUEST} records per request, paths counted")
            records = build_records(caller, raw, self.ctx.visible(caller), self.ctx.members(caller))
        except (ValueError, KeyError, TypeError) as e:
            return self.write_json(400, {"error": str(e) if not isinstance(e, KeyError) else f"missing key {e}"})
        except RecursionError:
            return self.write_json(400, {"error": "the request is nested too deeply"})
        try:
            stored = await self.ctx.committer.submit(records)
        except Exception as e:
            self.ctx.log(f"append failed: {e!r}")
            return self.write_json(503, {"error": "the audit store could not append; nothing was acknowledged"})
        self.write_json(200, {"acknowledged": count, "first_seq": stored[0].seq, "last_seq": stored[-1].seq})


class HealthHandler(_Base):
    def get(self):
        self.write_json(200, {"ok": True})


class ServiceContext:
    """What the handlers share: the store, the committer, token checks and the catalog."""

    def __init__(self, store, authenticate, catalog=None, visible_ttl=10.0):
        self.store = store
        self._authenticate = authenticate
        self.catalog = catalog
        self.committer = GroupCommitter(store)
        self._visible = {}
        self.visible_ttl = visible_ttl

    async def authenticate(self, token):
        return await self._authenticate(token)

    def visible(self, caller: Caller):
        """(region, dataset) pairs the caller's workspace shows now (cached briefly), or None if unknown."""
        if self.catalog is None or caller.project is None:
            return None
        key = (caller.user, caller.project)
        hit = self._visible.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        from ..access import AccessPolicy

        try:
            d = AccessPolicy(self.catalog).files(caller.user, caller.project)
            pairs = set(d.datasets)
        except Exception:
            pairs = set()
        self._visible[key] = (time.monotonic() + self.visible_ttl, pairs)
        return pairs

    def members(self, caller: Caller):
        """Members of the caller's project (cached with the visible datasets), or None if unknown."""
        if self.catalog is None or caller.project is None:
            return None
        key = ("members", caller.project)
        hit = self._visible.get(key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        try:
            names = {m.user.username for m in self.catalog.project(caller.project).memberships}
        except Exception:
            names = set()
        self._visible[key] = (time.monotonic() + self.visible_ttl, names)
        return names

    def log(self, text):
        print(f"[audit-service] {text}", flush=True)


def hub_authenticator():
    """Token checks against the hub (HubAuth), cached; returns an async token -> Caller | None."""
    from jupyterhub.services.auth import HubAuth

    auth = HubAuth(api_token=os.environ["JUPYTERHUB_API_TOKEN"], cache_max_age=60)

    async def check(token):
        model = await auth.user_for_token(token, use_cache=True, sync=False)
        if not model or model.get("kind", "user") != "user":
            return None
        return identity_from_model(model)

    return check


def make_app(ctx: ServiceContext, prefix: str = "/", report_handlers=()):
    from tornado.web import Application

    prefix = prefix.rstrip("/") + "/"
    handlers = [(prefix + "records", RecordsHandler), (prefix + "health", HealthHandler), *report_handlers]
    return Application(handlers, ctx=ctx, cookie_secret=os.urandom(32))


def listen_unix(path: str):
    """A listening unix socket at ``path`` for the service, replacing a socket left by an earlier run.

    Its folder is created (0755) if missing; the socket is 0666, since every workspace's uid connects
    to it (through the folder bound into its sandbox) and the token decides who the caller is, as on
    the TCP port. Anything at ``path`` that is not a socket is an error, never removed, and so is a
    socket something still answers on (another service with the same home): it is never taken over.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> sock = listen_unix(os.path.join(d, "audit", "audit.sock"))
    >>> oct(os.stat(os.path.join(d, "audit", "audit.sock")).st_mode & 0o777)
    '0o666'
    >>> sock.close()
    >>> listen_unix(os.path.join(d, "audit", "audit.sock")).close()  # an old socket is replaced
    >>> live = listen_unix(os.path.join(d, "audit", "audit.sock"))
    >>> listen_unix(os.path.join(d, "audit", "audit.sock"))
    Traceback (most recent call last):
    ...
    RuntimeError: another process is listening on .../audit/audit.sock; not taking it over
    >>> live.close()
    >>> open(os.path.join(d, "audit", "file"), "w").close()
    >>> listen_unix(os.path.join(d, "audit", "file"))
    Traceback (most recent call last):
    ...
    ValueError: File .../audit/file exists and is not a socket
    >>> listen_unix("/" + "x" * 200)
    Traceback (most recent call last):
    ...
    ValueError: the audit service's socket path '/xxx...' is longer than a unix socket's 107 bytes; use a shorter NGP_HOME
    """
    from tornado.netutil import bind_unix_socket

    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the terminating NUL
        raise ValueError(f"the audit service's socket path {path!r} is longer than a unix socket's 107 bytes; "
                         "use a shorter NGP_HOME")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o755, exist_ok=True)
        os.chmod(folder, 0o755)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        pass  # nothing there, or a socket left by a service that is gone: bind_unix_socket replaces it
    else:
        raise RuntimeError(f"another process is listening on {path}; not taking it over")
    finally:
        probe.close()
    return bind_unix_socket(path, mode=0o666)


async def sign_at_intervals(store, seconds: float, log) -> None:
    """Sign the chain head every ``seconds`` when records were added since the last checkpoint (in a
    thread: the commit waits for the disk). A failure is logged and tried again at the next interval."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(seconds)
        try:
            cp = await loop.run_in_executor(None, store.checkpoint)
        except Exception as e:
            log(f"could not sign a checkpoint: {e!r}")
        else:
            if cp is not None:
                log(f"signed a checkpoint at record {cp.seq}")


def main():
    """Run as a JupyterHub-managed service (the hub sets JUPYTERHUB_* variables)."""
    from tornado.httpserver import HTTPServer
    from urllib.parse import urlparse

    from ..catalog import Catalog
    from ..platform import Platform
    from .report import report_handlers
    from .store import AuditStore

    platform = Platform()
    store = AuditStore.for_platform(platform)
    store.recover_log()  # a checkpoint committed but not logged when the service was last killed
    store.checkpoint()  # records acknowledged before the service was last killed, unsigned until now
    every = platform.audit_checkpoint_seconds
    catalog = Catalog.open(platform)
    ctx = ServiceContext(store, hub_authenticator(), catalog)
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    app = make_app(ctx, prefix, report_handlers(prefix, ctx))
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8082"))
    socket_path = os.environ.get("NGP_AUDIT_SOCKET") or None

    async def serve():
        ctx.committer.start()
        server = HTTPServer(app, max_body_size=MAX_BODY)
        server.listen(url.port, url.hostname)
        ctx.log(f"listening on {url.hostname}:{url.port}{prefix}")
        if socket_path:
            server.add_socket(listen_unix(socket_path))
            own_socket = os.stat(socket_path).st_ino
            ctx.log(f"listening on {socket_path}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        signer = asyncio.ensure_future(sign_at_intervals(store, every, ctx.log)) if every > 0 else None
        await stop.wait()
        if signer is not None:
            signer.cancel()
        server.stop()
        if socket_path:
            with contextlib.suppress(FileNotFoundError):
                if os.stat(socket_path).st_ino == own_socket:  # not a later service's
                    os.unlink(socket_path)
        store.close()  # signs a checkpoint of the head on shutdown
        ctx.log("stopped; chain head signed")

    asyncio.run(serve())


if __name__ == "__main__":
    main()
