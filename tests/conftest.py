"""Shared fixtures: a fresh platform per test, on SQLite and on a real PostgreSQL server.

The PostgreSQL server is started once per test session from Debian's
``postgresql`` package, on 127.0.0.1 at a free port, and each test gets a
fresh database on it.
"""

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timezone

import pytest

from ngp_research.platform import Platform


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path:
        return path
    raise RuntimeError(
        f"PostgreSQL's {name} was not found; `make test` installs Debian's postgresql package"
    )


class PostgresServer:
    def __init__(self, base_dir):
        self.base_dir = base_dir
        self.port = _free_port()
        self.data = os.path.join(base_dir, "data")
        self.sock = os.path.join(base_dir, "sock")
        self.proc = None
        self._n = itertools.count(1)
        self.as_user = []
        if os.geteuid() == 0:  # the server refuses to run as root
            pwd.getpwnam("postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def start(self):
        os.makedirs(self.sock, exist_ok=True)
        if self.as_user:
            shutil.chown(self.base_dir, "postgres")
            shutil.chown(self.sock, "postgres")
        init = subprocess.run(
            self.as_user + [_pg_bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        self.proc = subprocess.Popen(
            self.as_user
            + [_pg_bin("postgres"), "-D", self.data, "-h", "127.0.0.1", "-p", str(self.port), "-k", self.sock,
               "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        import psycopg

        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres").close()
                return
            except psycopg.OperationalError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("PostgreSQL did not start")
                time.sleep(0.2)

    def new_database(self) -> str:
        import psycopg

        name = f"ngp_test_{next(self._n)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def postgres_server():
    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    base = tempfile.mkdtemp(prefix="ngp-postgres-")
    os.chmod(base, 0o755)
    server = PostgresServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request):
    return request.param


@pytest.fixture
def platform(backend, tmp_path, request, monkeypatch):
    """A fresh platform home; its databases on the backend under test."""
    monkeypatch.delenv("NGP_DATABASE_URL", raising=False)
    monkeypatch.delenv("NGP_AUDIT_DATABASE_URL", raising=False)
    p = Platform(home=str(tmp_path / "ngp"))
    if backend == "postgresql":
        url = request.getfixturevalue("postgres_server").new_database()
        p.database_url = url
        p.audit_database_url = url
    p.ensure_layout()
    return p


class Clock:
    """A settable clock for the catalog, so tests can write history."""

    def __init__(self, now=None):
        self.now = now or datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def catalog(platform, clock):
    from ngp_research.catalog import Catalog

    c = Catalog.open(platform, clock=clock)
    c.ensure_regions()
    yield c
    c.close()


@pytest.fixture
def people(catalog):
    """A small roster: admins of syd and norr, a lead, two researchers, a reviewer."""
    catalog.add_user("admin-syd", "syd", ["region-admin"])
    catalog.add_user("admin-norr", "norr", ["region-admin"])
    catalog.add_user("lars", "uppsala", ["project-lead"])
    catalog.add_user("alice", "uppsala", ["researcher"])
    catalog.add_user("bob", "stockholm", ["researcher"])
    catalog.add_user("clara", "syd", ["reviewer"])
    catalog.add_user("olof", "norr", ["operator"])
    return catalog


# Run inside sandboxes with `python -c`, never imported (it reads its parameters at the top).
collect_ignore = ["sandbox_probe.py"]
