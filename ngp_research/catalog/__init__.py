"""The catalog: regions, users, datasets, projects, members and tags, and the changes to them."""

from .models import Dataset, DatasetFile, Membership, Project, Region, Sample, Tag, User, UserRole
from .service import Catalog

__all__ = [
    "Catalog", "Dataset", "DatasetFile", "Membership", "Project", "Region", "Sample", "Tag", "User", "UserRole",
]
