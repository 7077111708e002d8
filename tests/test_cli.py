"""The ``ngp`` command as a user runs it: a real process, NGP_HOME, exit codes, --json.

The demo platform is seeded once per module and read by the tests after it;
tests that change things use their own home.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

NGP = [sys.executable, "-m", "ngp_research.cli"]


def ngp(home, *args, check=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NGP_")}
    env["NGP_HOME"] = str(home)
    p = subprocess.run(NGP + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def ngp_json(home, *args):
    return json.loads(ngp(home, *args, "--json", check=0).stdout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo") / "ngp"
    p = ngp(home, "demo", "seed", "--samples-per-region", 8, "--variants", 120, check=0)
    return home, p.stdout


def test_demo_seed_prints_the_platform(demo):
    home, out = demo
    for word in ["norr", "uppsala", "orebro", "stockholm", "ost", "vast", "syd", "cardio-gwas", "rare-disease",
                 "legacy-study", "[expired]", "revoked", "admin-syd", "alice", "lars", "clara"]:
        assert word in out
    again = ngp(home, "demo", "seed", check=0).stdout
    assert "already seeded" in again


def test_demo_is_reproducible(demo, tmp_path):
    home, _ = demo
    other = tmp_path / "ngp"
    ngp(other, "demo", "seed", "--samples-per-region", 8, "--variants", 120, check=0)
    a = {d["name"]: [f["sha256"] for f in d["files"]] for d in ngp_json(home, "dataset", "list")}
    b = {d["name"]: [f["sha256"] for f in d["files"]] for d in ngp_json(other, "dataset", "list")}
    assert a == b and len(a) == 7


def test_access_files_for_a_member(demo):
    home, _ = demo
    d = ngp_json(home, "access", "files", "cardio-gwas", "--user", "alice")
    assert d["allowed"] and d["reasons"] == []
    regions = {f["region"] for f in d["files"]}
    assert regions == {"norr", "uppsala", "stockholm", "syd"}
    for f in d["files"]:
        assert f["workspace_path"] == f"/data/{f['region']}/{f['dataset']}/{f['name']}"
        assert Path(f["host_path"]).is_file()
    names = {f["name"] for f in d["files"] if f["dataset"] == "syd-cohort"}
    assert names == {"syd-cohort.vcf.gz", "syd-cohort.vcf.gz.tbi", "syd-phenopackets.json"}


def test_access_reasons_for_non_member_expired_and_revoked(demo):
    home, _ = demo
    p = ngp(home, "access", "files", "cardio-gwas", "--user", "bob", check=0)
    assert "bob is not a member of project 'cardio-gwas'" in p.stdout
    p = ngp(home, "access", "files", "legacy-study", "--user", "alice", check=0)
    assert "expired on 2023-12-31" in p.stdout
    d = ngp_json(home, "access", "files", "rare-disease", "--user", "alice")
    assert {f["dataset"] for f in d["files"]} == {"vast-cohort", "orebro-cohort"}
    assert d["withheld"] == ["ost-cohort (ost): tag revoked"]
    # before the approval, even a member sees nothing
    d = ngp_json(home, "access", "files", "cardio-gwas", "--user", "alice", "--at", "2024-12-31T12:00:00Z")
    assert not d["allowed"] and "not valid until 2025-01-01" in d["reasons"][0]


def test_lists_and_show(demo):
    home, _ = demo
    assert [r["name"] for r in ngp_json(home, "region", "list")][:2] == ["norr", "uppsala"]
    users = {u["username"]: u["roles"] for u in ngp_json(home, "user", "list")}
    assert users["admin-vast"] == ["region-admin:vast"] and users["lars"] == ["project-lead", "researcher"]
    assert [d["name"] for d in ngp_json(home, "dataset", "list", "--region", "norr")] == ["norr-cohort"]
    show = ngp_json(home, "dataset", "show", "syd-cohort")
    assert show["samples"] == 8 and len(show["sample_ids"]) == 8 and show["registered_by"] == "admin-syd"
    assert {t["project"] for t in show["tags"]} == {"cardio-gwas", "legacy-study"}
    tags = ngp_json(home, "tag", "list", "--project", "rare-disease")
    assert sorted(t["state"] for t in tags) == ["active", "active", "revoked"]
    assert ngp(home, "tag", "list", "--region", "ost", check=0).stdout.count("revoked") == 1
    assert "cardio-gwas" in ngp(home, "project", "list", check=0).stdout


def test_audit_log_and_verify(demo):
    home, _ = demo
    assert "audit chain OK" in ngp(home, "audit", "verify", check=0).stdout
    log = ngp_json(home, "audit", "log", "--region", "ost")
    assert [r["action"] for r in log if r["dataset"] == "ost-cohort"] == ["dataset.ingest", "tag.grant", "tag.revoke"]
    assert all(r["region"] == "ost" for r in log)
    assert ngp_json(home, "audit", "log", "--user", "lars", "--since", "2100-01-01") == []


def test_audit_log_shows_one_entry_per_access_of_a_run_record(home):
    """The service stores a long run of a cell's opens (or fetches) as one record; the log lists each access."""
    from ngp_research.audit.records import AuditRecord
    from ngp_research.audit.store import AuditStore
    from ngp_research.platform import Platform

    ngp(home, "audit", "verify", check=0)  # the platform (and its key) exists
    store = AuditStore.for_platform(Platform(home=str(home)), create_key=False)
    ids = {"msg_id": "m1", "cell_id": None}
    store.append_many([
        AuditRecord("file.open", "alice", "p1", "syd", "syd-ds", None,
                    {"paths": [f"/data/syd/syd-ds/f{i}" for i in range(3)], "mode": "r", **ids}),
        AuditRecord("data.open", "alice", "p1", "syd", "syd-ds", "/data/syd/syd-ds/c.vcf.gz",
                    {"api": "pysam.VariantFile.fetch", **ids, "accesses": [{"start": 1}, {"start": 9}]}),
        AuditRecord("file.open", "alice", "p1", None, None, None, {"paths": [], **ids}),  # odd, yet it shows
    ])
    store.engine.dispose()
    entries = ngp_json(home, "audit", "log", "--user", "alice")
    assert [(e["path"], e["detail"].get("start")) for e in entries] == [
        ("/data/syd/syd-ds/f0", None), ("/data/syd/syd-ds/f1", None), ("/data/syd/syd-ds/f2", None),
        ("/data/syd/syd-ds/c.vcf.gz", 1), ("/data/syd/syd-ds/c.vcf.gz", 9), (None, None)]
    assert len({e["seq"] for e in entries}) == 3 and all(e["hash"] for e in entries)
    assert all("paths" not in e["detail"] and "accesses" not in e["detail"] for e in entries[:5])
    assert entries[0]["detail"] == {"mode": "r", **ids}
    assert [e["path"] for e in ngp_json(home, "audit", "log", "--user", "alice", "--limit", "2")] == [
        "/data/syd/syd-ds/f0", "/data/syd/syd-ds/f1"]
    assert ngp_json(home, "audit", "log", "--user", "alice", "--limit", "0") == []
    table = ngp(home, "audit", "log", "--user", "alice", check=0).stdout
    assert table.count("/data/syd/syd-ds/c.vcf.gz") == 2 and table.count("/data/syd/syd-ds/f") == 3
    p = ngp(home, "audit", "log", "--limit", "-1")
    assert p.returncode == 2 and "'-1' is not a count" in p.stderr
    assert "audit chain OK" in ngp(home, "audit", "verify", check=0).stdout


