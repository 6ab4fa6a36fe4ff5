"""Speed of `diffjax.generate` against transformers' `DiffusionGemmaForBlockDiffusion.generate`.

Two modes (`diffjax bench --help`):

* comparison (default, CPU-sized): one random config, the transformers model built and randomised in torch,
  saved with `save_pretrained` and read back through `convert.load_hf`, so both sides run IDENTICAL weights
  in float32 on the same prompt, batch, canvas and a FIXED number of denoising steps (adaptive stopping and
  EOS disabled on both sides, so every canvas runs every step). Reported per side: first call (ours: compile
  + run), a warmed-up call, decoder passes, ms per decoder step (warm call / passes; the prompt and canvas
  encodes are amortised into it), tokens/s, and the ratio ours / transformers (lower is faster). Timings are
  the best of `repeats` warm calls: on a shared machine the minimum is the least disturbed by other load.
* `--full-size`: the released 26B-A4B shapes (optionally fewer layers) with random bf16 weights created on
  the device by one jitted init (nothing crosses from the host), timed against the memory floor of a step:
  parameter bytes a decoder step reads / measured device copy bandwidth. GPU only unless `--force`. With
  `--experts-fp8` the experts are float8_e4m3fn with float32 per-column scales (`diffjax.quantize`), and the
  floor counts those bytes (about half of bf16's). Beside it the compute floor: the step's necessary FLOPs
  (`decoder_flops_per_step`) / measured bf16 matmul throughput, the bound from batch ~8 on; "x roofline" is
  the step against the larger of the two.

torch and transformers are optional (the `test` extra): imported only when the transformers side runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.config import (
    BLOCK_LAYOUTS,
    FULL,
    MLP_IMPLEMENTATIONS,
    MOE_IMPLEMENTATIONS,
    NORM_IMPLEMENTATIONS,
    PROJECTION_LAYOUTS,
    ROUTING_IMPLEMENTATIONS,
    SLIDING,
    SLIDING_ATTENTION_IMPLEMENTATIONS,
    AttentionConfig,
    Config,
    KernelTiles,
    gemma4_layer_types,
    require_pretiled_readers,
)
from diffjax.generate import STATISTICS
from diffjax.layout import relayout
from diffjax.model import KVCache, init_params, param_shapes
from diffjax.profile import kernel_times, render_kernel_times

RESULT_KEYS = ("first_call_s", "compile_s", "warm_call_s", "decoder_passes", "ms_per_step", "tokens_per_s")


class BenchError(RuntimeError):
    """A benchmark that cannot run here (missing optional dependency, no GPU); the message says why."""


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """Sizes of the comparison run. Defaults: a CPU-sized model that still has every structural feature."""

    hidden: int = 256
    layers: int = 4
    experts: int = 8
    top_k: int = 2
    vocab: int = 4096
    canvas: int = 64
    steps: int = 12
    batch: int = 2
    prompt: int = 32
    new_tokens: int = 128
    repeats: int = 3
    seed: int = 0
    transformers: bool = True
    threads: int | None = None
    moe_implementation: str = "grouped"
    statistics: str = "logits"

    def validate(self) -> None:
        if self.statistics not in STATISTICS:
            raise ValueError(f"--statistics must be one of {STATISTICS}, got {self.statistics!r}")
        for name in ("hidden", "layers", "experts", "top_k", "vocab", "canvas", "steps", "batch", "prompt",
                     "new_tokens", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.top_k > self.experts:
            raise ValueError(f"--top-k ({self.top_k}) must be <= --experts ({self.experts})")
        if self.hidden % 64:
            raise ValueError(f"--hidden must be a multiple of 64, the sizes the comparison model (4 heads of "
                             f"hidden/4 dims) is tested at, got {self.hidden}")
        if self.vocab < 8:
            raise ValueError(f"--vocab must be at least 8, got {self.vocab}")


def bench_config(s: BenchSettings) -> Config:
    """The comparison model: 4 heads, sliding head_dim hidden/4 (2 kv heads), k_eq_v global layers of twice that."""
    head_dim = s.hidden // 4
    return Config(
        vocab_size=s.vocab, hidden_size=s.hidden, num_layers=s.layers, layer_types=gemma4_layer_types(s.layers, 4),
        num_heads=4,
        sliding=AttentionConfig(head_dim=head_dim, num_kv_heads=2, rope_theta=10_000.0),
        full=AttentionConfig(head_dim=2 * head_dim, num_kv_heads=1, rope_theta=1_000_000.0,
                             rope_type="proportional", partial_rotary_factor=0.25),
        # Shorter than prompt + generated tokens, so the sliding layers' ring cache is exercised too.
        sliding_window=max(2, min(128, s.prompt + s.new_tokens - 1)),
        intermediate_size=2 * s.hidden, num_experts=s.experts, top_k_experts=s.top_k,
        moe_intermediate_size=max(8, s.hidden // 2), canvas_length=s.canvas,
        max_position_embeddings=max(4096, s.prompt + s.new_tokens + s.canvas),
        eos_token_id=(1,), moe_implementation=s.moe_implementation,
    )


# ------------------------------------------------------------------------------------ transformers side


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BenchError(
            f"the transformers side needs torch and transformers ({exc.name} is missing): "
            "pip install -e '.[test]', or pass --no-transformers"
        ) from None
    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        raise BenchError(
            f"transformers {transformers.__version__} has no DiffusionGemmaForBlockDiffusion (need 5.23.0)"
        )
    return torch, transformers


def random_hf_model(config: Config, seed: int, dtype: Any = None, device: Any = None) -> Any:
    """A transformers DiffusionGemma with every text weight random (the recipe of tests/reference.py, milder
    scales so activations stay in a normal float range over many steps).

    Encoder and decoder layer scalars get different values, as a trained checkpoint has.
    """
    torch, transformers = _import_torch()
    torch.manual_seed(seed)
    hf_config = transformers.DiffusionGemmaConfig(**config.to_hf())
    with torch.device(device or "cpu"):
        model = transformers.DiffusionGemmaForBlockDiffusion(hf_config)
    model = model.to(dtype or torch.float32).eval()
    generator = torch.Generator(device=device or "cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "vision" in name or "inv_freq" in name or "embed_scale" in name:
                continue
            if name.endswith("layer_scalar"):
                value = (0.7 if "encoder" in name else 1.2) + 0.2 * torch.rand(
                    tensor.shape, generator=generator, device=tensor.device)
            elif "norm" in name or name.endswith("router.scale") or name.endswith("per_expert_scale"):
                value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator, device=tensor.device)
            else:
                value = 0.05 * torch.randn(tensor.shape, generator=generator, device=tensor.device)
            tensor.copy_(value)
    return model


def time_transformers(
    model: Any, prompt_ids: np.ndarray, *, new_tokens: int, steps: int, repeats: int, threads: int | None,
    seed: int, device: Any = None, compile: bool = False,
) -> dict[str, float]:
    """Time `model.generate` at a fixed step count: a warm-up call, then `repeats` timed calls (the best).

    `compile`: a static cache, which makes their generate torch.compile its encoder, decoder and sampler
    ("reduce-overhead", CUDA graphs); the first call pays the compilation."""
    torch, _ = _import_torch()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device or "cpu")
    mask = torch.ones_like(ids, dtype=torch.bool)
    sync = torch.cuda.synchronize if (device and str(device).startswith("cuda")) else (lambda: None)
    kwargs = dict(
        attention_mask=mask, max_new_tokens=new_tokens, max_denoising_steps=steps,
        # None disables both adaptive stopping and EOS: every canvas runs every step.
        stability_threshold=None, confidence_threshold=None, eos_token_id=None, pad_token_id=None,
    )
    if compile:
        kwargs["cache_implementation"] = "static"

    def call() -> tuple[float, Any]:
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        sync()
        return time.perf_counter() - start, out

    torch.manual_seed(seed)
    first, out = call()
    times = [call()[0] for _ in range(repeats)]
    # With pad_token_id=None every generated position counts, so passes = generated length / tokens_per_forward.
    generated = out.sequences.shape[1] - ids.shape[1]
    passes = round(generated / float(out.tokens_per_forward[0]))
    warm = min(times)
    return {
        "first_call_s": first, "compile_s": float("nan"), "warm_call_s": warm, "decoder_passes": passes,
        "ms_per_step": 1e3 * warm / passes, "tokens_per_s": ids.shape[0] * generated / warm,
        "warm_calls_s": times,
    }


# ------------------------------------------------------------------------------------------ our side


def time_diffjax(
    params: Any, config: Config, prompt_ids: np.ndarray, *, new_tokens: int, steps: int, repeats: int, seed: int,
    prefill_chunk_size: int = 2048, statistics: str = "logits",
) -> dict[str, float]:
    """Time our `generate` at a fixed step count: the first call compiles; then `repeats` timed calls (the best).

    compile_s = first call - best warm call (the first call also runs once).
    """
    from diffjax.generate import generate

    ids = jnp.asarray(prompt_ids, jnp.int32)

    def call(i: int) -> tuple[float, Any]:
        start = time.perf_counter()
        out = generate(
            params, config, ids, key=jax.random.key(seed + i), max_new_tokens=new_tokens,
            max_denoising_steps=steps, stability_threshold=None, confidence_threshold=None, eos_token_id=None,
            prefill_chunk_size=prefill_chunk_size, statistics=statistics,
        )
        jax.block_until_ready(out.sequences)
        return time.perf_counter() - start, out

    first, out = call(0)
    times = [call(i + 1)[0] for i in range(repeats)]
    warm = min(times)
    passes = int(np.max(np.asarray(out.decoder_passes)))
    generated = out.sequences.shape[1] - ids.shape[1]
    return {
        "first_call_s": first, "compile_s": max(first - warm, 0.0), "warm_call_s": warm, "decoder_passes": passes,
        "ms_per_step": 1e3 * warm / passes, "tokens_per_s": ids.shape[0] * generated / warm,
        "warm_calls_s": times,
    }


def prompt_ids(config: Config, batch: int, length: int, seed: int) -> np.ndarray:
    # Ids from 3 up: no pad/eos/bos inside the prompt, so nothing special happens to it on either side.
    return np.random.default_rng(seed).integers(3, config.vocab_size, (batch, length), dtype=np.int64)


def run_comparison(s: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The CPU comparison. Returns {"settings", "config", "device", "diffjax", "transformers", "ratio"}."""
    import convert

    s.validate()
    config = bench_config(s)
    ids = prompt_ids(config, s.batch, s.prompt, s.seed)
    result: dict[str, Any] = {
        "settings": dataclasses.asdict(s), "device": str(jax.devices()[0]), "transformers": None, "ratio": None,
    }
    if s.transformers:
        log("building the random transformers model")
        model = random_hf_model(config, s.seed)
        with tempfile.TemporaryDirectory(prefix="diffjax-bench-") as tmp:
            model.save_pretrained(tmp)
            loaded_config, params = convert.load_hf(tmp)
        # The implementation choices are ours alone: they do not travel through a transformers config.
        loaded_config = loaded_config.replace(**config.implementation())
        if loaded_config != config:
            raise BenchError(f"config changed on the way through transformers: {loaded_config} != {config}")
        log(f"timing transformers ({s.repeats} warm calls)")
        result["transformers"] = time_transformers(
            model, ids, new_tokens=s.new_tokens, steps=s.steps, repeats=s.repeats, threads=s.threads, seed=s.seed,
        )
        result["torch_threads"] = _torch_threads()
        del model
    else:
        params = init_params(config, jax.random.key(s.seed))
    log(f"timing diffjax (compile + {s.repeats} warm calls)")
    result["diffjax"] = time_diffjax(
        params, config, ids, new_tokens=s.new_tokens, steps=s.steps, repeats=s.repeats, seed=s.seed,
        statistics=s.statistics,
    )
    if result["transformers"]:
        result["ratio"] = result["diffjax"]["ms_per_step"] / result["transformers"]["ms_per_step"]
    result["config"] = _config_summary(config)
    return result


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _config_summary(config: Config) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "num_layers": config.num_layers,
        "layer_types": "".join("F" if t == FULL else "S" for t in config.layer_types),
        "num_experts": config.num_experts, "top_k_experts": config.top_k_experts,
        "canvas_length": config.canvas_length, "expert_quantization": config.expert_quantization,
        "expert_layout": config.expert_layout,
    }


