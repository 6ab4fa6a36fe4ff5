"""The training loss against transformers 5.23.0 on a tiny random checkpoint, and an overfitting train_step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from reference import diffjax_params, random_hf_model
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

import convert
from diffjax import train
from diffjax.config import FULL, SLIDING, Config
from diffjax.lora import LoraConfig, init_lora, merge_lora
from diffjax.tasks import get_task

PROMPT_LEN, NUM_CANVASES = 10, 3


def _rows(config: Config, seed: int = 0) -> tuple[list, list]:
    """Row 0: a full-length prompt (longer than the window), 20 response tokens (3 canvases, EOS-filled).
    Row 1: a left-padded 6-token prompt, 12 response tokens (2 canvases, the third PAD)."""
    rng = np.random.default_rng(seed)
    hi = config.vocab_size
    prompts = [rng.integers(3, hi, PROMPT_LEN), rng.integers(3, hi, 6)]
    responses = [rng.integers(3, hi, 20), rng.integers(3, hi, 12)]
    return prompts, responses


def _batch(config: Config, seed: int = 0) -> train.Batch:
    return train.make_batch(config, *_rows(config, seed), PROMPT_LEN, NUM_CANVASES)


def _noise(config: Config, batch: train.Batch, canvas, coin, seed: int = 1) -> train.NoiseDraws:
    drawn = train.draw_noise(jax.random.key(seed), batch, config)
    return drawn.replace(canvas=jnp.asarray(canvas, jnp.int32), self_condition=jnp.asarray(coin, bool))


def test_make_batch_and_draw_noise():
    config = Config.tiny(canvas_length=8)
    batch = _batch(config)
    eos, pad = config.eos_token_id[0], config.pad_token_id
    resp = np.asarray(batch.response_ids)
    np.testing.assert_array_equal(batch.canvas_valid, [[True, True, True], [True, True, False]])
    np.testing.assert_array_equal(resp[0, 20:], eos)  # text, then EOS to the end of its canvas
    np.testing.assert_array_equal(resp[1, 12:16], eos)
    np.testing.assert_array_equal(resp[1, 16:], pad)
    # Google's targets: prompt pairs (9, 5) and every valid canvas (24, 16), less row 1's first response token.
    np.testing.assert_array_equal(np.asarray(batch.ar_mask).sum(1), [9 + 24, 5 + 16 - 1])
    np.testing.assert_array_equal(np.asarray(batch.prompt_mask).sum(1), [PROMPT_LEN, 6])
    assert np.all(np.asarray(batch.prompt_ids)[1, :4] == pad)

    noise = train.draw_noise(jax.random.key(0), batch.replace(canvas_valid=jnp.tile(batch.canvas_valid, (50, 1))),
                             config)
    canvas = np.asarray(noise.canvas).reshape(50, 2)
    assert set(canvas[:, 0]) == {0, 1, 2} and set(canvas[:, 1]) == {0, 1}  # only valid canvases
    t = np.asarray(noise.t)
    assert np.all((t >= train.T_MIN) & (t <= train.T_MAX))
    # Enough draws that an unclamped U(0, 1) would fall outside [T_MIN, T_MAX] (2e-4 of them) ~10 times.
    wide = train.draw_noise(jax.random.key(2), batch.replace(canvas_valid=jnp.tile(batch.canvas_valid, (25_000, 1))),
                            config)
    t_wide = np.asarray(wide.t)
    assert t_wide.min() >= train.T_MIN and t_wide.max() <= train.T_MAX and t_wide.min() < 1e-3
    frac = np.asarray(noise.replace_mask).mean(1)
    assert np.corrcoef(frac, t)[0, 1] > 0.8
    assert 0.3 < np.asarray(noise.self_condition).mean() < 0.7


def test_make_batch_at_the_edges():
    """A response filling its canvas exactly, one longer than every canvas, a prompt longer than its room."""
    config = Config.tiny(canvas_length=8)
    eos, pad = config.eos_token_id[0], config.pad_token_id
    rng = np.random.default_rng(4)
    exact, long, prompt = rng.integers(3, 100, 8), rng.integers(3, 100, 30), rng.integers(3, 100, 13)
    batch = train.make_batch(config, [prompt, prompt[:3]], [exact, long], PROMPT_LEN, NUM_CANVASES,
                             ar_targets="response")
    resp, ar = np.asarray(batch.response_ids), np.asarray(batch.ar_mask)
    # Exactly one canvas of text: its EOS opens the next canvas (EOS-filled); the third is PAD.
    np.testing.assert_array_equal(batch.canvas_valid, [[True, True, False], [True, True, True]])
    np.testing.assert_array_equal(resp[0, :8], exact)
    np.testing.assert_array_equal(resp[0, 8:16], eos)
    np.testing.assert_array_equal(resp[0, 16:], pad)
    assert ar[0].sum() == 9 and ar[0, PROMPT_LEN + 8]
    # Too long: cut to fill every canvas, with no EOS (one at the cut would teach stopping there).
    np.testing.assert_array_equal(resp[1], long[:24])
    assert ar[1].sum() == 24 and eos not in resp[1]
    # A long prompt keeps its last tokens, the ones next to the response; a short one is left-padded.
    np.testing.assert_array_equal(batch.prompt_ids[0], prompt[-PROMPT_LEN:])
    np.testing.assert_array_equal(batch.prompt_mask[1], [False] * (PROMPT_LEN - 3) + [True] * 3)


@pytest.mark.parametrize("ar_targets", train.AR_TARGETS)
def test_ar_loss_follows_each_reference_in_its_own_layout(ar_targets):
    """The AR co-loss on random logits against each reference's formula, in that reference's own layout:
    TRL's example (prompt, text and EOS right-padded, `attention_mask[:, :-1] & attention_mask[:, 1:]`,
    `F.cross_entropy(ignore_index=-100)`), Google's `EncoderARLoss` (the prompt right-padded to P, then every
    canvas, `full_valid & roll(full_valid, -1)`, per-example mean), ours (text and first EOS, token mean).
    Rows: a prompt filling P with a short response; a short prompt with a response cut at the canvases (no
    EOS); a short prompt with a response filling one canvas exactly (its EOS fills the next)."""
    config = Config.tiny(canvas_length=8)
    length, hi, pad = config.canvas_length, config.vocab_size, config.pad_token_id
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, hi, PROMPT_LEN), rng.integers(3, hi, 4), rng.integers(3, hi, 7)]
    responses = [rng.integers(3, hi, 11), rng.integers(3, hi, 30), rng.integers(3, hi, 8)]
    batch = train.make_batch(config, prompts, responses, PROMPT_LEN, NUM_CANVASES, ar_targets=ar_targets)
    ids = np.concatenate([batch.prompt_ids, batch.response_ids], 1)
    rows, width = ids.shape
    logits = (3 * rng.standard_normal((rows, width, hi))).astype(np.float32)  # position t predicts t + 1
    ours = float(train.ar_loss(jnp.asarray(logits[:, :-1]), jnp.asarray(ids), batch.ar_mask, batch.ar_mean))

    def in_our_layout(b: int, ref_prompt: int, pos: np.ndarray) -> np.ndarray:
        """Our position of the token at `pos` in a layout whose prompt (len(prompts[b]) real tokens) is
        followed by the response at `ref_prompt`."""
        real = len(prompts[b])
        return np.where(pos < real, PROMPT_LEN - real + pos, PROMPT_LEN + pos - ref_prompt)

    room = NUM_CANVASES * length
    text = [min(len(r), room) for r in responses]
    with_eos = [n + (n < room) for n in text]
    if ar_targets == "trl":
        trl_width = max(len(p) + n for p, n in zip(prompts, with_eos, strict=True))
        trl_ids = np.full((rows, trl_width), pad)
        attention = np.zeros((rows, trl_width), bool)
        trl_logits = rng.standard_normal((rows, trl_width, hi)).astype(np.float32)  # pads: never scored
        for b in range(rows):
            real = len(prompts[b]) + with_eos[b]
            where = in_our_layout(b, len(prompts[b]), np.arange(real))
            trl_ids[b, :real], attention[b, :real] = ids[b, where], True
            trl_logits[b, :real] = logits[b, where]
        mask = attention[:, :-1] & attention[:, 1:]
        targets = torch.tensor(np.where(mask, trl_ids[:, 1:], -100))
        expected = float(torch.nn.functional.cross_entropy(
            torch.tensor(trl_logits[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100))
    elif ar_targets == "google":
        full_seq = np.concatenate([np.full((rows, PROMPT_LEN), pad), batch.response_ids], 1)
        full_valid = np.concatenate([np.zeros((rows, PROMPT_LEN), bool),
                                     np.repeat(batch.canvas_valid, length, 1)], 1)
        g_logits = rng.standard_normal((rows, width, hi)).astype(np.float32)
        for b in range(rows):
            real = len(prompts[b])
            full_seq[b, :real], full_valid[b, :real] = prompts[b], True
            where = np.flatnonzero(full_valid[b])
            g_logits[b, where] = logits[b, in_our_layout(b, PROMPT_LEN, where)]
        target = np.roll(full_seq, -1, axis=1)
        shifted_valid = np.roll(full_valid, -1, axis=1)
        shifted_valid[:, -1] = False
        mask = full_valid & shifted_valid
        loss = _ce(g_logits, target) * mask
        expected = float(np.mean(loss.sum(1) / np.maximum(mask.sum(1), 1)))
    else:
        ce, count = 0.0, 0
        for b in range(rows):
            pos = PROMPT_LEN + np.arange(with_eos[b])
            ce += _ce(logits[b, pos - 1], ids[b, pos]).sum()
            count += len(pos)
        expected = ce / count
    print(ar_targets, "ours", ours, "reference", expected, "scored", np.asarray(batch.ar_mask).sum(1))
    assert expected > 1.0
    assert ours == pytest.approx(expected, rel=1e-5)


def test_ar_targets_differ_and_bad_ones_are_refused():
    config = Config.tiny(canvas_length=8)
    batch = _batch(config)
    masks = {t: np.asarray(train.make_batch(config, *_rows(config), PROMPT_LEN, NUM_CANVASES, ar_targets=t).ar_mask)
             for t in train.AR_TARGETS}
    # Row 0: 10 prompt tokens (9 scored after the first), 20 text + EOS, 3 canvases of 8; row 1: 6 prompt
    # tokens, 12 text + EOS, 2 canvases; Google skips row 1's first response token (its prompt is padded).
    assert masks["response"].sum(1).tolist() == [21, 13]
    assert masks["trl"].sum(1).tolist() == [9 + 21, 5 + 13]
    assert masks["google"].sum(1).tolist() == [9 + 24, 5 + 16 - 1] == np.asarray(batch.ar_mask).sum(1).tolist()
    task = get_task("sort")  # a task's batches pass the choice on
    for targets, mean, prompt_scored in (("response", "tokens", False), ("trl", "tokens", True),
                                         ("google", "examples", True)):
        task_batch = task.batch(task.model_config(config), 2, 0, 0, ar_targets=targets)
        assert task_batch.ar_mean == mean
        assert bool(task_batch.ar_mask[:, : task.prompt_length].any()) == prompt_scored
    with pytest.raises(ValueError, match="ar_targets must be one of"):
        train.make_batch(config, *_rows(config), PROMPT_LEN, NUM_CANVASES, ar_targets="prompt")
    with pytest.raises(ValueError, match="prompt_length must be >= 1"):
        train.make_batch(config, *_rows(config), 0, NUM_CANVASES)
    params = None
    with pytest.raises(ValueError, match=r"ar_mask has shape .* expected \[batch, prompt \+ response\]"):
        train.loss_terms(params, config, batch.replace(ar_mask=batch.ar_mask[:, PROMPT_LEN:]),
                         _noise(config, batch, canvas=[0, 0], coin=[False, False]))
    with pytest.raises(ValueError, match="ar_mean must be 'tokens' or 'examples'"):
        train.loss_terms(params, config, batch.replace(ar_mean="sum"),
                         _noise(config, batch, canvas=[0, 0], coin=[False, False]))


def test_noisy_canvas_replaces_exactly_the_drawn_positions():
    config = Config.tiny(canvas_length=8)
    batch = _batch(config)
    replace = np.random.default_rng(2).random((2, 8)) < 0.5
    noise = _noise(config, batch, canvas=[2, 1], coin=[True, False]).replace(replace_mask=jnp.asarray(replace))
    clean, noisy = (np.asarray(x) for x in train.noisy_canvas(config, batch, noise))
    canvases = np.asarray(batch.response_ids).reshape(2, NUM_CANVASES, 8)
    np.testing.assert_array_equal(clean, [canvases[0, 2], canvases[1, 1]])
    tokens = np.asarray(noise.tokens)
    assert replace.any() and (~replace).any() and (tokens[replace] != clean[replace]).any()
    np.testing.assert_array_equal(noisy[replace], tokens[replace])
    np.testing.assert_array_equal(noisy[~replace], clean[~replace])


def test_make_optimizer_is_clipped_adamw_on_warmup_cosine():
    """Against optax's AdamW driven by the schedule written out (linear warmup from 0 to the peak, then a
    half cosine down to peak x end_lr_ratio at total_steps, flat after), b1 0.95, b2 0.99, and the gradients
    clipped to global norm 1 before it. The gradients' norms vary from 2 to 10 between steps, so the clip
    changes Adam's result (a constant scale would not)."""
    peak, total, warmup, ratio, decay = 1e-2, 10, 3, 0.1, 1e-4

    def schedule(count):
        cosine = peak * ratio + peak * (1 - ratio) * 0.5 * (
            1 + jnp.cos(jnp.pi * jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)))
        return jnp.where(count < warmup, peak * count / warmup, cosine)

    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.95, b2=0.99, weight_decay=decay))
    ours = train.make_optimizer(peak_lr=peak, total_steps=total, warmup_steps=warmup, end_lr_ratio=ratio,
                                weight_decay=decay, clip_norm=1.0)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}
    trees = {"ours": (params, ours.init(params)), "reference": (params, reference.init(params))}
    for step in range(total + 3):
        direction = rng.standard_normal((4, 5))
        grads = {"w": jnp.asarray(direction / np.linalg.norm(direction) * rng.uniform(2, 10), jnp.float32)}
        for name, optimizer in (("ours", ours), ("reference", reference)):
            p, state = trees[name]
            updates, state = optimizer.update(grads, state, p)
            trees[name] = (optax.apply_updates(p, updates), state)
        np.testing.assert_allclose(trees["ours"][0]["w"], trees["reference"][0]["w"], rtol=1e-6, atol=1e-7,
                                   err_msg=f"step {step}")
    assert float(jnp.abs(trees["ours"][0]["w"] - params["w"]).max()) > 1e-2  # it moved


