"""The platform's error types.

Every refusal the platform makes is one of these, so the CLI can turn it
into exit status 2 with the reason on stderr, and the hub (later) into a
page a user can read.
"""


class NGPError(Exception):
    """Base class of every error the platform raises on purpose."""


class RefusedError(NGPError):
    """The acting user may not do this (permission, role, region)."""


class InvalidInputError(NGPError):
    """The request is malformed or names something that does not exist."""


class NotFoundError(InvalidInputError):
    """A named region, dataset, project, user or tag does not exist."""


class IngestError(InvalidInputError):
    """A file offered for ingest failed validation.

    Parameters
    ----------
    file : str
        The file (as the user named it) that failed.
    problem : str
        What is wrong with it, in words a region admin understands.
    location : str, optional
        Where in the file, e.g. ``"record 12 (line 40)"`` or ``"BGZF block at byte 65280"``.
    """

    def __init__(self, file, problem, location=None):
        self.file = str(file)
        self.problem = problem
        self.location = location
        where = f" at {location}" if location else ""
        super().__init__(f"{self.file}: {problem}{where}")


class AuditIntegrityError(NGPError):
    """The audit chain failed verification."""
