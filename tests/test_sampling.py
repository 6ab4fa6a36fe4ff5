"""Tests for diffjax.sampling.

The transformers 5.23.0 DiffusionGemma sampler classes are the oracle for the reference trio. Their random
draws are made known (torch's `multinomial` is reproduced from its exponential draws, the renoise tokens
are injected) and fed to our deterministic cores, so the comparisons are exact. Entropies are compared
to float32 rounding only (reduction order differs).
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler as HFEntropyBoundSampler,
)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from diffjax import sampling as S
from diffjax.sampling.statistics import _mix32 as mix32
from diffjax.sampling.statistics import uniform_tokens

# One jitted entry point per component kind, shared by the tests: eager JAX compiles every primitive
# separately, which dominates the runtime of tiny inputs.
# Sampler tests share these shapes, so a sampler configuration compiles once for the whole file.
BATCH, CANVAS, VOCAB = 2, 12, 48
_TRACES: collections.Counter = collections.Counter()


def _sampler_step_impl(smp, x, c, st, k):
    _TRACES[type(smp).__name__] += 1  # runs only while tracing
    return smp(x, c, st, k)


_sampler_step = jax.jit(_sampler_step_impl)
_stop_step = jax.jit(lambda rule, a, x, st: rule(a, x, st))
_scale = jax.jit(lambda sch, x, n, big_n: S.scale_logits(x, sch(n, big_n)))
_entropy = jax.jit(S.token_entropy)
_eb_update = jax.jit(S.entropy_bound_update)
_eb_mask = jax.jit(S.entropy_bound_mask)
_race = jax.jit(lambda x, q: S.exponential_race(jax.nn.softmax(x, axis=-1), q))
_br_update = jax.jit(S.block_refinement_update)
_ct_update = jax.jit(S.confidence_threshold_update, static_argnames="monotone")
_ddim_predict = jax.jit(S.ddim_predictor_update, static_argnames="vocab_size")
_apply = jax.jit(lambda f, x: f(x))


def _varied_logits(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Random logits whose per-position sharpness spans ~0.3..30, so entropies range from ~0 to ~log V."""
    scale = np.exp(rng.uniform(math.log(0.3), math.log(30.0), size=(*shape[:2], 1)))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _torch_processed(logits: np.ndarray, t_min: float, t_max: float, num_steps: int, n: int) -> torch.Tensor:
    processor = LinearTemperatureScheduleLogitsProcessor(
        t_min=t_min, t_max=t_max, max_denoising_steps=num_steps
    )
    # `_denoising_step` turns the step into an int32 tensor before calling the processors.
    return processor(None, torch.from_numpy(logits), cur_step=torch.tensor(n, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------
# Reference trio vs transformers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t_min", "t_max", "num_steps"), [(0.4, 0.8, 48), (0.3, 0.7, 48), (0.05, 2.0, 7), (0.0, 1.3, 17)]
)
def test_linear_temperature_matches_transformers_every_step(t_min, t_max, num_steps):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 8, 64)) * 5).astype(np.float32)
    schedule = S.LinearTemperature(t_min=t_min, t_max=t_max)
    for n in range(num_steps, 0, -1):
        expected = _torch_processed(logits, t_min, t_max, num_steps, n).numpy()
        eager = np.asarray(S.scale_logits(logits, schedule(n, num_steps)))
        traced = np.asarray(_scale(schedule, logits, jnp.int32(n), jnp.int32(num_steps)))
        np.testing.assert_array_equal(eager, expected)
        np.testing.assert_array_equal(traced, expected)


def test_token_entropy_matches_torch_categorical():
    rng = np.random.default_rng(1)
    logits = _varied_logits(rng, (3, 32, 128))
    logits[0, 0, :100] = S.MASK_VALUE  # filtered entries contribute exactly zero
    expected = torch.distributions.Categorical(logits=torch.from_numpy(logits)).entropy().numpy()
    np.testing.assert_allclose(np.asarray(_entropy(logits)), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("shape", [(1, 16, 64), (3, 32, 128), (2, 64, 512)])
@pytest.mark.parametrize("entropy_bound", [0.05, 0.5, 3.0])
def test_entropy_bound_step_matches_transformers(shape, entropy_bound):
    batch, canvas, vocab = shape
    seed = 17 * canvas + int(entropy_bound * 100)
    rng = np.random.default_rng(seed)
    logits = _varied_logits(rng, shape)
    current = rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64)
    noise = rng.integers(0, vocab, size=(batch, canvas)).astype(np.int64)
    num_steps, n = 48, 30

    # --- transformers, as in `_denoising_step` with a known renoise draw ---
    processed_t = _torch_processed(logits, 0.4, 0.8, num_steps, n)
    probs_t = torch.softmax(processed_t, dim=-1, dtype=torch.float32)
    torch.manual_seed(seed)
    sample_t = torch.multinomial(probs_t.view(-1, vocab), num_samples=1).view(batch, canvas)
    torch.manual_seed(seed)  # the exponential draws multinomial's one-sample path made
    exp_noise = torch.empty_like(probs_t.view(-1, vocab)).exponential_(1).view(batch, canvas, vocab)
    assert torch.equal(sample_t, torch.argmax(probs_t / exp_noise, dim=-1))
    hf = HFEntropyBoundSampler(
        EntropyBoundSamplerConfig(entropy_bound=entropy_bound), canvas, vocab, num_steps
    )
    hf.initialize_canvas = lambda batch_size, device: torch.from_numpy(noise)
    accepted_canvas = hf.accept_canvas(torch.from_numpy(current), sample_t, processed_t, n)
    new_canvas_t = hf.renoise_canvas(accepted_canvas, n)

    # --- ours, same draws ---
    processed = _scale(S.LinearTemperature(0.4, 0.8), logits, n, num_steps)
    np.testing.assert_array_equal(np.asarray(processed), processed_t.numpy())
    sample = _race(processed, exp_noise.numpy())
    np.testing.assert_array_equal(np.asarray(sample), sample_t.numpy())
    new_canvas, accepted = _eb_update(_entropy(processed), sample, noise.astype(np.int32), entropy_bound)
    np.testing.assert_array_equal(np.asarray(accepted), hf.accepted_token_mask.numpy())
    np.testing.assert_array_equal(np.asarray(new_canvas), new_canvas_t.numpy())
    assert np.asarray(accepted).sum(-1).min() >= 1  # the lowest-entropy position is always accepted


