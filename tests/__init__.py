"""The test suite (`python -m pytest -q` from the repository root)."""