def test_default_warmup_leaves_a_one_step_run_a_step_at_the_peak_rate():
    assert [train.default_warmup_steps(n) for n in (1, 2, 19, 20, 1000)] == [0, 1, 1, 2, 100]
    params = {"w": jnp.ones((3,), jnp.float32)}
    optimizer = train.make_optimizer(peak_lr=0.1, total_steps=1, warmup_steps=train.default_warmup_steps(1))
    updates, _ = optimizer.update({"w": jnp.ones((3,), jnp.float32)}, optimizer.init(params), params)
    assert float(jnp.abs(updates["w"]).min()) > 0.05  # the one step trains (a warmup step would not)


def test_lora_merge_is_w_plus_alpha_over_rank_a_b():
    """PEFT's convention: the update is (alpha / rank) A @ B, A ~ U(+-1/sqrt(fan_in)) and B = 0 at init; on
    modules whose fan_in and fan_out differ."""
    from diffjax.model import init_params

    config = Config.tiny()
    params = init_params(config, jax.random.key(0))
    lora_config = LoraConfig(rank=2, alpha=6.0, targets=("self_attn/k_proj", "mlp/down_proj"))
    lora = init_lora(params, lora_config, jax.random.key(1))
    rng = np.random.default_rng(3)
    for target in lora_config.targets:
        group, name = target.split("/")
        node = lora["blocks"]["layer_0"][group][name]
        fan_in, fan_out = params["blocks"]["layer_0"][group][name]["kernel"].shape[1:]
        assert fan_in != fan_out
        bound = fan_in**-0.5
        assert 0.9 * bound < float(jnp.abs(node["a"]).max()) <= bound
        assert float(jnp.abs(node["b"]).max()) == 0
        node["b"] = jnp.asarray(rng.standard_normal(node["b"].shape), jnp.float32)
    merged = merge_lora(params, lora, lora_config)
    for target in lora_config.targets:
        group, name = target.split("/")
        w = np.asarray(params["blocks"]["layer_0"][group][name]["kernel"], np.float64)
        node = lora["blocks"]["layer_0"][group][name]
        expected = w + 6.0 / 2 * np.einsum("nir,nro->nio", np.asarray(node["a"], np.float64),
                                           np.asarray(node["b"], np.float64))
        got = np.asarray(merged["blocks"]["layer_0"][group][name]["kernel"])
        assert np.abs(expected - w).max() > 0.1
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _softcap(config: Config, logits: np.ndarray) -> np.ndarray:
    cap = config.final_logit_softcapping
    return cap * np.tanh(logits / cap)


