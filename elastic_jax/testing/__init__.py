"""Helpers that build tiny random checkpoints for tests, notebooks and the README demo."""
