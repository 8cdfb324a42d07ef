"""Policies: the pure core (model, loader, diff, impact, the indexed engine) and, above it,
the set in force (store) and its hot reload."""
