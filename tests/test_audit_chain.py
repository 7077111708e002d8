"""The audit chain from the attacker's side: every kind of tampering is detected.

The attacker has write access to the audit database (SQL) but not to the
signing key. Runs on SQLite and PostgreSQL.
"""

import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from ngp_research.audit import AuditRecord, AuditStore
from ngp_research.audit.records import canonical, record_hash
from ngp_research.errors import AuditIntegrityError


@pytest.fixture
def store(platform):
    s = AuditStore.for_platform(platform)
    yield s
    s.engine.dispose()


def fill(store, n=20):
    store.append_many(
        AuditRecord("file.open", f"user{i % 3}", project="cardio", region="syd", dataset="syd-cohort",
                    path=f"/data/syd/syd-cohort/f{i}.vcf.gz", detail={"cell": i})
        for i in range(n)
    )
    store.checkpoint()


def sql(store, statement, **params):
    with store.engine.begin() as conn:
        conn.execute(text(statement), params)


def problems(store):
    report = store.verify()
    assert not report.ok
    return " | ".join(report.problems)


def test_clean_chain_verifies(store):
    fill(store)
    report = store.verify()
    assert report.ok, report.problems
    assert report.records == 20 and report.last_checkpoint_seq == 20


def test_record_fields_read_as_who_opened_what(store):
    rec = store.append(AuditRecord("file.open", "alice", project="cardio", region="syd", dataset="syd-cohort",
                                   path="/data/syd/syd-cohort/c.vcf.gz", detail={"cell": "c3"}))
    assert (rec.seq, rec.actor, rec.project, rec.region, rec.dataset) == (1, "alice", "cardio", "syd", "syd-cohort")
    assert rec.prev_hash == "0" * 64 and rec.hash == rec.computed_hash()
    assert store.records(region="syd", actor="alice")[0] == rec


def test_edited_record_is_detected(store):
    fill(store)
    sql(store, "update audit_records set actor='mallory' where seq=7")
    assert "record 7 does not match its hash (edited)" in problems(store)


def test_edited_detail_is_detected(store):
    fill(store)
    sql(store, "update audit_records set detail=:d where seq=3", d=canonical({"cell": 99}).decode())
    assert "record 3 does not match its hash" in problems(store)


def test_rewritten_chain_is_caught_by_the_signed_checkpoint(store):
    """The attacker edits a record and recomputes every hash after it: only the signature catches it."""
    fill(store)
    rows = store.records()
    prev = rows[4].prev_hash
    with store.engine.begin() as conn:
        for r in rows[4:]:
            content = r.content()
            content["prev_hash"] = prev
            if r.seq == 5:
                content["actor"] = "mallory"
            h = record_hash(content)
            conn.execute(text("update audit_records set actor=:a, prev_hash=:p, hash=:h where seq=:s"),
                         {"a": content["actor"], "p": prev, "h": h, "s": r.seq})
            prev = h
    assert "record 20 differs from its signed checkpoint (the chain was rewritten): one of records 1 to 20 was changed" \
        in problems(store)


def test_removed_record_is_detected(store):
    fill(store)
    sql(store, "delete from audit_records where seq=10")
    p = problems(store)
    assert "records 10 to 10 are missing (removed)" in p
    assert "record 11 does not link to the record before it" in p


def test_removed_and_renumbered_is_detected(store):
    fill(store)
    sql(store, "delete from audit_records where seq=10")
    sql(store, "update audit_records set seq=seq-1 where seq>10")
    assert "does not" in problems(store)


def test_reordered_records_are_detected(store):
    fill(store)
    sql(store, "update audit_records set seq=-1 where seq=4")
    sql(store, "update audit_records set seq=4 where seq=5")
    sql(store, "update audit_records set seq=5 where seq=-1")
    p = problems(store)
    assert "record 4 does not match its hash" in p and "record 5 does not match its hash" in p


