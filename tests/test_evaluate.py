"""evaluate() on the embedded demo model: exact-match accuracy on the task it was trained on, batching."""

import types

import jax
import numpy as np
import pytest

import convert
from diffjax.cli import DEFAULT_MODEL_DIR
from diffjax.config import Config
from diffjax.evaluate import evaluate, evaluation_prompts
from diffjax.tasks import get_task, read_task_file


def test_demo_model_sorts_and_evaluate_scores_it():
    config, params = convert.load(DEFAULT_MODEL_DIR)
    task = read_task_file(DEFAULT_MODEL_DIR)
    assert task is get_task("sort")
    # 24 prompts in batches of 16: the second batch is topped up with repeats that must not be counted.
    scores = evaluate(params, config, task, 24, key=jax.random.key(0), batch_size=16)
    assert scores["n"] == len(scores["answers"]) == 24
    prompts = evaluation_prompts(task, 24)
    right = [task.check(p, task.tokenizer.encode(a)) for p, a in zip(prompts, scores["answers"], strict=True)]
    assert scores["accuracy"] == pytest.approx(np.mean(right))
    assert scores["accuracy"] >= 0.9, scores["answers"]
    assert scores["tokens_per_forward"] > 1.0  # the sampler commits several tokens per decoder pass


def test_evaluate_rejects_bad_arguments():
    config, params = convert.load(DEFAULT_MODEL_DIR)
    with pytest.raises(ValueError, match="n and batch_size"):
        evaluate(params, config, get_task("sort"), 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="vocabulary"):
        evaluate(params, config.replace(vocab_size=8), get_task("sort"), 4, key=jax.random.key(0))


def test_evaluate_scores_the_real_rows_only(monkeypatch):
    """evaluate's bookkeeping against a stand-in for generate that answers every prompt but the second of each
    batch correctly: prompts left-padded with their mask, answers cut at EOS, and the rows that top up the last
    batch counted in no score."""
    task = get_task("sort")
    tok = task.tokenizer
    calls = []

    def fake_generate(params, config, ids, *, attention_mask, key, **settings):
        ids, mask = np.asarray(ids), np.asarray(attention_mask)
        calls.append((ids, mask, settings))
        new = np.full((ids.shape[0], settings["max_new_tokens"]), tok.pad_id, np.int32)
        for i, (row, visible) in enumerate(zip(ids, mask, strict=True)):
            digits = sorted(tok.decode(row[visible]))
            answer = tok.encode("".join(digits if i != 1 else digits[::-1]))
            new[i, :len(answer) + 1] = [*answer, tok.eos_id]
        rows = np.arange(1, ids.shape[0] + 1, dtype=np.float32)
        return types.SimpleNamespace(sequences=np.concatenate([ids, new], axis=1), tokens_per_forward=rows,
                                     decoder_passes=10 * rows)

    monkeypatch.setattr("diffjax.evaluate.generate", fake_generate)
    scores = evaluate(None, Config.tiny(), task, 5, key=jax.random.key(0), batch_size=4)
    prompts = evaluation_prompts(task, 5)
    # Batches of 4: rows 1-4, then row 5 and three repeats of it (scored as row 1 of its batch).
    assert [ids.shape for ids, _, _ in calls] == [(4, task.prompt_length)] * 2
    rows = [*prompts[:4], *[prompts[4]] * 4]  # the last batch topped up with repeats of its last prompt
    for i, (ids, mask, settings) in enumerate(calls):
        assert settings == {"max_new_tokens": task.max_answer_chars + 1, "eos_token_id": tok.eos_id,
                            "pad_token_id": tok.pad_id}
        for j, (row, visible) in enumerate(zip(ids, mask, strict=True)):
            n = len(rows[4 * i + j])
            assert visible[-n:].all() and not visible[:-n].any()  # left padding, under the mask
            np.testing.assert_array_equal(row[-n:], rows[4 * i + j])
            assert (row[:-n] == tok.pad_id).all()
    expected = ["".join(sorted(tok.decode(p))) for p in prompts]
    expected[1] = expected[1][::-1]
    assert scores["answers"] == expected and scores["n"] == 5
    assert scores["accuracy"] == pytest.approx(np.mean([task.check(p, tok.encode(a))
                                                        for p, a in zip(prompts, expected, strict=True)]))
    assert scores["accuracy"] < 1
    assert scores["tokens_per_forward"] == pytest.approx((1 + 2 + 3 + 4 + 1) / 5)
    assert scores["decoder_passes"] == pytest.approx(10 * (1 + 2 + 3 + 4 + 1) / 5)
