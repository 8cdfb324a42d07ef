"""Held mail: the durable store, release in order, and bounces when it expires."""
