"""The audit record: what happened, who did it, to which data, and its place in the chain.

A record is written so that "user U in project P opened file F of dataset D
of region R at time T, from cell C" reads straight off its fields::

    AuditRecord(action="file.open", actor="U", project="P", region="R",
                dataset="D", path="/data/R/D/F", detail={"cell": "C"})

Each stored record carries the hash of the one before; its own hash is the
sha256 of :func:`canonical` of every field but the hash itself.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

GENESIS = "0" * 64

#: Actions the platform writes. Later components add their own, dotted by component.
ACTIONS = {
    "region.create": "a region was added to the catalog",
    "user.add": "a user was added, with roles",
    "user.role": "a role was given to a user",
    "dataset.ingest": "a dataset was validated and registered into a region's area",
    "project.create": "a project was registered with its ethics approval",
    "project.change": "a project's title, approval or status changed",
    "member.add": "a user became a member of a project",
    "member.remove": "a user stopped being a member of a project",
    "tag.grant": "a region tagged one of its datasets for a project",
    "tag.revoke": "a region revoked a tag",
    "change.failed": "a recorded catalog change did not commit (detail names the record)",
    "file.open": "a file was opened inside a workspace",
    "file.link": "a link was made inside a workspace (path: what it leads to; detail.link: the link)",
    "workspace.start": "a project workspace started (detail: uid, datasets)",
    "workspace.stop": "a project workspace stopped (detail: why, e.g. access revoked)",
    "workspace.run": "an operator ran a command in a member's workspace sandbox (detail: command)",
    "workspace.refused": "a workspace start was refused (detail: the access policy's reasons)",
    "query.execute": "code was sent to a kernel to run",
    "report.run": "a report template ran in a member's workspace (detail: template and its sha256, parameters, "
                  "input datasets with checksums, outputs' sha256)",
    "review.mark": "a reviewer marked a candidate variant as reviewed, with a comment",
}


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_time(t: datetime) -> str:
    """ISO 8601 in UTC with microseconds, the only time format the chain hashes.

    >>> from datetime import datetime, timezone
    >>> format_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    '2026-01-02T03:04:05.000000Z'
    """
    if t.tzinfo is None:
        raise ValueError("audit times must be timezone-aware")
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def canonical(obj) -> bytes:
    """The canonical encoding that is hashed and signed: sorted-key compact UTF-8 JSON.

    >>> canonical({"b": 1, "a": "å"})
    b'{"a":"\\xc3\\xa5","b":1}'
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class AuditRecord:
    """An event to append. ``time`` defaults to the moment the store appends it."""

    action: str
    actor: str
    project: str | None = None
    region: str | None = None
    dataset: str | None = None
    path: str | None = None
    detail: dict = field(default_factory=dict)
    time: datetime | None = None
    detail_text: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.action or not isinstance(self.action, str):
            raise ValueError("action: an audit record needs an action")
        if not self.actor or not isinstance(self.actor, str):
            raise ValueError("actor: an audit record needs the acting identity")
        if not isinstance(self.detail, dict):
            raise ValueError("detail: must be a dict")
        # detail must be JSON-encodable now, not at append time; its encoding is kept for sealing
        object.__setattr__(self, "detail_text", canonical(self.detail).decode("utf-8"))

    @classmethod
    def prepared(cls, action: str, actor: str, project, region, dataset, path, detail: dict,
                 detail_text: str) -> "AuditRecord":
        """A record whose ``detail_text`` is already ``canonical(detail)`` (many records sharing one detail).

        The caller vouches for what ``__post_init__`` would check: a non-empty action and actor, and
        the detail's canonical text.

        >>> d = {"mode": "r"}
        >>> fast = AuditRecord.prepared("file.open", "alice", None, None, None, "/p", d, canonical(d).decode())
        >>> fast == AuditRecord("file.open", "alice", path="/p", detail=d)
        True
        """
        self = object.__new__(cls)
        object.__setattr__(self, "__dict__", {  # one dict literal: cheaper than __init__ or update(**kw)
            "action": action, "actor": actor, "project": project, "region": region, "dataset": dataset,
            "path": path, "detail": detail, "time": None, "detail_text": detail_text})
        return self


#: Detail keys never listed per access in a run record: a run whose records hold one is stored record by
#: record (ngp_research.audit.service.data_run), and a record listing one is read as itself (accesses).
NOT_PER_ACCESS = frozenset({"flag", "paths", "accesses", "user", "actor", "project", "code"})


