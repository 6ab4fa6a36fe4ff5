"""The training loop: orbax checkpoints that resume a killed run exactly, keep-last-K, LoRA fine-tuning."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax import train
from diffjax.checkpoint import TrainCheckpointer, TrainState
from diffjax.config import FULL, SLIDING, Config
from diffjax.lora import LoraConfig
from diffjax.model import init_params
from diffjax.quantize import dequantize_experts, quantize_model

CONFIG = Config.tiny(
    num_layers=2, layer_types=(SLIDING, FULL), canvas_length=8, vocab_size=128, hidden_size=32,
    intermediate_size=64, num_experts=4, moe_intermediate_size=16, moe_implementation="dense",
)
STEPS = 6
# One optimizer object for every run: it is a static argument of the jitted step, so all runs share one compile.
OPTIMIZER = train.make_optimizer(peak_lr=1e-2, total_steps=STEPS, warmup_steps=2)


def batches(index: int) -> train.Batch:
    """Batch `index` of a deterministic stream: two rows, prompts of 7 and 4 tokens, 1-2 canvases."""
    rng = np.random.default_rng(index)
    hi = CONFIG.vocab_size
    prompts = [rng.integers(3, hi, 7), rng.integers(3, hi, 4)]
    responses = [rng.integers(3, hi, 11), rng.integers(3, hi, 5)]
    return train.make_batch(CONFIG, prompts, responses, prompt_length=7, num_canvases=2)


class Killed(Exception):
    pass


def _assert_trees_equal(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    kept = jax.tree.map(np.asarray, params)
    whole = train.fit(params, CONFIG, batches, STEPS, key=jax.random.key(1), optimizer=OPTIMIZER,
                      checkpoint_dir=tmp_path / "whole", checkpoint_every=2, keep=2, progress=False)
    _assert_trees_equal(params, kept)  # the caller's params survive the donating train step
    assert len(whole.losses) == STEPS and whole.step == STEPS
    assert TrainCheckpointer(tmp_path / "whole").all_steps() == [4, 6]  # keep the last 2
    assert whole.losses[-1] < whole.losses[0]

    def dying(index: int) -> train.Batch:
        if index == 5:
            raise Killed
        return batches(index)

    with pytest.raises(Killed):  # dies during step 6, after the checkpoint of step 4
        train.fit(params, CONFIG, dying, STEPS, key=jax.random.key(1), optimizer=OPTIMIZER,
                  checkpoint_dir=tmp_path / "killed", checkpoint_every=2, keep=2, progress=False)
    assert TrainCheckpointer(tmp_path / "killed").all_steps() == [2, 4]

    # A fresh process' view: new params and another key; step, data position, RNG and optimiser come from disk.
    fresh = init_params(CONFIG, jax.random.key(0))
    resumed = train.fit(fresh, CONFIG, batches, STEPS, key=jax.random.key(99), optimizer=OPTIMIZER,
                        checkpoint_dir=tmp_path / "killed", checkpoint_every=2, keep=2, resume=True, progress=False)
    print("uninterrupted", whole.losses, "resumed", resumed.losses)
    assert resumed.losses == whole.losses[4:]  # bit-exact
    _assert_trees_equal(resumed.params, whole.params)
    _assert_trees_equal(resumed.opt_state, whole.opt_state)

    with pytest.raises(FileExistsError, match="already holds training checkpoints"):
        train.fit(params, CONFIG, batches, STEPS, key=jax.random.key(1), optimizer=OPTIMIZER,
                  checkpoint_dir=tmp_path / "whole", progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        train.fit(params, CONFIG, batches, STEPS, key=jax.random.key(1), optimizer=OPTIMIZER,
                  checkpoint_dir=tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train.fit(params, CONFIG, batches, STEPS, key=jax.random.key(1), optimizer=OPTIMIZER,
                  checkpoint_dir=tmp_path / "whole", resume=True, metadata={"task": "other"}, progress=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train.fit(params, CONFIG, batches, 0, key=jax.random.key(1))
    with pytest.raises(ValueError, match="checkpoint_every must be >= 1"):
        train.fit(params, CONFIG, batches, 1, key=jax.random.key(1), checkpoint_every=0)
    with pytest.raises(ValueError, match="keep must be >= 1"):
        train.fit(params, CONFIG, batches, 1, key=jax.random.key(1), checkpoint_dir=tmp_path / "k", keep=0)
    with pytest.raises(ValueError, match="resume needs a checkpoint_dir"):
        train.fit(params, CONFIG, batches, 1, key=jax.random.key(1), resume=True)


def test_lora_fit_trains_only_the_adapter(tmp_path):
    params = init_params(CONFIG, jax.random.key(0))
    lora_config = LoraConfig(rank=2, alpha=4.0)
    result = train.fit(params, CONFIG, batches, 3, key=jax.random.key(1), optimizer=OPTIMIZER, lora=lora_config,
                       checkpoint_dir=tmp_path / "lora", checkpoint_every=3, progress=False)
    assert result.losses[-1] < result.losses[0]
    b = result.lora["blocks"]["layer_0"]["self_attn"]["q_proj"]["b"]
    assert float(np.abs(np.asarray(b)).max()) > 0  # B starts at zero: it moved
    # Optimiser state only for the adapter: its leaves are LoRA-sized.
    n_lora = sum(x.size for x in jax.tree.leaves(result.lora))
    assert sum(x.size for x in jax.tree.leaves(result.opt_state)) < 3 * n_lora + 10
    for path, leaf in jax.tree_util.tree_flatten_with_path(result.params)[0]:
        names = [k.key for k in path]
        adapted = names[0] == "blocks" and "/".join(names[2:4]) in lora_config.targets
        same = np.array_equal(np.asarray(leaf), np.asarray(_get(params, names)))
        assert same != adapted, names
    # The checkpoint holds the adapter, not the model.
    restored = TrainCheckpointer(tmp_path / "lora").restore(
        TrainState(result.lora, result.opt_state, 0, 0, jax.random.key(0)))
    _assert_trees_equal(restored.trainable, result.lora)
    assert restored.step == restored.data_position == 3
    # Resuming the finished run: its stored settings (the LoraConfig, whose targets are a tuple that JSON gives
    # back as a list) must compare equal to this run's, and nothing more is trained.
    again = train.fit(params, CONFIG, batches, 3, key=jax.random.key(1), optimizer=OPTIMIZER, lora=lora_config,
                      checkpoint_dir=tmp_path / "lora", checkpoint_every=3, resume=True, progress=False)
    assert again.step == 3 and again.losses == []
    _assert_trees_equal(again.lora, result.lora)


def test_tokens_per_second_counts_prompt_and_response_tokens(monkeypatch):
    """Encoder tokens (prompt + response of every row) per second, timed from the end of the first
    (compiling) step: on a clock that ticks one second per reading, the tokens of one batch."""
    clock = iter(range(1, 1000))
    monkeypatch.setattr(train, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    params = init_params(CONFIG, jax.random.key(0))
    result = train.fit(params, CONFIG, batches, 3, key=jax.random.key(1), optimizer=OPTIMIZER, progress=False)
    per_batch = batches(0).prompt_ids.size + batches(0).response_ids.size
    assert per_batch == 2 * (7 + 2 * CONFIG.canvas_length)
    assert result.tokens_per_second == per_batch


def test_checkpointer_restores_step_and_data_position_apart(tmp_path):
    """`fit` keeps the two equal, but a TrainState may hold any pair (a loop that skips batches): each comes back
    as saved, with the arrays, the key and the metadata check."""
    state = TrainState({"w": jnp.arange(6.0).reshape(2, 3)}, {"m": jnp.full((2, 3), 0.5)}, 5, 7, jax.random.key(3))
    checkpointer = TrainCheckpointer(tmp_path / "ckpt")
    checkpointer.save(state, {"run": "a"})
    like = TrainState({"w": jnp.zeros((2, 3))}, {"m": jnp.zeros((2, 3))}, 0, 0, jax.random.key(0))
    restored = checkpointer.restore(like, {"run": "a"})
    assert (restored.step, restored.data_position) == (5, 7)
    _assert_trees_equal((restored.trainable, restored.opt_state), (state.trainable, state.opt_state))
    np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))
    with pytest.raises(ValueError, match="other settings"):
        checkpointer.restore(like, {"run": "b"})
    checkpointer.close()


def _get(tree, names):
    for name in names:
        tree = tree[name]
    return tree


def test_lora_fit_over_fp8_experts_equals_lora_over_their_dequantized_weights():
    """QLoRA-style: a LoRA adapter trained over a base with float8_e4m3fn experts follows the same losses as
    over the same experts dequantized (the fp8 weights are exactly representable), and the experts stay fp8."""
    params = init_params(CONFIG, jax.random.key(0))
    fp8_config, fp8_params = quantize_model(CONFIG, params)
    dequantized = dequantize_experts(fp8_params, jnp.float32)
    lora_config = LoraConfig(rank=2, alpha=4.0)
    runs = [train.fit(base, config, batches, 3, key=jax.random.key(1), optimizer=OPTIMIZER, lora=lora_config,
                      progress=False)
            for base, config in ((fp8_params, fp8_config), (dequantized, CONFIG))]
    np.testing.assert_allclose(runs[0].losses, runs[1].losses, rtol=1e-5)
    assert runs[0].losses[-1] < runs[0].losses[0]
    experts = runs[0].params["blocks"]["layer_0"]["experts"]
    assert experts["gate_up_proj"].dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(experts["gate_up_proj"], np.float32),
                                  np.asarray(fp8_params["blocks"]["layer_0"]["experts"]["gate_up_proj"], np.float32))


def test_a_diverged_run_stops_before_saving_nan_weights(tmp_path):
    """NaN weights after step 3 (an update scaled by NaN, as an overflowing optimiser would make) give a NaN
    loss at step 4: the run stops there, the checkpoint of step 2 stays the latest, and it is finite."""
    params = init_params(CONFIG, jax.random.key(0))
    breaking = optax.chain(OPTIMIZER, optax.scale_by_schedule(lambda count: jnp.where(count == 2, jnp.nan, 1.0)))
    with pytest.raises(train.TrainingDiverged, match=(
            r"training diverged at step 4: loss nan, diffusion nan, ar nan, grad_norm nan; the latest checkpoint, "
            rf"step 2 in {re.escape(str(tmp_path / 'run'))}, holds the weights before it")):
        train.fit(params, CONFIG, batches, STEPS, key=jax.random.key(1), optimizer=breaking,
                  checkpoint_dir=tmp_path / "run", checkpoint_every=2, progress=False)
    checkpointer = TrainCheckpointer(tmp_path / "run")
    assert checkpointer.all_steps() == [2]
    like = TrainState(params, breaking.init(params), 0, 0, jax.random.key(1))
    restored = checkpointer.restore(like)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.trainable))
    # A NaN loss from the first step: the gradient is NaN in the same step, so nothing is saved after it.
    nan_params = jax.tree.map(lambda x: x, params)
    nan_params["final_norm"]["scale"] = nan_params["final_norm"]["scale"].at[0].set(jnp.inf)
    with pytest.raises(train.TrainingDiverged, match=r"training diverged at step 1: .*; nothing was saved"):
        train.fit(nan_params, CONFIG, batches, STEPS, key=jax.random.key(1), optimizer=OPTIMIZER, progress=False)
