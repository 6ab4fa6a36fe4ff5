"""The one exception type of the converter."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be converted; the message names the file, tensor or field."""
