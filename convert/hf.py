"""Hugging Face `DiffusionGemmaForBlockDiffusion` checkpoints <-> the diffjax parameter tree.

Names (P = `model.decoder.` or `model.encoder.language_model.`; layer i lives at `config.layer_slot(i)` =
(block b, position j), i.e. index [b] of `blocks/layer_j/...`):

    P embed_tokens.weight [V, H]                 -> embedder/embedding        (also the tied LM head)
    P norm.weight                                -> final_norm/scale
    model.decoder.self_conditioning.X.weight     -> self_conditioning/mlp/X/kernel (transposed), pre_norm/scale
    P layers.i.self_attn.{q,k,v,o}_proj.weight   -> self_attn/{q,k,v,o}_proj/kernel (transposed)
    P layers.i.self_attn.{q,k}_norm.weight       -> self_attn/{q,k}_norm/scale
    P layers.i.mlp.{gate,up,down}_proj.weight    -> mlp/{gate,up,down}_proj/kernel (transposed)
    P layers.i.router.proj.weight [E, H]         -> router/proj/kernel [H, E]
    P layers.i.router.{scale,per_expert_scale}   -> router/{scale,per_expert_scale}
    P layers.i.experts.gate_up_proj [E, 2I, H]   -> experts/gate_up_proj [E, H, 2I]
    P layers.i.experts.down_proj [E, H, I]       -> experts/down_proj [E, I, H]
    P layers.i.<norm>.weight                     -> <norm>/scale
    model.decoder.layers.i.layer_scalar          -> decoder_layer_scalar
    model.encoder.language_model.layers.i.layer_scalar -> encoder_layer_scalar

Shared weights may be stored under the decoder's names (what `save_pretrained` writes), the encoder's, or
both; the decoder's copy wins and an encoder duplicate is not read. `lm_head.weight` is the embedding and is
skipped. The vision tower (`model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`) is skipped and
counted in the log.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import numbers
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from convert.atomic import atomic_directory, write_json
from convert.errors import CheckpointError
from convert.files import CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE, shard_file
from convert.finite import count_nonfinite, refuse_nonfinite
from convert.safetensors_io import LazyTensor, MappedFile, TensorInfo, read_header, write_safetensors
from convert.tree import (
    MIXED_DTYPES,
    Path,
    check_tree,
    dtype_mismatches,
    flatten,
    refuse_load_time_formats,
    resolve_dtype,
    to_jax,
    unflatten,
)
from diffjax.config import Config
from diffjax.model import param_leaf_shapes

log = logging.getLogger("convert")

# progress(phase, done_bytes, total_bytes); phase is "read" or "write".
Progress = Callable[[str, int, int], None]


def write_progress(progress: Progress | None, total: int) -> Callable[[int], None]:
    """An `advance(nbytes)` callback that reports cumulative bytes written out of `total` as "write"."""
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress("write", done, total)

    return advance

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
# Tied to the embedding, or non-persistent buffers a third-party export might include: never data we need.
IGNORED = re.compile(r"^lm_head\.weight$|(^|\.)(inv_freq|\w+_inv_freq|embed_scale)$")

# Both transforms are their own inverse, so the writer uses them unchanged.
TRANSPOSE = "transpose"  # torch Linear [out, in] <-> our kernel [in, out]
SWAP_LAST = "swap_last"  # packed experts: swap the last two axes


def _apply(transform: str | None, array: np.ndarray) -> np.ndarray:
    if transform == TRANSPOSE:
        return array.T
    if transform == SWAP_LAST:
        return np.swapaxes(array, -1, -2)
    return array


def _hf_shape(transform: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == TRANSPOSE:
        return shape[::-1]
    if transform == SWAP_LAST:
        return (*shape[:-2], shape[-1], shape[-2])
    return shape


_NORMS = (
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
    "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2",
)
# Per-layer leaf (below blocks/layer_j) -> (name below `P layers.i.`, transform).
LAYER_TENSORS: dict[Path, tuple[str, str | None]] = {
    **{("self_attn", f"{p}_proj", "kernel"): (f"self_attn.{p}_proj.weight", TRANSPOSE) for p in "qkvo"},
    **{("self_attn", f"{p}_norm", "scale"): (f"self_attn.{p}_norm.weight", None) for p in "qk"},
    **{("mlp", f"{p}_proj", "kernel"): (f"mlp.{p}_proj.weight", TRANSPOSE) for p in ("gate", "up", "down")},
    ("router", "proj", "kernel"): ("router.proj.weight", TRANSPOSE),
    ("router", "scale"): ("router.scale", None),
    ("router", "per_expert_scale"): ("router.per_expert_scale", None),
    ("experts", "gate_up_proj"): ("experts.gate_up_proj", SWAP_LAST),
    ("experts", "down_proj"): ("experts.down_proj", SWAP_LAST),
    **{(norm, "scale"): (f"{norm}.weight", None) for norm in _NORMS},
}
# The two layer_scalar buffers: same name below the layer, different owner.
LAYER_SCALARS: dict[Path, str] = {("decoder_layer_scalar",): DECODER, ("encoder_layer_scalar",): ENCODER}
# Shared, stored under either prefix.
SHARED_TENSORS: dict[Path, tuple[str, str | None]] = {
    ("embedder", "embedding"): ("embed_tokens.weight", None),
    ("final_norm", "scale"): ("norm.weight", None),
}
DECODER_TENSORS: dict[Path, tuple[str, str | None]] = {
    **{
        ("self_conditioning", "mlp", f"{p}_proj", "kernel"): (f"self_conditioning.{p}_proj.weight", TRANSPOSE)
        for p in ("gate", "up", "down")
    },
    ("self_conditioning", "pre_norm", "scale"): ("self_conditioning.pre_norm.weight", None),
}


@dataclasses.dataclass(frozen=True)
class Slot:
    """One HF tensor's place in our tree: leaf path, index along the stacked block axis (None: unstacked)."""

    leaf: Path
    block: int | None
    names: tuple[str, ...]  # HF names that may hold it, preferred first
    transform: str | None
    hf_shape: tuple[int, ...]
    layer: int | None = None

    @property
    def is_scalar(self) -> bool:
        return self.leaf[-1].endswith("layer_scalar")


