"""The diffjax checkpoint format: what `convert.save` writes and `convert.load` reads.

A directory:

    config.json             `Config.to_hf()` (a transformers-style `diffusion_gemma` config; `Config.from_hf`
                            reads it back to an equal Config, checked on save)
    params.safetensors      every leaf of the parameter tree, in its own dtype, under its "/"-joined path:
                            `embedder/embedding`, `final_norm/scale`, `self_conditioning/mlp/gate_proj/kernel`,
                            `blocks/layer_0/self_attn/q_proj/kernel` ([num_blocks, in, out]), ... exactly the
                            tree and shapes of `diffjax.param_shapes(config)` (kernels [in, out], layers
                            stacked on a leading block axis). Header `__metadata__`:
                            {"format": "diffjax", "format_version": "1"}.
    generation_config.json  optional, flat: max_new_tokens, max_denoising_steps, t_min, t_max,
                            entropy_bound, stability_threshold, confidence_threshold, eos_token_id (list),
                            pad_token_id (only the keys that are set), and transformers' keys diffjax does
                            not use but carries for a conversion back (`convert.hf.CARRIED_GENERATION_KEYS`).

The directory is written atomically (`convert.atomic`). Loading is bit-exact: bytes go from the file to the
array unchanged unless a `dtype` cast is asked for.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from convert.atomic import atomic_directory, write_json
from convert.errors import CheckpointError
from convert.files import CONFIG_FILE, GENERATION_CONFIG_FILE, PARAMS_FILE
from convert.finite import refuse_nonfinite
from convert.hf import (
    Progress,
    normalise_generation_config,
    read_config,
    write_progress,
)
from convert.safetensors_io import MappedFile, read_header, write_safetensors
from convert.tree import (
    MIXED_DTYPES,
    check_tree,
    dtype_mismatches,
    flatten,
    refuse_load_time_formats,
    resolve_dtype,
    unflatten,
)
from diffjax.config import Config
from diffjax.model import param_leaf_shapes
from diffjax.validation import first_few

FORMAT = "diffjax"
FORMAT_VERSION = "1"


def save(
    params: Mapping[str, Any],
    config: Config,
    dst: str | os.PathLike[str],
    generation_config: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    extra_files: Iterable[str | os.PathLike[str]] = (),
) -> pathlib.Path:
    """Write `params` (jax or numpy leaves) and `config` to the directory `dst` in the diffjax format.

    `extra_files` (e.g. the tokenizer and chat template) are copied in beside them, inside the same atomic
    write. Refuses an existing `dst` (FileExistsError) unless `overwrite=True`; the old directory is
    replaced only once the new one is complete, and survives any failure. Refuses floating leaves of more
    than one dtype: `load` reads a checkpoint in its one dtype and would refuse the file.
    """
    refuse_load_time_formats(config)
    flat = flatten(params)
    check_tree(flat, config, "params")
    if mixed := dtype_mismatches([("/".join(path), path, np.dtype(leaf.dtype)) for path, leaf in sorted(flat.items())],
                                 config):
        raise CheckpointError(
            f"params mix floating dtypes, a checkpoint `load` would refuse: {first_few(mixed)}. Cast them to one "
            "first, e.g. jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)")
    hf_config = config.to_hf()
    # A maths field to_hf cannot express would be silently lost (the implementation choices are not maths).
    if Config.from_hf(hf_config).replace(**config.implementation()) != config:
        raise CheckpointError(f"config does not survive config.json: {config} != {Config.from_hf(hf_config)}")
    tensors = {"/".join(path): leaf for path, leaf in flat.items()}
    advance = write_progress(progress, sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in tensors.values()))

    dst = pathlib.Path(dst)
    with atomic_directory(dst, overwrite, extra_files) as tmp:
        write_json(tmp / CONFIG_FILE, hf_config)
        if generation_config:
            write_json(tmp / GENERATION_CONFIG_FILE, normalise_generation_config(generation_config, carried=True))
        write_safetensors(
            tmp / PARAMS_FILE, tensors, {"format": FORMAT, "format_version": FORMAT_VERSION}, advance
        )
    return dst


def load(
    src: str | os.PathLike[str], dtype: Any = None, *, as_numpy: bool = False, check_finite: bool = False
) -> tuple[Config, dict[str, Any]]:
    """Read a directory written by `save`: `(config, params)` with jax leaves (numpy with `as_numpy`).

    `dtype` casts every leaf (None keeps the stored dtype, bit for bit, and refuses a file whose floating
    tensors are not all in one dtype: see `convert.tree.dtype_mismatches`). `check_finite` refuses a tensor
    holding NaN or inf, or one the cast overflows (`convert.finite`): off by default, since the converter
    already refused them in what it wrote and the scan reads every byte once more (about a second per
    10 GB on one core); on for a checkpoint of unknown history (`save` writes params as given: a diverged run's too).
    """
    src = pathlib.Path(src)
    config = read_config(src)
    target = resolve_dtype(dtype)
    file = src / PARAMS_FILE
    if not file.is_file():
        raise CheckpointError(f"{src}: no {PARAMS_FILE} (not a diffjax checkpoint; for a transformers folder "
                              "use load_hf, or drop --to-hf from `diffjax convert`)")
    tensors, metadata = read_header(file)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a diffjax checkpoint (metadata format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: diffjax checkpoint format version {metadata.get('format_version')!r}, this "
                              f"diffjax reads version {FORMAT_VERSION!r}")
    shapes = param_leaf_shapes(config)
    expected = {"/".join(p): p for p in shapes}
    problems = []
    if missing := sorted(set(expected) - set(tensors)):
        problems.append(f"missing tensors: {first_few(missing)}")
    if unexpected := sorted(set(tensors) - set(expected)):
        problems.append(f"unexpected tensors: {first_few(unexpected)}")
    if mismatched := [
        f"{name}: expected {list(shapes[expected[name]])}, got {list(info.shape)}"
        for name, info in sorted(tensors.items())
        if name in expected and info.shape != shapes[expected[name]]
    ]:
        problems.append(f"shape mismatch with {CONFIG_FILE} in {len(mismatched)} tensors: {first_few(mismatched)}")
    if target is None and (mixed := dtype_mismatches(
        [(name, expected[name], info.dtype) for name, info in sorted(tensors.items()) if name in expected], config
    )):
        problems.append(f"{MIXED_DTYPES}: {', '.join(mixed)}")
    if problems:
        raise CheckpointError(f"{file}: " + "; ".join(problems))
    mapped = MappedFile(file)
    flat: dict[tuple[str, ...], Any] = {}
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].begin):
        stored = mapped.view(info)
        if check_finite:
            with np.errstate(over="ignore"):  # an overflowing cast is reported by tensor name below
                host = stored.astype(target or info.dtype)
            refuse_nonfinite(host, name, str(file), stored)
        else:
            # astype always copies, so no leaf aliases (and keeps alive) the memory map.
            host = stored.astype(target or info.dtype)
        mapped.release(info)
        flat[expected[name]] = host if as_numpy else jax.numpy.asarray(host)
    del mapped
    check_tree(flat, config, str(file), target)
    return config, unflatten(flat)
