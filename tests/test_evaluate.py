"""evaluate() on the embedded demo model: exact-match accuracy on the task it was trained on, batching."""

import jax
import numpy as np
import pytest

import convert
from diffjax.cli import DEFAULT_MODEL_DIR
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
