"""Hyper-parameter checks shared by the components (run where the values are concrete, skipped under a trace)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from diffjax.validation import require_int


def is_concrete(value: Any) -> bool:
    """Whether `value` is a real number that can be checked now.

    Pytree unflattening re-runs __post_init__ with tracers (under jit) or placeholder objects (inside tree
    utilities); only real numbers (Python, NumPy, or a JAX scalar outside a trace) can be checked.
    """
    if isinstance(value, jax.Array):
        return not isinstance(value, jax.core.Tracer) and value.shape == () and value.dtype != bool
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def require_finite(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    """Raise `ValueError` naming `name` unless a concrete `value` is finite and `ok(value)`.

    Infinity passes most range checks and then reads as a wrong answer, not an error (t_max=inf samples
    uniformly; a large finite value says the same on purpose).
    """
    if is_concrete(value) and not (math.isfinite(float(value)) and ok(float(value))):
        raise ValueError(f"`{name}` must be finite and {requirement} (got {value!r})")


def require_optional_vocab(value: Any) -> None:
    """A component's `vocab_size`: None (the logits' width) or a positive integer."""
    if value is not None:
        require_int("vocab_size", value, 1)