def test_entropy_bound_accepts_several_positions_somewhere():
    # Guards the parity test above against only ever exercising "accept one".
    rng = np.random.default_rng(3)
    logits = _varied_logits(rng, (2, 64, 512)) / 0.5
    accepted = _eb_mask(_entropy(logits), 0.5)
    assert int(np.asarray(accepted).sum(-1).max()) > 3


def test_entropy_bound_ties_are_taken_in_position_order():
    # All positions share one distribution, so every entropy is tied. The number accepted is the same as
    # transformers'; which tied positions get it is implementation-defined in torch (unstable sort), and
    # position order here.
    row = np.random.default_rng(4).standard_normal(64).astype(np.float32)
    logits = np.broadcast_to(row, (2, 40, 64)).copy()
    entropy = float(np.asarray(_entropy(logits))[0, 0])
    bound = 6.5 * entropy
    hf = HFEntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 40, 64, 8)
    ids = torch.zeros((2, 40), dtype=torch.long)
    hf.accept_canvas(ids, ids, torch.from_numpy(logits), 1)
    ours = np.asarray(_eb_mask(_entropy(logits), bound))
    assert ours.sum(-1).tolist() == hf.accepted_token_mask.sum(-1).tolist() == [7, 7]
    assert ours[:, :7].all() and not ours[:, 7:].any()


def test_entropy_bound_accepts_an_excess_exactly_at_the_bound():
    """transformers accepts `cumsum(H) - H <= bound`: a position whose excess equals the bound is accepted.
    Entropies 0, log 2 and log 4 (one-hot, uniform over 2 and over 4 tokens) are bitwise the same in torch
    and here, so the boundary is exact in both."""
    vocab = 8
    logits = np.full((1, 3, vocab), S.MASK_VALUE, np.float32)
    logits[0, 0, :4] = logits[0, 1, :1] = logits[0, 2, :2] = 0.0  # entropies log 4, 0, log 2
    entropy = np.asarray(_entropy(logits))
    torch_entropy = torch.distributions.Categorical(logits=torch.from_numpy(logits)).entropy().numpy()
    np.testing.assert_array_equal(entropy, torch_entropy)
    ordered = np.sort(entropy[0])
    excess = float((np.cumsum(ordered) - ordered)[2])  # what the highest-entropy position must stay within
    assert excess > 0.6
    just_below = float(np.nextafter(np.float32(excess), np.float32(0)))
    for bound, expected in ((excess, [True, True, True]), (just_below, [False, True, True])):
        hf = HFEntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 3, vocab, 4)
        ids = torch.zeros((1, 3), dtype=torch.long)
        hf.accept_canvas(ids, ids, torch.from_numpy(logits), 1)
        assert hf.accepted_token_mask.numpy().tolist() == [expected]
        assert np.asarray(_eb_mask(entropy, bound)).tolist() == [expected], bound


def _stopping_sequence(num_steps: int = 6, canvas: int = 8, vocab: int = 64):
    """(argmax, logits) per step. Row 0: confident, stable throughout. Row 1: confident, stable from step 2.
    Row 2: stable but not confident. Row 3: confident, one position flips every step."""
    rng = np.random.default_rng(5)
    fixed = rng.integers(0, vocab, size=(4, canvas))
    flat_row = (rng.standard_normal((canvas, vocab)) * 0.5).astype(np.float32)
    steps = []
    for t in range(num_steps):
        targets = fixed.copy()
        if t < 2:
            targets[1] = rng.integers(0, vocab, size=canvas)
        targets[3, 0] = (fixed[3, 0] + t) % vocab
        logits = (rng.standard_normal((4, canvas, vocab)) * 0.5).astype(np.float32)
        logits += 30.0 * np.eye(vocab, dtype=np.float32)[targets]
        logits[2] = flat_row
        steps.append((logits.argmax(-1), logits))
    return steps


@pytest.mark.parametrize(
    ("stability_threshold", "expected_first_stop"),
    [(0, [0, 0, None, 0]), (1, [1, 3, None, None]), (2, [2, 4, None, None])],
)
def test_stable_and_confident_matches_transformers(stability_threshold, expected_first_stop):
    steps = _stopping_sequence()
    hf = StableAndConfidentStoppingCriteria(
        stability_threshold=stability_threshold, confidence_threshold=0.005
    )
    rule = S.StableAndConfidentStopping(stability_threshold=stability_threshold, confidence_threshold=0.005)
    state = rule.init(jnp.zeros(steps[0][0].shape, jnp.int32))
    history = []
    for argmax, logits in steps:
        expected = hf(torch.from_numpy(argmax), torch.from_numpy(logits)).numpy()
        stopped, state = _stop_step(rule, argmax.astype(np.int32), logits, state)
        np.testing.assert_array_equal(np.asarray(stopped), expected)
        history.append(np.asarray(stopped))
    history = np.stack(history)  # [steps, batch]
    first = [int(np.argmax(history[:, b])) if history[:, b].any() else None for b in range(4)]
    assert first == expected_first_stop


