"""The development/demo OpenID Connect provider, run as a local Node.js process.

Design section 6: users log in through OpenID Connect with oauthenticator's
``GenericOAuthenticator``; the demo and the tests use a real provider, the npm package
``oidc-provider``, with a fixed roster. ``hub/idp/server.js`` is that provider;
:class:`DevIdentityProvider` writes its configuration (users, clients, keys) and runs it.

Typical use::

    ensure_node_modules()
    idp = DevIdentityProvider(state_dir="/tmp/idp", port=0)
    idp.write_config(
        roster_from_users([("alice", ["researcher"])], password="demo"),
        [{"client_id": "jupyterhub", "client_secret": "s3cret",
          "redirect_uris": ["http://127.0.0.1:8000/hub/oauth_callback"]}],
    )
    with idp:
        print(idp.discovery_url)

The provider keeps sessions, codes and grants in memory. The signing key and cookie keys are
generated once and kept (mode 0600) in the state folder, so ID tokens stay verifiable across
restarts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa
from traitlets import Float, Integer, Unicode, default
from traitlets.config import Configurable

#: ``hub/idp`` in this checkout: ``<repo>/hub/idp``.
DEFAULT_IDP_DIR = Path(__file__).resolve().parents[2] / "hub" / "idp"

CONFIG_NAME = "idp-config.json"
KEYS_NAME = "idp-keys.json"
LOG_NAME = "idp.log"


def roster_from_users(users: Iterable[tuple[str, Iterable[str]]], password: str) -> list[dict]:
    """Provider users from ``(username, roles)`` pairs; every user gets ``password``.

    The roles become the ``groups`` claim, unchanged and in order.

    >>> roster_from_users([("admin-syd", ["region-admin:syd"]), ("olof", ["operator"])], "pw")[0]
    {'username': 'admin-syd', 'password': 'pw', 'name': 'admin-syd', 'email': 'admin-syd@ngp.example', 'groups': ['region-admin:syd']}
    """
    roster = []
    for username, roles in users:
        groups = [roles] if isinstance(roles, str) else list(roles)
        roster.append(
            {
                "username": username,
                "password": password,
                "name": username,
                "email": f"{username}@ngp.example",
                "groups": groups,
            }
        )
    return roster


def ensure_node_modules(idp_dir: str | os.PathLike | None = None) -> Path:
    """Install ``hub/idp``'s locked npm dependencies (``npm ci``) when ``node_modules`` is missing.

    Returns the ``node_modules`` folder. Raises :class:`RuntimeError` with npm's output when
    npm is not installed or fails.
    """
    idp = Path(idp_dir) if idp_dir is not None else DEFAULT_IDP_DIR
    modules = idp / "node_modules"
    if (modules / "oidc-provider" / "package.json").is_file():
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm was not found; the development identity provider needs Node.js 20+ and npm")
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=idp,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`npm ci` in {idp} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return modules


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def generate_rsa_jwk(bits: int = 2048) -> dict:
    """A new private RSA signing key as a JWK (RS256), its ``kid`` the RFC 7638 thumbprint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    priv = key.private_numbers()
    pub = priv.public_numbers
    jwk = {"kty": "RSA", "e": _b64url_uint(pub.e), "n": _b64url_uint(pub.n)}
    thumbprint = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    jwk["kid"] = base64.urlsafe_b64encode(hashlib.sha256(thumbprint).digest()).rstrip(b"=").decode()
    jwk.update(
        use="sig",
        alg="RS256",
        d=_b64url_uint(priv.d),
        p=_b64url_uint(priv.p),
        q=_b64url_uint(priv.q),
        dp=_b64url_uint(priv.dmp1),
        dq=_b64url_uint(priv.dmq1),
        qi=_b64url_uint(priv.iqmp),
    )
    return jwk


