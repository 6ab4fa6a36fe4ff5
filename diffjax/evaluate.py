"""Exact-match evaluation of a model on a task: `diffjax.generate` over task prompts, answers checked exactly.

    scores = evaluate(params, config, get_task("sort"), n=256, key=jax.random.key(0))
    scores["accuracy"], scores["tokens_per_forward"]

Prompts are drawn from the task's generator (seeded by `seed`, independent of training streams that use
`Task.batch`), left-padded to the task's longest prompt and run in batches of a fixed size (the last one
topped up with repeats and those rows dropped), so the generation loop compiles once per settings.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from diffjax.config import Config
from diffjax.generate import generate
from diffjax.model import Params
from diffjax.tasks import Task
from diffjax.tokenizer import answer_ids, left_pad

# Evaluation prompts come from a stream no training batch uses (`Task.batch` seeds with [seed, index]).
EVAL_STREAM = 2**31 - 1


def evaluation_prompts(task: Task, n: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts (ids with `<bos>`) of `task`, deterministic in `seed`."""
    rng = np.random.default_rng([EVAL_STREAM, seed])
    return [task.sample(rng)[0] for _ in range(n)]


def evaluate(
    params: Params, config: Config, task: Task, n: int, *, key: jax.Array, batch_size: int = 64, seed: int = 0,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Generate answers to `n` prompts of `task` and check them exactly.

    `generate_kwargs` go to `diffjax.generate` (sampler, temperature_schedule, max_denoising_steps, ...);
    `max_new_tokens` defaults to the task's longest answer + EOS. Returns accuracy (fraction exactly right),
    tokens_per_forward and decoder_passes (means over prompts; passes per prompt, all canvases), n, and
    answers (the decoded answers, in prompt order).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    tok = task.tokenizer
    if config.vocab_size < tok.vocab_size:
        raise ValueError(f"config.vocab_size {config.vocab_size} < task {task.name!r} vocabulary {tok.vocab_size}")
    settings = {"max_new_tokens": task.max_answer_chars + 1, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    settings.update(generate_kwargs)
    prompts = evaluation_prompts(task, n, seed)
    width = task.prompt_length
    correct, tpf, passes, answers = [], [], [], []
    for first in range(0, n, batch_size):
        rows = prompts[first:first + batch_size]
        real = len(rows)
        rows = rows + [rows[-1]] * (batch_size - real)
        ids, mask = left_pad(rows, tok.pad_id, width)
        out = generate(params, config, ids, attention_mask=mask, key=jax.random.fold_in(key, first), **settings)
        sequences = np.asarray(out.sequences)[:real, width:]
        for prompt, new in zip(rows[:real], sequences, strict=True):
            answer = answer_ids(new, (tok.eos_id,), tok.pad_id)
            correct.append(task.check(prompt, answer))
            answers.append(tok.decode(answer))
        tpf += np.asarray(out.tokens_per_forward)[:real].tolist()
        passes += np.asarray(out.decoder_passes)[:real].tolist()
    return {
        "accuracy": float(np.mean(correct)), "tokens_per_forward": float(np.mean(tpf)),
        "decoder_passes": float(np.mean(passes)), "n": n, "answers": answers,
    }


__all__ = ["evaluate", "evaluation_prompts"]
