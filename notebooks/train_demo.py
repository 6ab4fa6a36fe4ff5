"""Train the embedded demo model from scratch on CPU and write it to diffjax/assets/demo.

    PYTHONPATH=. python notebooks/train_demo.py [--task sort] [--steps 3000] [--batch-size 32] [--out DIR]

The recipe of the committed model: `Config.demo()` (4 layers, 3 sliding (window 8) + 1 full, 8 experts
top-2, self-conditioning) sized for the task by `Task.model_config`, `diffjax.train.fit` with AdamW
(b1 0.95, b2 0.99, wd 1e-4, clip 1.0) at peak 3e-3, 100 warmup steps then cosine to 10%, batch 32, batches
`task.batch(config, 32, index=step, seed=0)`, noise key chain from `jax.random.key(1)`. Dense expert maths
while training (the fastest on CPU; the saved config uses the default grouped experts, same maths).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax

import convert
from diffjax.cli import DEFAULT_MODEL_DIR
from diffjax.config import Config
from diffjax.model import count_params, init_params
from diffjax.tasks import get_task, write_task_file
from diffjax.train import fit, make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sort")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()

    task = get_task(args.task)
    config = task.model_config(Config.demo(moe_implementation="dense"))
    print(f"{task.name}: {count_params(config):,} parameters")
    result = fit(
        init_params(config, jax.random.key(0)), config,
        lambda index: task.batch(config, args.batch_size, index=index, seed=0), args.steps,
        key=jax.random.key(1), optimizer=make_optimizer(args.lr, args.steps, warmup_steps=min(100, args.steps // 10)),
    )
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    generation = {"max_new_tokens": task.max_answer_chars + 1, "eos_token_id": [task.tokenizer.eos_id],
                  "pad_token_id": task.tokenizer.pad_id}
    with tempfile.TemporaryDirectory() as tmp:
        convert.save(result.params, config.replace(moe_implementation="grouped"), args.out, generation, overwrite=True,
                     extra_files=[write_task_file(tmp, task)])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
