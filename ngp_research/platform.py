"""Where a platform installation keeps its things, and how it is configured.

The storage layout (design section 4)::

    $NGP_HOME/
      regions/<region>/datasets/<dataset>/...   a region's protected area
      projects/<project>/shared/               a project's shared area
      projects/<project>/home/<user>/          a member's home in that project
      state/                                   catalog and audit databases, keys

Configuration follows JupyterHub: :class:`Platform` is a traitlets
``Configurable`` whose options carry ``help=`` strings. Environment variables
give the defaults, so the CLI needs no configuration file.
"""

import os
from pathlib import Path

from traitlets import Float, Integer, List, Unicode, default
from traitlets.config import Configurable

DEFAULT_REGIONS = ("norr", "uppsala", "orebro", "stockholm", "ost", "vast", "syd")


class Platform(Configurable):
    """One installation of ngp-research: its home folder, databases and regions.

    Examples
    --------
    >>> import tempfile
    >>> p = Platform(home=tempfile.mkdtemp())
    >>> p.dataset_dir("uppsala", "cohort1").relative_to(p.home_path).as_posix()
    'regions/uppsala/datasets/cohort1'
    >>> p.database_url.startswith("sqlite:///")
    True
    """

    home = Unicode(
        help="The platform's home folder ($NGP_HOME). Holds the regions' areas, "
        "the projects' areas and the platform state.",
    ).tag(config=True)

    @default("home")
    def _default_home(self):
        return os.environ.get("NGP_HOME", os.path.abspath(".ngp-demo"))

    database_url = Unicode(
        help="SQLAlchemy URL of the catalog database. Defaults to $NGP_DATABASE_URL, "
        "or SQLite at $NGP_HOME/state/catalog.sqlite.",
    ).tag(config=True)

    @default("database_url")
    def _default_database_url(self):
        env = os.environ.get("NGP_DATABASE_URL")
        if env:
            return env
        return f"sqlite:///{self.state_dir / 'catalog.sqlite'}"

    audit_database_url = Unicode(
        help="SQLAlchemy URL of the audit store. Defaults to $NGP_AUDIT_DATABASE_URL, "
        "then $NGP_DATABASE_URL (its own tables), or SQLite at $NGP_HOME/state/audit.sqlite.",
    ).tag(config=True)

    @default("audit_database_url")
    def _default_audit_database_url(self):
        env = os.environ.get("NGP_AUDIT_DATABASE_URL") or os.environ.get("NGP_DATABASE_URL")
        if env:
            return env
        return f"sqlite:///{self.state_dir / 'audit.sqlite'}"

    regions = List(
        Unicode(),
        default_value=list(DEFAULT_REGIONS),
        help="The healthcare regions of this installation. Each gets its own protected "
        "storage area. NGP has seven: norr, uppsala, orebro, stockholm, ost, vast, syd.",
    ).tag(config=True)

    audit_checkpoint_interval = Integer(
        1000,
        help="Sign a checkpoint of the audit chain head after this many records "
        "(and always when a store is closed).",
    ).tag(config=True)

    audit_checkpoint_seconds = Float(
        60.0,
        help="The audit service also signs the chain head this often (seconds) when records were added "
        "since its last checkpoint, and when it starts: records acknowledged before a service was "
        "killed are signed then. 0: by count only. $NGP_AUDIT_CHECKPOINT_SECONDS.",
    ).tag(config=True)

    audit_trusted_key_id = Unicode(
        help="Key id of the audit signing key that checkpoints must be signed with "
        "(printed by `ngp audit verify`; $NGP_AUDIT_TRUSTED_KEY). Record it somewhere the "
        "platform's state folder is not, so a replaced key is detected.",
    ).tag(config=True)

    @default("audit_trusted_key_id")
    def _default_trusted_key(self):
        return os.environ.get("NGP_AUDIT_TRUSTED_KEY", "")

    @default("audit_checkpoint_seconds")
    def _default_checkpoint_seconds(self):
        return float(os.environ.get("NGP_AUDIT_CHECKPOINT_SECONDS", "60"))

    workspace_uid_base = Integer(
        200000,
        help="Members' workspaces run as host uid workspace_uid_base + the user's catalog id: "
        "a distinct unprivileged uid per user, recorded in the catalog.",
    ).tag(config=True)

    workspace_gid_base = Integer(
        300000,
        help="Each project's host group is workspace_gid_base + the project's catalog id; its "
        "shared area belongs to that group.",
    ).tag(config=True)

    workspace_data_gid = Integer(
        199999,
        help="The host group that may traverse the platform's home to the regions' files. Only "
        "sandboxed workspaces run with it, and they see only the files bound into them.",
    ).tag(config=True)

    @property
    def home_path(self) -> Path:
        return Path(self.home).resolve()

    @property
    def state_dir(self) -> Path:
        return self.home_path / "state"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def audit_socket(self) -> Path:
        """The audit service's unix socket; its folder is bound read-only into every workspace
        (``/run/ngp/audit``), so kernels reach the service without a relay."""
        return self.home_path / "run" / "audit" / "audit.sock"

    @property
    def reference_dir(self) -> Path:
        """Shared, non-patient reference files (gene panels, annotations) shown read-only at ``/reference``."""
        return self.home_path / "reference"

    @property
    def regions_dir(self) -> Path:
        return self.home_path / "regions"

    @property
    def projects_dir(self) -> Path:
        return self.home_path / "projects"

    def region_area(self, region: str) -> Path:
        return self.regions_dir / region

    def dataset_dir(self, region: str, dataset: str) -> Path:
        return self.region_area(region) / "datasets" / dataset

    def staging_dir(self, region: str) -> Path:
        """Where ingest stages copies: inside the region area, so the final rename is atomic."""
        return self.region_area(region) / ".staging"

    def ensure_layout(self) -> None:
        """Create the folders of the layout; the state folder is private to the platform."""
        for path in (self.regions_dir, self.projects_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
