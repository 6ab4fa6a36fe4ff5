"""What XLA makes of a decoder step for a GPU, compiled on a machine without one.

XLA compiles for a described GPU without a device ("deviceless" ahead-of-time compilation) when JAX's CUDA
plugin is installed (`pip install "jax[cuda13]"`; no driver or GPU needed). Its thunk sequence is the list of
what one call launches: kernels, cuBLAS/cuDNN calls, device-to-device copies, loops, and the command buffers
(CUDA graphs) that group launches. `step_structure` counts them per step, so a change that should remove
copies or launches can be checked here before a GPU is at hand:

    structure = compile_decoder_step(config, batch=1, prompt=1024, target="h200")
    print(structure.launches, structure.copies, structure.copy_bytes)

What this cannot see: autotuning (no device to time candidates on, so matmuls get XLA's default Triton
configurations, not the cuBLAS/Triton choice a GPU would make) and anything about time.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import re
import tempfile
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffjax.config import Config

# Descriptions of the GPUs to compile for (`stream_executor.GpuTargetConfigProto` text): the H200's as its own
# XLA reported it in a run here, less the fields this JAX's proto does not have.
TARGETS_DIR = pathlib.Path(__file__).parent / "assets" / "gpu_targets"
# Thunks that only group or order other thunks: not launches themselves.
_STRUCTURAL = {"kCommandBuffer", "kWhile", "kConditional", "kSequential", "kAsyncStart", "kAsyncDone",
               "kDynamicSliceFusion", "kWaitForStreams"}
_COPIES = {"kCopy", "kCopyDone", "kDeviceToDeviceCopy"}


@dataclasses.dataclass(frozen=True)
class LoopIteration:
    """What one iteration of a while loop launches: `launches` (of which `copies`, writing `copy_bytes`) and
    `kernels` by name as in `StepStructure.kernels`. depth: the while loops around this one."""

    depth: int = 0
    launches: int = 0
    copies: int = 0
    copy_bytes: int = 0
    kernels: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class StepStructure:
    """Per call of a compiled function (loop bodies counted once per iteration).

    launches: kernels, library calls (cuBLAS, cuDNN) and copies. copies / copy_bytes: device-to-device copies
    and the bytes they write. outside_command_buffers: launches the host issues one by one (the rest replay as
    CUDA graphs). loops: known trip count of each while loop (None where XLA does not know it; its body is
    then counted once). kernels: launches by name, numeric suffixes dropped, most first. loop_iterations: per
    while loop (in `loops`' order), what one iteration of it launches and copies, its condition and inner
    loops included: for a loop of unknown trip count, such as `generate`'s denoising loop, that is the
    per-pass figure the totals cannot give.
    """

    launches: int
    copies: int
    copy_bytes: int
    outside_command_buffers: int
    command_buffers: int
    loops: tuple[int | None, ...]
    kernels: tuple[tuple[str, int], ...]
    loop_iterations: tuple[LoopIteration, ...] = ()

    def summary(self) -> str:
        """One line: launches, copies, command buffers, loops and the most launched kernels."""
        loops = ", ".join("?" if n is None else str(n) for n in self.loops) or "none"
        top = ", ".join(f"{name} {count}" for name, count in self.kernels[:12])
        return (f"{self.launches} launches per call ({self.outside_command_buffers} outside the "
                f"{self.command_buffers} command buffers), {self.copies} device copies writing "
                f"{self.copy_bytes / 1e9:.3f} GB, while loops (trip counts): {loops}\n  most launched: {top}")


def step_structure(thunk_sequence: str, thunk_metadata: str, optimized_hlo: str) -> StepStructure:
    """Count the launches of one call from XLA's dump of a compiled GPU module: `*thunk_sequence*.txt`,
    `*thunk_metadata.txt` and `*gpu_after_optimizations.txt` (`--xla_dump_to`)."""
    annotations = {int(thunk_id): name for name, thunk_id in re.findall(
        r'profile_annotation: "([^"]*)"\s*thunk_id: (\d+)', thunk_metadata)}
    instructions = {name: (shape, rest) for name, shape, rest in re.findall(
        r"^\s*(?:ROOT )?%(\S+) = (\S+) (.*)$", optimized_hlo, flags=re.MULTILINE)}
    outside = command_buffers = 0
    loops: list[int | None] = []
    call = _Counts()  # the whole call
    per_loop: list[_Counts] = []  # per iteration of each while loop
    enclosing: list[_Enclosing] = []  # the structural thunks around the current line
    for line in thunk_sequence.splitlines():
        match = re.match(r"^(\s*)(\d+): (k\w+)\s*\[[^\]]*\]\s*(\S*)", line)
        if not match:
            continue
        indent, thunk_id, kind, name = len(match.group(1)), int(match.group(2)), match.group(3), match.group(4)
        while enclosing and indent <= enclosing[-1].indent:
            enclosing.pop()
        annotation = annotations.get(thunk_id, name)
        if kind == "kWhile":
            trips = _trip_count(instructions.get(annotation))
            loops.append(trips)
            per_loop.append(_Counts(depth=sum(e.loop is not None for e in enclosing)))
            enclosing.append(_Enclosing(indent, kind, trips or 1, annotation, len(per_loop) - 1))
            continue
        if kind in _STRUCTURAL:
            command_buffers += kind == "kCommandBuffer"
            enclosing.append(_Enclosing(indent, kind, 1, annotation, None))
            continue
        times = math.prod(e.iterations for e in enclosing)
        if all(e.kind != "kCommandBuffer" for e in enclosing):
            outside += times
        written = 0
        if kind in _COPIES:
            # A copy inside a dynamic-slice fusion has no annotation of its own: it writes the fusion's result.
            if annotation not in instructions:
                annotation = next((e.annotation for e in reversed(enclosing) if e.annotation in instructions),
                                  annotation)
            written = _array_bytes(instructions.get(annotation, ("",))[0])
        label = re.sub(r"([._]\d+)+$", "", f"copy:{annotation}" if kind in _COPIES else (name or annotation))
        call.add(times, kind in _COPIES, written, label)
        for depth, loop in enumerate(enclosing):
            if loop.loop is not None:  # this launch's count per iteration of that loop
                per_iteration = math.prod(e.iterations for e in enclosing[depth + 1:])
                per_loop[loop.loop].add(per_iteration, kind in _COPIES, written, label)
    return StepStructure(call.launches, call.copies, call.copy_bytes, outside, command_buffers, tuple(loops),
                         tuple(call.kernels.most_common()), tuple(c.iteration() for c in per_loop))


class _Enclosing(NamedTuple):
    """A structural thunk around the lines that follow it: its indent, kind, iterations per call of its parent
    (a while loop's trip count, else 1), annotation and, for a while loop, its index in `loops`."""

    indent: int
    kind: str
    iterations: int
    annotation: str
    loop: int | None


@dataclasses.dataclass
class _Counts:
    """Launches counted so far, for a whole call or one iteration of a loop at `depth`."""

    depth: int = 0
    launches: int = 0
    copies: int = 0
    copy_bytes: int = 0
    kernels: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def add(self, times: int, is_copy: bool, written: int, label: str) -> None:
        self.launches += times
        self.copies += times * is_copy
        self.copy_bytes += times * written
        self.kernels[label] += times

    def iteration(self) -> LoopIteration:
        return LoopIteration(self.depth, self.launches, self.copies, self.copy_bytes,
                             tuple(self.kernels.most_common()))


def _trip_count(instruction: tuple[str, str] | None) -> int | None:
    match = instruction and re.search(r'"known_trip_count":\{"n":"(\d+)"\}', instruction[1])
    return int(match.group(1)) if match else None


def _array_bytes(shape: str) -> int:
    """Bytes of an HLO array shape such as `bf16[1,2816,2112]{2,1,0}` (0 for a tuple). An HLO element type
    names its width in bits (`s32`, `bf16`, `f8e4m3fn`), except `pred` (one byte)."""
    match = re.match(r"^([a-z]+)(\d*)\w*\[([\d,]*)\]", shape)
    if not match or not (match.group(2) or match.group(1) == "pred"):
        return 0
    itemsize = int(match.group(2)) // 8 if match.group(2) else 1
    return itemsize * math.prod(int(d) for d in match.group(3).split(",") if d)


def gpu_device(target: str) -> Any:
    """A compile-only device of the GPU `target` describes (a name under `TARGETS_DIR`, e.g. "h200", or a
    path to a `GpuTargetConfigProto` text file). Raises `RuntimeError` naming the missing plugin if JAX's
    CUDA plugin is not installed."""
    from jax.experimental import topologies

    path = pathlib.Path(target)
    if not path.is_file():
        path = TARGETS_DIR / f"{target}.txtpb"
        if not path.is_file():
            known = sorted(p.stem for p in TARGETS_DIR.glob("*.txtpb"))
            raise ValueError(f"unknown GPU target {target!r}: one of {known} or a GpuTargetConfigProto text file")
    try:
        topology = topologies.get_topology_desc("", "cuda", topology="1x1x1", target_config=path.read_text())
    except (RuntimeError, KeyError, ValueError) as exc:  # jaxlib's errors subclass RuntimeError
        raise RuntimeError(
            f"cannot compile for a GPU here ({type(exc).__name__}: {str(exc)[:200]}): it needs JAX's CUDA plugin "
            "(pip install \"jax[cuda13]\" of this JAX's version; no GPU or driver needed)"
        ) from exc
    return topology.devices[0]


def compile_structure(fn: Any, args: tuple[Any, ...], device: Any,
                      compiler_options: dict[str, Any] | None = None) -> StepStructure:
    """Compile the jitted `fn(*args)` for `device` (`gpu_device`) on abstract `args` (ShapeDtypeStructs;
    placed on `device` here), with XLA's `compiler_options` beside the dump's, and count what one call
    launches."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    with tempfile.TemporaryDirectory() as dump:
        fn.trace(*placed).lower().compile(compiler_options={**(compiler_options or {}), "xla_dump_to": dump})
        files = {p.name: p for p in pathlib.Path(dump).iterdir()}

        def read(suffix: str) -> str:
            found = sorted(name for name in files if name.endswith(suffix))
            if not found:
                raise RuntimeError(f"XLA wrote no *{suffix} (files: {sorted(files)[:8]}...)")
            return files[found[-1]].read_text()

        after = [name for name in files if name.endswith("thunk_sequence_after_thunk_passes.txt")]
        sequence = files[after[-1]].read_text() if after else read("thunk_sequence.txt")
        return step_structure(sequence, read("thunk_metadata.txt"), read("gpu_after_optimizations.txt"))


def compile_decoder_step(config: Config, batch: int, prompt: int, target: str = "h200",
                         compiler_options: dict[str, Any] | None = None) -> StepStructure:
    """The structure of one decoder step (`diffjax.model.denoise_logits` with self-conditioning logits, on a
    cache of `prompt` tokens), bf16 weights, compiled for the GPU `target` names (`gpu_device`). The Pallas
    kernels are compiled for the GPU (not interpreted) whatever this machine's backend is."""
    from diffjax.model import _denoise_logits

    logits = jax.ShapeDtypeStruct((batch, config.canvas_length, config.vocab_size), jnp.bfloat16)
    row_mask = jax.ShapeDtypeStruct((batch,), jnp.bool_)
    return _compile_on_cache(
        lambda params, cache, ids, logits, rows: _denoise_logits(params, config, cache, ids, logits, rows),
        config, batch, prompt, target, (logits, row_mask), compiler_options=compiler_options)


def compile_encoder_step(config: Config, batch: int, prompt: int, target: str = "h200",
                         compiler_options: dict[str, Any] | None = None) -> StepStructure:
    """The structure of the encoder's pass over one canvas (appending it to a cache of `prompt` tokens, as
    `generate` does after each canvas), compiled like `compile_decoder_step`. The cache is donated, as in
    `generate`'s loop, where it is carried from canvas to canvas: without that the pass would copy every cache
    stack to a new buffer first (0.24 GB per pass at batch 1, 1.9 GB at batch 8)."""
    from diffjax.model import _encode

    mask = jax.ShapeDtypeStruct((batch, config.canvas_length), jnp.bool_)
    return _compile_on_cache(lambda params, cache, ids, mask: _encode(params, config, ids, mask, cache),
                             config, batch, prompt, target, (mask,), donate_cache=True,
                             compiler_options=compiler_options)


def compile_generate(config: Config, batch: int, prompt: int, target: str = "h200", statistics: str = "pallas",
                     compiler_options: dict[str, Any] | None = None) -> StepStructure:
    """The structure of a whole `generate` call (prefill, then a loop over canvases holding the denoising loop
    and the encoder's pass), two canvases, the default sampler and stopping rule, compiled like
    `compile_decoder_step`. Its loops have no known trip count, so the totals count each body once; the
    denoising loop's `loop_iterations` entry (`generate_pass`) is what one pass launches and copies, to set
    beside the decoder step alone."""
    from diffjax import kernels
    from diffjax.generate import GenerationSettings, _generate, make_components, node_types
    from diffjax.model import param_shapes

    settings = GenerationSettings(max_new_tokens=2 * config.canvas_length, eos_token_id=config.eos_token_id,
                                  statistics=statistics)
    settings.validate(config)

    def run(params, ids, mask, key, components):
        return _generate(params, config, settings, ids, mask, key, None, components, None, node_types(components))

    ids = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, prompt), jnp.bool_)
    key = jax.eval_shape(lambda: jax.random.key(0))
    components = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, make_components()))
    with kernels.compiling_for_gpu():
        return compile_structure(jax.jit(run), (param_shapes(config), ids, mask, key, components),
                                 gpu_device(target), compiler_options)


