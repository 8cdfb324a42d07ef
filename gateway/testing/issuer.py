"""A throwaway token issuer for tests: its own key, minting any claims (even broken ones)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from joserfc.jwk import ECKey, OKPKey

from gateway.config.settings import ALLOWED_ALGORITHMS, Issuer, VerifierSettings
from gateway.tokens.mint import device_payload, mint

DEFAULT_ISSUER = "https://mdm.example.test"
DEFAULT_AUDIENCE = "smtp-gateway.example.test"


@dataclass
class TestIssuer:
    """Mints tokens the way an MDM would; ``verifier_settings()`` trusts exactly this issuer."""

    __test__ = False  # not a pytest test class

    key: OKPKey | ECKey
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    algorithms: frozenset[str] = field(default=ALLOWED_ALGORITHMS)

    @classmethod
    def generate(cls, kid: str = "test-1", *, curve: str = "Ed25519", **kwargs: Any) -> TestIssuer:
        key: OKPKey | ECKey
        if curve == "P-256":
            key = ECKey.generate_key("P-256", parameters={"kid": kid}, private=True)
        else:
            key = OKPKey.generate_key("Ed25519", parameters={"kid": kid}, private=True)
        return cls(key=key, **kwargs)

    @property
    def alg(self) -> str:
        return "ES256" if isinstance(self.key, ECKey) else "EdDSA"

    def public_jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.public_jwks()))
        return path

    def issuer_config(self) -> Issuer:
        public = type(self.key).import_key(self.key.as_dict(private=False))
        return Issuer(
            issuer=self.issuer, keys={self.key.kid or "": public}, algorithms=self.algorithms
        )

    def verifier_settings(
        self, *others: TestIssuer, leeway: timedelta = timedelta(seconds=60)
    ) -> VerifierSettings:
        issuers = {i.issuer: i.issuer_config() for i in (self, *others)}
        return VerifierSettings(audience=self.audience, issuers=issuers, leeway=leeway)

    def claims(
        self,
        *,
        subject: str = "alice@example.test",
        device_id: str = "phone-1",
        platform: str = "ios",
        device_class: str = "mobile",
        apps: Iterable[str] = (),
        posture: Mapping[str, bool] | None = None,
        model: str | None = None,
        os_version: str | None = None,
        managed: bool | None = None,
        issued_at: datetime | None = None,
        lifetime: timedelta = timedelta(minutes=15),
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return device_payload(
            issuer=self.issuer,
            audience=self.audience,
            subject=subject,
            device_id=device_id,
            platform=platform,
            device_class=device_class,
            model=model,
            os_version=os_version,
            managed=managed,
            apps=apps,
            posture=posture,
            issued_at=issued_at or datetime.now(UTC),
            lifetime=lifetime,
            extra=extra,
        )

    def sign(self, payload: Mapping[str, Any], *, header: Mapping[str, Any] | None = None) -> str:
        return mint(payload, self.key, alg=self.alg, header=header)

    def token(self, **claims: Any) -> str:
        """A valid token; keyword arguments as for :meth:`claims`."""
        return self.sign(self.claims(**claims))