def test_stopping_confidence_uses_mean_entropy_strictly_below_threshold():
    """A mean entropy exactly at the threshold is not confident (transformers: `<`); one ulp above it is."""
    logits = np.zeros((1, 4, 8), np.float32)  # uniform: entropy log(8) everywhere
    argmax = np.zeros((1, 4), np.int32)
    mean_entropy = float(np.mean(np.asarray(_entropy(logits)), axis=-1)[0])
    torch_mean = torch.distributions.Categorical(logits=torch.from_numpy(logits)).entropy().mean(-1)
    assert float(torch_mean[0]) == mean_entropy  # the same float32 on both sides: an exact boundary
    just_above = float(np.nextafter(np.float32(mean_entropy), np.float32(np.inf)))
    for threshold, expected in ((mean_entropy, False), (just_above, True)):
        hf = StableAndConfidentStoppingCriteria(stability_threshold=0, confidence_threshold=threshold)
        assert hf(torch.from_numpy(argmax).long(), torch.from_numpy(logits)).tolist() == [expected]
        rule = S.StableAndConfidentStopping(stability_threshold=0, confidence_threshold=threshold)
        assert bool(_stop_step(rule, argmax, logits, rule.init(argmax))[0][0]) == expected, threshold


# ------------------------------------------------------------------------------------------------
# Block refinement
# ------------------------------------------------------------------------------------------------


def _diffusers_block_refinement_numpy(
    canvas, sampled, confidence, committed, noise, step, num_steps, threshold, edit
):
    """Line-by-line NumPy port of diffusers' BlockRefinementScheduler.step, uniform-corruption mode."""
    length = canvas.shape[1]
    target = ((step + 1) * length + num_steps - 1) // num_steps
    needed = np.maximum(target - committed.sum(-1), 0)
    masked = np.where(committed, -np.inf, confidence)
    ranks = np.argsort(np.argsort(-masked, axis=-1, kind="stable"), axis=-1, kind="stable")
    transfer = ~committed & ((ranks < needed[:, None]) | (confidence > threshold))
    editing = (
        np.zeros_like(transfer) if edit is None else committed & (sampled != canvas) & (confidence > edit)
    )
    prev = np.where(transfer | editing, sampled, canvas)
    new_committed = committed | transfer
    return np.where(new_committed, prev, noise), transfer | editing, new_committed


@pytest.mark.parametrize("edit", [None, 0.6])
def test_block_refinement_core_matches_diffusers_port(edit):
    rng = np.random.default_rng(6)
    batch, length, vocab, num_steps = 3, 24, 50, 7
    committed = np.zeros((batch, length), bool)
    canvas = rng.integers(0, vocab, size=(batch, length))
    for step in range(num_steps):
        sampled = rng.integers(0, vocab, size=(batch, length))
        confidence = rng.random((batch, length)).astype(np.float32)
        noise = rng.integers(0, vocab, size=(batch, length))
        expected = _diffusers_block_refinement_numpy(
            canvas, sampled, confidence, committed, noise, step, num_steps, 0.9, edit
        )
        got = _br_update(
            jnp.asarray(canvas, jnp.int32),
            jnp.asarray(sampled, jnp.int32),
            confidence,
            committed,
            jnp.asarray(noise, jnp.int32),
            step,
            num_steps,
            0.9,
            edit,
        )
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(g), e)
        canvas, committed = expected[0], expected[2]
    assert committed.all()


def test_block_refinement_commits_are_monotone_and_meet_the_quota():
    batch, length, vocab, num_steps = BATCH, CANVAS, VOCAB, 5
    rng = np.random.default_rng(7)
    sampler = S.BlockRefinementSampler(num_steps=num_steps, confidence_threshold=1.0)  # quota only
    canvas = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
    state = sampler.init(canvas)
    key = jax.random.key(0)
    for step in range(num_steps):
        logits = _varied_logits(rng, (batch, length, vocab))
        before_canvas, before_committed = np.asarray(canvas), np.asarray(state.committed)
        canvas, changed, state = _sampler_step(sampler, logits, canvas, state, jax.random.fold_in(key, step))
        committed = np.asarray(state.committed)
        # exactly the cumulative quota ceil((step + 1) * L / N), since no confidence reaches 1.0 here
        assert committed.sum(-1).tolist() == [math.ceil((step + 1) * length / num_steps)] * batch
        assert (committed | ~before_committed).all()  # never un-commits
        np.testing.assert_array_equal(np.asarray(canvas)[before_committed], before_canvas[before_committed])
        np.testing.assert_array_equal(np.asarray(changed), committed & ~before_committed)
    assert np.asarray(state.committed).all()


def test_block_refinement_threshold_commits_beyond_quota_and_reediting():
    batch, length = 1, 6
    canvas = jnp.arange(length, dtype=jnp.int32)[None]
    sampled = canvas + 1
    confidence = jnp.asarray([[0.99, 0.97, 0.2, 0.3, 0.1, 0.96]], jnp.float32)
    noise = jnp.full((batch, length), 15, jnp.int32)
    committed = jnp.zeros((batch, length), bool)
    out, _, new_committed = _br_update(canvas, sampled, confidence, committed, noise, 0, 6, 0.95, None)
    # quota 1 -> position 0; threshold 0.95 adds 1 and 5
    assert np.asarray(new_committed)[0].tolist() == [True, True, False, False, False, True]
    assert np.asarray(out)[0].tolist() == [1, 2, 15, 15, 15, 6]
    # editing: a committed position is overwritten only when its confidence beats the editing threshold
    sampler = S.BlockRefinementSampler(num_steps=6, allow_reediting=True, editing_threshold=0.9)
    assert sampler.allow_reediting
    out2, changed2, _ = _br_update(out, out + 3, confidence, new_committed, noise, 1, 6, 0.95, 0.98)
    assert np.asarray(changed2)[0, 0] and np.asarray(out2)[0, 0] == 4
    assert np.asarray(out2)[0, 1] == 2  # committed, 0.97 < 0.98: kept


