"""The catalog service: roles, projects, members, tags; every refusal changes nothing.

Runs on SQLite and on a real PostgreSQL server (the ``backend`` fixture).
"""

from datetime import date, timedelta

import pytest

from ngp_research.errors import InvalidInputError, NotFoundError, RefusedError


def snapshot(catalog):
    """Everything a refused change must leave as it was: catalog rows and audit records."""
    return (
        [(u.username, tuple(u.role_labels())) for u in catalog.users()],
        [(p.name, p.status, tuple((m.user.username, m.role) for m in p.memberships)) for p in catalog.projects()],
        [(t.dataset.name, t.project.name, t.revoked_at) for t in catalog.tags()],
        len(catalog.audit.records()),
    )


def make_project(catalog, name="cardio", lead="lars", valid_from=date(2025, 1, 1), valid_until=date(2027, 12, 31)):
    return catalog.create_project(name, lead, "2024-05678-01", valid_from, valid_until, title="Cardiomyopathy GWAS")


def fake_dataset(catalog, name, region):
    """Register a dataset row directly (ingest itself is tested in test_ingest.py)."""
    from ngp_research.catalog.models import Dataset, DatasetFile, User
    from sqlalchemy import select

    with catalog.change() as s:
        admin = s.scalar(select(User).where(User.username == f"admin-{region}"))
        ds = Dataset(name=name, region=catalog._region(s, region), kind="vcf", registered_at=catalog.clock(),
                     registered_by=admin)
        ds.files.append(DatasetFile(name=f"{name}.vcf.gz", role="data", size=1, sha256="0" * 64))
        s.add(ds)
    return name


def test_default_regions_are_the_seven(catalog):
    assert [r.name for r in catalog.regions()] == ["norr", "uppsala", "orebro", "stockholm", "ost", "vast", "syd"]
    assert catalog.ensure_regions() == []


def test_user_roles_and_region_admin_scope(people):
    u = people.user("admin-syd")
    assert u.role_labels() == ["region-admin:syd"]
    assert u.has_role("region-admin", "syd") and not u.has_role("region-admin", "norr")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"username": "../x", "region": "syd"}, "user name '../x' is not allowed"),
        ({"username": "eve", "region": "atlantis"}, "unknown region 'atlantis'"),
        ({"username": "eve", "region": "syd", "roles": ["king"]}, "unknown role 'king'"),
        ({"username": "alice", "region": "syd"}, "user 'alice' already exists"),
    ],
)
def test_bad_users_are_refused_whole(people, kwargs, message):
    before = snapshot(people)
    with pytest.raises(InvalidInputError, match=message):
        people.add_user(**kwargs)
    assert snapshot(people) == before


def test_project_lead_becomes_member_and_change_is_audited(people):
    make_project(people)
    p = people.project("cardio")
    assert [(m.user.username, m.role) for m in p.memberships] == [("lars", "lead")]
    rec = people.audit.records(action="project.create")[-1]
    assert rec.project == "cardio" and rec.detail["approval"] == "2024-05678-01"


@pytest.mark.parametrize(
    "args, error, message",
    [
        (dict(lead="alice"), RefusedError, "alice does not have the project-lead role"),
        (dict(lead="nobody"), NotFoundError, "unknown user 'nobody'"),
        (dict(valid_from=date(2027, 1, 1), valid_until=date(2026, 1, 1)), InvalidInputError, "is before valid-from"),
        (dict(name="a/b"), InvalidInputError, "project name 'a/b' is not allowed"),
    ],
)
def test_bad_projects_are_refused_whole(people, args, error, message):
    before = snapshot(people)
    with pytest.raises(error, match=message):
        make_project(people, **args)
    assert snapshot(people) == before