def _ce(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def _reference_loss(model, config: Config, batch: train.Batch, noise: train.NoiseDraws) -> dict[str, float]:
    """The same objective through transformers: one encoder pass for the AR loss; per example, a fresh cache of
    the clean context before the chosen canvas, a decoder pass without self-conditioning, then a second with
    the first pass' logits and the coin as `self_conditioning_mask`."""
    length = config.canvas_length
    ids = np.concatenate([batch.prompt_ids, batch.response_ids], 1).astype(np.int64)
    mask = np.concatenate([batch.prompt_mask, np.repeat(batch.canvas_valid, length, 1)], 1)
    rows = ids.shape[0]
    scored = np.asarray(batch.ar_mask)[:, 1:]
    clean, noisy = (np.asarray(x) for x in train.noisy_canvas(config, batch, noise))
    dummy = np.zeros((rows, length), np.int64)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            past_key_values=DynamicCache(config=model.config.text_config),
            decoder_input_ids=torch.tensor(dummy),
            decoder_attention_mask=torch.tensor(np.concatenate([mask, np.ones((rows, length), bool)], 1)),
        )
        hidden = out.encoder_last_hidden_state
        ar_logits = _softcap(config, model.lm_head(hidden).float().numpy())
    ar_ce = _ce(ar_logits[:, :-1], ids[:, 1:])
    if batch.ar_mean == "examples":
        ar = float(np.mean((ar_ce * scored).sum(1) / scored.sum(1)))
    else:
        ar = float((ar_ce * scored).sum() / scored.sum())

    per_example = []
    for b in range(rows):
        start = PROMPT_LEN + int(noise.canvas[b]) * length
        ctx, ctx_mask = ids[b:b + 1, :start], mask[b:b + 1, :start]
        canvas = torch.tensor(noisy[b:b + 1].astype(np.int64))
        dec_mask = torch.tensor(np.concatenate([ctx_mask, np.ones((1, length), bool)], 1))

        def decode(sc_logits=None, sc_mask=None, ctx=ctx, ctx_mask=ctx_mask, canvas=canvas, dec_mask=dec_mask):
            with torch.no_grad():
                return model(
                    input_ids=torch.tensor(ctx), attention_mask=torch.tensor(ctx_mask),
                    past_key_values=DynamicCache(config=model.config.text_config),
                    decoder_input_ids=canvas, decoder_attention_mask=dec_mask,
                    self_conditioning_logits=sc_logits, self_conditioning_mask=sc_mask,
                ).logits

        first = decode()
        second = decode(first, torch.tensor([bool(noise.self_condition[b])]))
        per_example.append(float(_ce(second[0].numpy(), clean[b]).mean()))
    diffusion = float(np.mean(per_example))
    return {"loss": diffusion + ar, "ar": ar, "diffusion": diffusion, "per_example": np.array(per_example)}


