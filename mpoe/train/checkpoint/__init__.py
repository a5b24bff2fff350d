"""Checkpoints: writing and reading them, resharding onto another layout, resuming."""
