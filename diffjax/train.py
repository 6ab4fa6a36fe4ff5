"""Training objective of DiffusionGemma: block-diffusion denoising loss + autoregressive encoder loss.

Data (`Batch`, built by `make_batch`): a prompt left-padded to a fixed length, then the response cut into
`num_canvases x canvas_length` tokens. The last canvas that holds text is filled with EOS to its end; later
canvases are PAD, masked out of the encoder and carry no loss (`canvas_valid` False).

Loss (`diffusion_loss`), one call:

1. Encoder: ONE causal pass over prompt + clean response. Its final-normed hidden states through the tied,
   softcapped LM head give an autoregressive next-token loss (token t+1 predicted at position t), weight 1.
   Scored targets (`Batch.ar_mask`), by default as Google's SFT `EncoderARLoss` scores them: the prompt and
   every valid canvas, EOS fill included, with a per-example mean. `make_batch(ar_targets="trl")` is TRL's
   example (prompt + response + its EOS, token mean); `ar_targets="response"` scores the response's text and
   first EOS only (token mean), which trains worse models on the sort task.
2. The same pass gives the K/V of every position and layer (the flax module's raw per-token K/V, before the
   cache's sliding ring). Per example one valid canvas `c` is chosen (start `s = P + c * L`), noised with
   `t ~ U(1e-4, 1 - 1e-4)`: each token replaced by a uniform random token with probability t.
3. Decoder view = exactly what generation has when it reaches that canvas: a `KVCache` with `length = s`,
   `mask` = the attention mask with every slot at or after `s` hidden (so the canvas sees the clean prompt
   and the clean EARLIER canvases, never later ones), full layers holding the K/V of all positions, and the
   sliding ring rebuilt per example by gathering the K/V of the last `ring` positions before `s`
   (`ring_positions(s, ring)`), which is what an encoder that had stopped at `s` would have left there. The
   canvas sits at positions `s .. s+L-1`. Since the cache length (and so the positions) differ per example,
   the decoder runs per example, each a batch of one: `jax.vmap` with dense experts, `jax.lax.map` with grouped
   ones (`ragged_dot` cannot be vmapped in jax 0.10; model.py keeps one scalar cache length per batch).
4. Self-conditioning: a first decoder pass without it, under `stop_gradient`; per example with probability
   0.5 (`NoiseDraws.self_condition`) its logits feed a second pass, otherwise the signal is exactly zero
   (`self_conditioning_mask` False). Only the second pass is scored: cross-entropy against the clean canvas
   over all its L positions, a per-example mean (no 1/t weight), then the batch mean.

Total = diffusion + AR. The decoder's loss also flows back through the cached K/V into the encoder pass.
All randomness is in `NoiseDraws` (`draw_noise`), so tests can fix it. `train_step` is one jit-compiled optax
step (clip 1.0, AdamW b1 0.95 b2 0.99 wd 1e-4, warmup + cosine schedule) of the full params, or of a LoRA
tree attached to frozen params (`diffjax.lora`). Full fine-tuning updates the params in their own dtype,
unless `fit(master_weights=True)` keeps float32 masters of bf16 or fp16 params (`train_step`'s
`compute_dtype`): without them an update below a weight's rounding step is lost. A LoRA adapter's weights
are float32. `fit` runs it step
by step over a batch stream with a progress bar and orbax checkpoints (`diffjax.checkpoint`) that resume a
killed run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from diffjax.checkpoint import TrainCheckpointer, TrainState
from diffjax.config import AR_TARGETS, DEFAULT_AR_TARGETS, SLIDING, Config
from diffjax.lora import LoraConfig, attach_lora, init_lora, merge_lora
from diffjax.model import (
    DECODE,
    ENCODE,
    DiffusionGemma,
    Embedder,
    KVCache,
    init_cache,
    ring_positions,
    ring_size,
)
from diffjax.sharding import MODEL, constrain
from diffjax.tokenizer import left_pad

Array = jax.Array
Params = dict[str, Any]

T_MIN, T_MAX = 1e-4, 1.0 - 1e-4


@flax.struct.dataclass
class Batch:
    """One training batch. P = prompt length, N = canvases, L = canvas length.

    prompt_ids/prompt_mask `[B, P]`: left-padded prompt and its attention mask.
    response_ids `[B, N*L]`: response tokens, the last text canvas EOS-filled, later canvases PAD.
    ar_mask `[B, P + N*L]`: the tokens of prompt + response that the AR loss scores, each predicted from the
    token before it (position 0 is never scored); `make_batch`'s `ar_targets` says which.
    canvas_valid `[B, N]`: canvases holding text (or its EOS fill); at least one per example.
    ar_mean (static): "tokens", the AR loss is the mean over every scored token of the batch; "examples", the
    mean over each example's scored tokens, then over the examples.
    """

    prompt_ids: Array
    prompt_mask: Array
    response_ids: Array
    ar_mask: Array
    canvas_valid: Array
    ar_mean: str = flax.struct.field(pytree_node=False, default="tokens")


@flax.struct.dataclass
class NoiseDraws:
    """The loss's randomness. canvas `[B]` int: chosen canvas index (a valid one); t `[B]` f32 noise level;
    tokens `[B, L]` int: the replacement tokens; replace_mask `[B, L]` bool: where they replace the clean
    canvas; self_condition `[B]` bool: whether the second decoder pass gets the first pass' logits."""

    canvas: Array
    t: Array
    tokens: Array
    replace_mask: Array
    self_condition: Array


