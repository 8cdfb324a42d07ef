"""Compliance Gateway: an SMTP submission proxy that gates mail on device compliance."""

__version__ = "0.1.0"