# ------------------------------------------------------------------------------------------------
# Confidence threshold (Fast-dLLM)
# ------------------------------------------------------------------------------------------------


def test_confidence_threshold_semantics():
    canvas = jnp.zeros((2, 5), jnp.int32)
    sampled = jnp.full((2, 5), 7, jnp.int32)
    noise = jnp.full((2, 5), 9, jnp.int32)
    confidence = jnp.asarray([[0.95, 0.9, 0.89, 0.2, 0.99], [0.1, 0.5, 0.3, 0.5, 0.2]], jnp.float32)
    committed = jnp.zeros((2, 5), bool)
    out, accepted, new_committed = _ct_update(
        canvas, sampled, confidence, committed, noise, 0.9, monotone=True
    )
    # row 0: every confidence >= 0.9 (equality included); row 1: none, so only the most confident (first tie)
    assert np.asarray(accepted).tolist() == [
        [True, True, False, False, True],
        [False, True, False, False, False],
    ]
    assert np.asarray(out).tolist() == [[7, 7, 9, 9, 7], [9, 7, 9, 9, 9]]
    # monotone: committed positions keep their token and the top-1 comes from the rest
    out2, _, committed2 = _ct_update(
        out, jnp.full((2, 5), 3, jnp.int32), confidence, new_committed, noise, 0.9, monotone=True
    )
    assert np.asarray(out2)[0].tolist() == [7, 7, 3, 9, 7]  # 0.89 is the best uncommitted: forced
    assert np.asarray(committed2).sum(-1).tolist() == [4, 2]
    # memoryless: everything is re-decided
    out3, _, _ = _ct_update(
        out, jnp.full((2, 5), 3, jnp.int32), confidence, new_committed, noise, 0.9, monotone=False
    )
    assert np.asarray(out3)[0].tolist() == [3, 3, 9, 9, 3]


def test_confidence_threshold_sampler_uses_draw_probability():
    logits = np.zeros((BATCH, CANVAS, VOCAB), np.float32)
    logits[0, 0, 5] = 12.0  # p ~ 0.9997
    logits[0, 1, 6] = 4.0  # p ~ 0.54
    logits[0, 2, 7] = 2.0  # p ~ 0.14
    sampler = S.ConfidenceThresholdSampler(threshold=0.99, sampling=S.GreedySampling())
    canvas = jnp.zeros((BATCH, CANVAS), jnp.int32)
    out, accepted, _ = _sampler_step(sampler, logits, canvas, sampler.init(canvas), jax.random.key(1))
    assert np.flatnonzero(np.asarray(accepted)[0]).tolist() == [0]
    assert int(out[0, 0]) == 5
    assert np.flatnonzero(np.asarray(accepted)[1]).tolist() == [0]  # all tied at 1/V: only the forced top-1
    sampler = sampler.replace(threshold=0.5)
    out, accepted, _ = _sampler_step(sampler, logits, canvas, sampler.init(canvas), jax.random.key(1))
    assert np.flatnonzero(np.asarray(accepted)[0]).tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------
# DDIM
# ------------------------------------------------------------------------------------------------


def test_ddim_route_probs_match_the_posterior_formula():
    vocab, num_steps = 50, 8
    same = jnp.asarray([[True, False]])
    for i in range(num_steps):
        probs = np.asarray(S.ddim_route_probs(same, i, num_steps, vocab))
        alpha_t, alpha_s = i / num_steps, (i + 1) / num_steps
        a, b = alpha_t / alpha_s, alpha_s
        for j, s in enumerate([1.0, 0.0]):
            masses = np.array(
                [b * (1 - a) / vocab + a * b * s, a * (1 - b) / vocab, (1 - a) * (1 - b) / vocab]
            )
            np.testing.assert_allclose(probs[0, j], masses / masses.sum(), rtol=1e-5, atol=1e-7)
    last = np.asarray(S.ddim_route_probs(same, num_steps - 1, num_steps, vocab))
    np.testing.assert_allclose(last[..., 0], 1.0)
    first = np.asarray(S.ddim_route_probs(same, 0, num_steps, vocab))
    assert np.all(first[..., 1] == 0.0)  # alpha_t = 0: nothing stays


def test_ddim_predictor_route_frequencies_and_last_step():
    rng = np.random.default_rng(8)
    batch, length, vocab, num_steps, i = 4, 2048, 1000, 10, 3
    canvas = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
    sampled = (canvas + 1) % vocab  # never equal to x_t
    noise = jnp.full((batch, length), -1, jnp.int32)  # marks the noise route
    u = jax.random.uniform(jax.random.key(2), (batch, length))
    out, took = _ddim_predict(canvas, sampled, u, noise, i, num_steps, vocab)
    out, took = np.asarray(out), np.asarray(took)
    a, b = i / (i + 1), (i + 1) / num_steps
    masses = np.array([b * (1 - a), a * (1 - b), (1 - a) * (1 - b)])
    p = masses / masses.sum()
    freqs = [np.mean(out == np.asarray(sampled)), np.mean(out == np.asarray(canvas)), np.mean(out == -1)]
    np.testing.assert_allclose(freqs, p, atol=0.02)
    np.testing.assert_array_equal(took, out == np.asarray(sampled))
    last, took_last = _ddim_predict(canvas, sampled, u, noise, num_steps - 1, num_steps, vocab)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(sampled))
    assert np.asarray(took_last).all()