def test_loss_matches_transformers(tmp_path):
    config = Config.tiny(canvas_length=8)  # sliding window 8 < prompt length 10
    model = random_hf_model(config, seed=3)
    loaded, params = diffjax_params(model, tmp_path)
    assert loaded == config
    batch = _batch(config)
    # Row 0: its last canvas (the ring then holds response positions only); row 1: its middle one.
    noise = _noise(config, batch, canvas=[2, 1], coin=[True, False])
    ours = train.loss_terms(params, config, batch, noise)
    ref = _reference_loss(model, config, batch, noise)
    diffs = {k: abs(float(ours[k]) - ref[k]) for k in ("loss", "ar", "diffusion")}
    diffs["per_example"] = float(np.max(np.abs(np.asarray(ours["diffusion_per_example"]) - ref["per_example"])))
    print("loss parity:", {k: f"{v:.2e}" for k, v in diffs.items()}, "reference", ref)
    assert ref["ar"] > 1.0 and ref["diffusion"] > 1.0
    assert max(diffs.values()) < 1e-5, diffs
    assert float(ours["loss"]) == pytest.approx(float(train.diffusion_loss(params, config, batch, noise)))

    # The fixed draws matter: another canvas or the other coin changes the loss.
    for other in (_noise(config, batch, canvas=[0, 1], coin=[True, False]),
                  _noise(config, batch, canvas=[2, 1], coin=[False, False])):
        assert abs(float(train.diffusion_loss(params, config, batch, other)) - float(ours["loss"])) > 1e-3


