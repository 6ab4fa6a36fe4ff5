"""Checkpoint conversion between Hugging Face DiffusionGemma folders and diffjax's own format.

    config, params = load_hf("path/to/hf-folder", dtype="bfloat16")   # transformers -> params
    save(params, config, "path/to/diffjax-ckpt")                       # our format (see convert.native)
    config, params = load("path/to/diffjax-ckpt")
    save_hf(params, config, "path/to/new-hf-folder")                   # params -> transformers
    convert_checkpoint("hf-folder", "diffjax-ckpt", dtype="bfloat16")  # or: python -m convert SRC DST

Every problem with an input is a `CheckpointError` (a `ValueError`) whose message names it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from convert.atomic import check_destination
from convert.errors import CheckpointError
from convert.files import PARAMS_FILE, companion_files
from convert.hf import Progress, load_generation_config, load_hf, load_hf_numpy, save_hf
from convert.native import FORMAT, load, save
from convert.tree import unflatten


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: Any = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> pathlib.Path:
    """Convert the transformers folder `src` into a diffjax checkpoint at `dst` (generation config, tokenizer,
    chat template and a trained model's task.json included, so `diffjax generate --checkpoint DST` needs
    nothing else).

    Host arrays go straight from the reader to the writer (no jax device copies), one preallocated array per
    leaf, so peak memory is about one copy of the converted weights. A `dst` that overlaps `src`, exists
    (without `overwrite`; with it, unless it is empty or a checkpoint), or cannot be created is refused before
    anything is read (see `check_destination`). A tensor holding NaN or inf is refused (see `load_hf`)."""
    check_destination(src, dst, overwrite)  # fail before reading tens of gigabytes
    config, flat = load_hf_numpy(src, dtype, progress)
    return save(unflatten(flat), config, dst, load_generation_config(src, carried=True) or None, overwrite=overwrite,
                progress=progress, extra_files=companion_files(src))


__all__ = [
    "FORMAT",
    "PARAMS_FILE",
    "CheckpointError",
    "Progress",
    "convert_checkpoint",
    "load",
    "load_generation_config",
    "load_hf",
    "load_hf_numpy",
    "save",
    "save_hf",
]
