"""``ngp demo seed``: a small, complete demo platform.

Seven regions each ingest a simulated cohort (msprime, with planted causal
variants) through the same validated ingest a region admin uses. Then the
demo roster, two approved projects with tags from several regions, one
project whose approval has expired, and one revoked tag.

Seeding an already seeded home changes nothing and prints what is there.
"""

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from ..access import AccessPolicy
from ..catalog import Catalog
from ..ingest import ingest_dataset
from .annotation import write_demo_reference
from .simulate import simulate_cohorts

LEAD = "lars"
RESEARCHER = "alice"
OUTSIDER = "bob"
REVIEWER = "clara"
OPERATOR = "olof"


def admin_of(region: str) -> str:
    return f"admin-{region}"


def dataset_of(region: str) -> str:
    return f"{region}-cohort"


def demo_users(regions):
    """The demo roster: (username, home region, roles)."""
    home = lambda r: r if r in regions else regions[0]  # noqa: E731
    users = [(admin_of(r), r, ["region-admin"]) for r in regions]
    users += [
        (LEAD, home("uppsala"), ["project-lead", "researcher"]),
        (RESEARCHER, home("uppsala"), ["researcher"]),
        (OUTSIDER, home("stockholm"), ["researcher"]),
        (REVIEWER, home("syd"), ["reviewer"]),
        (OPERATOR, home("norr"), ["operator"]),
    ]
    return users


@dataclass
class DemoSummary:
    home: str
    already_seeded: bool
    regions: list = field(default_factory=list)
    datasets: list = field(default_factory=list)
    users: list = field(default_factory=list)
    projects: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    access: list = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        out = [f"ngp-research demo platform in {self.home}"
               + (" (already seeded; remove the folder to seed anew)" if self.already_seeded else ""), ""]
        out.append("regions:   " + ", ".join(self.regions))
        out.append("")
        out.append("datasets:")
        for d in self.datasets:
            out.append(f"  {d['name']:<18} region {d['region']:<10} {d['kind']}, {d['samples']} samples, "
                       f"{d['files']} files, registered by {d['registered_by']}")
        out.append("")
        out.append("users:")
        for u in self.users:
            out.append(f"  {u['username']:<18} home {u['region']:<10} {', '.join(u['roles'])}")
        out.append("")
        out.append("projects:")
        for p in self.projects:
            members = ", ".join(f"{m['user']} ({m['role']})" for m in p["members"])
            out.append(f"  {p['name']:<14} approval {p['approval']} valid {p['valid_from']} to {p['valid_until']}"
                       f" [{p['approval_state']}]; members: {members}")
        out.append("")
        out.append("tags:")
        for t in self.tags:
            out.append(f"  {t['dataset']:<18} -> {t['project']:<14} {t['state']:<8} granted by {t['granted_by']}"
                       + (f", revoked: {t['revoke_reason']}" if t["state"] == "revoked" else ""))
        out.append("")
        out.append("what the access policy answers now (`ngp access files PROJECT --user USER`):")
        for a in self.access:
            if a["files"]:
                out.append(f"  {a['user']} in {a['project']}: {a['files']} files from "
                           + ", ".join(a["datasets"])
                           + (f"; not shown: {'; '.join(a['withheld'])}" if a["withheld"] else ""))
            else:
                out.append(f"  {a['user']} in {a['project']}: nothing; " + "; ".join(a["reasons"]))
        return "\n".join(out)


