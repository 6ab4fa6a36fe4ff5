"""The transformers 5.23.0 oracle: tiny random DiffusionGemma models, every weight randomised."""

from __future__ import annotations

import pathlib

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from diffjax.config import Config


def hf_config(config: Config) -> DiffusionGemmaConfig:
    # Default attention (sdpa): transformers' eager mask builder cannot make the decoder's padded mask in generate.
    return DiffusionGemmaConfig(**config.to_hf())


def random_hf_model(config: Config, seed: int = 0, embed_std: float = 0.15) -> DiffusionGemmaForBlockDiffusion:
    """A float32 transformers model with every text weight randomised (norms around 1, scalars distinct).

    Encoder and decoder `layer_scalar`s get different values; token 0's embedding row is not left at zero.
    A larger `embed_std` spreads the (tied) logits, so near-ties between the top two tokens become rare.
    """
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(hf_config(config)).float().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "vision" in name or "inv_freq" in name or "embed_scale" in name:
                continue
            shape = tensor.shape
            if name.endswith("layer_scalar"):
                base = 0.7 if "encoder" in name else 1.2
                value = base + 0.2 * torch.rand(shape, generator=generator)
            elif "norm" in name or name.endswith("router.scale") or name.endswith("per_expert_scale"):
                value = 1.0 + 0.3 * torch.randn(shape, generator=generator)
            else:
                std = embed_std if name.endswith("embed_tokens.weight") else 0.15
                value = std * torch.randn(shape, generator=generator)
            tensor.copy_(value)
    return model


def save_hf(model: DiffusionGemmaForBlockDiffusion, path: pathlib.Path, **kwargs) -> pathlib.Path:
    model.save_pretrained(path, **kwargs)
    return path


def diffjax_params(model: DiffusionGemmaForBlockDiffusion, path: pathlib.Path, dtype=None):
    """Save the transformers model and load it through our converter: (config, params)."""
    import convert

    save_hf(model, path)
    return convert.load_hf(path, dtype=dtype)
