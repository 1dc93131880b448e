"""The VAPID key pair (RFC 8292) that identifies EchoTune to browsers' push services.

The private key is a PEM file only the notifier reads; the public key is what a browser
passes to `pushManager.subscribe({applicationServerKey})`. Rotating the key invalidates every
existing subscription (push services tie a subscription to the key), so `ensure_vapid_keys`
keeps an existing file unless asked to rotate.

    echotune push keys [--rotate]      # create (once) and print the public key
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from app.config import Settings


@dataclass(frozen=True)
class VapidKeys:
    private_key_path: Path
    public_key: str
    """Uncompressed P-256 point, base64url without padding: the `applicationServerKey`."""
    created: bool


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def vapid_key_path(settings: Settings) -> Path:
    path = settings.push.vapid_key_path or settings.paths.state_dir / "push" / "vapid_private.pem"
    return Path(path).expanduser()


def _public_key(private_key: ec.EllipticCurvePrivateKey) -> str:
    point = private_key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return b64url(point)


def load_vapid_keys(path: Path) -> VapidKeys | None:
    """The stored key pair, or None when `echotune push keys` has not been run yet."""
    if not path.exists():
        return None
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or private_key.curve.name != "secp256r1":
        raise ValueError(f"{path} is not a P-256 private key")
    return VapidKeys(path, _public_key(private_key), created=False)


def ensure_vapid_keys(path: Path, rotate: bool = False) -> VapidKeys:
    """Create the key pair unless it exists (or `rotate`). Written owner-only and atomically,
    so a crash never leaves a half-written key that would break every subscription."""
    if not rotate:
        existing = load_vapid_keys(path)
        if existing:
            return existing
    private_key = ec.generate_private_key(ec.SECP256R1())
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    os.replace(tmp, path)
    return VapidKeys(path, _public_key(private_key), created=True)
