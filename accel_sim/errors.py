"""Errors of the simulator's execution layer, importable without torch (the CLI catches them)."""

from __future__ import annotations


class DeviceError(RuntimeError):
    """A torch device the simulator cannot run on exactly: unknown, absent, or failing."""


class ExactnessError(DeviceError):
    """A device whose arithmetic differs from the int64 reference on the self-check probe."""