def hf_slots(config: Config) -> tuple[list[Slot], dict[Path, tuple[int, ...]]]:
    """Every HF tensor the config needs, and the shape of every leaf of our tree."""
    shapes = param_leaf_shapes(config)
    slots: list[Slot] = []
    for path, shape in shapes.items():
        if path[0] != "blocks":
            if path in SHARED_TENSORS:
                suffix, transform = SHARED_TENSORS[path]
                names = (DECODER + suffix, ENCODER + suffix)
            elif path in DECODER_TENSORS:
                suffix, transform = DECODER_TENSORS[path]
                names = (DECODER + suffix,)
            else:
                raise AssertionError(f"no Hugging Face name for leaf {'/'.join(path)}: update convert/hf.py")
            slots.append(Slot(path, None, names, transform, _hf_shape(transform, shape)))
    for i in range(config.num_layers):
        block, j = config.layer_slot(i)
        for path, shape in shapes.items():
            if path[:2] != ("blocks", f"layer_{j}"):
                continue
            sub, layer_shape = path[2:], shape[1:]
            if sub in LAYER_SCALARS:
                names, transform = (f"{LAYER_SCALARS[sub]}layers.{i}.layer_scalar",), None
            elif sub in LAYER_TENSORS:
                suffix, transform = LAYER_TENSORS[sub]
                names = (f"{DECODER}layers.{i}.{suffix}", f"{ENCODER}layers.{i}.{suffix}")
            else:
                raise AssertionError(f"no Hugging Face name for leaf {'/'.join(path)}: update convert/hf.py")
            slots.append(Slot(path, block, names, transform, _hf_shape(transform, layer_shape), layer=i))
    return slots, shapes


# ------------------------------------------------------------------------------------ reading