def test_ddim_corrector_log_probs():
    rng = np.random.default_rng(9)
    logits = _varied_logits(rng, (2, 6, 40))
    canvas = jnp.asarray(rng.integers(0, 40, size=(2, 6)), jnp.int32)
    np.testing.assert_allclose(
        np.asarray(S.ddim_corrector_log_probs(logits, canvas, 1.0)),
        np.asarray(jax.nn.log_softmax(logits, axis=-1)),
        rtol=1e-5,
        atol=1e-5,
    )
    alpha = 0.25
    cond = np.asarray(S.ddim_corrector_log_probs(logits, canvas, alpha), np.float64)
    shifted = logits.astype(np.float64).copy()
    delta = math.log1p(40 * alpha / (1 - alpha))
    observed = np.asarray(canvas)[..., None]
    np.put_along_axis(shifted, observed, np.take_along_axis(shifted, observed, -1) - delta, -1)
    loo = np.exp(shifted - shifted.max(-1, keepdims=True))
    loo /= loo.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.exp(cond), alpha * loo + (1 - alpha) / 40, rtol=1e-4, atol=1e-7)


def test_ddim_uses_its_vocab_size_as_the_noise_range_k_throughout():
    """With `vocab_size` K below the logits' width, K is the uniform noise's range in the predictor's route
    probabilities and the corrector's uniform mass, not only in the renoise draw."""
    rng = np.random.default_rng(12)
    width, k_vocab, alpha = 40, 25, 0.25
    logits = _varied_logits(rng, (2, 6, width))
    canvas = jnp.asarray(rng.integers(0, width, size=(2, 6)), jnp.int32)
    cond = np.asarray(S.ddim_corrector_log_probs(logits, canvas, alpha, k_vocab), np.float64)
    shifted = logits.astype(np.float64).copy()
    observed = np.asarray(canvas)[..., None]
    delta = math.log1p(k_vocab * alpha / (1 - alpha))
    np.put_along_axis(shifted, observed, np.take_along_axis(shifted, observed, -1) - delta, -1)
    loo = np.exp(shifted - shifted.max(-1, keepdims=True))
    loo /= loo.sum(-1, keepdims=True)
    uniform = np.where(np.arange(width) < k_vocab, (1 - alpha) / k_vocab, 0.0)
    np.testing.assert_allclose(np.exp(cond), alpha * loo + uniform, rtol=1e-4, atol=1e-7)

    # The predictor: half the canvas already holds the argmax, where the clean route's mass grows with K
    # (0.929 at K = 25 against 0.953 at the width: 400 positions put a few route draws between the two).
    sampler = S.DDIMSampler(num_steps=4, vocab_size=k_vocab, sampling=S.GreedySampling())
    logits = _varied_logits(rng, (2, 200, width))
    argmax = np.asarray(logits.argmax(-1))
    canvas = jnp.asarray(np.where(rng.random(argmax.shape) < 0.5, argmax, rng.integers(0, k_vocab, argmax.shape)),
                         jnp.int32)
    key = jax.random.key(4)
    ours, took = jax.jit(sampler._predict)(jnp.asarray(logits), canvas, jnp.int32(1), key)
    _, route_key, noise_key = jax.random.split(key, 3)
    route_uniform = jax.random.uniform(route_key, canvas.shape, jnp.float32)
    noise = uniform_tokens(noise_key, canvas.shape, k_vocab)
    expected, expected_took = S.ddim_predictor_update(canvas, jnp.asarray(argmax, jnp.int32), route_uniform,
                                                      noise, 1, 4, k_vocab)
    at_width = S.ddim_predictor_update(canvas, jnp.asarray(argmax, jnp.int32), route_uniform, noise, 1, 4, width)[1]
    assert np.any(np.asarray(at_width) != np.asarray(expected_took))
    np.testing.assert_array_equal(np.asarray(took), np.asarray(expected_took))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))


def test_ddim_sampler_interleaves_predictor_and_corrector():
    rng = np.random.default_rng(10)
    batch, length, vocab = BATCH, CANVAS, VOCAB
    sampler = S.DDIMSampler(num_steps=2, corrector_steps=1, corrector_k=3, sampling=S.GreedySampling())
    assert sampler.num_calls == 4
    logits = _varied_logits(rng, (batch, length, vocab))
    canvas = jnp.asarray(rng.integers(0, vocab, size=(batch, length)), jnp.int32)
    state = sampler.init(canvas)
    step_fn = _sampler_step
    key = jax.random.key(3)
    canvas, _, state = step_fn(sampler, logits, canvas, state, jax.random.fold_in(key, 0))  # predictor i=0
    before = np.asarray(canvas)
    canvas, changed, state = step_fn(sampler, logits, canvas, state, jax.random.fold_in(key, 1))  # corrector
    assert np.asarray(changed).sum(-1).tolist() == [3, 3]
    np.testing.assert_array_equal(np.asarray(canvas)[~np.asarray(changed)], before[~np.asarray(changed)])
    # the last predictor step takes x0 everywhere
    canvas, changed, state = step_fn(sampler, logits, canvas, state, jax.random.fold_in(key, 2))
    np.testing.assert_array_equal(np.asarray(canvas), logits.argmax(-1))
    assert np.asarray(changed).all() and int(state.step) == 3


