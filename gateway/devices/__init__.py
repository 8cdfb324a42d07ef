"""Devices seen recently (the inventory behind impact previews) and the notices their users get."""