def seed_demo(platform, samples_per_region: int = 40, variants: int = 2000, seed: int = 42) -> DemoSummary:
    """Seed the demo platform into ``platform.home`` and return what it holds.

    Examples
    --------
    >>> import tempfile
    >>> from ngp_research.platform import Platform
    >>> summary = seed_demo(Platform(home=tempfile.mkdtemp()), samples_per_region=5, variants=50)
    >>> len(summary.datasets), [p["name"] for p in summary.projects]
    (7, ['cardio-gwas', 'legacy-study', 'rare-disease'])
    """
    if samples_per_region < 2:
        raise ValueError("samples-per-region: must be at least 2")
    if variants < 10:
        raise ValueError("variants: must be at least 10")
    catalog = Catalog.open(platform)
    try:
        catalog.ensure_regions()
        regions = [r.name for r in catalog.regions()]
        if catalog.datasets() or catalog.projects():
            return summarize(catalog, already_seeded=True)
        if len(regions) < 3:
            raise ValueError("regions: the demo needs at least three regions")
        for username, home, roles in demo_users(regions):
            catalog.add_user(username, home, roles)

        inbox = tempfile.mkdtemp(prefix="ngp-demo-inbox-")
        try:
            cohorts, planted_variants = simulate_cohorts(inbox, regions=regions,
                                                         samples_per_region=samples_per_region,
                                                         variants=variants, seed=seed)
            write_demo_reference(platform.reference_dir, cohorts, planted_variants)
            for c in cohorts:
                ingest_dataset(catalog, c.region, dataset_of(c.region), [c.vcf], admin_of(c.region),
                               metadata=c.metadata)
            planted = platform.home_path / "planted.json"
            shutil.copy(f"{inbox}/planted.json", planted)
        finally:
            shutil.rmtree(inbox, ignore_errors=True)

        today = catalog.clock().date()
        pick = lambda wanted, n: [r for r in wanted if r in regions] or regions[:n]  # noqa: E731

        # An approved project with data from four regions.
        catalog.create_project("cardio-gwas", LEAD, "2025-01234-01", date(2025, 1, 1), today + timedelta(days=730),
                               title="Genetics of hypertrophic cardiomyopathy and serum cholesterol")
        # Hail runs a JVM in each Dask worker: the lead gives the workspace two cores and 8 GiB.
        catalog.set_workspace_profile("cardio-gwas", LEAD, cpu=2, memory="8G")
        catalog.add_member("cardio-gwas", RESEARCHER, "member", actor=LEAD)
        catalog.add_member("cardio-gwas", REVIEWER, "reviewer", actor=LEAD)
        for r in pick(["norr", "uppsala", "stockholm", "syd"], 3):
            catalog.grant_tag(dataset_of(r), "cardio-gwas", admin_of(r), reason="data request approved by region")

        # A second approved project; one of its tags is later revoked.
        catalog.create_project("rare-disease", LEAD, "2025-04567-01", date(2025, 6, 1), today + timedelta(days=365),
                               title="Rare disease variant review across western and central Sweden")
        catalog.add_member("rare-disease", RESEARCHER, "member", actor=LEAD)
        catalog.add_member("rare-disease", REVIEWER, "reviewer", actor=LEAD)
        rare = pick(["vast", "orebro", "ost"], 3)
        for r in rare:
            catalog.grant_tag(dataset_of(r), "rare-disease", admin_of(r), reason="data request approved by region")
        catalog.revoke_tag(dataset_of(rare[-1]), "rare-disease", admin_of(rare[-1]),
                           reason="consent withdrawn for secondary use")

        # A project whose approval has expired: its data was tagged while it was valid.
        real_clock = catalog.clock
        catalog.clock = lambda: datetime(2022, 3, 1, 9, 0, tzinfo=timezone.utc)
        try:
            catalog.create_project("legacy-study", LEAD, "2021-00042-01", date(2021, 1, 1), date(2023, 12, 31),
                                   title="Completed pilot study")
            catalog.add_member("legacy-study", OUTSIDER, "member", actor=LEAD)
            catalog.add_member("legacy-study", RESEARCHER, "member", actor=LEAD)
            r = pick(["syd"], 1)[0]
            catalog.grant_tag(dataset_of(r), "legacy-study", admin_of(r), reason="pilot")
        finally:
            catalog.clock = real_clock
        return summarize(catalog, already_seeded=False)
    finally:
        catalog.close()


def summarize(catalog, already_seeded: bool) -> DemoSummary:
    now = catalog.clock()
    s = DemoSummary(home=str(catalog.platform.home_path), already_seeded=already_seeded)
    s.regions = [r.name for r in catalog.regions()]
    s.datasets = [
        {"name": d.name, "region": d.region.name, "kind": d.kind, "samples": len(d.samples), "files": len(d.files),
         "registered_by": d.registered_by.username}
        for d in catalog.datasets()
    ]
    s.users = [{"username": u.username, "region": u.home_region.name, "roles": u.role_labels()} for u in catalog.users()]
    for p in catalog.projects():
        state = ("expired" if p.valid_until < now.date() else
                 "not yet valid" if p.valid_from > now.date() else "valid")
        s.projects.append({
            "name": p.name, "lead": p.lead.username, "approval": p.approval_number,
            "valid_from": p.valid_from.isoformat(), "valid_until": p.valid_until.isoformat(),
            "approval_state": state, "status": p.status,
            "members": [{"user": m.user.username, "role": m.role} for m in p.memberships],
        })
    for t in catalog.tags():
        state = "active" if t.is_active(now) else ("revoked" if t.revoked_at else "expired")
        s.tags.append({"dataset": t.dataset.name, "region": t.dataset.region.name, "project": t.project.name,
                       "state": state, "granted_by": t.granted_by.username, "revoke_reason": t.revoke_reason})
    policy = AccessPolicy(catalog)
    users = {u["username"] for u in s.users}
    for project, user in [("cardio-gwas", RESEARCHER), ("cardio-gwas", OUTSIDER), ("rare-disease", RESEARCHER),
                          ("legacy-study", RESEARCHER)]:
        if user not in users or project not in {p["name"] for p in s.projects}:
            continue
        d = policy.files(user, project, now)
        s.access.append({"user": user, "project": project, "files": len(d.files),
                         "datasets": [f"{ds} ({r})" for r, ds in d.datasets], "reasons": list(d.reasons),
                         "withheld": list(d.withheld)})
    return s
