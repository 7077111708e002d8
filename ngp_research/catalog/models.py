"""The catalog's tables: regions, users, datasets and their files, projects, members, tags.

Times are stored as naive UTC and returned as timezone-aware UTC
(:class:`UTCDateTime`), so SQLite and PostgreSQL behave the same.
"""

from datetime import date, datetime, timezone

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

ROLES = ("region-admin", "project-lead", "researcher", "reviewer", "operator")
MEMBER_ROLES = ("lead", "member", "reviewer")
DATASET_KINDS = ("vcf", "bcf", "cram", "bam")
FILE_ROLES = ("data", "index", "reference", "metadata")
PROJECT_STATUSES = ("active", "suspended", "closed")


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime stored as naive UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog; use UTC-aware datetimes")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Region(Base):
    __tablename__ = "regions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(200), default="")

    datasets: Mapped[list["Dataset"]] = relationship(back_populates="region")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    home_region_id: Mapped[int] = mapped_column(ForeignKey("regions.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The member's own unprivileged host uid, under which their workspaces run.
    workspace_uid: Mapped[int | None] = mapped_column(Integer, unique=True, index=True, nullable=True)

    home_region: Mapped[Region] = relationship()
    roles: Mapped[list["UserRole"]] = relationship(
        back_populates="user", cascade="all, delete-orphan", order_by="UserRole.id"
    )

    def has_role(self, role: str, region: str | None = None) -> bool:
        for r in self.roles:
            if r.role == role and (region is None or (r.region is not None and r.region.name == region)):
                return True
        return False

    def role_labels(self) -> list[str]:
        """Roles as the identity provider's group claims spell them, e.g. ``region-admin:syd``."""
        return [f"{r.role}:{r.region.name}" if r.region else r.role for r in self.roles]


class UserRole(Base):
    __tablename__ = "user_roles"
    __table_args__ = (UniqueConstraint("user_id", "role", "region_id", name="uq_user_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(32))
    region_id: Mapped[int | None] = mapped_column(ForeignKey("regions.id"), nullable=True)

    user: Mapped[User] = relationship(back_populates="roles")
    region: Mapped[Region | None] = relationship()


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    region_id: Mapped[int] = mapped_column(ForeignKey("regions.id"))
    kind: Mapped[str] = mapped_column(String(8))
    genome_build: Mapped[str | None] = mapped_column(String(32), nullable=True)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    registered_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    individual_metadata: Mapped[str | None] = mapped_column(Text, nullable=True)

    region: Mapped[Region] = relationship(back_populates="datasets")
    registered_by: Mapped[User] = relationship()
    files: Mapped[list["DatasetFile"]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", order_by="DatasetFile.id",
        foreign_keys="DatasetFile.dataset_id",
    )
    samples: Mapped[list["Sample"]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", order_by="Sample.id"
    )
    tags: Mapped[list["Tag"]] = relationship(back_populates="dataset", order_by="Tag.id")


class DatasetFile(Base):
    __tablename__ = "dataset_files"
    __table_args__ = (UniqueConstraint("dataset_id", "name", name="uq_dataset_file"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    index_for_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_files.id"), nullable=True)

    dataset: Mapped[Dataset] = relationship(back_populates="files", foreign_keys=[dataset_id])
    index_for: Mapped["DatasetFile | None"] = relationship(remote_side=[id])


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (UniqueConstraint("dataset_id", "sample_id", name="uq_dataset_sample"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    sample_id: Mapped[str] = mapped_column(String(128))
    sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    hpo_terms: Mapped[str] = mapped_column(Text, default="")

    dataset: Mapped[Dataset] = relationship(back_populates="samples")


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(300), default="")
    lead_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    approval_number: Mapped[str] = mapped_column(String(64))
    approval_authority: Mapped[str] = mapped_column(String(200))
    valid_from: Mapped[date] = mapped_column(Date)
    valid_until: Mapped[date] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The project's host group: owner group of its shared area, primary group of its workspaces.
    workspace_gid: Mapped[int | None] = mapped_column(Integer, unique=True, index=True, nullable=True)
    #: The workspace profile the lead sets: CPU cores, memory (like "2G"), idle timeout in seconds.
    workspace_cpu: Mapped[float] = mapped_column(Float, default=1.0)
    workspace_memory: Mapped[str] = mapped_column(String(16), default="2G")
    workspace_idle_timeout: Mapped[int] = mapped_column(Integer, default=3600)

    lead: Mapped[User] = relationship()
    memberships: Mapped[list["Membership"]] = relationship(
        back_populates="project", cascade="all, delete-orphan", order_by="Membership.id"
    )
    tags: Mapped[list["Tag"]] = relationship(back_populates="project", order_by="Tag.id")


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("project_id", "user_id", name="uq_membership"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    role: Mapped[str] = mapped_column(String(16))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    added_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)

    project: Mapped[Project] = relationship(back_populates="memberships")
    user: Mapped[User] = relationship(foreign_keys=[user_id])


class Tag(Base):
    """A region's grant of one dataset to one project. Revoking keeps the row."""

    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    granted_by_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    dataset: Mapped[Dataset] = relationship(back_populates="tags")
    project: Mapped[Project] = relationship(back_populates="tags")
    granted_by: Mapped[User] = relationship(foreign_keys=[granted_by_id])
    revoked_by: Mapped[User | None] = relationship(foreign_keys=[revoked_by_id])

    def is_active(self, at: datetime) -> bool:
        if self.granted_at > at:
            return False
        if self.revoked_at is not None and self.revoked_at <= at:
            return False
        if self.expires_at is not None and self.expires_at <= at:
            return False
        return True