# ------------------------------------------------------------------------------------------ full size


def parse_xla_options(text: str) -> dict[str, bool | int | float | str]:
    """`"xla_a=true,xla_b=4,xla_c=FUSION,CUBLAS"` -> `{"xla_a": True, "xla_b": 4, "xla_c": "FUSION,CUBLAS"}`:
    XLA debug options for one compile (`compile(compiler_options=...)`). A comma starts the next option only
    where `name=` follows it, so list values keep theirs. Values are read as booleans, integers or floats where
    they are, strings otherwise (`xla_name=`: the empty string, e.g. an empty list); "" -> {}. XLA itself
    refuses a name it does not know, when the step compiles."""
    raw: dict[str, str] = {}
    name = None
    for part in filter(None, (part.strip() for part in text.split(","))):
        if "=" in part:
            name, _, value = part.partition("=")
            if not name.startswith("xla_"):
                raise ValueError(f"--xla-options: expected comma-separated xla_name=value items, got {part!r} in "
                                 f"{text!r}")
            raw[name] = value
        elif name is not None:
            raw[name] += "," + part
        else:
            raise ValueError(f"--xla-options: expected comma-separated xla_name=value items, got {part!r} in "
                             f"{text!r}")
    return {name: _option_value(value) for name, value in raw.items()}


