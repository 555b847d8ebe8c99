"""Helpers shared by the test modules (no test module imports another; fixtures shared by
all of them live in tests/conftest.py)."""
