"""Development tokens: an Ed25519 key pair and a minting function. Never for production.

The private key file carries ``"use": "sig"`` and a ``"comment"`` saying it is a
development key, so nobody mistakes it for the MDM's key.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, OKPKey

from gateway.tokens.verify import GatewayRegistry

DEV_KEY_COMMENT = "DEVELOPMENT KEY - NOT FOR PRODUCTION - anyone with this file can mint tokens"


def generate_dev_key(kid: str) -> OKPKey:
    return OKPKey.generate_key("Ed25519", parameters={"kid": kid, "use": "sig"}, private=True)


def write_dev_key_pair(
    directory: Path, kid: str = "dev-1", stem: str = "dev-issuer"
) -> tuple[Path, Path]:
    """Write ``<stem>.private.jwk.json`` (0600) and ``<stem>.jwks.json``; returns both paths."""
    key = generate_dev_key(kid)
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / f"{stem}.private.jwk.json"
    public_path = directory / f"{stem}.jwks.json"
    private_doc = {"comment": DEV_KEY_COMMENT, **key.as_dict(private=True)}
    private_path.write_text(json.dumps(private_doc, indent=2) + "\n")
    private_path.chmod(0o600)
    public_doc = {
        "comment": "Public half of the development key: trust it only in test setups.",
        "keys": [key.as_dict(private=False)],
    }
    public_path.write_text(json.dumps(public_doc, indent=2) + "\n")
    return private_path, public_path


def load_dev_key(path: Path) -> OKPKey:
    document = json.loads(path.read_text())
    document.pop("comment", None)
    key = OKPKey.import_key(document)
    if not key.is_private:
        raise ValueError(f"{path}: not a private key")
    return key


def device_payload(
    *,
    issuer: str,
    audience: str,
    subject: str,
    device_id: str,
    platform: str = "ios",
    device_class: str = "mobile",
    model: str | None = None,
    os_version: str | None = None,
    managed: bool | None = None,
    apps: Iterable[str] = (),
    posture: Mapping[str, bool] | None = None,
    issued_at: datetime,
    lifetime: timedelta = timedelta(minutes=15),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The claims of SPEC section 2 for one device."""
    device: dict[str, Any] = {"id": device_id, "platform": platform, "class": device_class}
    if model is not None:
        device["model"] = model
    if os_version is not None:
        device["os_version"] = os_version
    if managed is not None:
        device["managed"] = managed
    payload: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": int(issued_at.timestamp()),
        "exp": int((issued_at + lifetime).timestamp()),
        "jti": uuid.uuid4().hex,
        "device": device,
        "apps": list(apps),
        "posture": dict(posture or {}),
    }
    payload.update(extra or {})
    return payload


def mint(
    payload: Mapping[str, Any],
    key: OKPKey | ECKey,
    *,
    alg: str = "EdDSA",
    header: Mapping[str, Any] | None = None,
) -> str:
    """Sign claims as a compact JWS."""
    protected: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if key.kid:
        protected["kid"] = key.kid
    protected.update(header or {})
    return jws.serialize_compact(
        protected,
        json.dumps(payload, separators=(",", ":")).encode(),
        key,
        registry=GatewayRegistry(),
    )