def test_inserted_record_is_detected(store):
    fill(store)
    sql(store, "update audit_records set seq=seq+1000 where seq>=8")  # two steps: seq is unique
    sql(store, "update audit_records set seq=seq-999 where seq>=1008")
    rows = store.records()
    fake = {"seq": 8, "time": rows[6].time, "action": "file.open", "actor": "alice", "project": None, "region": None,
            "dataset": None, "path": "/decoy", "detail": {}, "prev_hash": rows[6].hash}
    sql(store, "insert into audit_records (seq, time, action, actor, detail, prev_hash, hash) "
               "values (8, :t, 'file.open', 'alice', '{}', :p, :h)", t=fake["time"], p=fake["prev_hash"],
        h=record_hash(fake))
    assert "record 9 does not link to the record before it" in problems(store)


def test_truncated_chain_is_detected_against_the_last_checkpoint(store):
    fill(store)
    sql(store, "delete from audit_records where seq>15")
    assert "the chain ends at record 15 but a signed checkpoint covers record 20: records 16 to 20 are missing (truncated)" \
        in problems(store)


def test_a_record_edited_with_its_hash_recomputed_is_named(store):
    """The record's own hash matches again, but the next record was chained to the original: the edited
    record is the one named."""
    fill(store)
    row = store.records()[6]
    content = {**row.content(), "actor": "mallory"}
    sql(store, "update audit_records set actor='mallory', hash=:h where seq=7", h=record_hash(content))
    p = problems(store)
    assert "record 8 does not link to record 7 before it: record 7 was replaced (edited and rehashed)" in p


def test_each_copy_of_a_checkpoint_is_checked_against_its_signature(store):
    """A checkpoint's time or key id edited in the database (its copy in the log untouched) is caught."""
    fill(store)
    sql(store, "update audit_checkpoints set signed_at='2020-01-01T00:00:00+00:00' where seq=20")
    assert "checkpoint at record 20 has an invalid signature (forged or altered)" in problems(store)


@pytest.mark.parametrize("edit", ["update audit_records set seq='abc' where seq=5",
                                  "update audit_checkpoints set seq='x' where seq=20",
                                  "update audit_checkpoints set head_hash=X'FF' where seq=20",
                                  "update audit_records set path=CAST(X'2FFF' AS TEXT) where seq=5"])
def test_values_of_the_wrong_type_fail_verification_without_a_crash(store, edit):
    if store.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's columns refuse values of another type")
    fill(store)
    sql(store, edit)
    assert problems(store)


def test_an_empty_store_without_a_key_verifies(platform):
    """A new platform: nothing recorded yet, no key made yet. Nothing can be wrong."""
    store = AuditStore.for_platform(platform, create_key=False)
    try:
        report = store.verify()
        assert report.ok and report.records == 0, report.problems
    finally:
        store.engine.dispose()


def test_truncation_with_checkpoint_rows_removed_is_caught_by_the_checkpoint_log(store):
    fill(store)
    sql(store, "delete from audit_records where seq>15")
    sql(store, "delete from audit_checkpoints")
    p = problems(store)
    assert "missing from the database (removed)" in p and "(truncated)" in p


def test_forged_checkpoint_is_detected(store):
    fill(store)
    sql(store, "update audit_checkpoints set head_hash=:h", h="f" * 64)
    assert "invalid signature" in problems(store)


def test_checkpoints_signed_at_intervals_and_on_close(platform):
    platform.audit_checkpoint_interval = 10
    s = AuditStore.for_platform(platform)
    for i in range(25):
        s.append(AuditRecord("query.execute", "alice", detail={"code": f"x = {i}"}))
    assert [c.seq for c in s.checkpoints()] == [1, 11, 21]  # anchored at the first record
    s.close()
    s2 = AuditStore.for_platform(platform)
    assert [c.seq for c in s2.checkpoints()] == [1, 11, 21, 25]
    assert s2.verify().ok
    s2.engine.dispose()


