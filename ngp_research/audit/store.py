"""The append-only, hash-chained audit store with signed checkpoints.

Records live in one table, in sequence order; each carries the hash of the
previous one. At the first append, every ``checkpoint_interval`` records, on
demand, and when the store is closed, the head of the chain (sequence number
and hash) is signed
with the platform's Ed25519 key. Checkpoints are kept in the database and,
as a second copy, appended to a log file beside the keys once committed, so
removing the tail of the chain together with its checkpoint rows is still
caught, and a writer killed at any moment never leaves a false alarm.

:meth:`AuditStore.verify` finds an edited, removed, reordered, inserted or
truncated record. What it cannot see: records appended after the last
checkpoint and then removed before the next one. Keep the interval small
where that matters, and copy the checkpoint log off the machine.
"""

import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
    select,
)

from ..catalog.database import make_engine
from ..errors import AuditIntegrityError
from .records import GENESIS, AuditRecord, StoredRecord, canonical, content_hash, format_time, seal, utc_now
from .signing import CheckpointSigner

log = logging.getLogger(__name__)

metadata = MetaData()

records_table = Table(
    "audit_records",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", String(32), nullable=False, index=True),
    Column("action", String(64), nullable=False),
    Column("actor", String(128), nullable=False, index=True),
    Column("project", String(64)),
    Column("region", String(64), index=True),
    Column("dataset", String(128)),
    Column("path", Text),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

checkpoints_table = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("head_hash", String(64), nullable=False),
    Column("signed_at", String(32), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("signature", Text, nullable=False),
)


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head_hash: str
    signed_at: str
    key_id: str
    signature: str

    def statement(self) -> bytes:
        return canonical({"seq": self.seq, "head_hash": self.head_hash, "signed_at": self.signed_at})

    def to_json(self) -> dict:
        return {
            "seq": self.seq,
            "head_hash": self.head_hash,
            "signed_at": self.signed_at,
            "key_id": self.key_id,
            "signature": self.signature,
        }


@dataclass
class VerificationReport:
    """What :meth:`AuditStore.verify` found. ``ok`` is true when ``problems`` is empty."""

    records: int = 0
    checkpoints: int = 0
    last_checkpoint_seq: int = 0
    head_hash: str = GENESIS
    key_id: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "head_hash": self.head_hash,
            "key_id": self.key_id,
            "problems": self.problems,
        }


_ADVISORY_LOCK = 0x6E6770  # "ngp"
MAX_PROBLEMS = 50