@pytest.fixture
def home(tmp_path):
    h = tmp_path / "ngp"
    ngp(h, "user", "add", "admin-syd", "--region", "syd", "--role", "region-admin", check=0)
    ngp(h, "user", "add", "lars", "--region", "uppsala", "--role", "project-lead", check=0)
    ngp(h, "user", "add", "alice", "--region", "uppsala", "--role", "researcher", check=0)
    return h


def test_the_whole_flow_from_the_command_line(home, tmp_path):
    from ngp_research.testing import write_cohort_metadata, write_vcf

    samples = ["S1", "S2"]
    vcf = write_vcf(tmp_path / "s.vcf.gz", samples, [("chr1", 100 + i, "A", "C", ["0/1", "0/0"]) for i in range(5)])
    meta = write_cohort_metadata(tmp_path / "m.json", samples)
    out = ngp_json(home, "dataset", "ingest", "--region", "syd", "--name", "syd-ds", "--as", "admin-syd", vcf,
                   "--metadata", meta)
    assert out["samples"] == 2
    ngp(home, "project", "create", "p1", "--lead", "lars", "--approval", "2025-9", "--valid-from", "2025-01-01",
        "--valid-until", "2099-01-01", "--title", "A study", check=0)
    ngp(home, "project", "add-member", "p1", "alice", "--as", "lars", check=0)
    ngp(home, "tag", "grant", "syd-ds", "p1", "--as", "admin-syd", "--expires", "2098-01-01", "--reason", "ok",
        check=0)
    assert len(ngp_json(home, "access", "files", "p1", "--user", "alice")["files"]) == 3
    ngp(home, "tag", "revoke", "syd-ds", "p1", "--as", "admin-syd", check=0)
    assert not ngp_json(home, "access", "files", "p1", "--user", "alice")["allowed"]
    ngp(home, "project", "remove-member", "p1", "alice", "--as", "lars", check=0)
    actions = [r["action"] for r in ngp_json(home, "audit", "log")]
    assert actions[-6:] == ["dataset.ingest", "project.create", "member.add", "tag.grant", "tag.revoke",
                            "member.remove"]
    assert "audit chain OK" in ngp(home, "audit", "verify", check=0).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["tag", "grant", "nope", "p", "--as", "admin-syd"], "unknown dataset 'nope'"),
        (["user", "add", "x", "--region", "atlantis"], "unknown region 'atlantis'"),
        (["project", "create", "p", "--lead", "alice", "--approval", "1", "--valid-from", "2025-01-01",
          "--valid-until", "2026-01-01"], "alice does not have the project-lead role"),
        (["project", "create", "p", "--lead", "lars", "--approval", "1", "--valid-from", "2025-13-01",
          "--valid-until", "2026-01-01"], "is not a date"),
        (["dataset", "ingest", "--region", "syd", "--name", "x", "--as", "alice", "/nonexistent.vcf.gz"],
         "alice is not an admin of region 'syd'"),
        (["access", "files", "nope", "--user", "alice"], "unknown project 'nope'"),
        (["project", "add-member", "nope", "alice", "--as", "lars"], "unknown project 'nope'"),
    ],
)
def test_refusals_exit_2_with_the_reason_on_stderr(home, args, message):
    before = ngp(home, "audit", "log", "--json", check=0).stdout
    p = ngp(home, *args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr
    assert ngp(home, "audit", "log", "--json", check=0).stdout == before


def test_verify_fails_with_exit_3_when_the_log_is_tampered(home):
    db = home / "state" / "audit.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("update audit_records set actor='mallory' where seq=3")
    p = ngp(home, "audit", "verify")
    assert p.returncode == 3 and "record 3 does not match its hash (edited)" in p.stderr


def test_state_is_private(home):
    state = home / "state"
    assert state.stat().st_mode & 0o777 == 0o700
    assert (state / "keys" / "audit-signing.key").stat().st_mode & 0o777 == 0o600


def test_console_script_is_installed():
    exe = shutil.which("ngp", path=os.path.dirname(sys.executable))
    assert exe, "the ngp entry point is declared in pyproject.toml"
    p = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "audit" in p.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["access", "files", "p", "--user", "alice", "--at", "9999-12-31T23:59:59-01:00"],
        ["access", "files", "p", "--user", "alice", "--at", "0001-01-01T00:00:00+01:00"],
        ["tag", "grant", "d", "p", "--as", "admin-syd", "--expires", "9999-12-31"],
        ["audit", "log", "--since", "0001-01-01T00:00:00+05:00"],
    ],
)
def test_extreme_dates_are_refused_not_crashed_on(home, args):
    p = ngp(home, *args)
    assert p.returncode == 2 and "out of range" in p.stderr and "Traceback" not in p.stderr