def test_lora_loss_matches_transformers_with_merged_weights(tmp_path):
    """LoRA on, B random (non-zero): our loss through the LoRA path equals the transformers model's, loaded from
    the merged fine-tune exported by `convert.save_hf` (so this also checks the LoRA-merged export)."""
    config = Config.tiny(canvas_length=8)
    model = random_hf_model(config, seed=3)
    _, params = diffjax_params(model, tmp_path / "base")
    lora_config = LoraConfig(rank=4, alpha=8.0)
    lora = init_lora(params, lora_config, jax.random.key(5))
    b_keys = iter(jax.random.split(jax.random.key(6), 100))
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.1 * jax.random.normal(next(b_keys), x.shape) if path[-1].key == "b" else x, lora)
    adapted = {"/".join(k.key for k in p[2:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(lora)[0]}
    assert adapted == set(lora_config.targets)

    batch = _batch(config)
    noise = _noise(config, batch, canvas=[2, 1], coin=[True, False])
    ours = train.trained_loss_terms(lora, config, batch, noise, base=params, lora=lora_config)
    merged = merge_lora(params, lora, lora_config)
    exported = convert.save_hf(merged, config, tmp_path / "merged")
    ref = _reference_loss(DiffusionGemmaForBlockDiffusion.from_pretrained(exported).float().eval(), config, batch,
                          noise)
    diffs = {k: abs(float(ours[k]) - ref[k]) for k in ("loss", "ar", "diffusion")}
    diffs["per_example"] = float(np.max(np.abs(np.asarray(ours["diffusion_per_example"]) - ref["per_example"])))
    print("LoRA loss parity:", {k: f"{v:.2e}" for k, v in diffs.items()}, "reference", ref)
    assert max(diffs.values()) < 1e-5, diffs
    # The adapter matters: the base model's loss is clearly different.
    assert abs(float(train.diffusion_loss(params, config, batch, noise)) - ref["loss"]) > 1e-2


def test_attached_lora_keeps_a_small_bf16_update_better_than_a_merge():
    """The training step's adapter path against the merged kernel, bf16, where the update is 0.5% of W: what
    the update changes in the output, against its exact effect (float32)."""
    from diffjax.layers import Linear
    from diffjax.lora import attach_lora

    keys = jax.random.split(jax.random.key(0), 4)
    kernel = (0.02 * jax.random.normal(keys[0], (1, 256, 256))).astype(jnp.bfloat16)
    params = {"blocks": {"layer_0": {"self_attn": {"q_proj": {"kernel": kernel}}}}}
    lora_config = LoraConfig(rank=4, alpha=4.0, targets=("self_attn/q_proj",))
    lora = {"blocks": {"layer_0": {"self_attn": {"q_proj": {
        "a": jax.random.normal(keys[1], (1, 256, 4)) / 16, "b": jax.random.normal(keys[2], (1, 4, 256)) * 8e-4}}}}}
    x = jax.random.normal(keys[3], (4096, 256)).astype(jnp.bfloat16)

    def output(module):
        return Linear(256).apply({"params": jax.tree.map(lambda leaf: leaf[0], module)}, x).astype(jnp.float32)

    q_proj = ("blocks", "layer_0", "self_attn", "q_proj")

    def module(tree):
        for part in q_proj:
            tree = tree[part]
        return tree

    update = lora["blocks"]["layer_0"]["self_attn"]["q_proj"]
    delta = update["a"][0] @ update["b"][0]
    assert 2e-3 < float(jnp.abs(delta).mean() / jnp.abs(kernel.astype(jnp.float32)).mean()) < 1e-2
    exact = x.astype(jnp.float32) @ delta
    base = output(module(params))
    errors = {name: float(jnp.linalg.norm(output(module(tree)) - base - exact) / jnp.linalg.norm(exact))
              for name, tree in (("attached", attach_lora(params, lora, lora_config)),
                                 ("merged", merge_lora(params, lora, lora_config)))}
    print("error of the update's effect:", errors)
    assert errors["attached"] < 0.7 * errors["merged"], errors


def test_lora_bad_input():
    config = Config.tiny()
    from diffjax.model import init_params

    params = init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoraConfig(alpha=0.0)
    with pytest.raises(ValueError, match=r"match no linear layer.*known: .*self_attn/q_proj"):
        init_lora(params, LoraConfig(targets=("self_attn/qkv",)), jax.random.key(0))
    lora = init_lora(params, LoraConfig(rank=2, targets=("self_attn/q_proj",)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"does not match lora_config\.targets"):
        merge_lora(params, lora, LoraConfig(rank=2, targets=("self_attn/q_proj", "mlp/up_proj")))
    with pytest.raises(ValueError, match="do not fit kernel"):
        merge_lora(params, lora, LoraConfig(rank=3, targets=("self_attn/q_proj",)))
    with pytest.raises(ValueError, match="needs both"):
        train.trained_loss_terms(lora, config, None, None, base=params)


SMALL = dict(num_layers=2, layer_types=(SLIDING, FULL), canvas_length=8, vocab_size=256, hidden_size=32,
             intermediate_size=64, num_experts=4, moe_intermediate_size=16, moe_implementation="dense")
SMALL_STEPS = optax.adam(3e-5)  # one object, so that jit's cache serves both tests below


def test_master_weights_keep_the_updates_a_bf16_step_loses():
    """Three small Adam steps (3e-5, below half of most weights' bf16 rounding step) from one bf16 start: the
    float32 masters (`compute_dtype=bf16`) move as a float32 run does; plain bf16 params lose most of it."""
    from diffjax.model import init_params

    config = Config.tiny(**{**SMALL, "num_layers": 1, "layer_types": (FULL,)})
    start16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), init_params(config, jax.random.key(0)))
    start = jax.tree.map(lambda w: w.astype(jnp.float32), start16)
    batch = _batch(config)
    noises = [train.draw_noise(jax.random.key(i), batch, config) for i in range(3)]
    optimizer = SMALL_STEPS

    def run(trainable, compute_dtype=None):
        opt_state = optimizer.init(trainable)
        for noise in noises:
            trainable, opt_state, _ = train.train_step(trainable, opt_state, config, optimizer, batch, noise,
                                                       None, None, compute_dtype)  # as `fit` calls it
        return np.concatenate([np.asarray(w - s, np.float32).ravel()
                               for w, s in zip(jax.tree.leaves(trainable), jax.tree.leaves(start), strict=True)])

    exact = run(jax.tree.map(jnp.copy, start))
    errors = {name: float(np.linalg.norm(moved - exact) / np.linalg.norm(exact))
              for name, moved in (("masters", run(jax.tree.map(jnp.copy, start), jnp.dtype(jnp.bfloat16))),
                                  ("bf16", run(jax.tree.map(jnp.copy, start16))))}
    print("error of the moves against float32:", errors)
    assert errors["masters"] < 0.25 < 0.6 < errors["bf16"], errors


def test_fit_with_master_weights_returns_bf16_and_refuses_what_it_cannot_do():
    from diffjax.model import init_params

    config = Config.tiny(**{**SMALL, "num_layers": 1, "layer_types": (FULL,)})
    params16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), init_params(config, jax.random.key(0)))
    batch = _batch(config)
    fitted = train.fit(params16, config, lambda i: batch, 1, key=jax.random.key(1), master_weights=True,
                       optimizer=SMALL_STEPS, progress=False)  # the test above's compiled step
    assert {w.dtype for w in jax.tree.leaves(fitted.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {w.dtype for w in jax.tree.leaves(fitted.opt_state[0].mu)} == {jnp.dtype(jnp.float32)}
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(fitted.params), jax.tree.leaves(params16),
                                                    strict=True))
    with pytest.raises(ValueError, match="float32 already"):
        train.fit(jax.tree.map(lambda w: w.astype(jnp.float32), params16), config, lambda i: batch, 1,
                  key=jax.random.key(1), master_weights=True, progress=False)
    mixed = {**params16, "embedder": jax.tree.map(lambda w: w.astype(jnp.float32), params16["embedder"])}
    with pytest.raises(ValueError, match="master_weights needs params of one dtype"):
        train.fit(mixed, config, lambda i: batch, 1, key=jax.random.key(1), master_weights=True, progress=False)
    with pytest.raises(ValueError, match="master_weights is for full fine-tuning"):
        train.fit(params16, config, lambda i: batch, 1, key=jax.random.key(1), master_weights=True,
                  lora=LoraConfig(rank=2), progress=False)


