"""THE access policy: which files a (user, project) may see at a given moment.

Nothing else in the platform decides visibility. The workspace planner mounts
exactly :attr:`AccessDecision.files`; the hub shows :attr:`AccessDecision.reasons`
when the answer is nothing.

The decision itself is the pure function :func:`decide` over plain facts
(:class:`ProjectFacts`), tested with hypothesis over random catalogs;
:class:`AccessPolicy` only loads those facts from the catalog.

Rules, all of which must hold for a file to be visible at time ``at``:

1. the user is a member of the project (any role);
2. the project's status is ``active``;
3. ``at`` lies within the ethics approval, ``valid_from`` to ``valid_until``
   inclusive (UTC calendar days);
4. the file's dataset has a tag for the project that was granted at or before
   ``at``, is not revoked at ``at`` and has not expired at ``at``.
"""

from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import PurePosixPath

from .names import check_name

WORKSPACE_DATA_ROOT = PurePosixPath("/data")


@dataclass(frozen=True)
class DatasetFacts:
    name: str
    region: str
    directory: str  # host folder of the dataset in the region's area
    files: tuple[str, ...]  # file names inside that folder (data, indexes, reference, metadata)


@dataclass(frozen=True)
class TagFacts:
    dataset: DatasetFacts
    granted_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def state(self, at: datetime) -> str:
        """``active``, ``not yet granted``, ``revoked`` or ``expired`` at ``at``."""
        if self.granted_at > at:
            return "not yet granted"
        if self.revoked_at is not None and self.revoked_at <= at:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= at:
            return "expired"
        return "active"


@dataclass(frozen=True)
class ProjectFacts:
    name: str
    status: str
    approval_number: str
    valid_from: date
    valid_until: date
    members: dict = field(default_factory=dict)  # username -> role
    tags: tuple[TagFacts, ...] = ()


@dataclass(frozen=True)
class VisibleFile:
    """One file a workspace shows: where it is on the host and where it appears inside."""

    region: str
    dataset: str
    name: str
    host_path: str
    workspace_path: str

    def to_json(self) -> dict:
        return {
            "region": self.region,
            "dataset": self.dataset,
            "name": self.name,
            "host_path": self.host_path,
            "workspace_path": self.workspace_path,
        }


@dataclass(frozen=True)
class AccessDecision:
    user: str
    project: str
    at: datetime
    files: tuple[VisibleFile, ...]
    reasons: tuple[str, ...]
    withheld: tuple[str, ...] = ()  # datasets whose tags do not count now, and why (revoked, expired, ...)

    @property
    def allowed(self) -> bool:
        return bool(self.files)

    @property
    def datasets(self) -> tuple[tuple[str, str], ...]:
        """(region, dataset) pairs the workspace shows, in order."""
        return tuple(dict.fromkeys((f.region, f.dataset) for f in self.files))

    def to_json(self) -> dict:
        return {
            "user": self.user,
            "project": self.project,
            "at": self.at.isoformat(),
            "allowed": self.allowed,
            "files": [f.to_json() for f in self.files],
            "reasons": list(self.reasons),
            "withheld": list(self.withheld),
        }


def workspace_path(region: str, dataset: str, name: str) -> str:
    """Where a tagged file appears inside a workspace.

    >>> workspace_path("syd", "syd-cohort", "syd-cohort.vcf.gz")
    '/data/syd/syd-cohort/syd-cohort.vcf.gz'
    """
    parts = (check_name(region, "region name"), check_name(dataset, "dataset name"), check_name(name, "file name"))
    return str(WORKSPACE_DATA_ROOT.joinpath(*parts))


