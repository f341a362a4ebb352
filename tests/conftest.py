"""pytest fixtures (the helpers themselves live in tests/helpers.py)."""

from .helpers import simulator, val_set  # noqa: F401
