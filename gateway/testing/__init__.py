"""Reusable fakes for integration tests: devices, an upstream, and a gateway on free ports."""