def test_train_step_overfits_one_batch():
    config = Config.tiny(**SMALL)
    from diffjax.model import init_params

    params = init_params(config, jax.random.key(0))
    batch = _batch(config)
    noise = train.draw_noise(jax.random.key(1), batch, config)
    optimizer = train.make_optimizer(peak_lr=1e-2, total_steps=100, warmup_steps=5)
    opt_state = optimizer.init(params)
    # grad_norm is the norm of the loss's gradient before clipping, not of the clipped update.
    grads = jax.grad(lambda p: train.diffusion_loss(p, config, batch, noise))(params)
    grad_norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads))))
    losses = []
    for _ in range(40):
        params, opt_state, metrics = train.train_step(params, opt_state, config, optimizer, batch, noise)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"]))
        if len(losses) == 1:
            np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norm, rtol=1e-4)
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.4f} in {len(losses)} steps")
    assert losses[-1] < 0.1 * losses[0]


def test_gradients_through_the_pallas_kernels_equal_the_twins():
    """Training with every Pallas kernel of the layers (interpreted here): the experts, the routing kernels, the
    attention inputs and split-K attention on every layer, and the norms kernel. The kernels differentiate
    through their plain-JAX twins, so the loss's gradients are those of the plain-JAX model."""
    from diffjax.model import init_params

    config = Config.tiny(num_layers=2, layer_types=(SLIDING, FULL), vocab_size=256)
    params = init_params(config, jax.random.key(0))
    batch = _batch(config)
    noise = train.draw_noise(jax.random.key(1), batch, config)

    kernels = config.replace(moe_implementation="pallas", global_attention_implementation="pallas",
                             sliding_attention_implementation="pallas", routing_implementation="pallas",
                             norm_implementation="pallas")

    def grads(config: Config):
        return jax.grad(lambda p: train.loss_terms(p, config, batch, noise)["loss"])(params)

    ours, twin = grads(kernels), grads(config)
    experts = ours["blocks"]["layer_0"]["experts"]["gate_up_proj"]
    assert float(jnp.abs(experts).max()) > 0
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(twin), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