# ------------------------------------------------------------------------------------------------
# Filters
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 63, 64, 100])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = np.random.default_rng(11).standard_normal((3, 7, 64)).astype(np.float32)
    out = np.asarray(_apply(S.TopKFilter(k), logits))
    keep_ref = np.zeros_like(logits, bool)
    np.put_along_axis(keep_ref, np.argsort(-logits, axis=-1)[..., : min(k, 64)], True, -1)
    np.testing.assert_array_equal(out != S.MASK_VALUE, keep_ref)
    np.testing.assert_array_equal(out[keep_ref], logits[keep_ref])


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_smallest_nucleus(p):
    logits = _varied_logits(np.random.default_rng(12), (3, 9, 128))
    out = np.asarray(_apply(S.TopPFilter(p), logits))
    order = np.argsort(-logits.astype(np.float64), axis=-1)
    sorted_logits = np.take_along_axis(logits.astype(np.float64), order, -1)
    probs = np.exp(sorted_logits - sorted_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mass_before = np.cumsum(probs, -1) - probs
    keep_sorted = (mass_before < p) | (p >= 1.0)  # p = 1 keeps all, whatever the float sum does
    keep_sorted[..., 0] = True
    keep_ref = np.zeros_like(logits, bool)
    np.put_along_axis(keep_ref, order, keep_sorted, -1)
    np.testing.assert_array_equal(out != S.MASK_VALUE, keep_ref)
    np.testing.assert_array_equal(out[keep_ref], logits[keep_ref])
    # the kept set really is a nucleus: its mass reaches p, and dropping its least likely token would not
    kept_mass = np.where(keep_sorted, probs, 0).sum(-1)
    assert np.all(kept_mass >= min(p, 1.0) - 1e-6)


@pytest.mark.parametrize(("p", "kept"), [(0.5, [0]), (0.75, [0, 1])])
def test_top_p_cuts_a_token_whose_mass_before_is_exactly_p(p, kept):
    """Probabilities .5, .25, .125, .125 are exact in float32: the mass before token 1 (2) is exactly
    p = .5 (.75), so that token is cut, as transformers' TopPLogitsWarper cuts a token once the mass
    after it is at most 1 - p."""
    logits = np.log(np.array([[0.5, 0.25, 0.125, 0.125]], np.float32))
    expected = np.isin(np.arange(4), kept)[None]
    hf = TopPLogitsWarper(top_p=p)(None, torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(np.isfinite(hf), expected)
    np.testing.assert_array_equal(np.asarray(_apply(S.TopPFilter(p), logits)) != S.MASK_VALUE, expected)


def test_identity_and_chain_filters():
    logits = np.random.default_rng(13).standard_normal((2, 3, 32)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_apply(S.IdentityFilter(), logits)), logits)
    chain = S.FilterChain((S.TopKFilter(8), S.TopPFilter(0.5)))
    expected = _apply(S.TopPFilter(0.5), _apply(S.TopKFilter(8), logits))
    filtered = _apply(chain, logits)
    np.testing.assert_array_equal(np.asarray(filtered), np.asarray(expected))
    # a filtered row stays NaN-free downstream
    assert np.isfinite(np.asarray(_entropy(filtered))).all()


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


def test_noise_proportion_temperature_is_google_annealing():
    sched = S.NoiseProportionTemperature(t_min=0.4, t_max=0.8, exponent=2.0)
    num_steps = 10
    for step in range(num_steps):  # Google counts steps up; noise proportion 1 - step / N
        p = 1.0 - step / num_steps
        expected = (1.0 - (1.0 - p) ** 2.0) * 0.4 + 0.4
        np.testing.assert_allclose(float(sched(num_steps - step, num_steps)), expected, rtol=1e-6)
    linear = S.NoiseProportionTemperature(exponent=1.0)
    np.testing.assert_allclose(float(linear(12, 48)), float(S.LinearTemperature()(12, 48)), rtol=1e-6)
    assert float(S.ConstantTemperature(0.7)(3, 9)) == np.float32(0.7)


def test_linear_temperature_span_follows_replace():
    sched = S.LinearTemperature(0.4, 0.8).replace(t_max=0.9)
    assert sched._span == 0.9 - 0.4
    assert float(sched(48, 48)) == np.float32(0.9)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: S.LinearTemperature(t_min=-0.1), "t_min"),
        (lambda: S.LinearTemperature(t_min=0.5, t_max=0.5), "t_max"),
        (lambda: S.LinearTemperature(t_min=0.8, t_max=0.4), "t_max"),
        (lambda: S.NoiseProportionTemperature(t_min=0.0), "t_min"),
        (lambda: S.NoiseProportionTemperature(exponent=0.0), "exponent"),
        (lambda: S.ConstantTemperature(0.0), "temperature"),
        (lambda: S.ConstantTemperature(-1.0), "temperature"),
        (lambda: S.EntropyBoundSampler(entropy_bound=0.0), "entropy_bound"),
        (lambda: S.EntropyBoundSampler(entropy_bound=-1.0), "entropy_bound"),
        (lambda: S.EntropyBoundSampler(vocab_size=0), "vocab_size"),
        (lambda: S.TopKFilter(0), "k"),
        (lambda: S.TopPFilter(0.0), "p"),
        (lambda: S.TopPFilter(1.5), "p"),
        (lambda: S.StableAndConfidentStopping(stability_threshold=-1), "stability_threshold"),
        (lambda: S.StableAndConfidentStopping(stability_threshold=1.5), "stability_threshold"),
        (lambda: S.StableAndConfidentStopping(confidence_threshold=0.0), "confidence_threshold"),
        (lambda: S.BlockRefinementSampler(num_steps=0), "num_steps"),
        (lambda: S.BlockRefinementSampler(confidence_threshold=1.5), "confidence_threshold"),
        (lambda: S.BlockRefinementSampler(editing_threshold=0.0), "editing_threshold"),
        (lambda: S.ConfidenceThresholdSampler(threshold=0.0), "threshold"),
        (lambda: S.ConfidenceThresholdSampler(threshold=1.01), "threshold"),
        (lambda: S.DDIMSampler(corrector_steps=-1), "corrector_steps"),
        (lambda: S.DDIMSampler(corrector_k=0), "corrector_k"),
        (lambda: S.DDIMSampler(corrector_selection="best"), "corrector_selection"),
        (lambda: S.DDIMSampler(corrector_selection_tau=0.0), "corrector_selection_tau"),
        (lambda: S.EntropyBoundSampler(entropy_bound=float("nan")), "entropy_bound"),
    ],
)
def test_bad_hyper_parameters_raise(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make()


# ------------------------------------------------------------------------------------------------
# jit, retracing, determinism
# ------------------------------------------------------------------------------------------------

# Configurations chosen to coincide with the other sampler tests' (same pytree structure and shapes),
# so most of them are already compiled.
_SAMPLER_VARIANTS = [
    (S.EntropyBoundSampler(entropy_bound=0.1), {"entropy_bound": 0.7}),
    (S.BlockRefinementSampler(num_steps=4), {"confidence_threshold": 0.5, "num_steps": 6}),
    (S.BlockRefinementSampler(num_steps=4, allow_reediting=True), {"editing_threshold": 0.5}),
    (S.ConfidenceThresholdSampler(threshold=0.9, sampling=S.GreedySampling()), {"threshold": 0.2}),
    (S.DDIMSampler(num_steps=4), {"num_steps": 8}),
    (
        S.DDIMSampler(num_steps=4, corrector_steps=1, corrector_k=3, sampling=S.GreedySampling()),
        {"corrector_selection_tau": 0.5},
    ),
    (S.DDIMSampler(num_steps=4, corrector_steps=1, corrector_selection="random"), {"num_steps": 3}),
]


@pytest.mark.parametrize(("sampler", "changes"), _SAMPLER_VARIANTS, ids=lambda v: type(v).__name__)
def test_samplers_jit_without_retracing_and_are_deterministic(sampler, changes):
    assert isinstance(sampler, S.Sampler)
    rng = np.random.default_rng(14)
    logits = _varied_logits(rng, (BATCH, CANVAS, VOCAB))
    canvas = jnp.asarray(rng.integers(0, VOCAB, size=(BATCH, CANVAS)), jnp.int32)

    def two_steps(smp, x, c, key):
        c1, _, state = _sampler_step(smp, x, c, smp.init(c), jax.random.fold_in(key, 0))
        return _sampler_step(smp, x, c1, state, jax.random.fold_in(key, 1))

    key = jax.random.key(5)
    out1 = two_steps(sampler, logits, canvas, key)
    traces = _TRACES[type(sampler).__name__]
    out2 = two_steps(sampler, logits, canvas, key)
    out3 = two_steps(sampler.replace(**changes), logits, canvas, key)
    assert _TRACES[type(sampler).__name__] == traces  # new numeric hyper-parameters, same program
    for x, y in zip(jax.tree_util.tree_leaves(out1), jax.tree_util.tree_leaves(out2), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    canvas_out, accepted, state = out1
    assert canvas_out.dtype == jnp.int32 and canvas_out.shape == (BATCH, CANVAS)
    assert accepted.dtype == jnp.bool_ and accepted.shape == (BATCH, CANVAS)
    assert int(state.step) == 2 and int(out3[2].step) == 2
    assert np.asarray(canvas_out).min() >= 0 and np.asarray(canvas_out).max() < VOCAB
    other = two_steps(sampler, logits, canvas, jax.random.key(6))[0]
    assert not np.array_equal(np.asarray(other), np.asarray(canvas_out))


def test_schedules_filters_and_stopping_jit_without_retracing():
    traces = []

    @jax.jit
    def step(schedule, logits_filter, stopping, logits, n):
        traces.append(1)
        processed = logits_filter(S.scale_logits(logits, schedule(n, 48)))
        argmax = jnp.argmax(processed, axis=-1).astype(jnp.int32)
        stopped, _ = stopping(argmax, processed, stopping.init(argmax))
        return processed, stopped

    logits = np.random.default_rng(15).standard_normal((2, 4, 32)).astype(np.float32)
    stopping = S.StableAndConfidentStopping(stability_threshold=0, confidence_threshold=0.005)
    a = step(S.LinearTemperature(0.4, 0.8), S.TopPFilter(0.9), stopping, logits, jnp.int32(5))
    b = step(
        S.LinearTemperature(0.2, 1.5),
        S.TopPFilter(0.3),
        stopping.replace(confidence_threshold=100.0),
        logits,
        jnp.int32(6),
    )
    assert len(traces) == 1
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.asarray(a[1]).any() and np.asarray(b[1]).all()
    step(S.NoiseProportionTemperature(), S.IdentityFilter(), S.NeverStop(), logits, jnp.int32(5))
    step(S.NoiseProportionTemperature(exponent=3.0), S.IdentityFilter(), S.NeverStop(), logits, jnp.int32(5))
    assert len(traces) == 2


def test_token_draws_sample_the_categorical():
    logits = jnp.log(jnp.asarray([0.7, 0.2, 0.1, 0.0]))[None, None].repeat(4000, axis=1)
    for draw in (S.GumbelMaxSampling(), S.ExponentialRaceSampling()):
        ids = np.asarray(draw(jax.random.key(7), logits))
        np.testing.assert_allclose(
            np.bincount(ids.ravel(), minlength=4) / ids.size, [0.7, 0.2, 0.1, 0.0], atol=0.03
        )
        np.testing.assert_array_equal(ids, np.asarray(draw(jax.random.key(7), logits)))
    assert np.asarray(S.GreedySampling()(jax.random.key(0), logits)).max() == 0


def test_counter_gumbel_noise_is_finite_at_the_extreme_hash_words():
    """The words 0xFFFFFFFF and 0 (found by inverting the hash) are the uniform's ends: with 24 bits the top
    one rounded to u = 1 in float32 and gave +inf noise, a few tokens per row at the released vocabulary."""
    modulus = 1 << 32

    def unmix32(y: int) -> int:  # the inverse of sampling.statistics._mix32
        y ^= y >> 16
        y = (y * pow(0xC2B2AE35, -1, modulus)) % modulus
        y ^= (y >> 13) ^ (y >> 26)
        y = (y * pow(0x85EBCA6B, -1, modulus)) % modulus
        return y ^ (y >> 16)

    seed, row = 5, 3
    row_word = int(mix32(jnp.uint32(row) * jnp.uint32(0x9E3779B9) ^ jnp.uint32(seed)))
    for word in (0xFFFFFFFF, 0):
        col = unmix32(word) ^ row_word
        assert int(mix32(jnp.uint32(row_word) ^ jnp.uint32(col))) == word
        noise = float(S.gumbel_noise(jnp.uint32(seed), jnp.uint32(row), jnp.uint32(col)))
        assert math.isfinite(noise) and -3.0 < noise < 17.0, (hex(word), noise)


def test_gumbel_max_draws_equal_jax_categorical():
    """The max-then-min-index form is the same draw as `jax.random.categorical`, bit for bit."""
    for seed in range(4):
        key = jax.random.key(seed)
        logits = 3.0 * jax.random.normal(jax.random.key(100 + seed), (3, 17, 301))
        ours = S.GumbelMaxSampling()(key, logits)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.categorical(key, logits, axis=-1)))