def _option_value(value: str) -> bool | int | float | str:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


@dataclasses.dataclass(frozen=True)
class FullSizeSettings:
    """A sweep over (prompt, batch) at the released shapes. Per point: one decoder step and one encoder
    canvas timed alone (jitted calls on a prefilled cache), and with `generate` the whole loop at a fixed step
    count. With `transformers`, their `generate` on the same config, prompt and batch (same process)."""

    layers: int | None = None
    batches: tuple[int, ...] = (1,)
    prompts: tuple[int, ...] = (1024,)
    new_tokens: int = 256
    steps: int = 16
    repeats: int = 3
    seed: int = 0
    force: bool = False
    generate: bool = True
    transformers: bool = False
    # torch.compile + static cache on the transformers side (what their generate does on a GPU when asked).
    transformers_compile: bool = True
    prefill_chunk: int = 2048
    # Expert implementations to time at each point (same weights): see `Config.moe_implementation`.
    moe_implementations: tuple[str, ...] = ("grouped",)
    # How the whole loop turns the decoder's output into the sampler's input (`generate`'s `statistics`):
    # each value gives its own row (same decoder and encoder timings, its own generate timing).
    statistics: tuple[str, ...] = ("logits",)
    # float8_e4m3fn experts with float32 per-column scales (`Config.expert_quantization="fp8"`).
    experts_fp8: bool = False
    # Experts laid out for the Pallas kernels (`Config.expert_layout="pretiled"`): "pallas" / "pallas_mgpu" only.
    experts_pretiled: bool = False
    # `Config.global_attention_implementation` of every point.
    global_attention: str = "xla"
    # `Config.sliding_attention_implementation` and `Config.scan_unroll` values to time at each point (same
    # weights, like the expert implementations). scan_unroll 1 loops over the layer blocks, their count
    # unrolls the loop.
    sliding_attention: tuple[str, ...] = ("xla",)
    scan_unroll: tuple[int, ...] = (1,)
    # `Config.projection_layout` and `Config.block_layout` values to time at each point: the random weights are
    # made in the first of each, and laid out for the others on the device (`diffjax.layout.relayout`: a second
    # copy of the dense projections, or of the whole model for the other block layout).
    projections: tuple[str, ...] = ("separate",)
    blocks: tuple[str, ...] = ("stacked",)
    # `Config.routing_implementation` values to time at each point (same weights).
    routing: tuple[str, ...] = ("xla",)
    # `Config.norm_implementation` values to time at each point (same weights).
    norms: tuple[str, ...] = ("xla",)
    # `Config.mlp_implementation` values to time at each point (same weights; "pallas" needs --moe pallas and
    # fused projections).
    mlp: tuple[str, ...] = ("xla",)
    # XLA compile options for the decoder step and the encoder canvas, each value one variant (same weights):
    # comma-separated `name=value` of XLA's debug options (`parse_xla_options`), "" for the defaults. Per
    # compile, so options such as `xla_gpu_enable_command_buffer=` (no CUDA graphs) are compared in one process.
    xla_options: tuple[str, ...] = ("",)
    # Pallas kernel tiles, each value one variant (same weights): `config.KernelTiles.parse` text, e.g.
    # "sliding_attention.block_k=64,routing.project=false"; "" for every kernel's defaults. Times a kernel
    # sweep's winners in the whole step, beside the defaults, in one process.
    tiles: tuple[str, ...] = ("",)
    # Size of the array copied to measure bandwidth: 4 GiB (well past any cache) on an accelerator, less on a
    # CPU where the full-size model already fills most of the host memory.
    bandwidth_bytes: int | None = None
    # Side of the square bf16 matmul timed for the compute side of the roofline: 8192 on an accelerator (~1.1
    # TFLOP, ~1.5 ms on an H100), 1024 on a CPU.
    matmul_size: int | None = None
    # A folder: one more decoder step per point under the profiler (`diffjax.profile`), its trace kept there
    # and its kernels summed by name in the point (`decoder_kernels`) and the log.
    profile_dir: str | None = None
    # The decoder step alone, on a cache of random keys and values: no prefill and no encoder canvas compiled
    # or timed (two of a point's three full-size compiles, ~30 s each with every kernel), for tile and option
    # sweeps where only the step changes.
    decoder_only: bool = False

    def validate(self) -> None:
        for name in ("new_tokens", "steps", "repeats", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("batches", "prompts"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v <= 0 for v in values):
                raise ValueError(f"--{name[:-1]} takes positive integers, got {values!r}")
        unknown = set(self.moe_implementations) - set(MOE_IMPLEMENTATIONS)
        if not self.moe_implementations or unknown:
            raise ValueError(f"--moe takes values of {MOE_IMPLEMENTATIONS}, got {self.moe_implementations!r}")
        if self.experts_pretiled:
            require_pretiled_readers(self.moe_implementations)
        if not self.statistics or set(self.statistics) - set(STATISTICS):
            raise ValueError(f"--statistics takes values of {STATISTICS}, got {self.statistics!r}")
        for flag, values, known in (("sliding-attention", self.sliding_attention, SLIDING_ATTENTION_IMPLEMENTATIONS),
                                    ("projections", self.projections, PROJECTION_LAYOUTS),
                                    ("blocks", self.blocks, BLOCK_LAYOUTS),
                                    ("routing", self.routing, ROUTING_IMPLEMENTATIONS),
                                    ("norms", self.norms, NORM_IMPLEMENTATIONS),
                                    ("mlp", self.mlp, MLP_IMPLEMENTATIONS)):
            # A string would pass as a tuple of its letters.
            if isinstance(values, str) or not values or set(values) - set(known):
                raise ValueError(f"--{flag} takes values of {known}, got {values!r}")
        if "pallas" in self.mlp and (set(self.moe_implementations) != {"pallas"} or set(self.projections) != {"fused"}):
            raise ValueError("--mlp pallas runs the dense MLP in the Pallas expert kernels: it needs --moe pallas and "
                             "--projections fused only")
        if isinstance(self.xla_options, str) or not self.xla_options:
            raise ValueError(f"--xla-options takes one or more option lists, got {self.xla_options!r}")
        for options in self.xla_options:
            parse_xla_options(options)
        if isinstance(self.tiles, str) or not self.tiles:
            raise ValueError(f"--tiles takes one or more tile settings, got {self.tiles!r}")
        for tiles in self.tiles:
            KernelTiles.parse(tiles)
        if not self.scan_unroll or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0
                                       for v in self.scan_unroll):
            raise ValueError(f"--scan-unroll takes positive integers, got {self.scan_unroll!r}")
        if self.layers is not None and not 0 < self.layers <= 30:
            raise ValueError(f"--layers must be in [1, 30] for --full-size, got {self.layers}")
        if self.transformers and not self.generate:
            raise ValueError("--with-transformers compares whole generate loops: drop --no-generate")
        if self.decoder_only and self.generate:
            raise ValueError("--decoder-only times the decoder step alone: add --no-generate (the whole loop "
                             "compiles its own prefill and encoder)")


