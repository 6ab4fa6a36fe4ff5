"""diffjax: DiffusionGemma in JAX/Flax.

ids -> embeddings -> layers -> logits -> sampler -> canvas, every step a pure jit-able function of an explicit
parameter pytree.
"""

from diffjax.config import AttentionConfig, Config
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

__all__ = [
    "AttentionConfig",
    "Config",
    "KVCache",
    "count_params",
    "denoise_logits",
    "encode",
    "encode_with_hidden",
    "init_cache",
    "init_params",
    "param_shapes",
]
