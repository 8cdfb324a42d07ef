"""Issuer public keys from PEM or JWKS files, selected by ``kid`` and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey

PublicKey = OKPKey | ECKey


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the fix."""


def _check_supported(key: PublicKey, where: str) -> PublicKey:
    if isinstance(key, OKPKey) and key.curve_name == "Ed25519":
        return key
    if isinstance(key, ECKey) and key.curve_name == "P-256":
        return key
    raise KeyFileError(f"{where}: only Ed25519 (EdDSA) and P-256 (ES256) public keys are accepted")


def _import_jwk(data: dict[str, object], where: str) -> PublicKey:
    if "d" in data:
        raise KeyFileError(f"{where}: contains a private key; give the gateway public keys only")
    kty = data.get("kty")
    try:
        if kty == "OKP":
            return _check_supported(OKPKey.import_key(data), where)  # type: ignore[arg-type]
        if kty == "EC":
            return _check_supported(ECKey.import_key(data), where)  # type: ignore[arg-type]
    except (JoseError, ValueError, TypeError) as exc:
        raise KeyFileError(f"{where}: not a usable JWK ({exc})") from exc
    raise KeyFileError(f"{where}: key type {kty!r} is not supported (use OKP/Ed25519 or EC/P-256)")


def load_key_file(path: Path) -> dict[str, PublicKey]:
    """Keys by kid. A PEM file holds one key whose kid is the file's stem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror or exc}") from exc
    if raw.lstrip().startswith(b"-----BEGIN"):
        if b"PRIVATE KEY" in raw:
            raise KeyFileError(f"{path}: contains a private key; give the gateway public keys only")
        key: PublicKey
        try:
            key = OKPKey.import_key(raw)
        except (JoseError, ValueError, TypeError):
            try:
                key = ECKey.import_key(raw)
            except (JoseError, ValueError, TypeError) as exc:
                raise KeyFileError(
                    f"{path}: not an Ed25519 or P-256 public key in PEM form"
                ) from exc
        return {path.stem: _check_supported(key, str(path))}
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: neither PEM nor JSON (JWKS): {exc}") from exc
    keys, _ = keys_from_jwks(document, str(path))
    return keys


def keys_from_jwks(
    document: object, where: str, *, skip_unsupported: bool = False
) -> tuple[dict[str, PublicKey], list[str]]:
    """Keys by kid from a JWKS document (RFC 7517 §5), and what was skipped.

    A key file is the admin's own, so anything unusable in it is an error. An issuer's
    published JWKS may also carry keys for other consumers (RSA, HMAC secrets never, but
    RSA often): with ``skip_unsupported`` those are skipped and named instead. Either way a
    key's own ``alg`` member is ignored: the algorithms are the gateway's fixed allow-list.
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeyFileError(f'{where}: a JWKS document must be an object with a "keys" list')
    keys: dict[str, PublicKey] = {}
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        at = f"{where} keys[{index}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{at}: not a JSON object")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise KeyFileError(f"{at}: every key in a JWKS needs a 'kid'")
        if kid in keys:
            raise KeyFileError(f"{at}: duplicate kid {kid!r}")
        if skip_unsupported and entry.get("use", "sig") != "sig":
            skipped.append(f"{kid[:60]!r} (use {str(entry.get('use'))[:20]!r})")
            continue
        try:
            keys[kid] = _import_jwk(entry, at)
        except KeyFileError as exc:
            if not skip_unsupported:
                raise
            skipped.append(f"{kid[:60]!r} ({str(exc).removeprefix(at + ': ')})")
    return keys, skipped