def _write_private(path: Path, data: Mapping) -> None:
    """Write JSON to ``path`` with mode 0600, atomically (never readable by others, not even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class DevIdentityProvider(Configurable):
    """Runs ``hub/idp/server.js`` (``oidc-provider``) on 127.0.0.1 for the demo and the tests."""

    host = Unicode(
        "127.0.0.1",
        help="Host name in the issuer URL. The provider always listens on 127.0.0.1 only, "
        "so this must name the loopback address (127.0.0.1 or localhost).",
    ).tag(config=True)

    port = Integer(
        0,
        help="TCP port of the provider. 0 picks a free port when the configuration is written.",
    ).tag(config=True)

    idp_dir = Unicode(
        help="Folder holding server.js, package.json and node_modules. Defaults to <repo>/hub/idp.",
    ).tag(config=True)

    @default("idp_dir")
    def _default_idp_dir(self):
        return str(DEFAULT_IDP_DIR)

    state_dir = Unicode(
        help="Folder for the provider's configuration, keys and log (created with mode 0700). "
        "Defaults to $NGP_HOME/state/idp, or ./.ngp-demo/state/idp.",
    ).tag(config=True)

    @default("state_dir")
    def _default_state_dir(self):
        home = os.environ.get("NGP_HOME", os.path.abspath(".ngp-demo"))
        return os.path.join(home, "state", "idp")

    node = Unicode(
        "node",
        help="The Node.js executable (20 or later), a name looked up on PATH or a path.",
    ).tag(config=True)

    startup_timeout = Float(
        20.0,
        help="Seconds to wait for the discovery document to answer 200 after starting.",
    ).tag(config=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -------------------------------------------------------------- paths and URLs

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def config_path(self) -> Path:
        return self.state_path / CONFIG_NAME

    @property
    def keys_path(self) -> Path:
        return self.state_path / KEYS_NAME

    @property
    def log_path(self) -> Path:
        return self.state_path / LOG_NAME

    @property
    def issuer(self) -> str:
        if not self.port:
            raise RuntimeError("the provider's port is not chosen yet; call write_config() first")
        return f"http://{self.host}:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -------------------------------------------------------------- configuration

    def _keys(self) -> dict:
        """Cookie keys and the signing JWK, generated on first use and kept in the state folder."""
        if self.keys_path.is_file():
            return json.loads(self.keys_path.read_text(encoding="utf-8"))
        keys = {
            "cookie_keys": [secrets.token_urlsafe(32), secrets.token_urlsafe(32)],
            "jwks": {"keys": [generate_rsa_jwk()]},
        }
        _write_private(self.keys_path, keys)
        return keys

    def write_config(self, users: Sequence[Mapping], clients: Sequence[Mapping]) -> Path:
        """Write the provider's configuration (mode 0600) and return its path.

        ``users``: dicts with username, password, name, email and groups (see
        :func:`roster_from_users`). ``clients``: dicts with client_id, client_secret and
        redirect_uris (optionally token_endpoint_auth_method, default client_secret_basic;
        client_secret_post is accepted too).
        """
        for user in users:
            missing = {"username", "password"} - set(user)
            if missing:
                raise ValueError(f"user {user.get('username')!r} lacks {sorted(missing)}")
        for client in clients:
            missing = {"client_id", "client_secret", "redirect_uris"} - set(client)
            if missing:
                raise ValueError(f"client {client.get('client_id')!r} lacks {sorted(missing)}")
        self.state_path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_path.chmod(0o700)
        if not self.port:
            self.port = _free_port("127.0.0.1")
        keys = self._keys()
        config = {
            "issuer": self.issuer,
            "port": self.port,
            "clients": [dict(c, redirect_uris=list(c["redirect_uris"])) for c in clients],
            "users": [
                {
                    "username": u["username"],
                    "password": u["password"],
                    "name": u.get("name", u["username"]),
                    "email": u.get("email", f"{u['username']}@ngp.example"),
                    "groups": list(u.get("groups", [])),
                }
                for u in users
            ],
            "cookie_keys": keys["cookie_keys"],
            "jwks": keys["jwks"],
        }
        _write_private(self.config_path, config)
        return self.config_path

    # -------------------------------------------------------------- process

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def _fail(self, why: str):
        self.stop()
        raise RuntimeError(f"the development identity provider {why}; log {self.log_path}:\n{self._log_tail()}")

    def start(self) -> None:
        """Start ``node server.js CONFIG`` and wait until its discovery document answers 200."""
        if self.running:
            return
        if not self.config_path.is_file():
            raise RuntimeError(f"no provider configuration at {self.config_path}; call write_config() first")
        idp = Path(self.idp_dir)
        if not (idp / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError(f"{idp}/node_modules is missing; run ensure_node_modules() (npm ci) first")
        node = shutil.which(self.node)
        if node is None:
            raise RuntimeError(f"Node.js ({self.node!r}) was not found; the identity provider needs Node.js 20+")
        try:
            with socket.socket() as probe:  # a listener there would answer our health check
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(("127.0.0.1", self.port))
        except OSError as exc:
            raise RuntimeError(f"cannot start the identity provider: 127.0.0.1:{self.port} is in use ({exc})") from None
        self._log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        self._proc = subprocess.Popen(
            [node, "server.js", str(self.config_path)],
            cwd=idp,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                self._fail(f"exited with status {self._proc.returncode} while starting")
            try:
                with urllib.request.urlopen(self.discovery_url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self._fail(f"did not answer {self.discovery_url} within {self.startup_timeout:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the provider (SIGTERM, then SIGKILL after 5 s). Safe to call when not running."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DevIdentityProvider:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
