"""The package's exceptions.

Every error a user can fix is a :class:`BadInput`: the CLI prints ``error: <message>`` on one line and
exits with code 2. Messages name the problem *and* the fix. Anything else is an internal failure (exit 1).
"""

from __future__ import annotations


class DeployPruneError(Exception):
    """Base class of every error raised on purpose by deploy-prune."""

    exit_code = 1


class BadInput(DeployPruneError):
    """The user's input is wrong (unknown name, unreadable file, bad shape, missing data...). Exit code 2."""

    exit_code = 2


class UnsupportedModel(BadInput):
    """The model cannot be traced or pruned at all; the message names the operation and the module."""


class ParityError(DeployPruneError):
    """An exported ONNX file does not reproduce the PyTorch model's outputs. Exit code 1."""
