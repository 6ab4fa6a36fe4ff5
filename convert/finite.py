"""The scan for NaN and inf in loaded weights, shared by the transformers reader and the diffjax loader.

A single NaN in a weight makes every logit downstream of it NaN: the model then samples garbage without an
error. The scan reads each value once, by its bits: with the sign bit cleared, a value of an IEEE-style float
format is inf or NaN exactly when its bits are at least those of the first pattern after the largest finite
value (its exponent all ones). That also holds for float8_e4m3fn, which has no inf and one NaN pattern per
sign (S.1111.111, right after 448). An integer comparison over a chunk is several times faster than
`np.isfinite`, which ml_dtypes (bfloat16, float8) implements one element at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

# Elements per step: bounds the scratch buffer (<= 8 MB) and keeps it in cache.
_CHUNK = 1 << 20


def _limits(dtype: type) -> tuple[np.dtype, int]:
    """(unsigned type of the same width, bits of the first non-finite magnitude) of the float `dtype`."""
    dtype = np.dtype(dtype)
    bits = np.dtype(f"u{dtype.itemsize}")
    return bits, int(np.array(ml_dtypes.finfo(dtype).max, dtype).view(bits).item()) + 1


# Formats whose non-finite values all lie above the largest finite one. Others (the "fnuz" float8s, whose NaN
# is the bits of -0) fall back to np.isfinite.
_BY_BITS = {
    np.dtype(t): _limits(t)
    for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64, ml_dtypes.float8_e4m3fn,
              ml_dtypes.float8_e5m2)
}


def count_nonfinite(array: np.ndarray) -> int:
    """How many values of `array` are NaN or inf (0 for a non-floating array)."""
    dtype = np.dtype(array.dtype)
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        return 0
    flat = array.reshape(-1)  # a view for the contiguous arrays the loaders pass
    if dtype not in _BY_BITS:
        return int(np.count_nonzero(~np.isfinite(flat)))
    bits, limit = _BY_BITS[dtype]
    magnitude_mask = bits.type((1 << (8 * bits.itemsize - 1)) - 1)
    scratch = np.empty(min(_CHUNK, flat.size), bits)
    count = 0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        magnitude = np.bitwise_and(chunk.view(bits), magnitude_mask, out=scratch[:chunk.size])
        if magnitude.max() >= limit:  # rare: only then a boolean array
            count += int(np.count_nonzero(magnitude >= limit))
    return count


def refuse_nonfinite(
    array: np.ndarray,
    name: str,
    where: str,
    stored: np.ndarray | None = None,
    to_file: Callable[[np.ndarray], np.ndarray] = lambda a: a,
) -> None:
    """Raise `CheckpointError` when the loaded tensor `array` holds NaN or inf, naming `where` (the file),
    the tensor `name`, how many values, and the first one in the file's order with its index there.

    `to_file` views an array of `array`'s layout in the file's (e.g. a transpose). `stored` is the tensor as
    the file holds it: where it is finite but `array` is not, the cast to `array.dtype` overflowed (a float32
    weight above 65504 cast to float16), and the message says so.
    """
    count = count_nonfinite(array)
    if not count:
        return
    # The error path only: a boolean array of the whole tensor, in the file's order.
    first = tuple(int(i) for i in np.argwhere(to_file(~np.isfinite(array)))[0])
    shown = f"[{', '.join(map(str, first))}]"
    if stored is not None and np.isfinite(stored[first]):
        raise CheckpointError(
            f"{where}: tensor {name!r} does not fit {array.dtype}: {count} of the {array.size} values read are "
            f"not finite once cast, the first {float(stored[first])} at {shown}; load it in a dtype with the "
            "range (bfloat16 or float32)"
        )
    raise CheckpointError(
        f"{where}: tensor {name!r} holds NaN or inf: {count} of the {array.size} values read, the first "
        f"{float(to_file(array)[first])} at {shown} (a corrupt or diverged checkpoint)"
    )
