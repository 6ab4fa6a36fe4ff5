"""Model configuration: every text-config field that changes the maths, and nothing else.

`Config` is a frozen (hashable) dataclass so it can be a static argument of `jax.jit`.
`Config.from_hf` reads a Hugging Face `config.json` of `model_type: diffusion_gemma`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def gemma4_layer_types(num_layers: int, period: int = 6) -> tuple[str, ...]:
    """Gemma 4's pattern (transformers' default `layer_types`): every `period`-th layer global, and the last
    always global (as transformers forces)."""
    return tuple(FULL if (i + 1) % period == 0 or i == num_layers - 1 else SLIDING for i in range(num_layers))
MOE_IMPLEMENTATIONS = ("grouped", "dense", "pallas", "pallas_mgpu")
# MoE kernels that read each block's experts from the whole stack of blocks in place (no per-block copy).
STACK_READING_MOE_IMPLEMENTATIONS = ("pallas", "pallas_mgpu")
# MoE forms that need a device mesh (`jax.set_mesh`): not a --moe choice; `diffjax generate --mesh` picks it.
MESH_MOE_IMPLEMENTATIONS = ("expert_parallel",)
GLOBAL_ATTENTION_IMPLEMENTATIONS = ("xla", "pallas")
SLIDING_ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")
ROUTING_IMPLEMENTATIONS = ("xla", "pallas")
NORM_IMPLEMENTATIONS = ("xla", "pallas")
MLP_IMPLEMENTATIONS = ("xla", "pallas")
# What the training loss's AR co-loss scores (`train.make_batch`): Google's SFT's (the default), TRL's example's,
# the response only.
AR_TARGETS = ("google", "trl", "response")
DEFAULT_AR_TARGETS = "google"

# Config fields that pick an implementation (same maths): not written to config.json.
IMPLEMENTATION_FIELDS = (
    "moe_implementation", "global_attention_implementation", "sliding_attention_implementation",
    "routing_implementation", "norm_implementation", "mlp_implementation", "scan_unroll", "kernel_tiles",
)
# How the expert weights are stored (`diffjax.quantize`). Not an implementation field: fp8 changes the maths
# (slightly) and the parameter tree, and no checkpoint stores it (quantized trees are made at load time).
EXPERT_QUANTIZATIONS = ("none", "fp8")
# How the expert weights are laid out (`diffjax.kernels.moe.pretile_model`): like the quantization, a storage
# format made at load time, which no checkpoint stores.
EXPERT_LAYOUTS = ("plain", "pretiled")
# How the dense projections are laid out (`diffjax.layout.fuse_projections`): a load-time storage format too.
PROJECTION_LAYOUTS = ("separate", "fused")
# How the layer blocks' parameters are stored (`diffjax.layout.unstack_blocks`): a load-time storage format.
BLOCK_LAYOUTS = ("stacked", "unstacked")

RopeType = Literal["default", "proportional"]

# KernelTiles field -> (module under diffjax.kernels, its tiles class, the Config choice under which the kernel
# runs: None for the vocabulary pass, a `generate` argument). Classes are imported when used: the kernels
# import the layers, which import this module.
_TILES_CLASSES = {
    "experts": ("moe", "MoeTiles", ("moe_implementation", "pallas")),
    "experts_mgpu": ("moe_mgpu", "MgpuMoeTiles", ("moe_implementation", "pallas_mgpu")),
    "sliding_attention": ("attention", "AttentionTiles", ("sliding_attention_implementation", "pallas")),
    "global_attention": ("attention", "AttentionTiles", ("global_attention_implementation", "pallas")),
    "routing": ("routing", "RouteTiles", ("routing_implementation", "pallas")),
    "vocab": ("vocab", "VocabTiles", None),
}


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """Tile settings of the Pallas kernels the model and `generate` run, per kernel; None leaves a kernel its
    own defaults (some follow the shapes, e.g. the experts' row tile the batch). Same maths, another speed:
    for a GPU sweep's winner (`python -m diffjax.kernels.bench --sweep`) or a researcher's experiment, timed in
    the whole step (`diffjax bench --full-size --tiles ...`), without editing a kernel.

    experts: `kernels.moe.MoeTiles` (`moe_implementation="pallas"`); experts_mgpu: `kernels.moe_mgpu.
    MgpuMoeTiles` ("pallas_mgpu"); sliding_attention / global_attention: `kernels.attention.AttentionTiles` of
    the split-K kernel on each layer type; routing: `kernels.routing.RouteTiles`; vocab:
    `kernels.vocab.VocabTiles` (`generate(statistics="pallas")`).
    """

    experts: Any = None
    experts_mgpu: Any = None
    sliding_attention: Any = None
    global_attention: Any = None
    routing: Any = None
    vocab: Any = None

    def validate(self) -> None:
        """Raise `ValueError` naming a field that holds the wrong class or an invalid setting."""
        for field in _TILES_CLASSES:
            value = getattr(self, field)
            if value is None:
                continue
            expected = self.tiles_class(field)
            if not isinstance(value, expected):
                raise ValueError(f"kernel_tiles.{field} must be a {expected.__module__}.{expected.__name__} or "
                                 f"None, got {type(value).__name__}")
            if hasattr(value, "validate"):
                value.validate()

    @staticmethod
    def tiles_class(field: str, where: str = "") -> type:
        """The tiles class a field holds, e.g. `AttentionTiles` for "sliding_attention"; an unknown field is a
        `ValueError` naming it (and `where` it was found)."""
        import importlib

        if field not in _TILES_CLASSES:
            raise ValueError(f"unknown kernel {_with_suggestion(field, frozenset(_TILES_CLASSES))}{where}: one of "
                             f"{sorted(_TILES_CLASSES)}")
        module, name, _ = _TILES_CLASSES[field]
        return getattr(importlib.import_module(f"diffjax.kernels.{module}"), name)

    def idle(self, config: Config, statistics: str = "logits") -> list[str]:
        """The fields set whose kernel `config` (and `generate(statistics=...)`) does not run: their settings
        would change nothing."""
        def runs(choice: tuple[str, str] | None) -> bool:
            return statistics == "pallas" if choice is None else getattr(config, choice[0]) == choice[1]

        return [field for field, (_, _, choice) in _TILES_CLASSES.items()
                if getattr(self, field) is not None and not runs(choice)]

    def kwargs(self, field: str) -> dict[str, Any]:
        """`{"tiles": ...}` for the kernel `field` names if set, else `{}` (the kernel's defaults)."""
        value = getattr(self, field)
        return {} if value is None else {"tiles": value}

    @classmethod
    def parse(cls, text: str) -> KernelTiles:
        """From `kernel.setting=value` items separated by commas, e.g. `sliding_attention.block_k=64,
        routing.project=false` (values: integers, true/false, none); "" or "default": every kernel's defaults.
        Raises `ValueError` naming an unknown kernel, setting or value."""
        settings: dict[str, dict[str, Any]] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            if item == "default":
                continue
            target, sep, raw = item.partition("=")
            field, dot, setting = target.strip().partition(".")
            if not sep or not dot:
                raise ValueError(f"kernel tiles item {item!r} is not kernel.setting=value")
            known = frozenset(f.name for f in dataclasses.fields(cls.tiles_class(field, f" in {item!r}")))
            if setting not in known:
                raise ValueError(f"{field} has no tile setting {_with_suggestion(setting, known)}: one of "
                                 f"{sorted(known)}")
            if setting in settings.get(field, {}):
                raise ValueError(f"kernel tiles set {field}.{setting} twice")
            settings.setdefault(field, {})[setting] = tile_value(raw.strip(), item)
        tiles = cls(**{field: cls.tiles_class(field)(**values) for field, values in settings.items()})
        tiles.validate()
        return tiles


def tile_value(raw: str, item: str) -> int | bool | None:
    """A tile setting's value from text: an integer, true/false or none; else a `ValueError` naming `item`."""
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"the value of {item!r} must be an integer, true, false or none") from None


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Attention shape and rotary embedding of one layer type (sliding or full)."""

    head_dim: int
    num_kv_heads: int
    rope_theta: float
    rope_type: RopeType = "default"
    # Proportional RoPE rotates `int(partial_rotary_factor * head_dim // 2)` frequency pairs; the rest get 0.
    partial_rotary_factor: float = 1.0
    rope_factor: float = 1.0

    def validate(self, prefix: str, num_heads: int) -> None:
        """Raise `ValueError` naming the invalid field as `prefix.field` (`num_heads` must be a multiple of the
        kv heads)."""
        _positive(f"{prefix}.head_dim", self.head_dim)
        _positive(f"{prefix}.num_kv_heads", self.num_kv_heads)
        if self.head_dim % 2:
            raise ValueError(f"{prefix}.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if num_heads % self.num_kv_heads:
            raise ValueError(
                f"{prefix}.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({num_heads})"
            )
        if self.rope_type not in ("default", "proportional"):
            raise ValueError(f"{prefix}.rope_type must be 'default' or 'proportional', got {self.rope_type!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"{prefix}.rope_theta must be > 0, got {self.rope_theta}")
        if not 0.0 <= self.partial_rotary_factor <= 1.0:
            raise ValueError(
                f"{prefix}.partial_rotary_factor must be in [0, 1], got {self.partial_rotary_factor}"
            )
        if self.rope_type == "default" and self.partial_rotary_factor != 1.0:
            # transformers' default RoPE with a partial factor yields cos/sin narrower than the head: it cannot run.
            raise ValueError(f"{prefix}.partial_rotary_factor != 1 needs rope_type 'proportional'")
        if not self.rope_factor > 0:
            raise ValueError(f"{prefix}.rope_factor must be > 0, got {self.rope_factor}")


@dataclasses.dataclass(frozen=True)
class Config:
    """DiffusionGemma text model dimensions (defaults: the released 26B-A4B)."""

    vocab_size: int = 262_144
    hidden_size: int = 2816
    num_layers: int = 30
    # One entry per layer, each `sliding_attention` or `full_attention`.
    layer_types: tuple[str, ...] = gemma4_layer_types(30)
    num_heads: int = 16
    sliding: AttentionConfig = AttentionConfig(head_dim=256, num_kv_heads=8, rope_theta=10_000.0)
    # Full (global) layers have no v_proj: values are the k_proj output ("k_eq_v").
    full: AttentionConfig = AttentionConfig(
        head_dim=512, num_kv_heads=2, rope_theta=1_000_000.0, rope_type="proportional", partial_rotary_factor=0.25
    )
    # Tokens a sliding layer sees, itself included.
    sliding_window: int = 1024
    intermediate_size: int = 2112
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    canvas_length: int = 256
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    eos_token_id: tuple[int, ...] = (1,)
    bos_token_id: int = 2
    # How the experts are computed; same maths, different speed. "grouped": only routed (token, expert)
    # pairs, sorted by expert, through `jax.lax.ragged_dot`. "dense": every expert on every token with the
    # unrouted pairs weighted 0 (faster on CPU for few experts, and the oracle for "grouped"). "pallas": the
    # block-sparse grouped-matmul kernel of `diffjax.kernels.moe` (Pallas' Triton lowering; GPU, interpreted
    # elsewhere, slowly). "pallas_mgpu": the TMA + wgmma kernels of `diffjax.kernels.moe_mgpu` (Pallas' Mosaic
    # GPU lowering; Hopper, bf16/fp16 activations; interpreted elsewhere).
    # "expert_parallel": experts split over a device mesh, tokens sent to their experts' devices with
    # all-to-all (`diffjax.sharding.experts_expert_parallel`; needs `jax.set_mesh`).
    moe_implementation: Literal["grouped", "dense", "pallas", "pallas_mgpu", "expert_parallel"] = "grouped"
    # How the decoder's global layers attend (the canvas over the whole cache, padding-only mask). "xla":
    # `layers.attend`. "pallas": the split-K kernel of `diffjax.kernels.attention`, and in the encoder and the
    # decoder its q/k/v inputs kernel (norms and RoPE in one launch). The encoder (causal) always attends
    # with `attend`.
    global_attention_implementation: Literal["xla", "pallas"] = "xla"
    # How the decoder's sliding layers attend (the canvas over the ring of the last window - 1 positions and
    # itself, padding-only mask). "xla": `layers.attend`. "cudnn": cuDNN's fused attention through
    # `jax.nn.dot_product_attention` (NVIDIA GPUs, bf16/fp16 only; on an H100 at batch 8 0.23 ms per layer
    # against 0.92 ms for "xla"). "pallas": the global layers' split-K kernel (any GPU it compiles for;
    # float32 too), which needs no more than a padding-only mask either, with the q/k/v inputs kernel (in the
    # encoder too). The encoder attends with `attend`: its left-padded rows see no key at all, where `attend`
    # returns zeros and cuDNN's result is not specified.
    sliding_attention_implementation: Literal["xla", "cudnn", "pallas"] = "xla"
    # How each MoE layer picks its experts and groups their rows. "xla": `layers.route` (the router's matmul,
    # softmax, `jax.lax.top_k`), and the row layout of the Pallas experts in plain JAX (`kernels.routing.
    # expert_rows_reference`). "pallas": the two kernels of `diffjax.kernels.routing`, the router (matmul and
    # top-k) and, for `moe_implementation="pallas"`, the layout (the other MoE forms sort the rows their own
    # way). Why: in XLA that routing is 15 small GPU launches per layer, over a third of a full-size decoder
    # step's launches.
    routing_implementation: Literal["xla", "pallas"] = "xla"
    # How each layer makes its feed-forward inputs after attention (the residual add with its norm, then the
    # residual normed for the dense MLP, the experts and the router: `layers.moe_inputs`). "xla": five GPU
    # launches per layer. "pallas": one, `diffjax.kernels.norms.moe_inputs_pallas`; and with
    # `mlp_implementation="pallas"` also the layer's output in one (`feedforward_outputs_pallas`: the experts'
    # rows summed, the three post-feed-forward norms, the residual add and the layer scalar), where XLA made two.
    norm_implementation: Literal["xla", "pallas"] = "xla"
    # How each layer runs its dense MLP (beside the experts). "xla": `layers.MLP`, three GPU launches per layer
    # (two matmuls and the activation). "pallas": programs of their own in the two launches of the Pallas
    # experts (`diffjax.kernels.moe.experts_pallas(..., mlp=...)`), which needs `moe_implementation="pallas"`
    # and the fused projection layout (the kernels read `mlp/gate_up_proj` as it lies).
    mlp_implementation: Literal["xla", "pallas"] = "xla"
    # How the experts' weights are stored. "none": in the parameter dtype. "fp8": float8_e4m3fn with a float32
    # scale per output channel (`diffjax.quantize`: half the bytes of bf16; the tree gains
    # `experts/{gate_up,down}_proj_scale` leaves). Every `moe_implementation` runs either; the plain-JAX ones
    # dequantize to the activation dtype, the Pallas kernels convert weight tiles in-kernel.
    expert_quantization: Literal["none", "fp8"] = "none"
    # How the experts' weights are laid out. "plain": gate_up `[experts, hidden, 2 * inter]`, down `[experts,
    # inter, hidden]`. "pretiled": column tile by column tile, `[experts, tiles, rows, tile width]`
    # (`diffjax.kernels.moe.pretile_model`), so that every k-step of a Pallas expert kernel's program reads one
    # contiguous block instead of a piece of each of 64 rows. Meant for the Pallas kernels ("pallas",
    # "pallas_mgpu"), which read it in place; "grouped" and "dense" untile a copy of each layer's experts per
    # call (the oracle).
    expert_layout: Literal["plain", "pretiled"] = "plain"
    # How the dense projections that read the same input are stored. "separate": q_proj, k_proj, v_proj and
    # gate_proj, up_proj, as in the checkpoints. "fused": one kernel each, `self_attn/qkv_proj` `[hidden,
    # q + k (+ v on sliding layers)]` and `mlp/gate_up_proj` `[hidden, 2 * intermediate]`
    # (`diffjax.layout.fuse_projections`). Same maths. Why: XLA on a GPU merges the separate matmuls into one
    # by concatenating their weights, and a concatenation of slices of the blocks' weight stacks is
    # materialised, a copy of every block's q/k/v and gate/up weights per step (205 copies, ~2.1 GB at full
    # size, counted in the step compiled for an H200); one kernel per block is read in place once the blocks
    # are unrolled (`scan_unroll`).
    projection_layout: Literal["separate", "fused"] = "separate"
    # How the layer blocks' parameters are stored. "stacked": `blocks/layer_j/...` leaves with a leading
    # `[blocks]` axis, scanned over (as the checkpoints hold them). "unstacked": `block_{i}/layer_j/...`, one
    # tree per block without that axis, run one block after another (`diffjax.layout.unstack_blocks`; no
    # scan, so `scan_unroll` does not apply). Same maths. Why: a block's slice of a stack that feeds a cuBLAS
    # matmul is copied out first, unrolled or not (3.3 GB per full-size step compiled for an H200 with cuBLAS
    # matmuls); a leaf of its own is read in place whichever matmul the GPU's autotuner picks.
    block_layout: Literal["stacked", "unstacked"] = "stacked"
    # Layer blocks per iteration of the scan over blocks (`jax.lax.scan`'s `unroll`). 1: a loop whose body is
    # one block, so compile time does not grow with depth. `num_blocks` (or more): no loop, so each block's
    # weights are a static slice of their stack, not a per-iteration dynamic slice, which XLA on a GPU copies
    # out of the stack (~1.7 ms of traffic in a 27.3 ms batch-1 step at full size, H200). Compiled for an
    # H200, a static slice feeding one matmul is read in place, but q/k/v and gate/up slices are still copied
    # (XLA merges those matmuls): use `projection_layout="fused"` with it. Compile time grows with it.
    scan_unroll: int = 1
    # Tile settings of the Pallas kernels (`KernelTiles`; the default leaves each kernel its own). Same maths.
    kernel_tiles: KernelTiles = KernelTiles()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", (eos,) if isinstance(eos, int) else tuple(eos))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise `ValueError` naming the first invalid field."""
        for name in (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "sliding_window", "intermediate_size",
            "num_experts", "top_k_experts", "moe_intermediate_size", "canvas_length", "max_position_embeddings",
            "scan_unroll",
        ):
            _positive(name, getattr(self, name))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] must be one of {LAYER_TYPES}, got {layer_type!r}")
        self.sliding.validate("sliding", self.num_heads)
        self.full.validate("full", self.num_heads)
        if self.top_k_experts > self.num_experts:
            raise ValueError(
                f"top_k_experts ({self.top_k_experts}) must be <= num_experts ({self.num_experts})"
            )
        for name, choices in (
            ("moe_implementation", MOE_IMPLEMENTATIONS + MESH_MOE_IMPLEMENTATIONS),
            ("global_attention_implementation", GLOBAL_ATTENTION_IMPLEMENTATIONS),
            ("sliding_attention_implementation", SLIDING_ATTENTION_IMPLEMENTATIONS),
            ("routing_implementation", ROUTING_IMPLEMENTATIONS),
            ("norm_implementation", NORM_IMPLEMENTATIONS),
            ("mlp_implementation", MLP_IMPLEMENTATIONS),
            ("expert_quantization", EXPERT_QUANTIZATIONS),
            ("expert_layout", EXPERT_LAYOUTS),
            ("block_layout", BLOCK_LAYOUTS),
            ("projection_layout", PROJECTION_LAYOUTS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.expert_layout == "pretiled" and self.moe_implementation in MESH_MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"expert_layout='pretiled' is read by the single-device MoE forms {MOE_IMPLEMENTATIONS}, not by "
                f"{self.moe_implementation!r}"
            )
        if self.mlp_implementation == "pallas":
            unmet = [f"{name}={want!r} (got {getattr(self, name)!r}{why})" for name, want, why in (
                ("moe_implementation", "pallas", ""),
                ("projection_layout", "fused", "; diffjax.layout.fuse_projections, or --fused-projections, makes it"),
            ) if getattr(self, name) != want]
            if unmet:
                raise ValueError("mlp_implementation='pallas' runs the dense MLP inside the Pallas expert kernels: "
                                 f"it needs {' and '.join(unmet)}")
        if not isinstance(self.kernel_tiles, KernelTiles):
            raise ValueError(f"kernel_tiles must be a KernelTiles, got {type(self.kernel_tiles).__name__}")
        self.kernel_tiles.validate()
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ValueError(f"final_logit_softcapping must be > 0 or None, got {self.final_logit_softcapping}")
        for name in ("pad_token_id", "bos_token_id"):
            _token_id(name, getattr(self, name), self.vocab_size)
        if not self.eos_token_id:
            raise ValueError("eos_token_id must name at least one token id (generation stops on it and training "
                             "pads with it)")
        for eos in self.eos_token_id:
            _token_id("eos_token_id", eos, self.vocab_size)

    # ------------------------------------------------------------ derived facts
    def attention(self, layer_type: str) -> AttentionConfig:
        """The attention shapes of a layer type: `sliding` or `full`."""
        return self.sliding if layer_type == SLIDING else self.full

    @property
    def layer_period(self) -> int:
        """Smallest period p dividing num_layers with layer_types[i] == layer_types[i % p].

        The model scans over num_layers // p identical blocks of p layers, so compile time follows p,
        not depth (6 for the released model).
        """
        for period in range(1, self.num_layers + 1):
            if self.num_layers % period == 0 and all(
                t == self.layer_types[i % period] for i, t in enumerate(self.layer_types)
            ):
                return period
        raise AssertionError("unreachable: the whole stack is always a period")

    @property
    def num_blocks(self) -> int:
        """Repeats of the layer pattern: the stacked blocks the model scans over."""
        return self.num_layers // self.layer_period

    @property
    def block_layer_types(self) -> tuple[str, ...]:
        """The layer types of one block (`layer_period` layers); every block repeats them."""
        return self.layer_types[: self.layer_period]

    def layer_slot(self, layer_index: int) -> tuple[int, int]:
        """(block, position in block) of a layer index."""
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer index {layer_index} out of range [0, {self.num_layers})")
        return divmod(layer_index, self.layer_period)

    @property
    def embed_scale(self) -> float:
        """Gemma's embedding multiplier, sqrt(hidden_size)."""
        return math.sqrt(self.hidden_size)

    def implementation(self) -> dict[str, Any]:
        """The fields that choose how (not what) is computed, e.g. to carry them over a config.json."""
        return {name: getattr(self, name) for name in IMPLEMENTATION_FIELDS}

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed; unknown field names raise `ValueError`."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown Config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def diffusiongemma_26b_a4b(cls) -> Config:
        """The released google/diffusiongemma-26B-A4B-it text model (eos as in its generation_config)."""
        return cls(eos_token_id=(1, 106, 50))

    @classmethod
    def tiny(cls, **changes: Any) -> Config:
        """A small random-test model with the real structure (MoE, sliding + k_eq_v global layers)."""
        base = cls(
            vocab_size=512, hidden_size=64, num_layers=4,
            layer_types=(SLIDING, SLIDING, SLIDING, FULL), num_heads=4,
            sliding=AttentionConfig(head_dim=16, num_kv_heads=2, rope_theta=10_000.0),
            full=AttentionConfig(head_dim=32, num_kv_heads=1, rope_theta=1_000_000.0,
                                 rope_type="proportional", partial_rotary_factor=0.25),
            sliding_window=8, intermediate_size=96, num_experts=8, top_k_experts=2,
            moe_intermediate_size=32, canvas_length=16,
        )
        return base.replace(**changes) if changes else base

    @classmethod
    def demo(cls, **changes: Any) -> Config:
        """The demo model's architecture (trained on CPU by `diffjax train`): `tiny()`'s structure with an
        8-token sliding window, 8 experts top-2 and a short context; `Task.model_config` sets the vocabulary
        and canvas length."""
        base = cls.tiny(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=64, sliding_window=8,
            max_position_embeddings=256,
        )
        return base.replace(**changes) if changes else base

    # ---------------------------------------------------------- Hugging Face IO
    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> Config:
        """Read a Hugging Face `config.json` dict (`model_type: diffusion_gemma`, or its `text_config`).

        Every problem (a wrong type, an unknown key, an unsupported value) raises `ValueError` naming the key's
        path in the file, e.g. `text_config.hidden_size`.
        """
        model_type = hf_config.get("model_type")
        if model_type == "diffusion_gemma":
            _reject_unknown(hf_config, _HF_TOP_KEYS | _HF_TOP_IGNORED_KEYS, "")
            # transformers unties every shared weight when the top-level flag is False, not only the LM head.
            _require_tied(hf_config, "")
            text = _mapping(hf_config, "text_config", "", {}, nullable=True)
            return cls(**_text_fields(text, "text_config"), canvas_length=_int(hf_config, "canvas_length", "", 256))
        if model_type == "diffusion_gemma_text":
            return cls(**_text_fields(hf_config, ""))
        raise ValueError(
            f"unknown model_type {model_type!r}: expected 'diffusion_gemma' (or 'diffusion_gemma_text')"
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers 5.23.0 loads as this model (a minimal vision tower included)."""
        full_layers = [i for i, t in enumerate(self.layer_types) if t == FULL]

        def rope_dict(att: AttentionConfig) -> dict[str, Any]:
            out: dict[str, Any] = {"rope_type": att.rope_type, "rope_theta": att.rope_theta}
            if att.rope_type == "proportional":
                out["partial_rotary_factor"] = att.partial_rotary_factor
            if att.rope_factor != 1.0:
                out["factor"] = att.rope_factor
            return out

        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.sliding.num_kv_heads,
            "head_dim": self.sliding.head_dim,
            "layer_types": list(self.layer_types),
            "per_layer_config": {
                str(i): {"head_dim": self.full.head_dim, "num_key_value_heads": self.full.num_kv_heads}
                for i in full_layers
            },
            "rope_parameters": {SLIDING: rope_dict(self.sliding), FULL: rope_dict(self.full)},
            "sliding_window": self.sliding_window,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "bos_token_id": self.bos_token_id,
            "tie_word_embeddings": True,
        }
        if self.final_logit_softcapping != 30.0:
            text["final_logit_softcapping"] = self.final_logit_softcapping
        return {
            "model_type": "diffusion_gemma",
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "canvas_length": self.canvas_length,
            "tie_word_embeddings": True,
            "text_config": text,
            "vision_config": {
                "model_type": "gemma4_vision", "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
            },
        }


# Keys transformers' `PreTrainedConfig` (5.23.0) writes at every level of a config.json (`to_dict`), or reads
# back from one for backward compatibility (`torch_dtype`, `_commit_hash`, ...): bookkeeping, no maths.
_HF_BOOKKEEPING_KEYS = frozenset({
    "model_type", "transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "initializer_range", "tokenizer_class", "auto_map", "_commit_hash",
    "attn_implementation", "experts_implementation", "use_cache",
})
# Top-level keys of a `diffusion_gemma` config.json that we read.
_HF_TOP_KEYS = frozenset({"model_type", "text_config", "canvas_length", "tie_word_embeddings"})
# Top-level keys that leave the text model alone: the vision tower and its token ids (`DiffusionGemmaConfig`),
# and the ids the released config.json repeats at the top level (generation takes its ids from
# generation_config.json, the model from text_config).
_HF_TOP_IGNORED_KEYS = _HF_BOOKKEEPING_KEYS | {
    "vision_config", "boi_token_id", "eoi_token_id", "image_token_id", "vision_soft_tokens_per_image",
    "eos_token_id", "pad_token_id", "bos_token_id",
}
# Keys of a transformers text_config that we read.
_HF_TEXT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v",
    "layer_types", "per_layer_config", "rope_parameters", "sliding_window", "num_experts", "top_k_experts",
    "moe_intermediate_size", "rms_norm_eps", "final_logit_softcapping", "max_position_embeddings",
    "pad_token_id", "eos_token_id", "bos_token_id", "hidden_activation", "attention_bias",
    "use_bidirectional_attention", "tie_word_embeddings",
})
# text_config keys that do not change inference maths (training-only, or Gemma 4 keys fixed for this architecture).
_HF_IGNORED_KEYS = _HF_BOOKKEEPING_KEYS | {
    "attention_dropout", "enable_moe_block", "use_double_wide_mlp", "num_kv_shared_layers",
    "vocab_size_per_layer_input", "hidden_size_per_layer_input",
}
# The per-layer overrides we model. transformers takes any field there (a per-layer sliding_window, say), which
# would otherwise be dropped without a word.
_HF_PER_LAYER_KEYS = frozenset({"head_dim", "num_key_value_heads"})
_HF_ROPE_KEYS = frozenset({"rope_type", "rope_theta", "partial_rotary_factor", "factor"})
# transformers' RoPE of a layer type that `rope_parameters` leaves out.
_HF_DEFAULT_ROPE: dict[str, dict[str, Any]] = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


def require_pretiled_readers(moe_implementations: tuple[str, ...]) -> None:
    """Raise `ValueError` unless every MoE implementation asked for reads pretiled experts in place: the
    `--experts-pretiled` flags lay the experts out for those kernels only (the others would untile a copy of
    each layer's experts per call)."""
    others = [m for m in moe_implementations if m not in STACK_READING_MOE_IMPLEMENTATIONS]
    if others:
        raise ValueError("--experts-pretiled is the layout of the Pallas expert kernels: pass --moe "
                         f"{' or '.join(STACK_READING_MOE_IMPLEMENTATIONS)} only, not {', '.join(others)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _token_id(name: str, value: Any, vocab_size: int) -> None:
    if not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")


# ----------------------------------------------------------------- reading config.json
def _text_fields(text: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The `Config` fields (all but `canvas_length`) of a transformers text config found at path `where`."""
    _refuse_unsupported(text, where)
    _reject_unknown(text, _HF_TEXT_KEYS | _HF_IGNORED_KEYS, where)
    num_layers = _int(text, "num_hidden_layers", where, 30)
    layer_types = _layer_types(text, where, num_layers)
    per_layer = _per_layer_overrides(text, where, num_layers)
    rope = _mapping(text, "rope_parameters", where, {}, nullable=True)
    _reject_unknown(rope, frozenset(LAYER_TYPES), _path(where, "rope_parameters"))
    return dict(
        vocab_size=_int(text, "vocab_size", where, 262_144),
        hidden_size=_int(text, "hidden_size", where, 2304),
        num_layers=num_layers,
        layer_types=layer_types,
        num_heads=_int(text, "num_attention_heads", where, 8),
        sliding=_attention(text, where, SLIDING, layer_types, per_layer, rope),
        full=_attention(text, where, FULL, layer_types, per_layer, rope),
        sliding_window=_int(text, "sliding_window", where, 512),
        intermediate_size=_int(text, "intermediate_size", where, 9216),
        # transformers' null here means a dense Gemma, not this mixture-of-experts model.
        num_experts=_int(text, "num_experts", where, nullable=True),
        top_k_experts=_int(text, "top_k_experts", where, nullable=True),
        moe_intermediate_size=_int(text, "moe_intermediate_size", where, nullable=True),
        rms_norm_eps=_float(text, "rms_norm_eps", where, 1e-6),
        final_logit_softcapping=_softcap(text, where),
        max_position_embeddings=_int(text, "max_position_embeddings", where, 131_072),
        pad_token_id=_int(text, "pad_token_id", where, 0, nullable=True),
        eos_token_id=_token_ids(text, "eos_token_id", where, (1,)),
        bos_token_id=_int(text, "bos_token_id", where, 2, nullable=True),
    )


def _refuse_unsupported(text: Mapping[str, Any], where: str) -> None:
    """Raise on the transformers options this implementation lacks (before the unknown-key check: a config with
    use_bidirectional_attention='all' also carries the `is_causal` that option sets)."""
    activation = _str(text, "hidden_activation", where, "gelu_pytorch_tanh")
    if activation != "gelu_pytorch_tanh":
        raise ValueError(f"{_path(where, 'hidden_activation')} {activation!r} is not supported (gelu_pytorch_tanh)")
    if _bool(text, "attention_bias", where, False):
        raise ValueError(f"{_path(where, 'attention_bias')}=True is not supported: DiffusionGemma has no attention "
                         "biases")
    bidirectional = _str(text, "use_bidirectional_attention", where, None, nullable=True)
    if bidirectional not in (None, "vision"):
        raise ValueError(f"{_path(where, 'use_bidirectional_attention')}={bidirectional!r} is not supported (the "
                         "released model uses 'vision')")
    _require_tied(text, where)


def _require_tied(mapping: Mapping[str, Any], where: str) -> None:
    if not _bool(mapping, "tie_word_embeddings", where, True):
        raise ValueError(f"{_path(where, 'tie_word_embeddings')}=False is not supported: the LM head is the "
                         "embedding")


def _layer_types(text: Mapping[str, Any], where: str, num_layers: int) -> tuple[str, ...]:
    """`layer_types`, or transformers' default (every 6th layer global); the last layer made global as
    transformers does, but only after every entry is checked (a bad last entry is an error, not rewritten)."""
    layer_types = _list(text, "layer_types", where, list(gemma4_layer_types(num_layers)), nullable=True)
    for i, layer_type in enumerate(layer_types):
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"{_path(where, 'layer_types')}[{i}] must be one of {LAYER_TYPES}, got {layer_type!r}")
    if layer_types and layer_types[-1] != FULL:
        layer_types[-1] = FULL
    return tuple(layer_types)


def _per_layer_overrides(text: Mapping[str, Any], where: str, num_layers: int) -> dict[int, dict[str, int]] | None:
    """`per_layer_config` by layer index; None where the key is absent.

    Absent and empty differ: transformers derives the global layers' overrides from `global_head_dim` only when
    the key is absent (even `{}` or null turns that off).
    """
    if "per_layer_config" not in text:
        return None
    path = _path(where, "per_layer_config")
    raw = _mapping(text, "per_layer_config", where, {}, nullable=True)
    overrides: dict[int, dict[str, int]] = {}
    for key in raw:
        index = _layer_index(key, path, num_layers)
        if index in overrides:
            raise ValueError(f"{path} names layer {index} twice")
        entry = _mapping(raw, key, path)
        _reject_unknown(entry, _HF_PER_LAYER_KEYS, _path(path, key))
        overrides[index] = {name: _int(entry, name, _path(path, key)) for name in entry}
    return overrides


def _layer_index(key: object, where: str, num_layers: int) -> int:
    # transformers writes the indices as strings zero-padded to one width ("05" when there are 30 layers).
    index = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
    if type(index) is not int or not 0 <= index < num_layers:
        raise ValueError(f"{where} keys must be layer indices in [0, {num_layers}), got {key!r}")
    return index


def _attention(
    text: Mapping[str, Any], where: str, layer_type: str, layer_types: tuple[str, ...],
    per_layer: dict[int, dict[str, int]] | None, rope: Mapping[str, Any],
) -> AttentionConfig:
    """The attention shape and RoPE of one layer type."""
    override = _layer_override(text, where, layer_type, layer_types, per_layer)
    return AttentionConfig(
        head_dim=override.get("head_dim", _int(text, "head_dim", where, 256)),
        num_kv_heads=override.get("num_key_value_heads", _int(text, "num_key_value_heads", where, 4)),
        **_rope(rope, _path(where, "rope_parameters"), layer_type),
    )


def _layer_override(
    text: Mapping[str, Any], where: str, layer_type: str, layer_types: tuple[str, ...],
    per_layer: dict[int, dict[str, int]] | None,
) -> dict[str, int]:
    """The per-layer overrides shared by every layer of one type (one `AttentionConfig` serves them all)."""
    if per_layer is None:
        if layer_type != FULL:
            return {}
        override = {"head_dim": _int(text, "global_head_dim", where, 512)}
        kv_heads = _int(text, "num_global_key_value_heads", where, None, nullable=True)
        # transformers applies the global kv-head count only to k_eq_v attention (the default).
        if kv_heads is not None and _bool(text, "attention_k_eq_v", where, True):
            override["num_key_value_heads"] = kv_heads
        return override
    distinct = {tuple(sorted(per_layer.get(i, {}).items())) for i, t in enumerate(layer_types) if t == layer_type}
    if len(distinct) > 1:
        raise ValueError(f"{_path(where, 'per_layer_config')} differs between {layer_type} layers: not supported")
    return dict(next(iter(distinct), ()))


def _rope(rope: Mapping[str, Any], where: str, layer_type: str) -> dict[str, Any]:
    """`AttentionConfig`'s RoPE fields from `rope_parameters[layer_type]`, found at path `where`."""
    params = _mapping(rope, layer_type, where, _HF_DEFAULT_ROPE[layer_type], nullable=True)
    path = _path(where, layer_type)
    _reject_unknown(params, _HF_ROPE_KEYS, path)
    return dict(
        rope_theta=_float(params, "rope_theta", path),
        rope_type=_str(params, "rope_type", path, "default"),
        partial_rotary_factor=_float(params, "partial_rotary_factor", path, 1.0),
        rope_factor=_float(params, "factor", path, 1.0),
    )


def _softcap(text: Mapping[str, Any], where: str) -> float | None:
    # null switches the softcap off; absent is transformers' default, 30.
    if "final_logit_softcapping" in text and text["final_logit_softcapping"] is None:
        return None
    return _float(text, "final_logit_softcapping", where, 30.0)


def _token_ids(mapping: Mapping[str, Any], key: str, where: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """One token id or a non-empty list of them (transformers' `int | list[int] | None`)."""
    value, found = _lookup(mapping, key, where, default, nullable=True)
    ids = [value] if type(value) is int else value
    if found and not (isinstance(ids, list) and ids and all(type(i) is int for i in ids)):
        raise ValueError(f"{_path(where, key)} must be a token id or a non-empty list of token ids, got {value!r}")
    return tuple(ids)


def _reject_unknown(mapping: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    """Raise on keys nothing reads: a misspelt key would otherwise leave its field at the default, silently."""
    unknown = sorted(str(key) for key in set(mapping) - known)
    if unknown:
        named = ", ".join(_with_suggestion(key, known) for key in unknown)
        raise ValueError(f"unknown {where or 'top-level'} key(s) in config.json: {named}")


def _with_suggestion(key: str, known: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"{key} (did you mean {close[0]}?)" if close else key


# ------------------------------------------------------------- typed field readers
_REQUIRED: Any = object()  # the default of a key that has none: its absence is an error


def _path(where: str, key: object) -> str:
    """A key's path in config.json, for error messages: `text_config.rope_parameters.full_attention`."""
    return f"{where}.{key}" if where else str(key)


def _lookup(mapping: Mapping[str, Any], key: object, where: str, default: Any, nullable: bool) -> tuple[Any, bool]:
    """(value, True) where the key is set; (default, False) where it is absent, or null and `nullable` (fields
    transformers types `X | None`, where null means unset)."""
    if key in mapping and not (nullable and mapping[key] is None):
        return mapping[key], True
    if default is _REQUIRED:
        raise ValueError(f"{_path(where, key)} is required" + (", got null" if key in mapping else ""))
    return default, False


def _checked(
    mapping: Mapping[str, Any], key: object, where: str, default: Any, nullable: bool,
    ok: Callable[[Any], bool], kind: str,
) -> Any:
    value, found = _lookup(mapping, key, where, default, nullable)
    if found and not ok(value):
        raise ValueError(f"{_path(where, key)} must be {kind}, got {value!r}")
    return value


def _int(mapping: Mapping[str, Any], key: str, where: str, default: Any = _REQUIRED, *, nullable: bool = False) -> Any:
    """An integer, or `default`. 64.9, 64.0, "64" and true are refused, not truncated or converted."""
    return _checked(mapping, key, where, default, nullable, lambda v: type(v) is int, "an integer")


def _float(mapping: Mapping[str, Any], key: str, where: str, default: Any = _REQUIRED) -> float:
    """A number (an integer will do), or `default`; "30" and true are refused."""
    return float(_checked(mapping, key, where, default, False, lambda v: type(v) in (int, float), "a number"))


def _bool(mapping: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    return _checked(mapping, key, where, default, False, lambda v: type(v) is bool, "true or false")


def _str(mapping: Mapping[str, Any], key: str, where: str, default: Any, *, nullable: bool = False) -> Any:
    return _checked(mapping, key, where, default, nullable, lambda v: isinstance(v, str), "a string")


def _list(mapping: Mapping[str, Any], key: str, where: str, default: list[Any], *, nullable: bool = False) -> list[Any]:
    """A copy of a list, or of `default`."""
    return list(_checked(mapping, key, where, default, nullable, lambda v: isinstance(v, list), "a list"))


def _mapping(
    mapping: Mapping[str, Any], key: object, where: str, default: Any = _REQUIRED, *, nullable: bool = False
) -> Mapping[str, Any]:
    return _checked(mapping, key, where, default, nullable, lambda v: isinstance(v, Mapping), "a JSON object")