def test_only_the_lead_or_an_operator_changes_members(people):
    make_project(people)
    people.add_member("cardio", "alice", actor="lars")
    people.add_member("cardio", "clara", "reviewer", actor="olof")
    before = snapshot(people)
    for intruder in ("alice", "bob", "admin-syd", "mallory"):
        with pytest.raises(RefusedError):
            people.add_member("cardio", "bob", actor=intruder)
        with pytest.raises(RefusedError):
            people.remove_member("cardio", "alice", actor=intruder)
    assert snapshot(people) == before
    people.remove_member("cardio", "alice", actor="lars")
    assert [m.user.username for m in people.project("cardio").memberships] == ["lars", "clara"]
    assert [r.action for r in people.audit.records(project="cardio")] == [
        "project.create", "member.add", "member.add", "member.remove"]
    assert people.audit.records(action="member.remove")[0].actor == "lars"


def test_member_errors(people):
    make_project(people)
    with pytest.raises(InvalidInputError, match="role: must be one of"):
        people.add_member("cardio", "alice", "boss", actor="lars")
    with pytest.raises(NotFoundError, match="unknown project 'nope'"):
        people.add_member("nope", "alice", actor="lars")
    with pytest.raises(NotFoundError, match="alice is not a member"):
        people.remove_member("cardio", "alice", actor="lars")
    people.add_member("cardio", "alice", actor="lars")
    with pytest.raises(InvalidInputError, match="already a member"):
        people.add_member("cardio", "alice", actor="lars")
    with pytest.raises(RefusedError, match="lead of project"):
        people.remove_member("cardio", "lars", actor="olof")


def test_only_the_owning_regions_admin_tags_and_revokes(people):
    make_project(people)
    fake_dataset(people, "syd-cohort", "syd")
    before = snapshot(people)
    for intruder in ("admin-norr", "lars", "alice", "olof", None, "mallory"):
        with pytest.raises(RefusedError):
            people.grant_tag("syd-cohort", "cardio", intruder)
    assert snapshot(people) == before
    people.grant_tag("syd-cohort", "cardio", "admin-syd", reason="approved request 12")
    for intruder in ("admin-norr", "lars", None):
        with pytest.raises(RefusedError):
            people.revoke_tag("syd-cohort", "cardio", intruder)
    people.revoke_tag("syd-cohort", "cardio", "admin-syd", reason="study paused")
    (tag,) = people.tags(project="cardio")
    assert tag.revoked_by.username == "admin-syd" and tag.revoke_reason == "study paused"
    grant, revoke = people.audit.records(dataset="syd-cohort")
    assert (grant.action, grant.actor, grant.region, grant.project) == ("tag.grant", "admin-syd", "syd", "cardio")
    assert (revoke.action, revoke.detail["reason"]) == ("tag.revoke", "study paused")


def test_tag_rules(people, clock):
    make_project(people)
    make_project(people, name="old", valid_from=date(2020, 1, 1), valid_until=date(2021, 1, 1))
    fake_dataset(people, "syd-cohort", "syd")
    with pytest.raises(RefusedError, match="expired on 2021-01-01"):
        people.grant_tag("syd-cohort", "old", "admin-syd")
    with pytest.raises(InvalidInputError, match="already past"):
        people.grant_tag("syd-cohort", "cardio", "admin-syd", expires=clock.now.date() - timedelta(days=1))
    people.grant_tag("syd-cohort", "cardio", "admin-syd", expires=date(2026, 12, 31))
    with pytest.raises(InvalidInputError, match="already tagged"):
        people.grant_tag("syd-cohort", "cardio", "admin-syd")
    with pytest.raises(NotFoundError, match="unknown dataset"):
        people.grant_tag("nope", "cardio", "admin-syd")
    people.revoke_tag("syd-cohort", "cardio", "admin-syd")
    with pytest.raises(NotFoundError, match="no active tag"):
        people.revoke_tag("syd-cohort", "cardio", "admin-syd")
    people.grant_tag("syd-cohort", "cardio", "admin-syd")  # a new grant after a revoke is a new tag
    assert [t.revoked_at is None for t in people.tags(project="cardio")] == [False, True]
    people.set_project_status("cardio", "suspended", actor="lars")
    with pytest.raises(RefusedError, match="is suspended"):
        people.grant_tag("syd-cohort", "cardio", "admin-syd")