def generate_pass(structure: StepStructure) -> LoopIteration:
    """The denoising loop's iteration in a `compile_generate` structure: the outermost loop of unknown trip
    count inside another (the canvas loop)."""
    for trips, iteration in zip(structure.loops, structure.loop_iterations, strict=True):
        if trips is None and iteration.depth == 1:
            return iteration
    raise ValueError(f"no denoising loop among the loops {structure.loops}: not a compiled `generate`")


def _compile_on_cache(step: Any, config: Config, batch: int, prompt: int, target: str,
                      more: tuple[jax.ShapeDtypeStruct, ...], donate_cache: bool = False,
                      compiler_options: dict[str, Any] | None = None) -> StepStructure:
    """`step(params, cache, canvas_ids, *more)` on bf16 weights and a cache with room for `prompt` tokens and a
    canvas, compiled for `target` with the Pallas kernels compiled, not interpreted."""
    from diffjax import kernels
    from diffjax.model import init_cache, param_shapes

    device = gpu_device(target)
    cache = jax.eval_shape(lambda: init_cache(config, batch, prompt + config.canvas_length, jnp.bfloat16))
    canvas = jax.ShapeDtypeStruct((batch, config.canvas_length), jnp.int32)
    with kernels.compiling_for_gpu():
        return compile_structure(jax.jit(step, donate_argnums=(1,) if donate_cache else ()),
                                 (param_shapes(config), cache, canvas, *more), device, compiler_options)
