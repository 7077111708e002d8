"""The Ed25519 key that signs checkpoints of the audit chain head.

The private key lives in ``$NGP_HOME/state/keys`` with mode 0600 and is never
mounted into a workspace.
"""

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_NAME = "audit-signing.key"
PUBLIC_NAME = "audit-signing.pub"


def _raw_public(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


class CheckpointSigner:
    """Signs and verifies checkpoint statements with the platform's audit key."""

    def __init__(self, keys_dir: Path, create: bool = True):
        self.keys_dir = Path(keys_dir)
        key_path = self.keys_dir / KEY_NAME
        if not key_path.exists():
            if not create:
                raise FileNotFoundError(f"no audit signing key at {key_path}")
            self._create(key_path)
        self._private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        self.public = self._private.public_key()
        self.key_id = key_id(self.public)

    def _create(self, key_path: Path) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = key_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, key_path)  # fails if another process created the key first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        pub = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (self.keys_dir / PUBLIC_NAME).write_bytes(pub)

    def sign(self, statement: bytes) -> str:
        return base64.b64encode(self._private.sign(statement)).decode("ascii")

    def verify(self, statement: bytes, signature: str) -> bool:
        try:
            self.public.verify(base64.b64decode(signature), statement)
            return True
        except (InvalidSignature, ValueError):
            return False