def read_config(path: str | os.PathLike[str]) -> Config:
    """`Config.from_hf` of `path/config.json`; errors name the file."""
    file = pathlib.Path(path) / CONFIG_FILE
    if not pathlib.Path(path).is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not file.is_file():
        raise CheckpointError(f"missing config.json: {file} does not exist")
    raw = _read_json_object(file)
    try:
        return Config.from_hf(raw)
    except ValueError as exc:
        raise CheckpointError(f"{file}: {exc}") from exc


def index_tensors(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Headers of `model.safetensors`, or of every shard `model.safetensors.index.json` names."""
    path = pathlib.Path(path)
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():  # transformers prefers the single file when both exist
        return read_header(single)[0]
    if not index.is_file():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: bad index (expected JSON with a 'weight_map' object)") from None
    for name, shard in weight_map.items():
        # A shard is a file of this folder: not another type, and no path that leads out of it.
        if not isinstance(shard, str) or pathlib.PurePath(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name in {path}")
    shards = list(dict.fromkeys(weight_map.values()))
    absent = [s for s in shards if not (path / s).is_file()]
    if absent:
        raise CheckpointError(f"{index} names missing shard(s): {', '.join(absent)}")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(path / shard)[0].items():
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} is stored twice: in {tensors[name].path.name} and in {shard}"
                )
            tensors[name] = info
    listed_absent = sorted(n for n, s in weight_map.items() if n not in tensors or tensors[n].path != path / s)
    if listed_absent:
        raise CheckpointError(
            f"{index} lists tensor(s) its shard does not hold: {_listing(listed_absent)}"
        )
    return tensors


def _listing(names: list[str], limit: int = 100) -> str:
    shown = "\n  ".join(names[:limit])
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)}\n  {shown}{more}"


@dataclasses.dataclass
class _Plan:
    reads: list[tuple[Slot, TensorInfo]]
    ones: list[Slot]  # layer_scalar buffers absent from the file: transformers' init value 1.0
    dtype: np.dtype  # of every leaf
    skipped_vision: int


def plan_load(
    config: Config, tensors: Mapping[str, TensorInfo], dtype: np.dtype | None, where: str
) -> _Plan:
    """Match checkpoint names to our leaves; raise one error listing every missing/unexpected/misshapen tensor
    (and, unless a `dtype` to cast to is given, every one not in the checkpoint's floating dtype)."""
    slots, _ = hf_slots(config)
    known = {name for slot in slots for name in slot.names}
    vision = [n for n in tensors if n.startswith(VISION_PREFIXES)]
    unexpected = sorted(
        n for n in tensors if n not in known and not n.startswith(VISION_PREFIXES) and not IGNORED.search(n)
    )
    found: dict[int, TensorInfo] = {}
    for k, slot in enumerate(slots):
        info = next((tensors[n] for n in slot.names if n in tensors), None)
        if info is not None:
            found[k] = info

    # A layer with only one of its two layer_scalar buffers: transformers keeps the missing one at its init
    # value 1.0 (strictly, 5.23.0 initialises only the decoder's; the encoder's is left as uninitialised
    # memory, which we do not reproduce). A layer with neither is a missing-tensor error.
    scalar_present: dict[int, int] = {}
    for k, slot in enumerate(slots):
        if slot.is_scalar and k in found:
            scalar_present[slot.layer] = scalar_present.get(slot.layer, 0) + 1  # type: ignore[index]
    ones = [s for k, s in enumerate(slots) if k not in found and s.is_scalar and scalar_present.get(s.layer)]
    missing = sorted(s.names[0] for k, s in enumerate(slots) if k not in found and s not in ones)

    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (map to no parameter): {_listing(unexpected)}")
    mismatched = [
        f"{info.name}: expected {list(slots[k].hf_shape)}, got {list(info.shape)}"
        for k, info in found.items()
        if info.shape != slots[k].hf_shape
    ]
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if dtype is None and (mixed := dtype_mismatches(
        [(info.name, slots[k].leaf, info.dtype) for k, info in sorted(found.items())], config
    )):
        problems.append(f"{MIXED_DTYPES}: {_listing(mixed)}")
    if problems:
        raise CheckpointError(f"{where}: " + "\n".join(problems))

    # dtype=None keeps the stored dtype, now known to be one, except float64: read as float32, which jax
    # without x64 can hold. Defaulted layer_scalars take it too.
    stored = next(iter(found.values())).dtype
    target = dtype if dtype is not None else np.dtype(np.float32) if stored == np.float64 else stored
    reads = sorted(((slots[k], info) for k, info in found.items()), key=lambda r: (str(r[1].path), r[1].begin))
    return _Plan(reads, ones, target, len(vision))


def _prepare(path: str | os.PathLike[str], dtype: Any) -> tuple[Config, np.dtype | None, _Plan]:
    """Config, target dtype and read plan of a transformers folder, logging what is skipped or defaulted."""
    config = read_config(path)
    target = resolve_dtype(dtype)
    tensors = index_tensors(path)
    plan = plan_load(config, tensors, target, str(path))
    if plan.skipped_vision:
        log.info("skipped %d vision tensors (model.encoder.vision_tower / embed_vision)", plan.skipped_vision)
    if plan.ones:
        log.warning(
            "%s: %d layer_scalar buffer(s) absent (%s); set to 1.0 as transformers initialises them",
            path, len(plan.ones), ", ".join(s.names[0] for s in plan.ones[:4]) + (", ..." if len(plan.ones) > 4 else ""),
        )
    return config, target, plan


def load_hf_numpy(
    path: str | os.PathLike[str], dtype: Any = None, progress: Progress | None = None
) -> tuple[Config, dict[Path, np.ndarray]]:
    """`load_hf` returning flat numpy leaves {path tuple: array} (what the converter writes from)."""
    config, target, plan = _prepare(path, dtype)
    _, shapes = hf_slots(config)
    # One preallocated array per leaf in the final dtype: the checkpoint is never held twice.
    arrays = {p: np.empty(shape, plan.dtype) for p, shape in shapes.items()}
    for slot in plan.ones:
        arrays[slot.leaf][slot.block] = 1
    total = sum(info.nbytes for _, info in plan.reads)
    done = 0
    mapped: MappedFile | None = None
    for slot, info in plan.reads:
        if mapped is None or mapped.path != info.path:
            mapped = MappedFile(info.path)  # the previous shard is unmapped once its last view is gone
        dest = arrays[slot.leaf] if slot.block is None else arrays[slot.leaf][slot.block]
        stored = mapped.view(info)
        # float -> float only (dtypes were validated); the transpose is done by the strided copy itself. An
        # overflowing cast is reported below by tensor name, not warned about by numpy.
        with np.errstate(over="ignore"):
            np.copyto(dest, _apply(slot.transform, stored), casting="unsafe")
        # The copy, not the file: a cast to float16 can overflow what the file holds.
        refuse_nonfinite(dest, info.name, str(info.path), stored, functools.partial(_apply, slot.transform))
        mapped.release(info)
        done += info.nbytes
        if progress is not None:
            progress("read", done, total)
    del mapped
    check_tree(arrays, config, f"converted {path}", target)
    return config, arrays


def load_hf(
    path: str | os.PathLike[str], dtype: Any = None, progress: Progress | None = None, *, mesh: Mesh | None = None
) -> tuple[Config, dict[str, Any]]:
    """Read a transformers DiffusionGemma folder into `(Config, params)`.

    `path` holds `config.json` and `model.safetensors` or `model.safetensors.index.json` + shards. Tensors are
    streamed one at a time from memory-mapped files into one preallocated array per stacked leaf, cast to
    `dtype` ("bfloat16", "float32", "float16" or a dtype; None keeps the stored dtype). Returns jax arrays with
    exactly the structure and shapes of `diffjax.param_shapes(config)`. Raises `CheckpointError` (a
    `ValueError`) naming the problem, among them a tensor holding NaN or inf, or one that the cast to `dtype`
    overflows (`convert.finite`: each value is scanned once after its copy, about 10-15% of the load time).

    With a `mesh` (`diffjax.sharding.make_mesh`), every leaf is made directly with the sharding of
    `diffjax.sharding.param_shardings`: each device's shard is copied from the memory-mapped slices it
    covers, so neither one device nor the host ever holds more than one shard at a time (replicas of a shard
    are read once). On several hosts each host reads only its own devices' shards.
    """
    if mesh is None:
        config, arrays = load_hf_numpy(path, dtype, progress)
        return config, to_jax(arrays)
    return _load_hf_sharded(path, dtype, progress, mesh)


def _shard_by_shard(shape: tuple[int, ...], sharding: Any, make_shard: Callable[[tuple[slice, ...]], np.ndarray]
                    ) -> jax.Array:
    """`jax.make_array_from_callback`, one distinct shard on the host at a time: that function keeps every
    device's host shard until it has them all (a data-parallel replica of a 30 GB expert stack is read once per
    replica). Here each index is read once, put on the devices holding it, and dropped before the next."""
    devices_by_index: dict[tuple, list[Any]] = {}
    indices: dict[tuple, tuple[slice, ...]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop, s.step) for s in index)
        devices_by_index.setdefault(key, []).append(device)
        indices[key] = index
    pieces = []
    for key, devices in devices_by_index.items():
        host = make_shard(indices[key])
        pieces += [jax.device_put(host, device).block_until_ready() for device in devices]
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def _load_hf_sharded(
    path: str | os.PathLike[str], dtype: Any, progress: Progress | None, mesh: Mesh
) -> tuple[Config, dict[str, Any]]:
    from diffjax.sharding import param_shardings  # imports the model: only needed here

    config, target, plan = _prepare(path, dtype)
    _, shapes = hf_slots(config)
    # leaf -> {block (None: unstacked) -> (transform, tensor), or None for a defaulted layer_scalar}
    sources: dict[Path, dict[int | None, tuple[str | None, TensorInfo] | None]] = {p: {} for p in shapes}
    for slot, info in plan.reads:
        sources[slot.leaf][slot.block] = (slot.transform, info)
    for slot in plan.ones:
        sources[slot.leaf][slot.block] = None
    shardings = flatten(param_shardings(config, mesh))
    files: dict[pathlib.Path, MappedFile] = {}

    def copy_into(dest: np.ndarray, source: tuple[str | None, TensorInfo] | None, index: tuple[slice, ...]) -> None:
        if source is None:
            dest[...] = 1
            return
        transform, info = source
        if info.path not in files:
            files[info.path] = MappedFile(info.path)
        stored = files[info.path].view(info)
        # Only the shard's slice of the (transposed) view is touched and copied (overflow: as in load_hf_numpy).
        with np.errstate(over="ignore"):
            np.copyto(dest, _apply(transform, stored)[index], casting="unsafe")
            if count_nonfinite(dest):  # reported on the whole tensor, as without a mesh (only on this error)
                whole = _apply(transform, stored).astype(plan.dtype)
                refuse_nonfinite(whole, info.name, str(info.path), stored, functools.partial(_apply, transform))

    def shard(leaf: Path, index: tuple[slice, ...]) -> np.ndarray:
        shape = shapes[leaf]
        out = np.empty([len(range(dim)[s]) for dim, s in zip(shape, index, strict=True)], plan.dtype)
        if leaf[0] != "blocks":
            copy_into(out, sources[leaf][None], index)
        else:
            for row, block in enumerate(range(shape[0])[index[0]]):
                copy_into(out[row], sources[leaf][block], index[1:])
        return out

    total = sum(info.nbytes for _, info in plan.reads)
    done = 0
    arrays: dict[Path, Any] = {}
    for leaf, shape in shapes.items():
        arrays[leaf] = _shard_by_shard(shape, shardings[leaf], functools.partial(shard, leaf))
        for source in sources[leaf].values():
            if source is not None:
                if source[1].path in files:  # a host whose devices needed none of it never mapped it
                    files[source[1].path].release(source[1])
                done += source[1].nbytes
        if progress is not None:
            progress("read", done, total)
    files.clear()
    check_tree(arrays, config, f"converted {path}", target)
    return config, unflatten(arrays)


# ---------------------------------------------------------------------------- generation config

GENERATION_KEYS = (
    "max_new_tokens", "max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
    "confidence_threshold", "eos_token_id", "pad_token_id",
)
_INTEGER_KEYS = frozenset({"max_new_tokens", "max_denoising_steps", "stability_threshold", "pad_token_id"})
# Every key transformers 5.23.0's DiffusionGemmaGenerationConfig takes (its __init__ raises "Unexpected
# kwargs" on any other, do_sample and top_p included), plus our flat layout's entropy_bound.
KNOWN_GENERATION_FILE_KEYS = frozenset({
    *GENERATION_KEYS, "max_length", "return_dict_in_generate", "sampler_config", "cache_implementation",
    "cache_config", "disable_compile", "bos_token_id", "_commit_hash", "_from_model_config", "transformers_version",
})


# Keys of transformers' generation config that diffjax does not use but a conversion carries through
# verbatim, so that a checkpoint converted to ours and back generates in transformers as before.
CARRIED_GENERATION_KEYS = (
    "max_length", "bos_token_id", "return_dict_in_generate", "cache_implementation", "cache_config",
    "disable_compile",
)


def normalise_generation_config(raw: Mapping[str, Any], where: str = "generation config",
                                carried: bool = False) -> dict[str, Any]:
    """Keep the sampler settings we use, from either transformers' layout or our flat one; drop nulls.
    With `carried`, also the `CARRIED_GENERATION_KEYS` present, verbatim (what the converters write back).

    transformers nests `entropy_bound` in `sampler_config` (`{"_cls_name": "EntropyBoundSamplerConfig", ...}`);
    `eos_token_id` becomes a list of ints. A value of the wrong type (a string, a list, a bool where a number
    belongs) is a `CheckpointError` naming `where` (the file) and the key.
    """
    flat = dict(raw)
    shown = {key: key for key in GENERATION_KEYS}
    sampler = flat.get("sampler_config")
    if sampler is not None and not isinstance(sampler, Mapping):
        raise CheckpointError(f"{where}: sampler_config must be an object, got {sampler!r}")
    if sampler is not None and flat.get("entropy_bound") is None:
        flat["entropy_bound"] = sampler.get("entropy_bound")
        shown["entropy_bound"] = "sampler_config.entropy_bound"
    out = {k: flat[k] for k in GENERATION_KEYS if flat.get(k) is not None}
    for key, value in out.items():
        if key == "eos_token_id":
            ids = value if isinstance(value, list | tuple) else [value]
            if not all(map(_is_integer, ids)):
                raise CheckpointError(f"{where}: eos_token_id must be an integer or a list of integers, got {value!r}")
            out[key] = [int(i) for i in ids]
        elif key in _INTEGER_KEYS and not _is_integer(value):
            raise CheckpointError(f"{where}: {shown[key]} must be an integer, got {value!r}")
        elif key not in _INTEGER_KEYS and not _is_number(value):
            raise CheckpointError(f"{where}: {shown[key]} must be a number, got {value!r}")
    if carried:
        out.update({key: raw[key] for key in CARRIED_GENERATION_KEYS if raw.get(key) is not None})
    return out


def _is_integer(value: Any) -> bool:
    # bool is an int to Python, but a JSON `true` is no token id or step count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _read_json_object(file: pathlib.Path) -> dict[str, Any]:
    """The JSON object in `file`; a `CheckpointError` naming the file if it is not one."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: bad JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: bad JSON (not an object)")
    return raw


def load_generation_config(path: str | os.PathLike[str], carried: bool = False) -> dict[str, Any]:
    """Sampler settings of `path/generation_config.json` ({} when absent); see `GENERATION_KEYS`. With
    `carried`, also the keys a conversion keeps without using them (`CARRIED_GENERATION_KEYS`)."""
    file = pathlib.Path(path) / GENERATION_CONFIG_FILE
    if not file.is_file():
        return {}
    raw = _read_json_object(file)
    # Warned, not refused: transformers may accept more keys in a later version. A typo of one of ours
    # would otherwise be dropped without a word and its default used.
    for key in sorted(set(raw) - KNOWN_GENERATION_FILE_KEYS):
        close = difflib.get_close_matches(key, sorted(KNOWN_GENERATION_FILE_KEYS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        log.warning("%s: ignoring unknown key %r%s; transformers' DiffusionGemmaGenerationConfig refuses it",
                    file, key, hint)
    return normalise_generation_config(raw, str(file), carried)


def hf_generation_config(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """Our flat settings -> the `generation_config.json` transformers' DiffusionGemmaGenerationConfig reads."""
    flat = normalise_generation_config(generation_config, carried=True)
    out: dict[str, Any] = {k: v for k, v in flat.items() if k != "entropy_bound"}
    # transformers validates these with isinstance(float): a JSON 1 would be rejected.
    for key in ("t_min", "t_max", "confidence_threshold"):
        if key in out:
            out[key] = float(out[key])
    if "entropy_bound" in flat:
        out["sampler_config"] = {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": float(flat["entropy_bound"])}
    return out


# ------------------------------------------------------------------------------------ writing


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes (> 0) from an int or a string like "5GB", "20KB", "500MiB" (decimal units as transformers uses)."""
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match:
        nbytes = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
    else:
        nbytes = size if isinstance(size, int) and not isinstance(size, bool) else 0
    if nbytes <= 0:
        raise ValueError(
            f"bad size {size!r}: expected a positive number of bytes, optionally with a unit B, KB, MB, GB, TB "
            "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 5GB or 500MiB"
        )
    return nbytes


def save_hf(
    params: Mapping[str, Any],
    config: Config,
    dst: str | os.PathLike[str],
    generation_config: Mapping[str, Any] | None = None,
    *,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: Progress | None = None,
    extra_files: Iterable[str | os.PathLike[str]] = (),
) -> pathlib.Path:
    """Write a folder `DiffusionGemmaForBlockDiffusion.from_pretrained` loads.

    `extra_files` (e.g. the tokenizer, or a trained model's task.json) are copied in beside the weights, inside
    the same atomic write.

    Shared weights go under the decoder's names (as `save_pretrained` writes them), plus both layer_scalar
    sets. Sharded with `model.safetensors.index.json` when larger than `max_shard_size`. The vision tower is
    not written: transformers 5.23.0 then initialises it randomly with a MISSING note, it does not fail (the
    text model is unaffected). Written atomically (see `convert.atomic`).
    """
    refuse_load_time_formats(config)
    flat = flatten(params)
    check_tree(flat, config, "params")
    slots, _ = hf_slots(config)
    lazy: dict[str, LazyTensor] = {}
    for slot in slots:
        leaf = flat[slot.leaf]
        dtype = np.dtype(leaf.dtype)
        lazy[slot.names[0]] = LazyTensor(slot.hf_shape, dtype, _maker(leaf, slot))
    names = sorted(lazy)
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    used = 0
    for name in names:
        nbytes = math.prod(lazy[name].shape) * lazy[name].dtype.itemsize
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    total = sum(math.prod(t.shape) * t.dtype.itemsize for t in lazy.values())
    advance = write_progress(progress, total)

    dst = pathlib.Path(dst)
    with atomic_directory(dst, overwrite, extra_files) as tmp:
        write_json(tmp / CONFIG_FILE, config.to_hf())
        if generation_config:
            write_json(tmp / GENERATION_CONFIG_FILE, hf_generation_config(generation_config))
        if len(shards) == 1:
            write_safetensors(tmp / SINGLE_FILE, {n: lazy[n] for n in names}, {"format": "pt"}, advance)
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                file = shard_file(k, len(shards))
                write_safetensors(tmp / file, {n: lazy[n] for n in shard}, {"format": "pt"}, advance)
                weight_map.update(dict.fromkeys(shard, file))
            write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return dst


def _maker(leaf: Any, slot: Slot) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        # Slice before fetching: a jax leaf then crosses to the host one layer at a time.
        part = leaf if slot.block is None else leaf[slot.block]
        return _apply(slot.transform, np.asarray(part))

    return make


__all__ = [
    "GENERATION_KEYS",
    "Progress",
    "hf_slots",
    "load_generation_config",
    "load_hf",
    "load_hf_numpy",
    "save_hf",
]
