"""The access policy, proved over random catalogs (hypothesis) and checked on the real catalog."""

from datetime import date, datetime, time, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ngp_research.access import AccessPolicy, DatasetFacts, ProjectFacts, TagFacts, decide

REGIONS = ["norr", "uppsala", "orebro", "stockholm", "ost", "vast", "syd"]
USERS = ["alice", "bob", "clara", "lars", "mallory"]
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)

names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
instants = st.integers(min_value=0, max_value=4 * 365 * 24).map(lambda h: EPOCH + timedelta(hours=h))
days = st.integers(min_value=0, max_value=4 * 365).map(lambda d: EPOCH.date() + timedelta(days=d))


@st.composite
def datasets(draw):
    n = draw(st.integers(1, 6))
    ds_names = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    out = []
    for name in ds_names:
        region = draw(st.sampled_from(REGIONS))
        files = draw(st.lists(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,10}", fullmatch=True).filter(
            lambda s: ".." not in s), min_size=1, max_size=4, unique=True))
        out.append(DatasetFacts(name, region, f"/ngp/regions/{region}/datasets/{name}", tuple(files)))
    return out


@st.composite
def projects(draw):
    all_datasets = draw(datasets())
    start = draw(days)
    end = start + timedelta(days=draw(st.integers(0, 900)))
    members = {u: draw(st.sampled_from(["lead", "member", "reviewer"]))
               for u in draw(st.lists(st.sampled_from(USERS), unique=True))}
    tags = []
    for ds in all_datasets:
        for _ in range(draw(st.integers(0, 2))):
            granted = draw(instants)
            expires = draw(st.one_of(st.none(), instants.filter(lambda t: t > granted)))
            revoked = draw(st.one_of(st.none(), instants.filter(lambda t: t >= granted)))
            tags.append(TagFacts(ds, granted, expires, revoked))
    status = draw(st.sampled_from(["active", "active", "active", "suspended", "closed"]))
    return ProjectFacts("p", status, "2024-0001", start, end, members, tuple(tags)), all_datasets


def active(tag, at):
    return tag.granted_at <= at and (tag.revoked_at is None or at < tag.revoked_at) and (
        tag.expires_at is None or at < tag.expires_at)


@settings(max_examples=400, deadline=None)
@given(projects(), st.sampled_from(USERS), instants)
def test_policy_invariants(project_and_datasets, user, at):
    project, all_datasets = project_and_datasets
    decision = decide(project, user, at)
    visible = {(f.region, f.dataset) for f in decision.files}

    # never a file whose dataset lacks an active, unexpired tag for the project
    for region, dataset in visible:
        assert any(t.dataset.name == dataset and active(t, at) for t in project.tags)
    # never anything for a non-member, a project that is not active, or outside the approval
    if user not in project.members:
        assert not decision.files and any("not a member" in r for r in decision.reasons)
    if project.status != "active":
        assert not decision.files
    if not (project.valid_from <= at.date() <= project.valid_until):
        assert not decision.files and any("approval" in r for r in decision.reasons)
    # every in-workspace path unique, absolute under /data, free of '..'
    paths = [f.workspace_path for f in decision.files]
    assert len(paths) == len(set(paths))
    for f in decision.files:
        parts = f.workspace_path.split("/")
        assert parts[:2] == ["", "data"] and len(parts) == 5 and ".." not in parts
        assert parts[2:] == [f.region, f.dataset, f.name]
        assert f.host_path.startswith(f"/ngp/regions/{f.region}/datasets/{f.dataset}/")
    # nothing is ever both allowed and refused; a refusal always says why
    assert bool(decision.files) != bool(decision.reasons)
    # and when everything holds, every file of every actively tagged dataset is there, exactly
    if (user in project.members and project.status == "active"
            and project.valid_from <= at.date() <= project.valid_until):
        expected = {(ds.region, ds.name, n) for ds in all_datasets
                    if any(t.dataset is ds and active(t, at) for t in project.tags) for n in ds.files}
        assert {(f.region, f.dataset, f.name) for f in decision.files} == expected


def facts(**kw):
    ds = DatasetFacts("d", "syd", "/h/d", ("d.vcf.gz", "d.vcf.gz.tbi"))
    base = dict(name="p", status="active", approval_number="A-1", valid_from=date(2025, 1, 1),
                valid_until=date(2025, 12, 31), members={"alice": "member"},
                tags=(TagFacts(ds, datetime(2025, 1, 1, tzinfo=timezone.utc)),))
    base.update(kw)
    return ProjectFacts(**base)


AT = datetime(2025, 6, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "kw, at, reason",
    [
        ({}, datetime(2024, 12, 31, 23, 59, tzinfo=timezone.utc), "is not valid until 2025-01-01"),
        ({}, datetime(2026, 1, 1, tzinfo=timezone.utc), "expired on 2025-12-31"),
        ({"status": "suspended"}, AT, "project 'p' is suspended"),
        ({"members": {}}, AT, "alice is not a member of project 'p'"),
        ({"tags": ()}, AT, "no data is tagged for project 'p'"),
    ],
)
def test_reasons(kw, at, reason):
    d = decide(facts(**kw), "alice", at)
    assert not d.allowed and any(reason in r for r in d.reasons), d.reasons


def test_approval_days_are_inclusive():
    assert decide(facts(), "alice", datetime.combine(date(2025, 12, 31), time(23, 59), tzinfo=timezone.utc)).allowed
    assert decide(facts(), "alice", datetime(2025, 1, 1, tzinfo=timezone.utc)).allowed


def test_revoked_and_expired_tags_are_named():
    ds = DatasetFacts("d", "syd", "/h/d", ("x",))
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    p = facts(tags=(TagFacts(ds, t0, revoked_at=t0 + timedelta(days=1)),))
    assert "d (syd): tag revoked" in decide(p, "alice", AT).reasons[0]
    p = facts(tags=(TagFacts(ds, t0, expires_at=t0 + timedelta(days=1)),))
    assert "d (syd): tag expired" in decide(p, "alice", AT).reasons[0]


def test_naive_time_is_refused():
    with pytest.raises(ValueError, match="at: must be timezone-aware"):
        decide(facts(), "alice", datetime(2025, 6, 1))


def test_policy_reads_the_real_catalog(people, clock):
    from tests.test_catalog import fake_dataset

    people.create_project("cardio", "lars", "2025-01", date(2025, 1, 1), date(2027, 12, 31))
    people.add_member("cardio", "alice", actor="lars")
    fake_dataset(people, "syd-cohort", "syd")
    fake_dataset(people, "norr-cohort", "norr")
    people.grant_tag("syd-cohort", "cardio", "admin-syd")
    policy = AccessPolicy(people)
    d = policy.files("alice", "cardio")
    assert [f.workspace_path for f in d.files] == ["/data/syd/syd-cohort/syd-cohort.vcf.gz"]
    assert d.files[0].host_path == str(people.platform.dataset_dir("syd", "syd-cohort") / "syd-cohort.vcf.gz")
    assert "not a member" in policy.files("bob", "cardio").reasons[0]
    before_revoke = clock.now
    clock.now = clock.now + timedelta(hours=1)
    people.revoke_tag("syd-cohort", "cardio", "admin-syd")
    assert not policy.files("alice", "cardio").allowed
    assert policy.files("alice", "cardio", at=before_revoke).allowed  # history is answerable
