"""pytest plugin (registered by the package's ``pytest11`` entry point).

Fixtures for users' own integration tests; every server binds a free loopback port.

* ``test_issuer``: a throwaway MDM issuer with its own Ed25519 key.
* ``fake_upstream``: a running FakeUpstream; read ``.messages``, set ``.faults``.
* ``gateway_factory``: ``async with gateway_factory({"ban.toml": "..."}) as gateway:``
  starts a gateway relaying to ``fake_upstream`` with those policy files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from gateway.testing.harness import RunningGateway, running_gateway, write_config
from gateway.testing.issuer import TestIssuer
from gateway.testing.upstream import FakeUpstream

GatewayFactory = Callable[..., AbstractAsyncContextManager[RunningGateway]]


@pytest.fixture
def test_issuer() -> TestIssuer:
    return TestIssuer.generate("test-1")


try:  # the plugin loads wherever the package is installed; async fixtures need pytest-asyncio
    import pytest_asyncio
except ImportError:  # pragma: no cover
    pytest_asyncio = None  # type: ignore[assignment]

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def fake_upstream() -> AsyncIterator[FakeUpstream]:
        async with FakeUpstream.running() as upstream:
            yield upstream


@pytest.fixture
def gateway_factory(
    tmp_path: Path, test_issuer: TestIssuer, fake_upstream: FakeUpstream
) -> GatewayFactory:
    def factory(
        policies: Mapping[str, str] | None = None,
        smtp: Mapping[str, object] | None = None,
        extra: str = "",
    ) -> AbstractAsyncContextManager[RunningGateway]:
        path = write_config(
            tmp_path / "gateway",
            issuer=test_issuer,
            upstream_port=fake_upstream.port,
            policies=policies,
            smtp=smtp,
            extra=extra,
        )
        return running_gateway(path)

    return factory
