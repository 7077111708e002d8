"""The catalog's service layer: every change to regions, users, datasets, projects and tags.

Each change is checked first (does the acting user hold the right role for
this region or project? does everything named exist?) and refused whole with
a :class:`~ngp_research.errors.RefusedError` or
:class:`~ngp_research.errors.InvalidInputError` before anything is written.
Each accepted change appends an audit record naming who did what to which
object; the record is durable before the catalog transaction commits.

The acting user is a catalog username, or ``None`` for the platform operator
working on the host (the CLI without ``--as``), recorded as
``operator:<login>``.
"""

import os
import pwd
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta, timezone
from typing import Callable, Iterator

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ..audit.records import AuditRecord, utc_now
from ..errors import InvalidInputError, NotFoundError, RefusedError
from ..names import check_name
from .database import make_engine, upgrade
from .models import (
    MEMBER_ROLES,
    PROJECT_STATUSES,
    ROLES,
    Dataset,
    DatasetFile,
    Membership,
    Project,
    Region,
    Tag,
    User,
    UserRole,
)


def end_of_day(d: date) -> datetime:
    """The first instant after ``d`` (UTC): an expiry date is valid through its whole day."""
    return datetime.combine(d + timedelta(days=1), time(0), tzinfo=timezone.utc)


def operator_identity() -> str:
    """``operator:<login>`` of the process's effective uid (from the password database, not $USER)."""
    uid = os.geteuid()
    try:
        login = pwd.getpwuid(uid).pw_name
    except KeyError:  # no passwd entry in some containers
        login = f"uid{uid}"
    return f"operator:{login}"