class AuditStore:
    """Append, checkpoint, verify and query the audit chain.

    Parameters
    ----------
    url : str
        SQLAlchemy URL of the audit database.
    keys_dir : path
        Folder of the signing key (created on first use, mode 0700/0600).
    checkpoint_interval : int
        Sign the head after this many records since the last checkpoint.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> store = AuditStore(f"sqlite:///{d}/audit.sqlite", d / "keys")
    >>> rec = store.append(AuditRecord(action="tag.grant", actor="admin-syd", dataset="syd-cohort"))
    >>> rec.seq
    1
    >>> store.close()
    >>> store.verify().ok
    True
    """

    def __init__(self, url: str, keys_dir, checkpoint_interval: int = 1000, checkpoint_log=None,
                 create_key: bool = True, trusted_key_id: str | None = None):
        if checkpoint_interval < 1:
            raise ValueError("checkpoint_interval: must be at least 1")
        self.url = url
        self.engine = make_engine(url)
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        if self._is_sqlite:

            @event.listens_for(self.engine, "connect")
            def _no_implicit_begin(dbapi_conn, _record):
                dbapi_conn.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _begin_deferred(conn):
                # SQLAlchemy's transactions on this engine only read (appends take the write lock in
                # _transaction): in WAL mode a reader, however long (verify, a report), does not
                # block the service's appends.
                conn.exec_driver_sql("BEGIN")

        metadata.create_all(self.engine)
        marker = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_sql = (f"INSERT INTO {records_table.name} ({', '.join(c.name for c in records_table.columns)}) "
                            f"VALUES ({', '.join([marker] * len(records_table.columns))})")
        cp_columns = [c.name for c in checkpoints_table.columns if c.name != "id"]
        self._checkpoint_sql = (f"INSERT INTO {checkpoints_table.name} ({', '.join(cp_columns)}) "
                                f"VALUES ({', '.join([marker] * len(cp_columns))})")
        try:
            self.signer = CheckpointSigner(Path(keys_dir), create=create_key)
        except FileNotFoundError:
            self.signer = None  # only a reader may lack the key; verify() reports it
        self.trusted_key_id = trusted_key_id or None
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_log = Path(checkpoint_log) if checkpoint_log else Path(keys_dir).parent / "audit-checkpoints.jsonl"
        self._unlogged = []  # committed checkpoints the log could not take yet (see _log_checkpoint)
        self._log_checked = False  # the first write transaction looks for an unlogged checkpoint
        self._log_lock = threading.Lock()  # threads sharing this store log one at a time

    @classmethod
    def for_platform(cls, platform, create_key: bool = True) -> "AuditStore":
        """The platform's store. Readers (verify, log) pass ``create_key=False``: they never make a key."""
        platform.ensure_layout()
        return cls(
            platform.audit_database_url,
            platform.keys_dir,
            checkpoint_interval=platform.audit_checkpoint_interval,
            checkpoint_log=platform.state_dir / "audit-checkpoints.jsonl",
            create_key=create_key,
            trusted_key_id=platform.audit_trusted_key_id,
        )

    # -- writing ---------------------------------------------------------

    # Plain SQL on the DB-API connection (the same on SQLite and PostgreSQL): on the append path of
    # every record, where SQLAlchemy's per-statement work cost more than running the statements.
    _HEAD_SQL = f"SELECT seq, hash FROM {records_table.name} ORDER BY seq DESC LIMIT 1"
    _LAST_CHECKPOINT_SQL = f"SELECT COALESCE(MAX(seq), 0) FROM {checkpoints_table.name}"

    @contextmanager
    def _transaction(self, signed: list | None = None):
        """A DB-API cursor in a write transaction that holds the chain's lock.

        ``signed`` collects the checkpoints :meth:`_sign_head` stored in this transaction; they are
        appended to the checkpoint log once the commit succeeded, never before. So every line of the
        log is a checkpoint the database holds (one it lacks was removed), and a transaction that
        fails, or a writer killed before its commit, leaves nothing in the log. A writer stopped
        between the commit and the log line leaves the newest checkpoint unlogged: ``verify``
        allows that one (once the log holds an earlier one), and the next store to write, or the
        writer that signs the next checkpoint, logs it first (:meth:`_log_unlogged`).
        """
        raw = self.engine.raw_connection()
        cur = None
        try:
            cur = raw.cursor()
            if self._is_sqlite:
                cur.execute("BEGIN IMMEDIATE")  # the connection is in autocommit mode (see __init__)
            elif self.engine.dialect.name == "postgresql":
                # read committed whatever the server's default: the head must be read after the lock is
                # granted, not from a snapshot taken before it
                cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cur.execute(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})")
            try:
                if self._unlogged:  # the log could not take a committed checkpoint: no new records until it does
                    self._flush_unlogged()
                if not self._log_checked:  # a writer killed between its commit and its log line
                    self._log_unlogged(cur)
                    self._log_checked = True
                yield cur
                raw.commit()
            except BaseException:
                raw.rollback()
                raise
            for cp in signed or ():
                self._log_checkpoint(cp)
        finally:
            if cur is not None:
                cur.close()
            raw.close()  # back to the pool

    def _head(self, cur) -> tuple[int, str]:
        cur.execute(self._HEAD_SQL)
        row = cur.fetchone()
        return (row[0], row[1]) if row else (0, GENESIS)

    def _last_checkpoint_seq(self, cur) -> int:
        cur.execute(self._LAST_CHECKPOINT_SQL)
        return cur.fetchone()[0]

    def append(self, record: AuditRecord) -> StoredRecord:
        """Append one record; it is durable (committed) when this returns."""
        return self.append_many([record])[0]

    def append_many(self, records: Iterable[AuditRecord]) -> list[StoredRecord]:
        """Append records in one transaction (group commit); durable when this returns."""
        records = list(records)
        if not records:
            return []
        for r in records:
            if not isinstance(r, AuditRecord):
                raise TypeError(f"records: expected AuditRecord, got {type(r).__name__}")
        now = utc_now()
        now_text = format_time(now)
        signed = []
        with self._transaction(signed) as cur:
            seq, prev = self._head(cur)
            sealed = []
            for r in records:
                seq += 1
                s = seal(r, seq, prev, now, now_text)
                prev = s.hash
                sealed.append(s)
            # The DB-API's executemany with positional rows: SQLAlchemy's per-row parameter handling
            # cost more than the hashing.
            rows = [(s.seq, s.time, s.action, s.actor, s.project, s.region, s.dataset, s.path, s.detail_text,
                     s.prev_hash, s.hash) for s in sealed]
            if len(rows) == 1:
                cur.execute(self._insert_sql, rows[0])
            else:
                cur.executemany(self._insert_sql, rows)
            last_checkpoint = self._last_checkpoint_seq(cur)
            # The first append anchors the chain with a checkpoint, so a chain with records
            # and no checkpoint at all can only mean checkpoints were removed.
            if last_checkpoint == 0 or seq - last_checkpoint >= self.checkpoint_interval:
                self._sign_head(cur, seq, prev, signed)
        return sealed

    def _sign_head(self, cur, seq: int, head_hash: str, signed: list) -> Checkpoint:
        if self.signer is None:
            raise AuditIntegrityError("the audit signing key is missing; refusing to sign")
        self._log_unlogged(cur)
        signed_at = format_time(utc_now())
        statement = canonical({"seq": seq, "head_hash": head_hash, "signed_at": signed_at})
        cp = Checkpoint(seq, head_hash, signed_at, self.signer.key_id, self.signer.sign(statement))
        cur.execute(self._checkpoint_sql, (cp.seq, cp.head_hash, cp.signed_at, cp.key_id, cp.signature))
        signed.append(cp)  # logged after the commit (see _transaction)
        return cp

    def _log_checkpoint(self, cp: Checkpoint) -> None:
        """Log a committed checkpoint. A failure to write the log does not undo the commit (the records
        are stored and acknowledged): the checkpoint waits in ``_unlogged``, and the next write
        transaction must log it first or fail, so no record is appended while the log lags."""
        with self._log_lock:
            if cp not in self._unlogged:
                self._unlogged.append(cp)
        try:
            self._flush_unlogged()
        except OSError as e:
            log.error("audit: could not write the checkpoint log %s (%s); appends wait for it", self.checkpoint_log, e)

    def _flush_unlogged(self) -> None:
        """Log the committed checkpoints waiting in ``_unlogged``; raises OSError when the log cannot take them."""
        with self._log_lock:
            while self._unlogged:
                self._log(self._unlogged[0].to_json())
                del self._unlogged[0]

    def recover_log(self) -> None:
        """Log the newest stored checkpoint if a writer was killed between committing and logging it.
        Every store does it in its first write transaction; the audit service calls it when it starts,
        so the gap is closed before the first record arrives."""
        with self._transaction():
            pass

    def _log_unlogged(self, cur) -> None:
        """Before a new checkpoint is signed: log the newest stored one if the writer that committed it
        was stopped before logging it (it is validly signed and newer than every logged one)."""
        cur.execute(f"SELECT seq, head_hash, signed_at, key_id, signature FROM {checkpoints_table.name} "
                    "ORDER BY seq DESC, id DESC LIMIT 1")
        row = cur.fetchone()
        if row is None or self.signer is None:
            return
        newest = Checkpoint(*row)
        if newest.seq > self._newest_logged_seq() and newest.key_id == self.signer.key_id \
                and self.signer.verify(newest.statement(), newest.signature):
            self._log_checkpoint(newest)

    def _newest_logged_seq(self, tail: int = 1 << 16) -> int:
        """The highest ``seq`` among the checkpoint log's last lines (lines are appended in order, but for
        writers in a race): what :meth:`_log_unlogged` compares with, without reading a long log whole."""
        try:
            with open(self.checkpoint_log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - tail))
                lines = f.read().split(b"\n")
        except FileNotFoundError:
            return 0
        if size > tail:
            lines = lines[1:]  # the first is cut
        newest = 0
        for line in lines:
            try:
                seq = json.loads(line)["seq"]
            except (ValueError, TypeError, KeyError):
                continue
            if isinstance(seq, int):
                newest = max(newest, seq)
        return newest

    def _log(self, entry: dict) -> None:
        """Append ``entry`` to the checkpoint log, durably (fsync)."""
        self.checkpoint_log.parent.mkdir(parents=True, exist_ok=True)
        data = canonical(entry) + b"\n"
        fd = os.open(self.checkpoint_log, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # an earlier write was cut short: this line starts on a line of its own
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current head now. Returns None when the head is already signed."""
        signed = []
        with self._transaction(signed) as cur:
            seq, head = self._head(cur)
            if seq == 0 or self._last_checkpoint_seq(cur) >= seq:
                return None
            return self._sign_head(cur, seq, head, signed)

    def close(self) -> None:
        """Sign any unsigned records and release the database."""
        self.checkpoint()
        self.engine.dispose()

    # -- reading ---------------------------------------------------------

    @staticmethod
    def _stored(row) -> StoredRecord:
        try:
            detail = json.loads(row.detail)
        except (ValueError, TypeError, RecursionError):
            detail = {"unreadable_detail": str(row.detail)}
        return StoredRecord(
            seq=row.seq,
            time=row.time,
            action=row.action,
            actor=row.actor,
            project=row.project,
            region=row.region,
            dataset=row.dataset,
            path=row.path,
            detail=detail,
            prev_hash=row.prev_hash,
            hash=row.hash,
        )

    def records(
        self,
        *,
        region: str | None = None,
        actor: str | None = None,
        project: str | None = None,
        dataset: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[StoredRecord]:
        """Records matching every filter given, oldest first."""
        c = records_table.c
        q = select(records_table).order_by(c.seq)
        if region is not None:
            q = q.where(c.region == region)
        if actor is not None:
            q = q.where(c.actor == actor)
        if project is not None:
            q = q.where(c.project == project)
        if dataset is not None:
            q = q.where(c.dataset == dataset)
        if action is not None:
            q = q.where(c.action == action)
        if since is not None:
            q = q.where(c.time >= format_time(since))
        if until is not None:
            q = q.where(c.time < format_time(until))
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [self._stored(r) for r in conn.execute(q)]

    def checkpoints(self, conn=None) -> list[Checkpoint]:
        """The stored checkpoints, in order; read on ``conn`` when given (see :meth:`_snapshot`)."""
        if conn is None:
            with self.engine.connect() as conn:
                return self.checkpoints(conn)
        rows = conn.execute(select(checkpoints_table).order_by(checkpoints_table.c.seq, checkpoints_table.c.id))
        return [Checkpoint(r.seq, r.head_hash, r.signed_at, r.key_id, r.signature) for r in rows]

    def _logged_checkpoints(self) -> tuple[list[Checkpoint], list[str]]:
        found, problems = [], []
        if not self.checkpoint_log.exists():
            return found, problems
        text = self.checkpoint_log.read_text()
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d.get("seq"), int) or not all(
                        isinstance(d.get(k), str) for k in ("head_hash", "signed_at", "key_id", "signature")):
                    raise TypeError
                found.append(Checkpoint(d["seq"], d["head_hash"], d["signed_at"], d["key_id"], d["signature"]))
            except (ValueError, KeyError, TypeError, OverflowError, AttributeError, RecursionError):
                if (n == len(lines) and not text.endswith("\n")) or any(
                        other.startswith(line) and other != line for other in lines[n:]):
                    continue  # a write cut short (see _log): the checkpoint was logged again, or is the newest
                problems.append(f"checkpoint log line {n} is malformed")
        return found, problems

    def _iter_rows(self, conn=None):
        if conn is None:
            with self.engine.connect() as conn:
                yield from self._iter_rows(conn)
            return
        yield from conn.execution_options(stream_results=True, yield_per=5000).execute(
            select(records_table).order_by(records_table.c.seq))

    @contextmanager
    def _snapshot(self):
        """A connection whose reads all see the database as of one moment (SQLite's deferred read
        transaction in WAL mode; PostgreSQL's repeatable read)."""
        with self.engine.connect() as conn:
            if not self._is_sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn

    @staticmethod
    def _hash_of_row(row) -> str | None:
        """The hash a stored row should carry, or None when its stored text is not canonical.

        The hash covers the canonical encoding of the detail; a stored detail that is
        not byte-for-byte that encoding (duplicate keys, other spacing, broken JSON)
        has been edited.
        """
        try:
            detail = json.loads(row.detail)
            if canonical(detail).decode("utf-8") != row.detail:
                return None
            return content_hash(row.seq, row.time, row.action, row.actor, row.project, row.region, row.dataset,
                                row.path, row.detail, row.prev_hash)
        except (ValueError, TypeError, UnicodeError, RecursionError, OverflowError):
            return None

    def verify(self) -> VerificationReport:
        """Walk the whole chain and every checkpoint; report every inconsistency found."""
        report = VerificationReport()
        problems = report.problems

        def problem(text):
            if len(problems) < MAX_PROBLEMS:
                problems.append(text)
            elif len(problems) == MAX_PROBLEMS:
                problems.append("... more problems not shown")

        # While the service appends: the log is read before the database's snapshot (each of its lines
        # was committed before it was written, so the snapshot holds it) and again after it (to look
        # for the snapshot's checkpoints, which may have been logged meanwhile).
        try:
            log_cps, log_problems = self._logged_checkpoints()
        except (OSError, ValueError) as e:  # a folder, unreadable or not text: nothing in it can be trusted
            log_cps, log_problems = [], [f"the checkpoint log cannot be read ({e.__class__.__name__}: {e})"]
        for p in log_problems:
            problem(p)
        hash_at: dict[int, str] = {}
        expected_seq, prev_hash, count = 1, GENESIS, 0
        prev_seq, prev_intact = None, True
        db_cps = []
        try:
            with self._snapshot() as conn:
                for c in self.checkpoints(conn):
                    if not (isinstance(c.seq, int) and all(isinstance(v, str) for v in
                                                           (c.head_hash, c.signed_at, c.key_id, c.signature))):
                        problem(f"checkpoint {c.seq!r} holds values of the wrong type (edited)")
                    if isinstance(c.seq, int):
                        db_cps.append(c)
                wanted = {c.seq for c in db_cps + log_cps}
                for rec in self._iter_rows(conn):
                    count += 1
                    if not isinstance(rec.seq, int):
                        problem(f"the record after record {expected_seq - 1} has a sequence number that is not "
                                f"a number ({rec.seq!r}: edited)")
                        prev_hash, prev_intact = rec.hash, False
                        continue
                    if rec.seq != expected_seq:
                        if rec.seq > expected_seq:
                            problem(f"records {expected_seq} to {rec.seq - 1} are missing (removed)")
                        else:
                            problem(f"record {rec.seq} appears out of order after record {expected_seq - 1}")
                    try:
                        expected_hash = self._hash_of_row(rec)
                    except Exception as e:  # a value of a type no writer stores
                        expected_hash = f"unhashable: {e.__class__.__name__}"
                    intact = expected_hash == rec.hash
                    if expected_hash is None:
                        problem(f"record {rec.seq} has a detail that is not its canonical encoding (edited)")
                    elif not intact:
                        problem(f"record {rec.seq} does not match its hash (edited)")
                    if rec.prev_hash != prev_hash:
                        if prev_seq is not None and prev_intact and intact and rec.seq == prev_seq + 1:
                            # Both records match their own hashes, but this one was chained to another record
                            # before it: the one before was replaced (edited with its hash recomputed), or
                            # a record between them was removed, or they were reordered.
                            problem(f"record {rec.seq} does not link to record {prev_seq} before it: record "
                                    f"{prev_seq} was replaced (edited and rehashed), or a record between them was "
                                    "removed, inserted or reordered")
                        else:
                            problem(
                                f"record {rec.seq} does not link to the record before it "
                                "(a record was removed, inserted or reordered, or the chain was rewritten)"
                            )
                    if rec.seq in wanted:
                        hash_at[rec.seq] = rec.hash
                    prev_hash, prev_seq, prev_intact = rec.hash, rec.seq, intact
                    expected_seq = rec.seq + 1
        except Exception as e:  # the database itself cannot be read as a store (edited columns, not text, ...)
            problem(f"the audit store cannot be read after record {expected_seq - 1} "
                    f"({e.__class__.__name__}: {str(e)[:200]})")
        # Every field of each copy, the database's and the log's, is checked against its signature.
        all_cps = {(c.seq, c.head_hash, c.signed_at, c.key_id, c.signature): c for c in db_cps + log_cps}.values()
        try:
            log_after, _ = self._logged_checkpoints()
        except (OSError, ValueError):
            log_after = []
        db_keys = {(c.seq, c.head_hash, c.signature) for c in db_cps}
        for c in log_cps:
            if (c.seq, c.head_hash, c.signature) not in db_keys:
                problem(f"checkpoint at record {c.seq} is in the checkpoint log but missing from the database (removed)")
        report.records = count
        report.head_hash = prev_hash
        last_seq = expected_seq - 1

        if self.signer is None:
            if last_seq > 0 or db_cps or log_cps or self.trusted_key_id:
                problem("the audit signing key is missing, so no checkpoint can be checked")
        elif self.trusted_key_id and self.signer.key_id != self.trusted_key_id:
            problem(f"the signing key in the state folder ({self.signer.key_id}) is not the trusted key "
                    f"({self.trusted_key_id}): the key was replaced")
        report.key_id = self.signer.key_id if self.signer else None
        logged = {(c.seq, c.head_hash, c.signature) for c in log_after}
        newest_logged = max((c.seq for c in log_after), default=0)
        newest = max(db_cps, key=lambda c: c.seq, default=None)
        for c in db_cps:
            if (c.seq, c.head_hash, c.signature) not in logged:
                if c is newest and 0 < newest_logged < c.seq:
                    continue  # committed, its log line not yet written (see _transaction); an empty log is not allowed
                problem(f"checkpoint at record {c.seq} is missing from the checkpoint log (log truncated or edited)")
        for c in all_cps:
            if self.signer is None:
                break
            try:
                good = c.key_id == self.signer.key_id and self.signer.verify(c.statement(), c.signature)
            except Exception:  # values of the wrong type: no signature can cover them
                good = False
            if not good:
                problem(f"checkpoint at record {c.seq} has an invalid signature (forged or altered)")
                continue
            report.checkpoints += 1
            report.last_checkpoint_seq = max(report.last_checkpoint_seq, c.seq)
            if c.seq > last_seq:
                problem(
                    f"the chain ends at record {last_seq} but a signed checkpoint covers record {c.seq}: "
                    f"records {last_seq + 1} to {c.seq} are missing (truncated)"
                )
            elif c.seq in hash_at and hash_at[c.seq] != c.head_hash:
                # the change lies after the newest earlier checkpoint the chain still matches
                held = max((d.seq for d in all_cps if d.seq < c.seq and hash_at.get(d.seq) == d.head_hash),
                           default=0)
                problem(f"record {c.seq} differs from its signed checkpoint (the chain was rewritten): one of "
                        f"records {held + 1} to {c.seq} was changed")
        if last_seq > 0 and report.checkpoints == 0:
            problem("no valid signed checkpoint covers the chain (checkpoints removed or never signed)")
        elif last_seq - report.last_checkpoint_seq > self.checkpoint_interval:
            problem(f"{last_seq - report.last_checkpoint_seq} records follow the last checkpoint, more than the "
                    f"interval of {self.checkpoint_interval} (checkpoints removed)")
        return report

    def verify_or_raise(self) -> VerificationReport:
        report = self.verify()
        if not report.ok:
            raise AuditIntegrityError("; ".join(report.problems))
        return report