def make_batch(
    config: Config, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], prompt_length: int,
    num_canvases: int, ar_targets: str = DEFAULT_AR_TARGETS,
) -> Batch:
    """Token lists -> `Batch`. A prompt longer than `prompt_length` keeps its last tokens; a response (without
    EOS) with no room for its EOS in `num_canvases * canvas_length` tokens is cut to fill them, without an EOS:
    an EOS at the cut would teach the model to stop where the text was only truncated (TRL's example drops
    the EOS of a cut response likewise).

    `ar_targets` chooses the tokens the AR co-loss scores (`Batch.ar_mask`) and its mean (`Batch.ar_mean`):
    - "google" (the default; Google's SFT, `EncoderARLoss`): every token of the prompt and of the valid
      canvases, EOS fill included, whose predecessor is one too, except the first response token when the
      prompt is shorter than `prompt_length` (Google right-pads the prompt, so a PAD stands between the two);
      the mean over each example's scored tokens, then over the examples.
    - "trl" (TRL's `sft_diffusion_gemma` example): every token of prompt + text + first EOS whose predecessor is
      one too; mean over the batch's scored tokens.
    - "response" (diffjax's default before 2026-11-28): the response's text and the first EOS after it (the
      first one predicted from the last prompt token); mean over the batch's scored tokens. On the sort task
      it trains markedly worse models (`notebooks/ablation_ar_targets.ipynb`).
    """
    if ar_targets not in AR_TARGETS:
        raise ValueError(f"ar_targets must be one of {AR_TARGETS}, got {ar_targets!r}")
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1 (the prompt starts with BOS), got {prompt_length}")
    length = config.canvas_length
    eos, pad = config.eos_token_id[0], config.pad_token_id
    batch = len(prompts)
    if len(responses) != batch:
        raise ValueError(f"{batch} prompts but {len(responses)} responses")
    # Longer prompts keep their last tokens, the ones next to the canvas.
    prompt_ids, prompt_mask = left_pad([list(prompt)[-prompt_length:] for prompt in prompts], pad, prompt_length)
    response_ids = np.full((batch, num_canvases * length), pad, np.int32)
    text_and_eos = np.zeros((batch, num_canvases * length), bool)
    canvas_valid = np.zeros((batch, num_canvases), bool)
    room = num_canvases * length
    for b, response in enumerate(responses):
        text = list(response)
        cut = len(text) >= room  # no room left for its EOS
        text = text[:room]
        used = num_canvases if cut else len(text) // length + 1  # canvases holding text and its EOS
        response_ids[b, : used * length] = eos
        response_ids[b, : len(text)] = text
        text_and_eos[b, : len(text) + (not cut)] = True
        canvas_valid[b, :used] = True

    response_scored = np.repeat(canvas_valid, length, 1) if ar_targets == "google" else text_and_eos
    sources = np.concatenate([prompt_mask, response_scored], 1)  # tokens that may predict the next one
    targets = sources.copy()
    if ar_targets == "response":
        targets[:, :prompt_length] = False
    ar_mask = np.zeros_like(targets)
    ar_mask[:, 1:] = targets[:, 1:] & sources[:, :-1]
    if ar_targets == "google":
        ar_mask[~prompt_mask.all(1), prompt_length] = False
    return Batch(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), jnp.asarray(response_ids),
                 jnp.asarray(ar_mask), jnp.asarray(canvas_valid),
                 ar_mean="examples" if ar_targets == "google" else "tokens")