@dataclass(frozen=True)
class StoredRecord:
    """A record as it sits in the chain."""

    seq: int
    time: str
    action: str
    actor: str
    project: str | None
    region: str | None
    dataset: str | None
    path: str | None
    detail: dict
    prev_hash: str
    hash: str
    detail_text: str = field(default="", repr=False, compare=False)  # the stored (canonical) detail

    @property
    def paths(self) -> list:
        """The paths this record is about: its ``path``, or the run of paths it stands for.

        The audit service stores a long run of one cell's opens in one place as one record, its
        paths in ``detail["paths"]`` (see ``ngp_research.audit.service.build_records``).

        >>> r = StoredRecord(1, "t", "file.open", "u", None, None, None, None, {"paths": ["/a", "/b"]}, "0", "1")
        >>> r.paths, r.replace(path="/c", detail={}).paths
        (['/a', '/b'], ['/c'])
        """
        if self.path is not None:
            return [self.path]
        listed = self.detail.get("paths")
        return list(listed) if isinstance(listed, list) else []

    def accesses(self):
        """One view of this record per access it stands for: the same record, with that access's path and detail.

        A record listing a run of paths (``detail["paths"]``) gives one view per path; a record of a
        run of data accesses to its ``path`` (``detail["accesses"]``, e.g. a loop of ``fetch``
        calls) gives one view per access, its detail what the accesses share plus its own. The
        views share ``seq`` and ``hash`` with the stored record (their detail lacks ``paths`` and
        ``accesses``), so they are for reading, not for verifying.

        >>> r = StoredRecord(7, "t", "file.open", "u", None, "r", "d", None, {"paths": ["/a", "/b"], "mode": "r"}, "0", "1")
        >>> [(v.seq, v.path, v.detail) for v in r.accesses()]
        [(7, '/a', {'mode': 'r'}), (7, '/b', {'mode': 'r'})]
        >>> r = StoredRecord(8, "t", "data.open", "u", None, "r", "d", "/x", {"contig": "1", "accesses": [{"start": 5}]}, "0", "1")
        >>> [(v.path, v.detail) for v in r.accesses()]
        [('/x', {'contig': '1', 'start': 5})]
        """
        listed = self.detail.get("accesses")
        if self.action == "data.open" and self.path is not None and isinstance(listed, list) and listed \
                and all(isinstance(a, dict) and NOT_PER_ACCESS.isdisjoint(a) and self.detail.keys().isdisjoint(a)
                        for a in listed):  # only the form the service builds: nothing an access could override
            shared = {k: v for k, v in self.detail.items() if k != "accesses"}
            return [self.replace(detail={**shared, **a}, detail_text="") for a in listed]
        if self.path is not None or not isinstance(self.detail.get("paths"), list) or not self.detail["paths"]:
            return [self]  # never none: a record always shows
        detail = {k: v for k, v in self.detail.items() if k != "paths"}
        return [self.replace(path=p, detail=detail, detail_text="") for p in self.detail["paths"]]

    def replace(self, **changes) -> "StoredRecord":
        return dataclasses.replace(self, **changes)

    def content(self) -> dict:
        """Every field but the hash: what the hash covers."""
        return {
            "seq": self.seq,
            "time": self.time,
            "action": self.action,
            "actor": self.actor,
            "project": self.project,
            "region": self.region,
            "dataset": self.dataset,
            "path": self.path,
            "detail": self.detail,
            "prev_hash": self.prev_hash,
        }

    def computed_hash(self) -> str:
        return record_hash(self.content())

    def to_json(self) -> dict:
        return {**self.content(), "hash": self.hash}


def record_hash(content: dict) -> str:
    return hashlib.sha256(canonical(content)).hexdigest()


_dump = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_dump_str = json.encoder.encode_basestring  # what _dump does for a str, without its Python-level dispatch


def _j(value) -> str:
    """``_dump(value)``, quicker for the str and None that make up most of a record."""
    if value.__class__ is str:
        return _dump_str(value)
    if value is None:
        return "null"
    if value.__class__ is int:
        return int.__repr__(value)
    return _dump(value)


def content_hash(seq, time, action, actor, project, region, dataset, path, detail_text, prev_hash) -> str:
    """:func:`record_hash` of a record's content, with its detail already in canonical form.

    Builds the same bytes as ``canonical(content)`` (keys in sorted order) without encoding the
    detail again, so appending and verifying encode each detail once.

    >>> c = {"seq": 1, "time": "t", "action": "a", "actor": "u", "project": None, "region": "r",
    ...      "dataset": "d", "path": "/p", "detail": {"b": [1], "a": "å"}, "prev_hash": "0"}
    >>> content_hash(**{k: v for k, v in c.items() if k != "detail"},
    ...              detail_text=canonical(c["detail"]).decode()) == record_hash(c)
    True
    """
    text = (f'{{"action":{_j(action)},"actor":{_j(actor)},"dataset":{_j(dataset)},'
            f'"detail":{detail_text},"path":{_j(path)},"prev_hash":{_j(prev_hash)},'
            f'"project":{_j(project)},"region":{_j(region)},"seq":{_j(seq)},"time":{_j(time)}}}')
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(record: AuditRecord, seq: int, prev_hash: str, now: datetime, now_text: str | None = None) -> StoredRecord:
    """Give a record its place in the chain: sequence number, time, previous hash and own hash.

    ``now_text`` is ``format_time(now)``, when the caller has it (one batch, one time).
    """
    time = format_time(record.time) if record.time is not None else (now_text or format_time(now))
    h = content_hash(seq, time, record.action, record.actor, record.project, record.region, record.dataset,
                     record.path, record.detail_text, prev_hash)
    sealed = object.__new__(StoredRecord)  # the frozen dataclass's __init__, without its per-field setattr
    object.__setattr__(sealed, "__dict__", {
        "seq": seq, "time": time, "action": record.action, "actor": record.actor, "project": record.project,
        "region": record.region, "dataset": record.dataset, "path": record.path, "detail": record.detail,
        "prev_hash": prev_hash, "hash": h, "detail_text": record.detail_text})
    return sealed
