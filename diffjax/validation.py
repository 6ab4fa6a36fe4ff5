"""Checks of user-given values shared by the model, the generation loop and the samplers: each raises a
`ValueError` that names the argument, before a bad value becomes a raw JAX error or a silent wrong answer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def first_few(items: list[str], separator: str = ", ", shown: int = 5) -> str:
    """The first `shown` items, and how many more: one wrong setting (a config that does not fit its weights)
    can make every layer's tensors a problem."""
    more = f" (and {len(items) - shown} more)" if len(items) > shown else ""
    return separator.join(items[:shown]) + more


def require_int(name: str, value: Any, minimum: int) -> None:
    """`value` a Python or NumPy integer (not a bool, not a float) >= `minimum`."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum} (got {value!r})")


def token_ids(name: str, ids: Any, vocab_size: int) -> jax.Array:
    """`ids` as an int32 array, refusing what an embedding gather would silently read as other tokens:
    a non-integer dtype (floats truncate, bools are ids 0 and 1) and concrete ids outside `[0,
    vocab_size)` (the gather clamps). A host array is checked before its conversion, which would wrap an
    int64 id of 2**32 + 5 to 5 (JAX keeps 32-bit integers)."""
    if not isinstance(ids, jax.Array):
        ids = np.asarray(ids)
    if ids.size and not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.size and not isinstance(ids, jax.core.Tracer):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} contains token id {low if low < 0 else high} outside the vocabulary "
                             f"[0, {vocab_size})")
    return jnp.asarray(ids).astype(jnp.int32)


def padding_mask(name: str, mask: Any, shape: tuple[int, ...], every_row_real: bool = False,
                 left_padded: bool = False) -> jax.Array:
    """`mask` (1 = real token, 0 = padding) as a bool array of `shape`: booleans or integers 0/1 only (a
    cast would read 0.5 or 2 as a real token); with `every_row_real`, each row holding a real token (a
    prompt of padding alone has nothing to continue); with `left_padded`, each row's padding all before its
    tokens (generation continues from the last column, which must be the prompt's last token)."""
    if not isinstance(mask, jax.Array):
        mask = np.asarray(mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} does not match the token ids' {tuple(shape)}")
    if not (mask.dtype == bool or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise ValueError(f"{name} must be booleans or integers 0/1, got dtype {mask.dtype}")
    if not isinstance(mask, jax.core.Tracer):
        values = np.asarray(mask)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0 (padding) and 1 (a real token), got "
                             f"{sorted(set(np.unique(values).tolist()) - {0, 1})[:5]}")
        empty = np.flatnonzero(~values.astype(bool).any(axis=-1)) if every_row_real else ()
        if len(empty):
            raise ValueError(f"{name} row {int(empty[0])} has no real token: every row needs at least one")
        gaps = np.flatnonzero((np.diff(values.astype(np.int8), axis=-1) < 0).any(axis=-1)) if left_padded else ()
        if len(gaps):
            raise ValueError(f"{name} row {int(gaps[0])} has padding after a real token: pad prompts on the left "
                             "(`diffjax.tokenizer.left_pad`), since the canvas continues from the last column")
    return jnp.asarray(mask).astype(bool)


def prng_key(name: str, key: Any) -> jax.Array:
    """`key` from `jax.random.key(seed)` (or a legacy `jax.random.PRNGKey(seed)`): one key, not a batch."""
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    legacy = isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32 and key.shape == (2,)
    if not (typed and key.shape == ()) and not legacy:
        got = f"{type(key).__name__} {getattr(key, 'dtype', '')}{list(getattr(key, 'shape', []))}"
        raise ValueError(f"{name} must be one PRNG key, jax.random.key(seed), got {got}")
    return key