class Catalog:
    """The platform's catalog: SQLAlchemy session handling plus checked, audited changes.

    Parameters
    ----------
    platform : ngp_research.platform.Platform
        Where the database is and which regions exist.
    audit : ngp_research.audit.AuditStore
        Where change records go.
    clock : callable, optional
        Returns the current UTC time; tests and the demo seeder set it to write history.
    """

    def __init__(self, platform, audit, clock: Callable[[], datetime] = utc_now, migrate: bool = True):
        self.platform = platform
        self.audit = audit
        self.clock = clock
        self.engine = make_engine(platform.database_url)
        if migrate:
            upgrade(self.engine)

    @classmethod
    def open(cls, platform, clock=utc_now) -> "Catalog":
        from ..audit.store import AuditStore

        platform.ensure_layout()
        return cls(platform, AuditStore.for_platform(platform), clock=clock)

    def close(self) -> None:
        self.audit.close()
        self.engine.dispose()

    # -- sessions ----------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session; objects stay usable after it closes."""
        with Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def change(self) -> Iterator["_ChangeSession"]:
        """A write transaction. Its audit records are appended after the flush and before the commit.

        If the commit fails after the records were appended, a ``change.failed``
        record naming them follows, so the log never claims a change that did
        not happen without saying so.
        """
        holder: dict = {}
        with Session(self.engine, expire_on_commit=False) as s:
            try:
                with s.begin():
                    yield _ChangeSession(s, holder)
                    s.flush()
                    records = holder.get("records", [])
                    if records:
                        holder["appended"] = self.audit.append_many(records)
            except BaseException as e:
                if holder.get("appended"):
                    self.audit.append_many(
                        AuditRecord("change.failed", r.actor, project=r.project, region=r.region, dataset=r.dataset,
                                    detail={"seq": r.seq, "action": r.action, "error": type(e).__name__})
                        for r in holder["appended"]
                    )
                if isinstance(e, IntegrityError):
                    raise InvalidInputError(f"the catalog refused the change: {e.orig}") from None
                raise

    # -- lookups -----------------------------------------------------------

    def _region(self, s: Session, name: str) -> Region:
        region = s.scalar(select(Region).where(Region.name == name))
        if region is None:
            known = ", ".join(s.scalars(select(Region.name).order_by(Region.id)))
            raise NotFoundError(f"unknown region {name!r}; the regions are: {known}")
        return region

    def _user(self, s: Session, name: str) -> User:
        user = s.scalar(select(User).where(User.username == name).options(selectinload(User.roles)))
        if user is None:
            raise NotFoundError(f"unknown user {name!r}")
        return user

    def _acting(self, s: Session, actor: str | None) -> User | None:
        if actor is None:
            return None
        user = s.scalar(select(User).where(User.username == actor))
        if user is None:
            raise RefusedError(f"refused: {actor!r} is not a user of this platform")
        return user

    def _dataset(self, s: Session, name: str) -> Dataset:
        ds = s.scalar(select(Dataset).where(Dataset.name == name))
        if ds is None:
            raise NotFoundError(f"unknown dataset {name!r}")
        return ds

    def _project(self, s: Session, name: str) -> Project:
        p = s.scalar(select(Project).where(Project.name == name))
        if p is None:
            raise NotFoundError(f"unknown project {name!r}")
        return p

    @staticmethod
    def actor_label(actor: str | None) -> str:
        return actor if actor is not None else operator_identity()

    def require_region_admin(self, s: Session, actor: str | None, region: str, doing: str) -> User | None:
        """Refuse unless ``actor`` administers ``region`` (the host operator is not a region admin)."""
        user = self._acting(s, actor)
        if user is None or not user.has_role("region-admin", region):
            who = actor if actor is not None else "the platform operator"
            raise RefusedError(f"refused: {who} is not an admin of region {region!r} and may not {doing}")
        return user

    def _require_lead_or_operator(self, s: Session, actor: str | None, project: Project, doing: str) -> User | None:
        user = self._acting(s, actor)
        if user is None or user.has_role("operator"):
            return user
        if project.lead_id == user.id:
            return user
        if any(m.user_id == user.id and m.role == "lead" for m in project.memberships):
            return user
        raise RefusedError(f"refused: {actor} is not the lead of project {project.name!r} and may not {doing}")

    # -- regions -----------------------------------------------------------

    def ensure_regions(self) -> list[str]:
        """Add the platform's configured regions that the catalog lacks; returns those added."""
        added = []
        with self.change() as s:
            existing = set(s.scalars(select(Region.name)))
            for name in self.platform.regions:
                check_name(name, "region name")
                if name not in existing:
                    s.add(Region(name=name, title=name))
                    added.append(name)
            s.record(
                [AuditRecord("region.create", self.actor_label(None), region=n) for n in added]
            )
        for name in self.platform.regions:
            (self.platform.region_area(name) / "datasets").mkdir(parents=True, exist_ok=True)
        return added

    def regions(self) -> list[Region]:
        with self.session() as s:
            return list(s.scalars(select(Region).order_by(Region.id)))

    # -- users ---------------------------------------------------------------

    def add_user(self, username: str, region: str, roles=(), actor: str | None = None) -> User:
        """Register a user with a home region and roles. ``region-admin`` applies to the home region.

        Roles are ``region-admin``, ``project-lead``, ``researcher``, ``reviewer``, ``operator``.
        """
        try:
            check_name(username, "user name")
        except ValueError as e:
            raise InvalidInputError(str(e)) from None
        roles = list(dict.fromkeys(roles))
        for role in roles:
            if role not in ROLES:
                raise InvalidInputError(f"unknown role {role!r}; roles are: {', '.join(ROLES)}")
        with self.change() as s:
            if actor is not None:
                acting = self._acting(s, actor)
                if not acting.has_role("operator"):
                    raise RefusedError(f"refused: {actor} is not an operator and may not add users")
            home = self._region(s, region)
            if s.scalar(select(User).where(User.username == username)) is not None:
                raise InvalidInputError(f"user {username!r} already exists")
            user = User(username=username, home_region=home, created_at=self.clock())
            for role in roles:
                user.roles.append(UserRole(role=role, region=home if role == "region-admin" else None))
            s.add(user)
            s.flush()
            user.workspace_uid = self.platform.workspace_uid_base + user.id
            s.record(
                AuditRecord(
                    "user.add",
                    self.actor_label(actor),
                    region=region,
                    detail={"user": username, "roles": user.role_labels(), "workspace_uid": user.workspace_uid},
                    
                )
            )
        return user

    def users(self) -> list[User]:
        with self.session() as s:
            q = select(User).order_by(User.username).options(
                selectinload(User.roles).selectinload(UserRole.region), selectinload(User.home_region)
            )
            return list(s.scalars(q))

    def user(self, username: str) -> User:
        with self.session() as s:
            user = self._user(s, username)
            _ = user.home_region, [r.region for r in user.roles]
            return user

    # -- datasets ----------------------------------------------------------

    def datasets(self, region: str | None = None) -> list[Dataset]:
        with self.session() as s:
            q = select(Dataset).order_by(Dataset.name).options(
                selectinload(Dataset.region), selectinload(Dataset.files).selectinload(DatasetFile.index_for),
                selectinload(Dataset.samples),
                selectinload(Dataset.registered_by),
            )
            if region is not None:
                q = q.where(Dataset.region_id == self._region(s, region).id)
            return list(s.scalars(q))

    def dataset(self, name: str) -> Dataset:
        with self.session() as s:
            ds = self._dataset(s, name)
            _ = ds.region, [f.index_for for f in ds.files], ds.samples, ds.registered_by
            _ = [(t.project, t.dataset.region, t.granted_by, t.revoked_by) for t in ds.tags]
            return ds

    # -- projects ------------------------------------------------------------

    def create_project(
        self,
        name: str,
        lead: str,
        approval_number: str,
        valid_from: date,
        valid_until: date,
        title: str = "",
        authority: str = "Swedish Ethical Review Authority",
        actor: str | None = None,
    ) -> Project:
        """Register a project with its ethics approval; the lead becomes its first member."""
        try:
            check_name(name, "project name")
        except ValueError as e:
            raise InvalidInputError(str(e)) from None
        if not approval_number or not approval_number.strip():
            raise InvalidInputError("approval: an ethics approval number is required")
        if not isinstance(valid_from, date) or not isinstance(valid_until, date):
            raise InvalidInputError("valid-from/valid-until: dates are required")
        if valid_until < valid_from:
            raise InvalidInputError(
                f"valid-until {valid_until.isoformat()} is before valid-from {valid_from.isoformat()}"
            )
        with self.change() as s:
            if actor is not None:
                acting = self._acting(s, actor)
                if not (acting.has_role("operator") or (acting.username == lead and acting.has_role("project-lead"))):
                    raise RefusedError(f"refused: {actor} may not register a project led by {lead}")
            lead_user = self._user(s, lead)
            if not lead_user.has_role("project-lead"):
                raise RefusedError(f"refused: {lead} does not have the project-lead role")
            if s.scalar(select(Project).where(Project.name == name)) is not None:
                raise InvalidInputError(f"project {name!r} already exists")
            now = self.clock()
            project = Project(
                name=name,
                title=title or name,
                lead=lead_user,
                approval_number=approval_number.strip(),
                approval_authority=authority,
                valid_from=valid_from,
                valid_until=valid_until,
                status="active",
                created_at=now,
            )
            project.memberships.append(Membership(user=lead_user, role="lead", added_at=now, added_by_id=None))
            s.add(project)
            s.flush()
            project.workspace_gid = self.platform.workspace_gid_base + project.id
            s.record(
                AuditRecord(
                    "project.create",
                    self.actor_label(actor),
                    project=name,
                    detail={
                        "lead": lead,
                        "approval": approval_number,
                        "authority": authority,
                        "valid_from": valid_from.isoformat(),
                        "valid_until": valid_until.isoformat(),
                        "title": project.title,
                    },
                    
                )
            )
        return project

    def set_project_status(self, name: str, status: str, actor: str | None = None, reason: str = "") -> Project:
        if status not in PROJECT_STATUSES:
            raise InvalidInputError(f"status: must be one of {', '.join(PROJECT_STATUSES)}")
        with self.change() as s:
            project = self._project(s, name)
            acting = self._require_lead_or_operator(s, actor, project, "change its status")
            if status == "active" and acting is not None and not acting.has_role("operator"):
                raise RefusedError(f"refused: only a platform operator may reactivate project {name!r}")
            old = project.status
            project.status = status
            s.record(
                AuditRecord(
                    "project.change", self.actor_label(actor), project=name,
                    detail={"status": [old, status], "reason": reason},
                )
            )
        return project

    def set_workspace_profile(self, name: str, actor: str | None, cpu=None, memory=None, idle_timeout=None):
        """The lead (or an operator) sets the project's workspace resources; checked and audited."""
        from ..workspace.plan import Profile

        with self.change() as s:
            project = self._project(s, name)
            self._require_lead_or_operator(s, actor, project, "change its workspace profile")
            old = Profile(project.workspace_cpu, project.workspace_memory, project.workspace_idle_timeout)
            try:
                new = Profile(
                    old.cpu if cpu is None else cpu,
                    old.memory if memory is None else memory,
                    old.idle_timeout if idle_timeout is None else idle_timeout,
                )
            except ValueError as e:
                raise InvalidInputError(str(e)) from None
            project.workspace_cpu, project.workspace_memory = float(new.cpu), str(new.memory)
            project.workspace_idle_timeout = new.idle_timeout
            s.record(AuditRecord("project.change", self.actor_label(actor), project=name,
                                 detail={"profile": [old.to_json(), new.to_json()]}))
        return new

    def workspace_identity(self, username: str, project: str) -> tuple[int, int]:
        """(host uid of the user, host gid of the project), allocating and recording them if missing."""
        with self.session() as s:
            user, p = self._user(s, username), self._project(s, project)
            if user.workspace_uid is not None and p.workspace_gid is not None:
                return user.workspace_uid, p.workspace_gid
        with self.change() as s:
            user, p = self._user(s, username), self._project(s, project)
            if user.workspace_uid is None:
                user.workspace_uid = self.platform.workspace_uid_base + user.id
                s.record(AuditRecord("user.role", self.actor_label(None), region=user.home_region.name,
                                     detail={"user": username, "workspace_uid": user.workspace_uid}))
            if p.workspace_gid is None:
                p.workspace_gid = self.platform.workspace_gid_base + p.id
                s.record(AuditRecord("project.change", self.actor_label(None), project=project,
                                     detail={"workspace_gid": p.workspace_gid}))
            return user.workspace_uid, p.workspace_gid

    def projects(self) -> list[Project]:
        with self.session() as s:
            q = select(Project).order_by(Project.name).options(
                selectinload(Project.lead),
                selectinload(Project.memberships).selectinload(Membership.user),
            )
            return list(s.scalars(q))

    def project(self, name: str) -> Project:
        with self.session() as s:
            p = self._project(s, name)
            _ = p.lead, [m.user for m in p.memberships]
            _ = [(t.project, t.dataset.region, t.granted_by, t.revoked_by) for t in p.tags]
            return p

    def add_member(self, project: str, username: str, role: str = "member", actor: str | None = None) -> Membership:
        if role not in MEMBER_ROLES:
            raise InvalidInputError(f"role: must be one of {', '.join(MEMBER_ROLES)}")
        with self.change() as s:
            p = self._project(s, project)
            acting = self._require_lead_or_operator(s, actor, p, "change its members")
            user = self._user(s, username)
            if any(m.user_id == user.id for m in p.memberships):
                raise InvalidInputError(f"{username} is already a member of project {project!r}")
            m = Membership(user=user, role=role, added_at=self.clock(), added_by_id=acting.id if acting else None)
            p.memberships.append(m)
            s.record(
                AuditRecord(
                    "member.add", self.actor_label(actor), project=project,
                    detail={"user": username, "role": role},
                )
            )
        return m

    def remove_member(self, project: str, username: str, actor: str | None = None) -> None:
        with self.change() as s:
            p = self._project(s, project)
            self._require_lead_or_operator(s, actor, p, "change its members")
            user = self._user(s, username)
            found = [m for m in p.memberships if m.user_id == user.id]
            if not found:
                raise NotFoundError(f"{username} is not a member of project {project!r}")
            if p.lead_id == user.id:
                raise RefusedError(f"refused: {username} is the lead of project {project!r} and cannot be removed")
            p.memberships.remove(found[0])
            s.record(
                AuditRecord(
                    "member.remove", self.actor_label(actor), project=project,
                    detail={"user": username, "role": found[0].role},
                )
            )

    # -- tags ----------------------------------------------------------------

    def grant_tag(
        self,
        dataset: str,
        project: str,
        actor: str | None,
        expires: date | datetime | None = None,
        reason: str = "",
    ) -> Tag:
        """A region admin tags one of the region's datasets for an approved project."""
        with self.change() as s:
            ds = self._dataset(s, dataset)
            region = ds.region.name
            acting = self.require_region_admin(s, actor, region, f"tag dataset {dataset!r}")
            p = self._project(s, project)
            now = self.clock()
            if p.status != "active":
                raise RefusedError(f"refused: project {project!r} is {p.status}")
            if p.valid_until < now.date():
                raise RefusedError(
                    f"refused: the ethics approval {p.approval_number} of project {project!r} "
                    f"expired on {p.valid_until.isoformat()}"
                )
            expires_at = None
            if expires is not None:
                expires_at = end_of_day(expires) if not isinstance(expires, datetime) else expires
                if expires_at <= now:
                    raise InvalidInputError(f"expires: {expires} is already past")
            if any(t.dataset_id == ds.id and t.is_active(now) for t in p.tags):
                raise InvalidInputError(f"dataset {dataset!r} is already tagged for project {project!r}")
            tag = Tag(dataset=ds, project=p, granted_by=acting, granted_at=now, expires_at=expires_at, reason=reason)
            s.add(tag)
            s.record(
                AuditRecord(
                    "tag.grant", self.actor_label(actor), project=project, region=region, dataset=dataset,
                    detail={"expires": expires_at.isoformat() if expires_at else None, "reason": reason},
                )
            )
        return tag

    def revoke_tag(self, dataset: str, project: str, actor: str | None, reason: str = "") -> Tag:
        with self.change() as s:
            ds = self._dataset(s, dataset)
            region = ds.region.name
            acting = self.require_region_admin(s, actor, region, f"revoke tags of dataset {dataset!r}")
            p = self._project(s, project)
            now = self.clock()
            active = [t for t in p.tags if t.dataset_id == ds.id and t.is_active(now)]
            if not active:
                raise NotFoundError(f"dataset {dataset!r} has no active tag for project {project!r}")
            for t in active:
                t.revoked_at = now
                t.revoked_by = acting
                t.revoke_reason = reason
            s.record(
                AuditRecord(
                    "tag.revoke", self.actor_label(actor), project=project, region=region, dataset=dataset,
                    detail={"reason": reason},
                )
            )
        return active[0]

    def tags(self, project: str | None = None, region: str | None = None) -> list[Tag]:
        with self.session() as s:
            q = select(Tag).order_by(Tag.id).options(
                selectinload(Tag.dataset).selectinload(Dataset.region),
                selectinload(Tag.project),
                selectinload(Tag.granted_by),
                selectinload(Tag.revoked_by),
            )
            if project is not None:
                q = q.where(Tag.project_id == self._project(s, project).id)
            if region is not None:
                q = q.join(Dataset).where(Dataset.region_id == self._region(s, region).id)
            return list(s.scalars(q))


class _ChangeSession:
    """A Session that also collects the audit records of the change."""

    def __init__(self, session: Session, holder: dict):
        self._session = session
        self._holder = holder

    def record(self, records) -> None:
        if isinstance(records, AuditRecord):
            records = [records]
        self._holder.setdefault("records", []).extend(records)

    def __getattr__(self, name):
        return getattr(self._session, name)

