"""Training checkpoints with orbax: everything a killed run needs to continue exactly where it stopped.

A `TrainState` is the trained tree (the model params, or the LoRA tree when fine-tuning with LoRA), the
optimiser state, the optimiser step, the data position (index of the next batch) and the RNG key of the next
step. `TrainCheckpointer` keeps the last `keep` of them under one directory, one orbax step folder each
(`DIR/<step>/`); orbax writes every step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact. Saving is synchronous: the train step donates its buffers,
and an asynchronous save could still be reading them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

Array = jax.Array


@dataclasses.dataclass
class TrainState:
    """trainable: params or LoRA tree; opt_state: its optax state; step: optimiser steps done; data_position:
    index of the next batch; key: the RNG key the next step splits its noise from."""

    trainable: Any
    opt_state: Any
    step: int
    data_position: int
    key: Array


class TrainCheckpointer:
    """Save / restore `TrainState`s under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 checkpoint, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState, metadata: Mapping[str, Any] | None = None) -> None:
        """Write `state` as checkpoint `state.step`; `metadata` (JSON) is stored beside it, e.g. the run's
        settings, and checked on restore."""
        arrays = {"trainable": state.trainable, "opt_state": state.opt_state, "key": jax.random.key_data(state.key)}
        meta = {"step": state.step, "data_position": state.data_position, "metadata": dict(metadata or {})}
        self._manager.save(state.step, args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, like: TrainState, metadata: Mapping[str, Any] | None = None, step: int | None = None) -> TrainState:
        """The checkpoint `step` (default: the latest), into the tree structure, shapes and dtypes of `like`.

        Raises ValueError when there is none, or when its stored metadata differs from `metadata` (a resumed
        run with other settings would not continue the same run).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no training checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise ValueError(f"no checkpoint of step {step} in {self.directory}; have {self.all_steps()}")
        # Settings first: a run with other settings would fail on shapes, or worse, silently continue.
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        stored, given = meta["metadata"], _json_roundtrip(metadata or {})
        if metadata is not None and stored != given:
            differ = ", ".join(f"{k} (checkpoint {stored.get(k, 'not set')!r}, now {given.get(k, 'not set')!r})"
                               for k in sorted(set(stored) | set(given)) if stored.get(k) != given.get(k))
            raise ValueError(f"checkpoint {self.directory / str(step)} was written by a run with other settings: "
                             f"{differ}")
        template = {"trainable": like.trainable, "opt_state": like.opt_state, "key": jax.random.key_data(like.key)}
        restored = self._manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(template)))
        arrays = restored.arrays
        return TrainState(arrays["trainable"], arrays["opt_state"], int(meta["step"]), int(meta["data_position"]),
                          jax.random.wrap_key_data(arrays["key"], impl=jax.random.key_impl(like.key)))

    def close(self) -> None:
        self._manager.close()


def _json_roundtrip(value: Mapping[str, Any]) -> Any:
    """What JSON gives back for `value` (tuples become lists), for comparing against stored metadata."""
    return json.loads(json.dumps(dict(value)))


__all__ = ["TrainCheckpointer", "TrainState"]
