"""diffjax: DiffusionGemma in JAX/Flax.

ids -> embeddings -> layers -> logits -> sampler -> canvas, every step a pure jit-able function of an explicit
parameter pytree.
"""

import os
from typing import Any

from diffjax.config import AttentionConfig, Config
from diffjax.generate import GenerationOutput, generate
from diffjax.layout import arrange_for_gpu
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
from diffjax.quantize import quantize_model
from diffjax.tokenizer import chat


def load(
    path: str | os.PathLike[str],
    dtype: Any = None,
    *,
    experts_fp8: bool = False,
    experts_pretiled: bool = False,
    projections_fused: bool = False,
    blocks_unstacked: bool = False,
    check_finite: bool = False,
) -> tuple[Config, dict[str, Any]]:
    """`(config, params)` of a checkpoint written by `diffjax convert` or `diffjax train`: `convert.load`,
    bit-identical to what was saved (`dtype` casts every leaf).

    `experts_fp8`: store the experts' weights in float8_e4m3fn with float32 per-column scales
    (`diffjax.quantize`; about half the memory of a bf16 model, and of what a decoder step reads). They are
    quantized on the way from the file to the device, one weight stack at a time.
    `experts_pretiled`: lay the experts' weights out for the Pallas expert kernels
    (`diffjax.kernels.moe.pretile_model`; use with `moe_implementation="pallas"` or `"pallas_mgpu"`).
    `projections_fused`: q/k/v and gate/up as one kernel each (`diffjax.layout.fuse_projections`; same maths,
    read in place by an unrolled GPU step, see `Config.projection_layout`).
    `blocks_unstacked`: each layer block's weights a tree of their own (`diffjax.layout.unstack_blocks`; same
    maths, no scan, read in place by any matmul, see `Config.block_layout`).
    `check_finite`: refuse a checkpoint with a NaN or inf weight, naming the tensor (reads every weight once
    more, ~10 GB/s)."""
    # Imported here: `convert` imports diffjax's submodules, so a module-level import would be circular.
    from convert import load as load_checkpoint

    if experts_fp8:
        config, params = quantize_model(*load_checkpoint(path, dtype, as_numpy=True, check_finite=check_finite))
    else:
        config, params = load_checkpoint(path, dtype, check_finite=check_finite)
    return arrange_for_gpu(config, params, experts_pretiled=experts_pretiled, projections_fused=projections_fused,
                           blocks_unstacked=blocks_unstacked)

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
