"""The pure policy core: model, loader, and the evaluator (no I/O beyond reading files in the loader)."""
