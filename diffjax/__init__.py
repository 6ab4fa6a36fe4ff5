"""diffjax: DiffusionGemma in JAX/Flax.

ids -> embeddings -> layers -> logits -> sampler -> canvas, every step a pure jit-able function of an explicit
parameter pytree.
"""

import os
from typing import Any

from diffjax.config import AttentionConfig, Config
from diffjax.generate import GenerationOutput, generate
from diffjax.model import (
    KVCache,
    count_params,
    denoise_logits,
    encode,
    encode_with_hidden,
    init_cache,
    init_params,
    param_shapes,
)
from diffjax.tokenizer import chat


def load(path: str | os.PathLike[str], dtype: Any = None) -> tuple[Config, dict[str, Any]]:
    """`(config, params)` of a checkpoint written by `diffjax convert` or `diffjax train`: `convert.load`,
    bit-identical to what was saved (`dtype` casts every leaf)."""
    # Imported here: `convert` imports diffjax's submodules, so a module-level import would be circular.
    from convert import load as load_checkpoint

    return load_checkpoint(path, dtype)

__all__ = [
    "AttentionConfig",
    "Config",
    "GenerationOutput",
    "KVCache",
    "chat",
    "count_params",
    "denoise_logits",
    "encode",
    "encode_with_hidden",
    "generate",
    "init_cache",
    "init_params",
    "load",
    "param_shapes",
]