def full_size_config(layers: int | None) -> Config:
    config = Config.diffusiongemma_26b_a4b()
    if layers is None or layers == config.num_layers:
        return config
    return config.replace(num_layers=layers, layer_types=gemma4_layer_types(layers))


def decoder_bytes_per_step(params: Any) -> int:
    """Bytes of the weights one decoder step reads, assuming every expert is hit (256 tokens x top-8 of 128
    leaves an expert untouched with probability (1 - 8/128)^256 ~ 7e-8). The encoder's layer scalars are not
    read; the embedding is counted once (a fused `softmax(h E^T) E` streams it once for logits and
    self-conditioning together), so this is a floor, not what today's implementation reads. Each leaf counts
    in its own dtype: fp8 experts are one byte per weight plus their float32 scales."""
    return sum(decoder_bytes_by_part(params).values())


# The parts of a decoder step's weights, by the first of these names in a leaf's path (else "other": norms,
# the router, layer scalars).
WEIGHT_PARTS = {"experts": "experts", "self_attn": "attention", "mlp": "dense mlp", "embedding": "embedding"}


def decoder_bytes_by_part(params: Any) -> dict[str, int]:
    """`decoder_bytes_per_step` split into `WEIGHT_PARTS`: the floor of each part of the step, to set against
    the profile's kernels."""
    parts = dict.fromkeys([*WEIGHT_PARTS.values(), "other"], 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(p, "key", None) for p in path]
        if keys[-1] == "encoder_layer_scalar":
            continue
        part = next((WEIGHT_PARTS[k] for k in keys if k in WEIGHT_PARTS), "other")
        parts[part] += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    return parts


def decoder_flops_per_step(config: Config, batch: int, prompt: int) -> int:
    """Floating-point operations of one decoder step (multiply and add counted apart) that no implementation
    can skip: every dense weight once per canvas token, each token's top-k experts (not all of them), the tied
    embedding twice (the logits and the self-conditioning product `softmax(z) @ E`), and attention over the keys
    a canvas row sees (the canvas, plus the prompt on full layers or its last `window - 1` positions on sliding
    ones). Norms, softmaxes and other elementwise work are left out (~1% at the released shapes)."""
    tokens = batch * config.canvas_length
    plain = config.replace(expert_layout="plain", expert_quantization="none")
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(plain))[0]:
        keys = [getattr(p, "key", None) for p in path]
        size = math.prod(leaf.shape)
        if keys[-1] == "kernel":
            total += 2 * tokens * size
        elif "experts" in keys:
            total += 2 * tokens * size * config.top_k_experts // config.num_experts
        elif keys[-1] == "embedding":
            total += 2 * 2 * tokens * size
    for layer_type in config.layer_types:
        context = min(prompt, config.sliding_window - 1) if layer_type == SLIDING else prompt
        # scores and the weighted sum of values: two products of [heads, head_dim] by the keys, per token
        total += 2 * 2 * tokens * config.num_heads * config.attention(layer_type).head_dim * (
            config.canvas_length + context)
    return total


def cache_bytes(cache: Any) -> int:
    """Bytes of the cached keys and values: a decoder step reads all of them once."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves((cache.keys, cache.values)))


def copy_bandwidth(nbytes: int, repeats: int = 10) -> float:
    """Device copy bandwidth in bytes/s: read + write of an `nbytes` array per call, best of `repeats`."""
    n = max(nbytes // 4, 1)
    x = jnp.zeros((n,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(copy(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(copy(x))
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def matmul_throughput(size: int, repeats: int = 10) -> float:
    """Device bf16 matmul throughput in FLOP/s (float32 accumulation): `[size, size] @ [size, size]`, best of
    `repeats`. What a well-tuned large product reaches here, the compute side of the roofline."""
    a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.bfloat16)
    product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    _, seconds = best_time(lambda: product(a, b), repeats)
    return 2 * size**3 / seconds


def peak_memory_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def best_time(fn: Callable[[], Any], repeats: int, calls: int = 1) -> tuple[float, float]:
    """(first call incl. compile, best of `repeats` warm samples) in seconds. A sample is `calls` calls queued
    back to back and waited for once, over `calls`: JAX dispatches asynchronously, so with several calls a
    short kernel's device time is measured, not the host's dispatch of one call and its wait for the result
    (tens of microseconds, most of a 0.1 ms kernel)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([fn() for _ in range(calls)])
        best = min(best, (time.perf_counter() - start) / calls)
    return first, best