def test_signing_key_is_private(platform, store):
    key = platform.keys_dir / "audit-signing.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert platform.keys_dir.stat().st_mode & 0o777 == 0o700


def test_verify_or_raise(store):
    fill(store, 3)
    store.verify_or_raise()
    sql(store, "update audit_records set path='/x' where seq=2")
    with pytest.raises(AuditIntegrityError, match="record 2"):
        store.verify_or_raise()


def test_records_filters(store):
    fill(store, 9)
    assert len(store.records(actor="user1")) == 3
    assert store.records(since=datetime(2100, 1, 1, tzinfo=timezone.utc)) == []
    assert len(store.records(limit=2)) == 2


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="actor"):
        AuditRecord("file.open", "")
    with pytest.raises(TypeError):
        AuditRecord("file.open", "a", detail={"x": object()})


def test_canonical_encoding_is_stable():
    assert canonical({"b": [1, 2], "a": None}) == b'{"a":null,"b":[1,2]}'


@pytest.mark.parametrize("backend", ["sqlite"])
def test_hundred_thousand_records_verify(store):
    n = 100_000
    batch = 10_000
    for start in range(0, n, batch):
        store.append_many(AuditRecord("file.open", "alice", project="p", region="syd", dataset="d",
                                      path=f"/data/syd/d/{i}") for i in range(start, start + batch))
    store.checkpoint()
    report = store.verify()
    assert report.ok and report.records == n


# -- rewriting history without the key, and malformed tampering ---------------------------------


def rewrite_chain(store, drop_seq):
    """Remove one record and rebuild every hash after it, as an attacker without the key would."""
    rows = [r for r in store.records() if r.seq != drop_seq]
    sql(store, "delete from audit_records")
    prev = "0" * 64
    with store.engine.begin() as conn:
        for i, r in enumerate(rows, 1):
            content = {**r.content(), "seq": i, "prev_hash": prev}
            h = record_hash(content)
            conn.execute(text("insert into audit_records (seq, time, action, actor, project, region, dataset, path, "
                              "detail, prev_hash, hash) values (:seq, :time, :action, :actor, :project, :region, "
                              ":dataset, :path, :detail, :prev_hash, :hash)"),
                         {**content, "detail": canonical(content["detail"]).decode(), "hash": h})
            prev = h


def test_rewriting_history_and_removing_all_checkpoints_is_detected(store):
    fill(store)
    rewrite_chain(store, drop_seq=5)
    sql(store, "delete from audit_checkpoints")
    store.checkpoint_log.write_text("")
    assert "no valid signed checkpoint covers the chain" in problems(store)


def test_a_truncated_checkpoint_log_is_detected(store):
    fill(store)
    store.checkpoint_log.write_text("")
    assert "missing from the checkpoint log" in problems(store)


def test_a_replaced_signing_key_is_detected_when_the_key_is_pinned(platform):
    s = AuditStore.for_platform(platform)
    fill(s)
    trusted = s.signer.key_id
    s.engine.dispose()
    # the attacker rewrites history and re-signs it all with a key of their own
    (platform.keys_dir / "audit-signing.key").unlink()
    platform.audit_trusted_key_id = trusted
    forged = AuditStore.for_platform(platform)
    rewrite_chain(forged, drop_seq=5)
    sql(forged, "delete from audit_checkpoints")
    forged.checkpoint_log.write_text("")
    forged.checkpoint()
    p = problems(forged)
    assert f"is not the trusted key ({trusted}): the key was replaced" in p
    forged.engine.dispose()


def test_verify_never_creates_a_key(platform):
    s = AuditStore.for_platform(platform)
    fill(s, 3)
    s.engine.dispose()
    (platform.keys_dir / "audit-signing.key").unlink()
    reader = AuditStore.for_platform(platform, create_key=False)
    assert "signing key is missing" in problems(reader)
    assert not (platform.keys_dir / "audit-signing.key").exists()
    reader.engine.dispose()


