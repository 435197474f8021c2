"""Helpers shared by the test folders (importable as `support.*` through pytest's `pythonpath = ["tests"]`)."""