@functools.partial(jax.jit, static_argnames=("config",))
def draw_noise(key: Array, batch: Batch, config: Config) -> NoiseDraws:
    """Uniform valid canvas, t ~ U(1e-4, 1-1e-4), uniform replacement tokens, coin p=0.5 per example."""
    k_canvas, k_t, k_tokens, k_replace, k_coin = jax.random.split(key, 5)
    rows, length = batch.canvas_valid.shape[0], config.canvas_length
    canvas = jax.random.categorical(k_canvas, jnp.where(batch.canvas_valid, 0.0, -jnp.inf), axis=-1)
    t = jax.random.uniform(k_t, (rows,), jnp.float32, T_MIN, T_MAX)
    tokens = jax.random.randint(k_tokens, (rows, length), 0, config.vocab_size, jnp.int32)
    replace = jax.random.uniform(k_replace, (rows, length)) < t[:, None]
    coin = jax.random.bernoulli(k_coin, 0.5, (rows,))
    return NoiseDraws(canvas.astype(jnp.int32), t, tokens, replace, coin)


def noisy_canvas(config: Config, batch: Batch, noise: NoiseDraws) -> tuple[Array, Array]:
    """(clean `[B, L]`, noisy `[B, L]`) tokens of each example's chosen canvas."""
    length = config.canvas_length
    canvases = batch.response_ids.reshape(batch.response_ids.shape[0], -1, length)
    clean = jnp.take_along_axis(canvases, noise.canvas[:, None, None], axis=1)[:, 0]
    return clean, jnp.where(noise.replace_mask, noise.tokens, clean)


def _cross_entropy(logits: Array, targets: Array) -> Array:
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def ar_loss(logits: Array, ids: Array, ar_mask: Array, ar_mean: str) -> Array:
    """The AR co-loss from the encoder's next-token logits `[B, S-1, V]` (position t predicts token t+1) of
    `ids [B, S]`, scoring the tokens `ar_mask [B, S]` marks; `ar_mean` as in `Batch`. A batch (or, with
    "examples", an example) with nothing scored adds 0."""
    scored = ar_mask[:, 1:]
    ce = _cross_entropy(logits, ids[:, 1:]) * scored
    if ar_mean == "examples":
        return jnp.mean(jnp.sum(ce, axis=1) / jnp.maximum(jnp.sum(scored, axis=1), 1))
    return jnp.sum(ce) / jnp.maximum(jnp.sum(scored), 1)