@pytest.mark.parametrize(
    "detail",
    [
        "not json",
        '{"cell": 1, "cell": 2}',  # duplicate keys: one reader sees 1, another 2
        '{"cell":  2}',  # same value, other bytes
        '{"x": "\\ud800"}',  # a lone surrogate
    ],
)
def test_malformed_details_are_reported_not_crashed_on(store, detail):
    fill(store, 5)
    sql(store, "update audit_records set detail=:d where seq=2", d=detail)
    assert "record 2 has a detail that is not its canonical encoding (edited)" in problems(store)


@pytest.mark.parametrize("line", ['{"seq": 1e400}', '{"seq": "x", "head_hash": 1}', "[]", "nan"])
def test_malformed_checkpoint_log_lines_are_reported(store, line):
    fill(store, 5)
    with open(store.checkpoint_log, "a") as f:
        f.write(line + "\n")
    assert "checkpoint log line" in problems(store)


def test_a_long_read_does_not_hold_up_appends(tmp_path):
    """``ngp audit verify`` or a report reading the chain must not block the service's appends (SQLite, WAL)."""
    import threading

    store = AuditStore(f"sqlite:///{tmp_path}/audit.sqlite", tmp_path / "keys")
    store.append_many([AuditRecord("file.open", "alice", path=f"/project/{i}") for i in range(10)])
    rows = store._iter_rows()
    next(rows)  # a read transaction is open now, as during a long verify
    done = []
    writer = threading.Thread(target=lambda: done.append(store.append(AuditRecord("file.open", "bob", path="/p"))),
                              daemon=True)
    writer.start()
    writer.join(5)
    rest = list(rows)
    assert done and done[0].seq == 11, "the append waited for the reader"
    assert len(rest) >= 9 and store.verify().ok


def test_a_transaction_that_fails_after_signing_leaves_nothing_in_the_log(store, monkeypatch):
    """A checkpoint is logged only once committed: a failed (or killed) transaction leaves no log line
    that verify would read as a checkpoint removed from the database."""
    real = store._sign_head

    def sign_then_fail(*args):
        real(*args)
        raise RuntimeError("the commit failed")

    monkeypatch.setattr(store, "_sign_head", sign_then_fail)
    with pytest.raises(RuntimeError):
        fill(store)  # the first append signs a checkpoint, then fails
    monkeypatch.undo()
    assert store.records() == [] and store.checkpoints() == []
    assert not store.checkpoint_log.exists() or store.checkpoint_log.read_text() == ""
    fill(store)
    assert store.verify().ok


def _kill_before_logging(store, monkeypatch, n):
    """Append ``n`` records with the process 'killed' (SystemExit: nothing after it runs) once the
    checkpoint they bring is committed, before its log line; the seqs of those checkpoints."""
    killed = []

    def killed_before_logging(cp):
        killed.append(cp.seq)
        raise SystemExit("killed")

    monkeypatch.setattr(store, "_log_checkpoint", killed_before_logging)
    with pytest.raises(SystemExit):
        store.append_many(AuditRecord("file.open", "alice", path=f"/project/k{i}") for i in range(n))
    monkeypatch.undo()
    store.engine.dispose()
    return killed


def test_a_writer_killed_between_commit_and_log_line_is_no_false_alarm(platform, monkeypatch):
    """SIGKILL of the service can land after a checkpoint's commit and before its log line. The newest
    checkpoint may lack its line (verify allows that one); the restarted writer logs it at once."""
    platform.audit_checkpoint_interval = 10
    store = AuditStore.for_platform(platform)
    fill(store, 10)  # a checkpoint at 10
    assert _kill_before_logging(store, monkeypatch, 10) == [20]
    assert '"seq":20' not in store.checkpoint_log.read_text()
    reader = AuditStore.for_platform(platform, create_key=False)
    assert reader.verify().ok, reader.verify().problems  # the newest checkpoint, not yet logged: allowed
    restarted = AuditStore.for_platform(platform)
    restarted.recover_log()  # what the service does when it starts
    assert '"seq":20' in restarted.checkpoint_log.read_text() and restarted.verify().ok
    # Logged now, the checkpoint anchors the chain: removing it with the records it covers is caught.
    sql(restarted, "delete from audit_records where seq>10")
    sql(restarted, "delete from audit_checkpoints where seq>10")
    assert "checkpoint at record 20 is in the checkpoint log but missing from the database" in problems(restarted)
    for s in (reader, restarted):
        s.engine.dispose()


