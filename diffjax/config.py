"""Model configuration: every text-config field that changes the maths, and nothing else.

`Config` is a frozen (hashable) dataclass so it can be a static argument of `jax.jit`.
`Config.from_hf` reads a Hugging Face `config.json` of `model_type: diffusion_gemma`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
MOE_IMPLEMENTATIONS = ("grouped", "dense", "pallas", "pallas_mgpu")
# MoE kernels that read each block's experts from the whole stack of blocks in place (no per-block copy).
STACK_READING_MOE_IMPLEMENTATIONS = ("pallas", "pallas_mgpu")
# MoE forms that need a device mesh (`jax.set_mesh`): not offered where no mesh is set up (bench, CLI).
MESH_MOE_IMPLEMENTATIONS = ("expert_parallel",)
GLOBAL_ATTENTION_IMPLEMENTATIONS = ("xla", "pallas")
SLIDING_ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "pallas")

# Config fields that pick an implementation (same maths): not written to config.json.
IMPLEMENTATION_FIELDS = ("moe_implementation", "global_attention_implementation", "sliding_attention_implementation")
# How the expert weights are stored (`diffjax.quantize`). Not an implementation field: fp8 changes the maths
# (slightly) and the parameter tree, and no checkpoint stores it (quantized trees are made at load time).
EXPERT_QUANTIZATIONS = ("none", "fp8")
# How the expert weights are laid out (`diffjax.kernels.moe.pretile_model`): like the quantization, a storage
# format made at load time, which no checkpoint stores.
EXPERT_LAYOUTS = ("plain", "pretiled")

RopeType = Literal["default", "proportional"]


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
    layer_types: tuple[str, ...] = tuple(
        FULL if (i + 1) % 6 == 0 else SLIDING for i in range(30)
    )
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
    # `layers.attend`. "pallas": the split-K kernel of `diffjax.kernels.attention`. The encoder (causal)
    # always uses `attend`.
    global_attention_implementation: Literal["xla", "pallas"] = "xla"
    # How the decoder's sliding layers attend (the canvas over the ring of the last window - 1 positions and
    # itself, padding-only mask). "xla": `layers.attend`. "cudnn": cuDNN's fused attention through
    # `jax.nn.dot_product_attention` (NVIDIA GPUs, bf16/fp16 only; on an H100 at batch 8 0.23 ms per layer
    # against 0.92 ms for "xla"). "pallas": the global layers' split-K kernel (any GPU it compiles for;
    # float32 too), which needs no more than a padding-only mask either. The encoder keeps `attend`: its
    # left-padded rows see no key at all, where `attend` returns zeros and cuDNN's result is not specified.
    sliding_attention_implementation: Literal["xla", "cudnn", "pallas"] = "xla"
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
        if self.moe_implementation not in MOE_IMPLEMENTATIONS + MESH_MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"moe_implementation must be one of {MOE_IMPLEMENTATIONS + MESH_MOE_IMPLEMENTATIONS}, "
                f"got {self.moe_implementation!r}"
            )
        if self.global_attention_implementation not in GLOBAL_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"global_attention_implementation must be one of {GLOBAL_ATTENTION_IMPLEMENTATIONS}, "
                f"got {self.global_attention_implementation!r}"
            )
        if self.sliding_attention_implementation not in SLIDING_ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"sliding_attention_implementation must be one of {SLIDING_ATTENTION_IMPLEMENTATIONS}, "
                f"got {self.sliding_attention_implementation!r}"
            )
        if self.expert_quantization not in EXPERT_QUANTIZATIONS:
            raise ValueError(
                f"expert_quantization must be one of {EXPERT_QUANTIZATIONS}, got {self.expert_quantization!r}"
            )
        if self.expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {self.expert_layout!r}")
        if self.expert_layout == "pretiled" and self.moe_implementation in MESH_MOE_IMPLEMENTATIONS:
            raise ValueError(
                f"expert_layout='pretiled' is read by the single-device MoE forms {MOE_IMPLEMENTATIONS}, not by "
                f"{self.moe_implementation!r}"
            )
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.final_logit_softcapping is not None and not self.final_logit_softcapping > 0:
            raise ValueError(f"final_logit_softcapping must be > 0 or None, got {self.final_logit_softcapping}")
        for name in ("pad_token_id", "bos_token_id"):
            _token_id(name, getattr(self, name), self.vocab_size)
        for eos in self.eos_token_id:
            _token_id("eos_token_id", eos, self.vocab_size)

    # ------------------------------------------------------------ derived facts
    def attention(self, layer_type: str) -> AttentionConfig:
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
        return self.num_layers // self.layer_period

    @property
    def block_layer_types(self) -> tuple[str, ...]:
        return self.layer_types[: self.layer_period]

    def layer_slot(self, layer_index: int) -> tuple[int, int]:
        """(block, position in block) of a layer index."""
        if not 0 <= layer_index < self.num_layers:
            raise ValueError(f"layer index {layer_index} out of range [0, {self.num_layers})")
        return divmod(layer_index, self.layer_period)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def implementation(self) -> dict[str, str]:
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
        """Read a Hugging Face `config.json` dict (`model_type: diffusion_gemma`, or its `text_config`)."""
        model_type = hf_config.get("model_type")
        if model_type == "diffusion_gemma":
            text = dict(hf_config.get("text_config") or {})
            canvas_length = hf_config.get("canvas_length", 256)
        elif model_type == "diffusion_gemma_text":
            text, canvas_length = dict(hf_config), 256
        else:
            raise ValueError(
                f"unknown model_type {model_type!r}: expected 'diffusion_gemma' (or 'diffusion_gemma_text')"
            )
        unknown = sorted(set(text) - _HF_TEXT_KEYS - _HF_IGNORED_KEYS)
        if unknown:
            raise ValueError(f"unknown text_config key(s) in config.json: {', '.join(unknown)}")
        if text.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"hidden_activation {text['hidden_activation']!r} is not supported (gelu_pytorch_tanh)")
        if text.get("attention_bias", False):
            raise ValueError("attention_bias=True is not supported: DiffusionGemma has no attention biases")
        if text.get("use_bidirectional_attention") == "all":
            raise ValueError("use_bidirectional_attention='all' is not supported (the released model uses 'vision')")
        if text.get("tie_word_embeddings", True) is False:
            raise ValueError("tie_word_embeddings=False is not supported: the LM head is the embedding")

        num_layers = int(text.get("num_hidden_layers", 30))
        layer_types = list(text.get("layer_types") or [
            FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)
        ])
        if layer_types and layer_types[-1] != FULL:
            layer_types[-1] = FULL  # as transformers does: the last layer is always global
        rope = text.get("rope_parameters") or {}
        per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
        sliding_head_dim = int(text.get("head_dim", 256))
        sliding_kv = int(text.get("num_key_value_heads", 4))

        def attention_of(layer_type: str, default_rope: dict[str, Any]) -> AttentionConfig:
            overrides = [per_layer.get(i, {}) for i, t in enumerate(layer_types) if t == layer_type]
            distinct = {tuple(sorted(o.items())) for o in overrides}
            if len(distinct) > 1:
                raise ValueError(f"per_layer_config differs between {layer_type} layers: not supported")
            override = overrides[0] if overrides else {}
            if layer_type == FULL and not per_layer:
                override = {"head_dim": int(text.get("global_head_dim", 512))}
                if text.get("num_global_key_value_heads") is not None:
                    override["num_key_value_heads"] = int(text["num_global_key_value_heads"])
            params = rope.get(layer_type) or default_rope
            return AttentionConfig(
                head_dim=int(override.get("head_dim", sliding_head_dim)),
                num_kv_heads=int(override.get("num_key_value_heads", sliding_kv)),
                rope_theta=float(params["rope_theta"]),
                rope_type=params.get("rope_type", "default"),
                partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
                rope_factor=float(params.get("factor", 1.0)),
            )

        eos = text.get("eos_token_id", 1)
        return cls(
            vocab_size=int(text.get("vocab_size", 262_144)),
            hidden_size=int(text.get("hidden_size", 2304)),
            num_layers=num_layers,
            layer_types=tuple(layer_types),
            num_heads=int(text.get("num_attention_heads", 8)),
            sliding=attention_of(SLIDING, {"rope_type": "default", "rope_theta": 10_000.0}),
            full=attention_of(
                FULL, {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}
            ),
            sliding_window=int(text.get("sliding_window", 512)),
            intermediate_size=int(text.get("intermediate_size", 9216)),
            num_experts=int(_required(text, "num_experts")),
            top_k_experts=int(_required(text, "top_k_experts")),
            moe_intermediate_size=int(_required(text, "moe_intermediate_size")),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            final_logit_softcapping=text.get("final_logit_softcapping", 30.0),
            canvas_length=int(canvas_length),
            max_position_embeddings=int(text.get("max_position_embeddings", 131_072)),
            pad_token_id=int(text.get("pad_token_id") if text.get("pad_token_id") is not None else 0),
            eos_token_id=(eos,) if isinstance(eos, int) else tuple(eos or (1,)),
            bos_token_id=int(text.get("bos_token_id") if text.get("bos_token_id") is not None else 2),
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


# Keys of a transformers text_config that we read.
_HF_TEXT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads", "layer_types",
    "per_layer_config", "rope_parameters", "sliding_window", "num_experts", "top_k_experts",
    "moe_intermediate_size", "rms_norm_eps", "final_logit_softcapping", "max_position_embeddings",
    "pad_token_id", "eos_token_id", "bos_token_id", "hidden_activation", "attention_bias",
    "use_bidirectional_attention", "tie_word_embeddings",
})
# Keys that do not change inference maths (bookkeeping, training-only, or fixed for this architecture).
_HF_IGNORED_KEYS = frozenset({
    "model_type", "dtype", "torch_dtype", "initializer_range", "attention_dropout", "use_cache",
    "transformers_version", "architectures", "output_attentions", "output_hidden_states", "return_dict",
    "enable_moe_block", "attention_k_eq_v", "use_double_wide_mlp", "num_kv_shared_layers",
    "vocab_size_per_layer_input", "hidden_size_per_layer_input", "_name_or_path", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "problem_type", "id2label", "label2id",
})


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


def _required(text: Mapping[str, Any], key: str) -> Any:
    if text.get(key) is None:
        raise ValueError(f"text_config.{key} is missing: DiffusionGemma is a mixture-of-experts model")
    return text[key]