def _decoder_cache(config: Config, kv: tuple[dict, dict], mask: Array, start: Array) -> KVCache:
    """One example's cache as the encoder would have left it after `start` tokens (batch axis of 1).

    kv: per-token K/V of the whole sequence, `"layer_j" -> [blocks, seq, kv_heads, head_dim]`; mask `[seq]`.
    """
    seq = mask.shape[0]
    ring = ring_size(config, seq)
    ring_pos = jnp.maximum(ring_positions(start, ring), 0)  # empty slots (-1) are masked by the cache mask

    def view(layer_type: str, x: Array) -> Array:
        if layer_type == SLIDING:
            x = jnp.take(x, ring_pos, axis=1)
            if not jax.sharding.get_abstract_mesh().empty:
                # Ring slots unsplit (kv heads as propagated): with the expert-parallel MoE's tokens split over
                # the mesh, Shardy (jax 0.10.2) otherwise splits the slots of this gather inside the training
                # step's `lax.map` and the gradient of its scatter-add transpose comes out wrong (README
                # "Sharded runs").
                x = jax.lax.with_sharding_constraint(x, P(None, None, P.UNCONSTRAINED, None))
        return x[:, None]

    keys, values = {}, {}
    for j, layer_type in enumerate(config.block_layer_types):
        name = f"layer_{j}"
        keys[name] = view(layer_type, kv[0][name])
        values[name] = view(layer_type, kv[1][name])
    visible = mask & (jnp.arange(seq) < start)
    return KVCache(keys=keys, values=values, mask=visible[None], length=start.astype(jnp.int32))


def _decode_one(
    params: Params, config: Config, kv: tuple[dict, dict], mask: Array, start: Array, canvas: Array,
    sc_logits: Array | None, sc_mask: Array | None,
) -> Array:
    cache = _decoder_cache(config, kv, mask, start)
    return DiffusionGemma(config).apply(
        {"params": params}, DECODE, canvas[None], cache,
        self_conditioning_logits=None if sc_logits is None else sc_logits[None],
        self_conditioning_mask=None if sc_mask is None else sc_mask[None],
    )[0]


def _per_example(config: Config, fn: Any, args: Any) -> Array:
    """`fn` over the leading (example) axis of `args`: `jax.vmap` for dense experts; `jax.lax.map` (a loop of
    batch-1 passes) for grouped and expert-parallel ones, because `jax.lax.ragged_dot` has no batching rule in
    jax 0.10."""
    if config.moe_implementation == "dense":
        return jax.vmap(fn)(args)
    return jax.lax.map(fn, args)


@functools.partial(jax.jit, static_argnames=("config",))
def loss_terms(params: Params, config: Config, batch: Batch, noise: NoiseDraws) -> dict[str, Array]:
    """The loss and its parts: `loss`, `diffusion`, `ar`, `diffusion_per_example [B]`."""
    rows, prompt_len = batch.prompt_ids.shape
    if batch.ar_mask.shape != (rows, prompt_len + batch.response_ids.shape[1]):
        raise ValueError(
            f"Batch.ar_mask has shape {batch.ar_mask.shape}, expected [batch, prompt + response] = "
            f"{(rows, prompt_len + batch.response_ids.shape[1])} (build batches with train.make_batch)"
        )
    if batch.ar_mean not in ("tokens", "examples"):
        raise ValueError(f"Batch.ar_mean must be 'tokens' or 'examples', got {batch.ar_mean!r}")
    length = config.canvas_length
    ids = jnp.concatenate([batch.prompt_ids, batch.response_ids], axis=1).astype(jnp.int32)
    response_visible = jnp.repeat(batch.canvas_valid, length, axis=1)
    mask = jnp.concatenate([batch.prompt_mask, response_visible], axis=1).astype(bool)

    # 1. One causal encoder pass: hidden states for the AR loss and the per-token K/V of every layer.
    dtype = params["embedder"]["embedding"].dtype
    hidden, kv = DiffusionGemma(config).apply(
        {"params": params}, ENCODE, ids, init_cache(config, rows, 1, dtype), attention_mask=mask
    )
    ar_logits = Embedder(config).apply({"params": params["embedder"]}, hidden[:, :-1], method=Embedder.logits)
    ar = ar_loss(ar_logits, ids, batch.ar_mask, batch.ar_mean)

    # 2. The chosen canvas, noised, decoded against the clean context before it (vmapped: positions differ).
    clean, noisy = noisy_canvas(config, batch, noise)
    start = prompt_len + noise.canvas * length
    # [blocks, B, ...] -> [B, blocks, ...]; on a mesh every example whole (each one's decoder pass runs on the
    # whole mesh), kv heads over `model`: from the MoE's tokens split over every device, XLA otherwise rebuilt
    # each example's K/V by replicating the whole batch's first.
    kv_rows = jax.tree.map(lambda x: constrain(jnp.moveaxis(x, 1, 0), P(None, None, None, MODEL, None)), kv)
    decode = functools.partial(_decode_one, params, config)
    first = _per_example(config, lambda a: decode(*a, None, None), (kv_rows, mask, start, noisy))
    first = jax.lax.stop_gradient(first)
    second = _per_example(config, lambda a: decode(*a), (kv_rows, mask, start, noisy, first, noise.self_condition))
    per_example = jnp.mean(_cross_entropy(second, clean), axis=-1)
    diffusion = jnp.mean(per_example)
    return {"loss": diffusion + ar, "diffusion": diffusion, "ar": ar, "diffusion_per_example": per_example}