def test_a_writer_killed_before_logging_the_first_checkpoint_is_no_false_alarm_after_restart(platform, monkeypatch):
    store = AuditStore.for_platform(platform)
    assert _kill_before_logging(store, monkeypatch, 3) == [3]  # the anchor checkpoint
    restarted = AuditStore.for_platform(platform)
    restarted.close()  # a store that writes nothing still logs it (its first transaction)
    again = AuditStore.for_platform(platform, create_key=False)
    assert again.verify().ok, again.verify().problems
    assert '"seq":3' in again.checkpoint_log.read_text()
    again.engine.dispose()


def test_an_older_checkpoint_missing_from_the_log_is_reported(store):
    store.checkpoint_interval = 10
    for _ in range(3):
        fill(store, 10)
    store.checkpoint_log.write_text("".join(line + "\n" for line in store.checkpoint_log.read_text().splitlines()
                                            if '"seq":10,' not in line))
    assert "checkpoint at record 10 is missing from the checkpoint log" in problems(store)


def test_no_record_is_appended_while_the_checkpoint_log_cannot_be_written(store, monkeypatch):
    """A full disk under the log: the append whose checkpoint could not be logged is stored (it was
    committed and is acknowledged), but nothing more is appended until the log takes the checkpoint,
    so records never pile up that no logged checkpoint covers."""
    store.checkpoint_interval = 10
    fill(store, 10)

    def disk_full(entry):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_log", disk_full)
    store.append_many([AuditRecord("file.open", "alice", path=f"/project/{i}") for i in range(10)])
    assert len(store.records()) == 20  # committed: its checkpoint (at 20) waits for the log
    with pytest.raises(OSError, match="No space left"):
        store.append(AuditRecord("file.open", "alice", path="/project/after"))
    assert len(store.records()) == 20
    monkeypatch.undo()
    store.append(AuditRecord("file.open", "alice", path="/project/after"))
    assert len(store.records()) == 21 and '"seq":20' in store.checkpoint_log.read_text() and store.verify().ok


def test_a_log_line_cut_short_is_no_false_alarm(store):
    """A write cut short (a crash, a full disk) leaves part of a line; the checkpoint is logged again."""
    fill(store, 10)
    fill(store, 5)
    line = canonical(store.checkpoints()[-1].to_json()).decode()  # the newest checkpoint's line
    full = store.checkpoint_log.read_text()
    assert full.endswith(line + "\n")
    store.checkpoint_log.write_text(full[:-len(line) - 1] + line[:40])
    assert store.verify().ok, store.verify().problems
    store.append(AuditRecord("file.open", "alice", path="/project/next"))
    store.checkpoint()  # signing the next checkpoint logs the cut one again first, on a line of its own
    assert line[:40] + "\n" + line + "\n" in store.checkpoint_log.read_text()
    assert store.verify().ok, store.verify().problems


def test_verify_while_records_are_appended_reports_nothing(store):
    """``ngp audit verify`` against a running service: the log and the database change as it reads."""
    fill(store, 5)
    store.checkpoint_interval = 1
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            store.append(AuditRecord("file.open", "alice", path=f"/project/w{i}"))
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        reports = [store.verify() for _ in range(20)]
    finally:
        stop.set()
        t.join(10)
    assert [r.problems for r in reports if not r.ok] == []
    assert reports[-1].records > reports[0].records > 0