# Kernel names kept per profiled decoder step (the largest; the trace on disk has them all).
PROFILED_KERNELS = 40
# The parts of a decoder step, by the name prefixes of their kernels (the Pallas kernels' `name`s, cuBLAS's and
# XLA's matmuls, cuDNN's attention, copies); the first part a name matches takes it, "other" the rest.
STEP_PARTS = (
    ("experts", ("moe_gate_up", "moe_down", "moe_mgpu_")),
    ("attention", ("global_attention_", "attention_inputs", "cudnn", "fmha", "flash")),
    ("routing", ("route", "expert_rows")),
    ("norms", ("moe_inputs",)),
    ("vocabulary", ("vocab_stats",)),
    ("matmuls", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("copies", ("Memcpy", "copy")),
)


def step_parts(kernels: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`kernel_times`' kernels summed by part of the step (`STEP_PARTS`): {part: {"count", "total_us"}}, in
    `STEP_PARTS` order, then "other"."""
    parts = {name: {"count": 0, "total_us": 0.0} for name, _ in (*STEP_PARTS, ("other", ()))}
    for kernel in kernels:
        part = next((name for name, prefixes in STEP_PARTS if kernel["name"].startswith(prefixes)), "other")
        parts[part]["count"] += kernel["count"]
        parts[part]["total_us"] += kernel["total_us"]
    return parts


# `decoder_looped_ms` is the time one compiled loop takes for 1 + LOOPED_STEPS steps less its time for 1, over
# LOOPED_STEPS: the call's dispatch and wait (~3.7 ms at the released shapes on an H200) cancel out.
LOOPED_STEPS = 4


def random_cache(config: Config, batch: int, prompt: int, dtype: Any, seed: int) -> KVCache:
    """A cache as if `prompt` tokens had been written, with random keys and values: what a decoder step reads,
    for timing it without compiling a prefill."""
    from diffjax.model import init_cache

    empty = init_cache(config, batch, prompt + config.canvas_length, dtype)
    names = sorted(empty.keys)
    draws = iter(jax.random.split(jax.random.key(seed), 2 * len(names)))

    def fill(arrays: dict[str, Any]) -> dict[str, Any]:
        return {name: jax.random.normal(next(draws), arrays[name].shape, dtype) for name in names}

    mask = jnp.broadcast_to(jnp.arange(empty.capacity) < prompt, empty.mask.shape)
    return empty.replace(keys=fill(empty.keys), values=fill(empty.values), mask=mask,
                         length=jnp.asarray(prompt, jnp.int32))


@functools.partial(jax.jit, static_argnames=("config",))
def _looped_decoder_steps(params: Any, config: Config, cache: Any, canvas_ids: Any, self_conditioning_logits: Any,
                          self_conditioning_mask: Any, count: Any) -> Any:
    """`count` (traced: one program for every count) decoder steps in one loop, each self-conditioned on the
    last one's logits as in `generate`, whose denoising loop also has a trip count known only on the device:
    the steps depend on each other, so XLA can hoist none of them out of the loop."""
    from diffjax.model import _denoise_logits

    def step(_: Any, logits: Any) -> Any:
        return _denoise_logits(params, config, cache, canvas_ids, logits, self_conditioning_mask).astype(logits.dtype)

    return jax.lax.fori_loop(0, count, step, self_conditioning_logits)


def time_steps(params: Any, config: Config, batch: int, prompt: int, s: FullSizeSettings,
               xla_options: str = "", tiles: str = "") -> dict[str, Any]:
    """One decoder step and one encoder canvas on a cache prefilled with `prompt` random tokens, each compiled
    with `xla_options` (`parse_xla_options`); `tiles` (the text of `config.kernel_tiles`) names the profile.
    The decoder step is timed three ways: one call (its dispatch and wait included), three calls queued, and
    in one compiled loop (`LOOPED_STEPS` more steps against one: the device's time per step, as inside
    `generate`, without the call's dispatch and wait). With
    `s.decoder_only`, the cache is random (`random_cache`) and the prefill and encoder are neither compiled
    nor timed (their fields are None)."""
    from diffjax.model import _denoise_logits, _encode, init_cache, param_dtype, prefill

    if prompt + config.canvas_length > config.max_position_embeddings:
        raise ValueError(f"prompt {prompt} + a canvas exceed the model's {config.max_position_embeddings} positions")
    prefill_first = prefill_s = None
    if s.decoder_only:
        cache = random_cache(config, batch, prompt, param_dtype(params), s.seed)
    else:
        ids = jnp.asarray(prompt_ids(config, batch, prompt, s.seed), jnp.int32)
        mask = jnp.ones_like(ids, bool)
        empty = init_cache(config, batch, prompt + config.canvas_length, param_dtype(params))
        fill = jax.jit(prefill, static_argnames=("config", "chunk_size"))
        prefill_first, prefill_s = best_time(
            lambda: fill(params, config, ids, mask, empty, chunk_size=s.prefill_chunk), 1)
        cache = fill(params, config, ids, mask, empty, chunk_size=s.prefill_chunk)
    canvas = jax.random.randint(jax.random.key(s.seed), (batch, config.canvas_length), 0, config.vocab_size)
    sc_logits = jnp.zeros((batch, config.canvas_length, config.vocab_size), param_dtype(params))
    sc_mask = jnp.ones((batch,), bool)

    options = parse_xla_options(xla_options)
    start = time.perf_counter()
    decoder = _denoise_logits.lower(params, config, cache, canvas, sc_logits, sc_mask).compile(options)
    decoder_compile_s = time.perf_counter() - start

    def decoder_step() -> Any:
        return decoder(params, cache, canvas, sc_logits, sc_mask)

    _, decoder_s = best_time(decoder_step, s.repeats)
    # Three steps queued back to back: the host's dispatch of one overlaps the device's work on the one before;
    # a lone call's time also holds its dispatch and wait.
    _, decoder_queued_s = best_time(decoder_step, s.repeats, calls=3)
    # `generate`'s loop runs on the device: its steps pay no dispatch each.
    one = jnp.asarray(1, jnp.int32)
    looped = _looped_decoder_steps.lower(params, config, cache, canvas, sc_logits, sc_mask, one).compile(options)
    _, looped_one_s = best_time(lambda: looped(params, cache, canvas, sc_logits, sc_mask, one), s.repeats)
    more = jnp.asarray(1 + LOOPED_STEPS, jnp.int32)
    _, looped_more_s = best_time(lambda: looped(params, cache, canvas, sc_logits, sc_mask, more), s.repeats)
    encoder_s = encoder_compile_s = None
    if not s.decoder_only:
        canvas_mask = jnp.ones_like(canvas, bool)
        start = time.perf_counter()
        encoder = _encode.lower(params, config, canvas, canvas_mask, cache).compile(options)
        encoder_compile_s = time.perf_counter() - start
        _, encoder_s = best_time(lambda: encoder(params, canvas, canvas_mask, cache)[0], s.repeats)
    profiled = {}
    if s.profile_dir is not None:
        trace_dir = pathlib.Path(s.profile_dir) / (
            f"decoder_prompt{prompt}_batch{batch}_{config.moe_implementation}_"
            f"{config.sliding_attention_implementation}_unroll{config.scan_unroll}_{config.projection_layout}_"
            f"{config.block_layout}_routing_{config.routing_implementation}_norms_{config.norm_implementation}"
            f"_mlp_{config.mlp_implementation}"
            + "".join(f"_{label}_{re.sub(r'[^A-Za-z0-9=]+', '_', text)}"
                      for label, text in (("xla", xla_options), ("tiles", tiles)) if text))
        try:
            breakdown = kernel_times(decoder_step, trace_dir)
            profiled["decoder_kernels"] = {**breakdown, "kernels": breakdown["kernels"][:PROFILED_KERNELS],
                                           "parts": step_parts(breakdown["kernels"])}
        except Exception as exc:  # a profiler that cannot trace here must not lose the timings
            profiled["decoder_kernels_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return {
        "prefill_s": prefill_s,
        "prefill_compile_s": None if prefill_first is None else max(prefill_first - prefill_s, 0.0),
        "decoder_ms": 1e3 * decoder_s, "decoder_queued_ms": 1e3 * decoder_queued_s,
        "decoder_looped_ms": 1e3 * (looped_more_s - looped_one_s) / LOOPED_STEPS,
        "decoder_compile_s": decoder_compile_s,
        "encoder_canvas_ms": None if encoder_s is None else 1e3 * encoder_s, "encoder_compile_s": encoder_compile_s,
        "cache_bytes": cache_bytes(cache),
        # A canvas costs `steps` decoder passes plus one encoder pass that appends it to the context.
        "tokens_per_s_at_steps": None if encoder_s is None else batch * config.canvas_length / (
            s.steps * decoder_s + encoder_s),
        **profiled,
    }


def _base_config(s: FullSizeSettings, config: Config | None) -> Config:
    """The released shapes (or `config`) with the expert storage and global attention of `s`; the variants of
    a sweep replace the other implementation fields."""
    config = config or full_size_config(s.layers)
    if s.experts_fp8:
        config = config.replace(expert_quantization="fp8")
    if s.experts_pretiled:  # random weights: made in the pretiled layout directly
        config = config.replace(expert_layout="pretiled", moe_implementation=s.moe_implementations[0])
    return config.replace(global_attention_implementation=s.global_attention)


# What tells the decoder steps of a sweep apart, as points name it.
VARIANT_KEYS = ("prompt", "batch", "moe", "sliding_attention", "scan_unroll", "projections", "blocks", "routing",
                "norms", "mlp", "xla_options", "tiles")
# The full-size table's column headers of VARIANT_KEYS, where shorter than the key.
_VARIANT_HEADERS = {"sliding_attention": "sliding", "scan_unroll": "unroll"}


def _variants(s: FullSizeSettings) -> list[dict[str, Any]]:
    """Every decoder step to run, as {VARIANT_KEYS: value}, in increasing (prompt, batch) order."""
    return [dict(zip(VARIANT_KEYS, values, strict=True)) for values in itertools.product(
        sorted(set(s.prompts)), sorted(set(s.batches)), s.moe_implementations, s.sliding_attention, s.scan_unroll,
        s.projections, s.blocks, s.routing, s.norms, s.mlp, s.xla_options, s.tiles)]


def _variant_config(config: Config, variant: dict[str, Any]) -> Config:
    return config.replace(
        moe_implementation=variant["moe"], sliding_attention_implementation=variant["sliding_attention"],
        scan_unroll=variant["scan_unroll"], projection_layout=variant["projections"], block_layout=variant["blocks"],
        routing_implementation=variant["routing"], norm_implementation=variant["norms"],
        mlp_implementation=variant["mlp"], kernel_tiles=KernelTiles.parse(variant["tiles"]))


def compiled_full_size(s: FullSizeSettings, target: str, log: Callable[[str], None] = lambda _: None,
                       config: Config | None = None) -> dict[str, Any]:
    """Every variant's decoder step and encoder canvas pass compiled on this machine for the GPU `target` names,
    and counted (`diffjax.compiled`: launches, device copies and their bytes, loops, command buffers); nothing
    runs. Needs JAX's CUDA plugin, not a GPU. Returns {"target", "points": [...], ...}: each point the decoder
    step's counts at its top level and the encoder's under "encoder"; with `s.generate`, under "generate" per
    `s.statistics` value one pass of `generate`'s denoising loop (`compiled.generate_pass`: what the loop
    runs per step, the step's sampler included)."""
    from diffjax.compiled import (
        compile_decoder_step,
        compile_encoder_step,
        compile_generate,
        generate_pass,
        gpu_device,
    )

    s.validate()
    config = _base_config(s, config)
    try:
        gpu_device(target)
    except (RuntimeError, ValueError) as exc:  # no CUDA plugin, or an unknown target: every point would fail
        raise BenchError(str(exc)) from None
    points = []
    for variant in _variants(s):
        point: dict[str, Any] = dict(variant)
        log(f"compiling the decoder step for {target}: {json.dumps(point)}")
        shapes = (_variant_config(config, variant), variant["batch"], variant["prompt"], target,
                  parse_xla_options(variant["xla_options"]))
        try:
            start = time.perf_counter()
            point.update(dataclasses.asdict(compile_decoder_step(*shapes)))
            # XLA's compile here, without autotuning: how compile time grows with a variant, not the GPU's.
            point["compile_s"] = time.perf_counter() - start
            if not s.decoder_only:
                point["encoder"] = dataclasses.asdict(compile_encoder_step(*shapes))
            if s.generate:
                point["generate"] = {
                    statistics: dataclasses.asdict(generate_pass(compile_generate(
                        shapes[0], variant["batch"], variant["prompt"], target, statistics, shapes[4])))
                    for statistics in s.statistics}
        except Exception as exc:  # one variant failing to compile must not lose the others
            point["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        points.append(point)
        log(f"point {json.dumps(point)}")
    return {"settings": dataclasses.asdict(s), "target": target, "config": _config_summary(config), "points": points}


def run_full_size(
    s: FullSizeSettings, log: Callable[[str], None] = lambda _: None, config: Config | None = None
) -> dict[str, Any]:
    """The released shapes on the device, against the memory floor. Returns {"points": [...], ...}.

    Points run in increasing (prompt, batch) order so the running peak of device memory after each point is
    that point's peak. `config` replaces the released shapes (tests run the whole path on a tiny model).
    """
    s.validate()
    device = jax.devices()[0]
    if device.platform == "cpu" and not s.force:
        raise BenchError(
            "--full-size measures a ~50 GB bf16 model against GPU memory bandwidth; this machine has only a CPU "
            "backend. Run it where a GPU is, or pass --force (with e.g. --layers 1; even one full-width layer "
            "needs well over 10 GB of host memory) to try anyway."
        )
    config = _base_config(s, config).replace(projection_layout=s.projections[0], block_layout=s.blocks[0])
    experts = ("fp8 experts" if config.expert_quantization == "fp8" else "bf16 experts") + (
        ", pretiled" if s.experts_pretiled else "")
    log(f"making random bf16 weights ({experts}) on {device} ({config.num_layers} layers)")
    start = time.perf_counter()
    params = init_params(config, jax.random.key(s.seed), jnp.bfloat16)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - start
    log("measuring device copy bandwidth")
    bandwidth = copy_bandwidth(s.bandwidth_bytes or ((256 << 20) if device.platform == "cpu" else (4 << 30)))
    log("measuring device matmul throughput")
    throughput = matmul_throughput(s.matmul_size or (1024 if device.platform == "cpu" else 8192))
    weight_parts = decoder_bytes_by_part(params)
    weight_bytes = sum(weight_parts.values())
    log("weights a decoder step reads, at the measured bandwidth: " + ", ".join(
        f"{part} {n / 1e9:.2f} GB ({1e3 * n / bandwidth:.2f} ms)" for part, n in weight_parts.items()))
    model, theirs = None, {}
    if s.transformers:
        torch, _ = _import_torch()
        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    points = []
    made_in = config
    laid_out = {(config.projection_layout, config.block_layout): params}  # params by layouts, each made once
    steps: dict[tuple[Any, ...], dict[str, Any]] = {}
    for variant in _variants(s):
        prompt, batch = variant["prompt"], variant["batch"]
        config = _variant_config(config, variant)
        layouts = (config.projection_layout, config.block_layout)
        if layouts not in laid_out:
            log(f"laying the weights out: projections {layouts[0]}, blocks {layouts[1]}")
            laid_out[layouts] = relayout(made_in, params, *layouts)[1]
        params_here = laid_out[layouts]
        for statistics in s.statistics:
            name = ", ".join(f"{key} {value}" for key, value in variant.items()) + f", statistics {statistics}"
            point: dict[str, Any] = {**variant, "statistics": statistics}
            key = tuple(variant.values())
            try:
                if key not in steps:
                    log(f"{name}: decoder step and encoder canvas")
                    steps[key] = time_steps(params_here, config, batch, prompt, s, variant["xla_options"],
                                            variant["tiles"])
                point.update(steps[key])
                if "decoder_kernels" in point:
                    parts = ", ".join(f"{part} {p['total_us'] / 1e3:.2f} ms ({p['count']})" for part, p in
                                      point["decoder_kernels"]["parts"].items() if p["count"])
                    log(f"{name}: decoder step kernels\n{render_kernel_times(point['decoder_kernels'])}\n"
                        f"by part (launches): {parts}")
                step_bytes = weight_bytes + point["cache_bytes"]
                point["floor_ms"] = 1e3 * step_bytes / bandwidth
                point["ratio_to_floor"] = point["decoder_ms"] / point["floor_ms"]
                point["looped_ratio_to_floor"] = point["decoder_looped_ms"] / point["floor_ms"]
                # From batch ~8 a step does more arithmetic than the matmul throughput covers in the time its
                # bytes take: there the compute floor is the bound that counts.
                point["flops"] = decoder_flops_per_step(config, batch, prompt)
                point["compute_floor_ms"] = 1e3 * point["flops"] / throughput
                point["roofline_ms"] = max(point["floor_ms"], point["compute_floor_ms"])
                point["ratio_to_roofline"] = point["decoder_ms"] / point["roofline_ms"]
                ids = prompt_ids(config, batch, prompt, s.seed)
                if s.generate:
                    log(f"{name}: whole generate loop ({s.steps} steps per canvas)")
                    point["diffjax"] = time_diffjax(
                        params_here, config, ids, new_tokens=s.new_tokens, steps=s.steps, repeats=s.repeats,
                        seed=s.seed, prefill_chunk_size=s.prefill_chunk, statistics=statistics,
                    )
                    point["generate_ratio_to_floor"] = point["diffjax"]["ms_per_step"] / point["floor_ms"]
                if s.transformers:
                    if (prompt, batch) not in theirs:
                        log(f"prompt {prompt}, batch {batch}: transformers generate")
                        # Random weights of their own: both sides read the same bytes; values do not matter.
                        model = model or random_hf_model(config, s.seed, dtype=torch.bfloat16, device=torch_device)
                        theirs[prompt, batch] = time_transformers(
                            model, ids, new_tokens=s.new_tokens, steps=s.steps, repeats=s.repeats, threads=None,
                            seed=s.seed, device=torch_device, compile=s.transformers_compile,
                        )
                    point["transformers"] = theirs[prompt, batch]
                    point["ratio"] = point["diffjax"]["ms_per_step"] / point["transformers"]["ms_per_step"]
            except Exception as exc:  # one point failing (e.g. out of memory) must not lose the others
                point["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                log(f"{name} failed: {point['error']}")
            point["peak_memory_bytes"] = peak_memory_bytes()
            points.append(point)
            # The whole point, as it finishes: a run killed later (time limit, out of memory) keeps it in its log.
            log(f"point {json.dumps(point)}")
    return {
        "settings": dataclasses.asdict(s), "device": str(device), "config": _config_summary(config),
        "init_s": init_s, "weight_bytes": weight_bytes, "weight_bytes_by_part": weight_parts,
        "bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": throughput, "points": points,
    }


# ---------------------------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _title(cfg: dict[str, Any]) -> str:
    return (f"hidden {cfg['hidden_size']}, {cfg['num_layers']} layers ({cfg['layer_types']}), "
            f"{cfg['num_experts']} experts top-{cfg['top_k_experts']}, vocab {cfg['vocab_size']}, "
            f"canvas {cfg['canvas_length']}"
            + (f", {cfg['expert_quantization']} experts" if cfg.get("expert_quantization", "none") != "none" else "")
            + (", pretiled experts" if cfg.get("expert_layout", "plain") != "plain" else ""))


def render(result: dict[str, Any], console: Any) -> None:
    """Print a result (comparison or full-size sweep) as rich tables."""
    if "target" in result:
        render_compiled(result, console)
        return
    if "points" in result:
        render_full_size(result, console)
        return
    from rich.table import Table

    settings = result["settings"]
    caption = (f"batch {settings['batch']}, prompt {settings['prompt']}, {settings['new_tokens']} new tokens, "
               f"{settings['steps']} fixed steps per canvas; experts {settings['moe_implementation']}, statistics "
               f"{settings['statistics']}; {result['device']}")
    table = Table(title=_title(result["config"]), caption=caption)
    table.add_column("metric")
    table.add_column("diffjax", justify="right")
    has_theirs = result.get("transformers") is not None
    if has_theirs:
        table.add_column("transformers", justify="right")
    labels = {
        "first_call_s": "first call (s)", "compile_s": "compile (s)", "warm_call_s": "best warm call (s)",
        "decoder_passes": "decoder passes", "ms_per_step": "ms / decoder step", "tokens_per_s": "tokens / s",
    }
    for key in RESULT_KEYS:
        row = [labels[key], _fmt(result["diffjax"][key])]
        if has_theirs:
            row.append(_fmt(result["transformers"][key]))
        table.add_row(*row)
    console.print(table)
    if result.get("ratio") is not None:
        verdict = "faster" if result["ratio"] < 1 else "slower"
        console.print(f"ratio ours/transformers (ms per decoder step): {result['ratio']:.3f} "
                      f"(diffjax {verdict}; lower is faster)")


def render_full_size(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    settings = result["settings"]
    caption = (f"{result['device']}; weights {_gib(result['weight_bytes'])} made in {result['init_s']:.1f} s; "
               f"copy bandwidth {result['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
               f"{result['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; floor = (weights + cache) / bandwidth; compute "
               f"floor = step FLOPs / matmul rate; queued = per step of 3 calls queued; looped = per step in "
               f"one compiled loop, as in generate ({LOOPED_STEPS} more steps against one); x roofline = "
               f"against the larger; tokens/s at {settings['steps']} steps per canvas = canvas x batch / "
               f"(steps x decoder + "
               f"encoder); generate = whole loop, ms per decoder pass")
    points = result["points"]
    # Only what tells the points apart gets a column; the settings they share go to the caption.
    keys = [*VARIANT_KEYS, "statistics"]
    varying = [key for key in keys if len({str(p[key]) for p in points}) > 1]
    shared = ", ".join(f"{key} {points[0][key]}" for key in keys if key not in varying) if points else ""
    table = Table(title=_title(result["config"]), caption=f"{shared}. {caption}")
    columns = [*(_VARIANT_HEADERS.get(key, key) for key in varying), "decoder ms", "queued ms", "looped ms",
               "floor ms", "x floor", "looped x floor", "compute floor ms", "x roofline", "encoder canvas ms",
               "tokens/s", "generate ms/step", "transformers ms/step", "ours/theirs", "peak mem"]
    for name in columns:
        table.add_column(name, justify="right")
    for point in points:
        variant = tuple(str(point[key]) for key in varying)
        if "error" in point:
            table.add_row(*variant, f"[red]{point['error'][:60]}[/]", *["-"] * (len(columns) - len(variant) - 1))
            continue
        ours, theirs = point.get("diffjax") or {}, point.get("transformers") or {}
        table.add_row(
            *variant, _fmt(point["decoder_ms"]), _fmt(point.get("decoder_queued_ms")),
            _fmt(point.get("decoder_looped_ms")), _fmt(point["floor_ms"]), _fmt(point["ratio_to_floor"]),
            _fmt(point.get("looped_ratio_to_floor")), _fmt(point["compute_floor_ms"]), _fmt(point["ratio_to_roofline"]),
            _fmt(point["encoder_canvas_ms"]), _fmt(point["tokens_per_s_at_steps"]),
            _fmt(ours.get("ms_per_step")), _fmt(theirs.get("ms_per_step")), _fmt(point.get("ratio")),
            _gib(point["peak_memory_bytes"]),
        )
    console.print(table)


def render_compiled(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    points = result["points"]
    # Only what tells the points apart gets a column; the settings they share go to the caption.
    varying = [key for key in VARIANT_KEYS if len({str(p[key]) for p in points}) > 1]
    shared = ", ".join(f"{key} {points[0][key]}" for key in VARIANT_KEYS if key not in varying) if points else ""
    caption = (f"compiled here for {result['target']} (diffjax.compiled), nothing run; {shared}. Per decoder step: "
               "launches = kernels + library calls + copies, loop bodies once per iteration; outside graphs = "
               "launched one by one; copies = device-to-device copies, GB = what they write; compile s = XLA "
               "here, no autotuning (decoder); encoder = its pass over one canvas; generate pass = one iteration of "
               "generate's denoising loop (launches / GB copied), per statistics path")
    table = Table(title=_title(result["config"]), caption=caption)
    columns = [*varying, "launches", "outside graphs", "copies", "GB", "loops", "compile s", "encoder launches",
               "encoder GB", "generate pass"]
    for name in columns:
        table.add_column(name, justify="right")
    for point in points:
        variant = [str(point[key]) for key in varying]
        if "error" in point:
            table.add_row(*variant, f"[red]{point['error'][:60]}[/]", *["-"] * (len(columns) - len(variant) - 1))
            continue
        table.add_row(*variant, str(point["launches"]), str(point["outside_command_buffers"]), str(point["copies"]),
                      f"{point['copy_bytes'] / 1e9:.3f}", ",".join(map(str, point["loops"])) or "-",
                      f"{point['compile_s']:.0f}", *((str(point["encoder"]["launches"]),
                                                      f"{point['encoder']['copy_bytes'] / 1e9:.3f}")
                                                     if "encoder" in point else ("-", "-")),
                      ", ".join(f"{statistics}: {one['launches']} / {one['copy_bytes'] / 1e9:.3f}"
                                for statistics, one in point.get("generate", {}).items()) or "-")
    console.print(table)


def check_output_file(path: str | os.PathLike[str]) -> None:
    """Raise `ValueError` if results could not be written to `path`; call it before a long run."""
    path = pathlib.Path(path)
    folder = path.parent
    if path.is_dir():
        raise ValueError(f"{path} is a folder: name a file to write the results to")
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {path}: folder {folder} is not writable")


def output_file(text: str) -> pathlib.Path:
    """argparse `type` of a results file: a bad path is refused when the arguments are parsed."""
    try:
        check_output_file(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return pathlib.Path(text)


def write_json(result: Any, path: str | os.PathLike[str]) -> None:
    """`result` as JSON (NaN as null), through a temporary sibling renamed onto `path`: an interrupted write
    leaves the previous file whole."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(clean(result), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


__all__ = [
    "BenchError",
    "BenchSettings",
    "FullSizeSettings",
    "bench_config",
    "copy_bandwidth",
    "decoder_bytes_per_step",
    "decoder_flops_per_step",
    "matmul_throughput",
    "random_hf_model",
    "render",
    "run_comparison",
    "run_full_size",
    "step_parts",
    "write_json",
]