def diffusion_loss(params: Params, config: Config, batch: Batch, noise: NoiseDraws) -> Array:
    """Total training loss (diffusion + AR, both batch means) for fixed `noise`; see the module docstring."""
    return loss_terms(params, config, batch, noise)["loss"]


# ------------------------------------------------------------------------------- optimiser


def default_warmup_steps(steps: int) -> int:
    """A tenth of the run (at least one step), leaving at least one step at the peak rate: a 1-step run starts at
    it, where a warmup step would train at rate 0."""
    return min(max(1, steps // 10), steps - 1)


def make_optimizer(
    peak_lr: float = 1e-4, total_steps: int = 1000, warmup_steps: int = 100, end_lr_ratio: float = 0.1,
    weight_decay: float = 1e-4, clip_norm: float = 1.0,
) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(b1 0.95, b2 0.99) on a linear-warmup + cosine-decay schedule."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak_lr * end_lr_ratio,
    )
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=0.95, b2=0.99, weight_decay=weight_decay),
    )


def trained_loss_terms(
    trainable: Params, config: Config, batch: Batch, noise: NoiseDraws, base: Params | None = None,
    lora: LoraConfig | None = None,
) -> dict[str, Array]:
    """`loss_terms` of what a train step optimises: the model params, or with `lora` the LoRA tree
    `trainable` attached to the frozen `base` params (see `diffjax.lora`)."""
    if (base is None) != (lora is None):
        raise ValueError("LoRA training needs both `base` (the frozen params) and `lora` (its LoraConfig)")
    params = trainable if lora is None else attach_lora(base, trainable, lora)
    return loss_terms(params, config, batch, noise)


@functools.partial(
    jax.jit, static_argnames=("config", "optimizer", "lora", "compute_dtype"),
    donate_argnames=("trainable", "opt_state"),
)
def train_step(
    trainable: Params, opt_state: Any, config: Config, optimizer: optax.GradientTransformation, batch: Batch,
    noise: NoiseDraws, base: Params | None = None, lora: LoraConfig | None = None, compute_dtype: Any = None,
) -> tuple[Params, Any, dict[str, Array]]:
    """One optimiser step on `diffusion_loss`; metrics: loss, diffusion, ar, grad_norm (before clipping).

    Full fine-tuning: `trainable` is the params. LoRA: `trainable` is the LoRA tree, `base` the frozen params
    and `lora` its config; only the LoRA tree (and its optimiser state, `optimizer.init(lora_tree)`) changes.
    `compute_dtype` (full fine-tuning with master weights): `trainable` holds float32 masters, cast to this
    dtype for the loss; gradients, optimiser state and updates stay float32.
    """

    def loss_fn(p: Params) -> tuple[Array, dict[str, Array]]:
        if compute_dtype is not None:
            p = jax.tree.map(lambda w: w.astype(compute_dtype), p)
        terms = trained_loss_terms(p, config, batch, noise, base, lora)
        return terms["loss"], terms

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {k: terms[k] for k in ("loss", "diffusion", "ar")}
    metrics["grad_norm"] = optax.tree.norm(grads)
    return trainable, opt_state, metrics


