"""pytest plugin (registered by the package's ``pytest11`` entry point): fixtures for
your own integration tests against a real gateway. Every server binds a free loopback port.

* ``test_issuer``: a throwaway MDM issuer with its own Ed25519 key.
* ``fake_upstream``: a running FakeUpstream; read ``.messages``, set ``.faults``.
* ``gateway_factory``: ``async with gateway_factory({"ban.toml": "..."}) as gateway:``
  starts a gateway relaying to ``fake_upstream`` with those policy files; any section of
  gateway.toml can be given as a keyword (``groups={...}``, ``limits={...}``).

The async fixtures need pytest-asyncio (``pip install 'compliance-gateway[testkit]'``)
and work in its default (strict) mode: mark your tests ``@pytest.mark.asyncio``, or set
``asyncio_mode = "auto"``. docs/testing.md has the whole story.
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
    """An MDM issuer with a fresh Ed25519 key: ``test_issuer.token(...)`` signs device
    tokens, and the gateways of ``gateway_factory`` trust it."""
    return TestIssuer.generate("test-1")


try:  # the plugin loads wherever the package is installed; async fixtures need pytest-asyncio
    import pytest_asyncio
except ImportError:  # pragma: no cover
    pytest_asyncio = None  # type: ignore[assignment]

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def fake_upstream() -> AsyncIterator[FakeUpstream]:
        """A running fake upstream MTA on a free loopback port: ``.messages`` lists what
        it accepted, ``.faults`` makes it refuse, stall or drop (FakeUpstream)."""
        async with FakeUpstream.running() as upstream:
            yield upstream


@pytest.fixture
def gateway_factory(
    tmp_path: Path, test_issuer: TestIssuer, fake_upstream: FakeUpstream
) -> GatewayFactory:
    """Start gateways relaying to ``fake_upstream`` and trusting ``test_issuer``:

    ``async with gateway_factory(policies, smtp=None, extra="", **sections) as gateway``

    ``policies`` maps file names to policy TOML; ``smtp`` overrides [smtp] keys; any other
    keyword is a section of gateway.toml merged over the test defaults, e.g.
    ``groups={"sales": ["bob@example.test"]}`` or ``limits={"max_connections": 5}``.
    ``gateway.port`` is the submission port; the gateway stops when the block ends.
    """

    def factory(
        policies: Mapping[str, str] | None = None,
        smtp: Mapping[str, object] | None = None,
        extra: str = "",
        **sections: Mapping[str, object],
    ) -> AbstractAsyncContextManager[RunningGateway]:
        path = write_config(
            tmp_path / "gateway",
            issuer=test_issuer,
            upstream_port=fake_upstream.port,
            policies=policies,
            smtp=smtp,
            extra=extra,
            sections=sections,
        )
        return running_gateway(path)

    return factory