def decide(project: ProjectFacts, user: str, at: datetime) -> AccessDecision:
    """Decide what ``user`` sees in ``project``'s workspace at ``at``.

    Examples
    --------
    >>> from datetime import date, datetime, timezone
    >>> ds = DatasetFacts("syd-cohort", "syd", "/ngp/regions/syd/datasets/syd-cohort", ("c.vcf.gz", "c.vcf.gz.tbi"))
    >>> p = ProjectFacts("cardio", "active", "2025-01234", date(2025, 1, 1), date(2027, 12, 31),
    ...                  members={"alice": "member"},
    ...                  tags=(TagFacts(ds, granted_at=datetime(2025, 2, 1, tzinfo=timezone.utc)),))
    >>> now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    >>> [f.workspace_path for f in decide(p, "alice", now).files]
    ['/data/syd/syd-cohort/c.vcf.gz', '/data/syd/syd-cohort/c.vcf.gz.tbi']
    >>> decide(p, "mallory", now).reasons
    ("mallory is not a member of project 'cardio'",)
    """
    if at.tzinfo is None:
        raise ValueError("at: must be timezone-aware (UTC)")
    day = at.astimezone(timezone.utc).date()
    reasons = []
    if user not in project.members:
        reasons.append(f"{user} is not a member of project {project.name!r}")
    if project.status != "active":
        reasons.append(f"project {project.name!r} is {project.status}")
    if day < project.valid_from:
        reasons.append(
            f"the ethics approval {project.approval_number} of project {project.name!r} "
            f"is not valid until {project.valid_from.isoformat()}"
        )
    if day > project.valid_until:
        reasons.append(
            f"the ethics approval {project.approval_number} of project {project.name!r} "
            f"expired on {project.valid_until.isoformat()}"
        )
    active = [t for t in project.tags if t.state(at) == "active"]
    active_names = {t.dataset.name for t in active}
    inactive = tuple(dict.fromkeys(
        f"{t.dataset.name} ({t.dataset.region}): tag {t.state(at)}"
        for t in project.tags if t.dataset.name not in active_names
    ))
    if not active:
        detail = "; ".join(inactive)
        reasons.append(f"no data is tagged for project {project.name!r}" + (f" ({detail})" if detail else ""))
    if reasons:
        return AccessDecision(user, project.name, at, (), tuple(reasons), inactive)

    files, seen = [], set()
    for tag in active:
        ds = tag.dataset
        if ds.name in seen:
            continue
        seen.add(ds.name)
        for name in ds.files:
            files.append(
                VisibleFile(
                    region=ds.region,
                    dataset=ds.name,
                    name=name,
                    host_path=str(PurePosixPath(ds.directory) / check_name(name, "file name")),
                    workspace_path=workspace_path(ds.region, ds.name, name),
                )
            )
    return AccessDecision(user, project.name, at, tuple(files), (), inactive)


class AccessPolicy:
    """Loads a project's facts from the catalog and applies :func:`decide`.

    Parameters
    ----------
    catalog : ngp_research.catalog.Catalog
    """

    def __init__(self, catalog):
        self.catalog = catalog

    def project_facts(self, project_name: str) -> ProjectFacts:
        from sqlalchemy import select
        from sqlalchemy.orm import selectinload

        from .catalog.models import Dataset, Membership, Tag

        with self.catalog.session() as s:
            project = self.catalog._project(s, project_name)
            members = {
                m.user.username: m.role
                for m in s.scalars(
                    select(Membership).where(Membership.project_id == project.id).options(selectinload(Membership.user))
                )
            }
            tags = s.scalars(
                select(Tag)
                .where(Tag.project_id == project.id)
                .order_by(Tag.id)
                .options(selectinload(Tag.dataset).selectinload(Dataset.region), selectinload(Tag.dataset).selectinload(Dataset.files))
            )
            tag_facts = []
            for t in tags:
                ds = t.dataset
                directory = self.catalog.platform.dataset_dir(ds.region.name, ds.name)
                tag_facts.append(
                    TagFacts(
                        DatasetFacts(ds.name, ds.region.name, str(directory), tuple(f.name for f in ds.files)),
                        granted_at=t.granted_at,
                        expires_at=t.expires_at,
                        revoked_at=t.revoked_at,
                    )
                )
            return ProjectFacts(
                name=project.name,
                status=project.status,
                approval_number=project.approval_number,
                valid_from=project.valid_from,
                valid_until=project.valid_until,
                members=members,
                tags=tuple(tag_facts),
            )

    def files(self, user: str, project: str, at: datetime | None = None) -> AccessDecision:
        """What ``user`` may see in ``project`` at ``at`` (default: now)."""
        at = at or self.catalog.clock()
        return decide(self.project_facts(project), user, at)