# ------------------------------------------------------------------------------- fit loop


class TrainingDiverged(ValueError):
    """A step's loss or gradient norm was NaN or inf: every later update would be NaN too."""


@dataclasses.dataclass
class FitResult:
    """What `fit` returns. params: the trained model (the LoRA update merged in); lora: the LoRA tree (None for
    full fine-tuning); opt_state: the optimiser state of the trained tree; step: optimiser steps done in total;
    history: per step run by this call (a resumed run starts at its checkpoint): loss, diffusion, ar, grad_norm;
    tokens_per_second: encoder tokens (prompt + response) per second after the first (compiling) step."""

    params: Params
    lora: Params | None
    opt_state: Any
    step: int
    history: dict[str, list[float]]
    tokens_per_second: float | None

    @property
    def losses(self) -> list[float]:
        return self.history["loss"]


def fit(
    params: Params, config: Config, batches: Callable[[int], Batch], steps: int, *, key: Array,
    optimizer: optax.GradientTransformation | None = None, lora: LoraConfig | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None, checkpoint_every: int = 100, keep: int = 3,
    resume: bool = False, metadata: Mapping[str, Any] | None = None, progress: bool = True,
    console: Any = None, master_weights: bool = False,
) -> FitResult:
    """Train until `steps` optimiser steps are done: one jit-compiled `train_step` per step, batch `batches(i)`
    for data position i, the step's noise drawn from a key split off the carried RNG key.

    `params` is the model to train, or with `lora` the frozen base (a fresh LoRA tree is initialised from
    `key`). With `checkpoint_dir`, a `TrainCheckpointer` there saves the train state every `checkpoint_every`
    steps and at the end, keeping the last `keep`; `resume=True` continues from its latest checkpoint (the
    losses then equal those of an uninterrupted run), and a directory that already has checkpoints is refused
    without it. `metadata` (JSON) is stored with each checkpoint and must match on resume. `progress` shows a
    rich progress bar (loss, tokens/s) on `console`. A step whose loss or gradient norm is not finite stops
    the run with `TrainingDiverged` before anything after it is saved (the checkpoints on disk keep the
    weights from before it).

    `master_weights` (full fine-tuning of bf16 or fp16 params): train float32 copies of the weights, with
    float32 optimiser state, and run each step's loss in the params' dtype; `FitResult.params` is cast back
    to it. Without them an update smaller than half a weight's rounding step (bf16: 2^-9 of its size) is
    lost. Costs 4 more bytes a weight, and AdamW's two moments take 4 bytes each instead of 2.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if lora is None and config.expert_quantization != "none":
        raise ValueError(
            f"training updates every weight, and {config.expert_quantization} experts are a storage format, not "
            "trainable weights: train the unquantized model (diffjax.quantize.dequantize_experts)"
        )
    compute_dtype = None
    if master_weights:
        if lora is not None:
            raise ValueError("master_weights is for full fine-tuning: a LoRA adapter's weights are float32 already")
        dtypes = {w.dtype for w in jax.tree.leaves(params)}
        if len(dtypes) > 1:
            raise ValueError(f"master_weights needs params of one dtype, got {sorted(map(str, dtypes))}")
        (compute_dtype,) = dtypes
        if compute_dtype == jnp.float32:
            raise ValueError("master_weights keeps float32 copies of bf16 or fp16 params; these are float32 already")
    optimizer = optimizer or make_optimizer(total_steps=steps, warmup_steps=default_warmup_steps(steps))
    if master_weights:
        trainable = jax.tree.map(lambda w: jnp.array(w, jnp.float32), params)  # copies: train_step donates them
    elif lora is None:
        trainable = jax.tree.map(jnp.copy, params)  # train_step donates its input; the caller keeps theirs
    else:
        key, lora_key = jax.random.split(key)
        trainable = init_lora(params, lora, lora_key)
    base = None if lora is None else params
    state = TrainState(trainable, optimizer.init(trainable), 0, 0, key)
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = TrainCheckpointer(checkpoint_dir, keep)
        metadata = {"lora": None if lora is None else dataclasses.asdict(lora), **(metadata or {}),
                    **({"master_weights": True} if master_weights else {})}  # older runs resume as they were
        if checkpointer.latest_step() is not None:
            if not resume:
                raise FileExistsError(f"{checkpoint_dir} already holds training checkpoints "
                                      f"{checkpointer.all_steps()}: resume from them or choose another directory")
            state = checkpointer.restore(state, metadata)
        elif resume:
            raise ValueError(f"nothing to resume: no training checkpoint in {checkpoint_dir}")
    elif resume:
        raise ValueError("resume needs a checkpoint_dir")

    history: dict[str, list[float]] = {"loss": [], "diffusion": [], "ar": [], "grad_norm": []}
    tokens, timed_from = 0, None
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            task = bar.add_task("train", total=steps, completed=state.step, loss="-", rate="-")
            while state.step < steps:
                batch = batches(state.data_position)
                next_key, step_key = jax.random.split(state.key)
                noise = draw_noise(step_key, batch, config)
                trainable, opt_state, metrics = train_step(
                    state.trainable, state.opt_state, config, optimizer, batch, noise, base, lora, compute_dtype)
                for name, value in metrics.items():
                    history[name].append(float(value))  # also waits for the step, so the timing below is real
                _check_finite_step(state.step + 1, history, checkpointer)
                state = TrainState(trainable, opt_state, state.step + 1, state.data_position + 1, next_key)
                if timed_from is None:
                    timed_from = time.perf_counter()
                else:
                    tokens += int(batch.prompt_ids.size + batch.response_ids.size)
                rate = tokens / (time.perf_counter() - timed_from) if tokens else None
                bar.update(task, completed=state.step, loss=f"{history['loss'][-1]:.4f}",
                           rate="-" if rate is None else f"{rate:,.0f}")
                if checkpointer is not None and (state.step % checkpoint_every == 0 or state.step == steps):
                    checkpointer.save(state, metadata)
        if checkpointer is not None and checkpointer.latest_step() != state.step:
            checkpointer.save(state, metadata)  # a run resumed at its end: keep its last state on disk
    finally:
        if checkpointer is not None:
            checkpointer.close()
    if lora is not None:
        merged = merge_lora(params, state.trainable, lora)
    elif master_weights:
        merged = jax.tree.map(lambda w: w.astype(compute_dtype), state.trainable)
    else:
        merged = state.trainable
    return FitResult(merged, None if lora is None else state.trainable, state.opt_state, state.step, history,
                     rate if tokens else None)


def _check_finite_step(step: int, history: Mapping[str, list[float]], checkpointer: TrainCheckpointer | None) -> None:
    """Stop at the first non-finite step: its update has already made the weights NaN."""
    values = {name: values[-1] for name, values in history.items()}
    if all(math.isfinite(v) for v in values.values()):
        return
    saved = None if checkpointer is None else checkpointer.latest_step()
    where = ("nothing was saved" if checkpointer is None else
             f"no checkpoint was written in {checkpointer.directory}" if saved is None else
             f"the latest checkpoint, step {saved} in {checkpointer.directory}, holds the weights before it")
    raise TrainingDiverged(
        f"training diverged at step {step}: " + ", ".join(f"{n} {v:.4g}" for n, v in values.items())
        + f"; {where}. A lower learning rate or a longer warmup usually helps."
    )


__all__ = [
    "AR_TARGETS", "Batch", "FitResult", "NoiseDraws", "TrainingDiverged", "ar_loss", "diffusion_loss", "draw_noise",
    "fit", "loss_terms", "make_batch", "make_optimizer", "noisy_canvas", "train_step", "trained_loss_terms",
]