# ----------------------------------------------------------------------------- statistics path


def test_token_statistics_agree_with_the_logits_helpers():
    logits = _varied_logits(np.random.default_rng(21), (BATCH, CANVAS, VOCAB))
    stats = jax.jit(S.token_statistics)(logits, 9)
    lse = jax.nn.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(np.asarray(stats.logsumexp), np.asarray(lse), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats.entropy), np.asarray(_entropy(logits)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stats.argmax), logits.argmax(-1))
    for ids, log_prob in ((stats.argmax, stats.argmax_logprob), (stats.sample, stats.sample_logprob)):
        np.testing.assert_allclose(np.exp(np.asarray(log_prob)), np.asarray(S.sampled_token_probs(logits, ids)),
                                   rtol=1e-5)
    # The draw is random (not the argmax everywhere) and a function of the seed.
    assert np.any(np.asarray(stats.sample) != np.asarray(stats.argmax))
    assert np.any(np.asarray(S.token_statistics(logits, 10).sample) != np.asarray(stats.sample))


@pytest.mark.parametrize(
    "sampler",
    [
        S.EntropyBoundSampler(entropy_bound=0.7, sampling=S.GreedySampling()),
        S.ConfidenceThresholdSampler(threshold=0.4, sampling=S.GreedySampling()),
        S.ConfidenceThresholdSampler(threshold=0.4, monotone=False, sampling=S.GreedySampling()),
        S.BlockRefinementSampler(num_steps=4, confidence_threshold=0.6, sampling=S.GreedySampling()),
        S.BlockRefinementSampler(num_steps=4, allow_reediting=True, editing_threshold=0.3,
                                 sampling=S.GreedySampling()),
    ],
    ids=lambda s: type(s).__name__,
)
def test_from_statistics_is_the_same_step_as_from_logits(sampler):
    """With a deterministic draw both entry points must make the same step (renoise included), step after
    step, so the fused vocabulary pass changes nothing but where the statistics come from."""
    rng = np.random.default_rng(22)
    canvas = jnp.asarray(rng.integers(0, VOCAB, (BATCH, CANVAS)), jnp.int32)
    state_logits = state_stats = sampler.init(canvas)
    canvas_logits = canvas_stats = canvas
    from_stats = jax.jit(lambda smp, st, c, s, k: smp.from_statistics(st, c, s, k, VOCAB))
    for step in range(3):
        # Moderate sharpness: no probabilities saturated at 1.0, where the two paths' last-ulp rounding could
        # reorder exactly tied confidences.
        # One device copy for both paths (not a host array each converts on its own): in CI the logits path once
        # ranked confidences as if it had read other logits, which a fresh process did not reproduce.
        logits = jnp.array(rng.standard_normal((BATCH, CANVAS, VOCAB)).astype(np.float32) * rng.uniform(
            0.5, 4.0, (BATCH, CANVAS, 1)
        ).astype(np.float32))
        key = jax.random.key(step)
        canvas_logits, accepted_logits, state_logits = _sampler_step(sampler, logits, canvas_logits, state_logits,
                                                                     key)
        canvas_stats, accepted_stats, state_stats = from_stats(
            sampler, S.token_statistics(logits, step), canvas_stats, state_stats, key
        )
        np.testing.assert_array_equal(np.asarray(canvas_stats), np.asarray(canvas_logits))
        np.testing.assert_array_equal(np.asarray(accepted_stats), np.asarray(accepted_logits))
        assert 0 < int(np.sum(np.asarray(accepted_logits))) < BATCH * CANVAS
    jax.tree.map(np.testing.assert_array_equal, state_stats, state_logits)


def test_stopping_from_statistics_equals_from_logits():
    rng = np.random.default_rng(23)
    rule = S.StableAndConfidentStopping(stability_threshold=1, confidence_threshold=1.7)
    state_a = state_b = rule.init(jnp.zeros((BATCH, CANVAS), jnp.int32))
    argmax = jnp.asarray(rng.integers(0, VOCAB, (BATCH, CANVAS)), jnp.int32)
    verdicts = []
    for _ in range(2):  # the second call sees a stable argmax; the confidence decides per row
        logits = _varied_logits(rng, (BATCH, CANVAS, VOCAB))
        stop_a, state_a = _stop_step(rule, argmax, logits, state_a)
        stop_b, state_b = rule.from_statistics(argmax, S.token_statistics(logits, 0), state_b)
        np.testing.assert_array_equal(np.asarray(stop_b), np.asarray(stop_a))
        verdicts.append(np.asarray(stop_a))
    assert not verdicts[0].any()
    np.testing.assert_array_equal(verdicts[1], [True, False])  # mean entropies 1.48 and 1.98
    never = S.NeverStop()
    assert not np.asarray(never.from_statistics(argmax, S.token_statistics(logits, 0), ())[0]).any()