def test_schema_is_managed_by_alembic(catalog):
    from sqlalchemy import inspect, text

    with catalog.engine.connect() as conn:
        from alembic.script import ScriptDirectory

        from ngp_research.catalog.database import alembic_config

        head = ScriptDirectory.from_config(alembic_config(str(catalog.engine.url))).get_current_head()
        assert conn.execute(text("select version_num from alembic_version")).scalar_one() == head
        assert {"regions", "users", "datasets", "dataset_files", "projects", "memberships", "tags", "samples"} <= set(
            inspect(conn).get_table_names())


def test_migrations_match_the_models(catalog):
    """A model change without a migration fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from ngp_research.catalog.migrations_filter import catalog_tables_only
    from ngp_research.catalog.models import Base

    with catalog.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"include_name": catalog_tables_only})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_a_lead_may_suspend_but_only_an_operator_reactivates(people):
    make_project(people)
    people.add_member("cardio", "alice", "lead", actor="lars")  # a co-lead
    people.set_project_status("cardio", "suspended", actor="olof")
    for lead in ("lars", "alice"):
        with pytest.raises(RefusedError, match="only a platform operator may reactivate"):
            people.set_project_status("cardio", "active", actor=lead)
    assert people.project("cardio").status == "suspended"
    people.set_project_status("cardio", "active", actor="olof")
    assert people.project("cardio").status == "active"


def test_operator_identity_comes_from_the_uid_not_the_environment(people, monkeypatch):
    import pwd
    import os

    monkeypatch.setenv("LOGNAME", "alice")
    monkeypatch.setenv("USER", "alice")
    people.add_user("eve", "syd", ["researcher"])
    rec = people.audit.records(action="user.add")[-1]
    assert rec.actor == f"operator:{pwd.getpwuid(os.geteuid()).pw_name}"


def test_a_change_that_fails_to_commit_after_its_record_says_so(people):
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    def fail(session):
        raise RuntimeError("commit failed")

    event.listen(Session, "before_commit", fail)
    try:
        with pytest.raises(RuntimeError, match="commit failed"):
            make_project(people)
    finally:
        event.remove(Session, "before_commit", fail)
    assert not [p for p in people.projects() if p.name == "cardio"]
    created, failed = people.audit.records()[-2:]
    assert created.action == "project.create"
    assert (failed.action, failed.detail["seq"], failed.detail["action"]) == ("change.failed", created.seq,
                                                                                "project.create")
    assert people.audit.verify().ok


def test_upgrading_a_populated_0001_catalog_keeps_its_rows(platform):
    """A catalog made by the first release upgrades in place; its rows survive."""
    from alembic import command
    from sqlalchemy import text

    from ngp_research.catalog.database import alembic_config, make_engine

    engine = make_engine(platform.database_url)
    cfg = alembic_config(platform.database_url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("insert into regions (id, name, title) values (1, 'syd', 'syd')"))
        conn.execute(text("insert into users (id, username, home_region_id, created_at) "
                          "values (1, 'lars', 1, '2025-01-01 00:00:00')"))
        conn.execute(text("insert into projects (id, name, title, lead_id, approval_number, approval_authority, "
                          "valid_from, valid_until, status, created_at) values (1, 'p', 'p', 1, 'A', 'B', "
                          "'2025-01-01', '2026-01-01', 'active', '2025-01-01 00:00:00')"))
    engine.dispose()
    from ngp_research.catalog import Catalog

    c = Catalog.open(platform)
    p = c.project("p")
    assert (p.lead.username, p.workspace_memory, p.workspace_idle_timeout) == ("lars", "2G", 3600)
    c.close()
