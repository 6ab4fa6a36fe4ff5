"""The names of the files the converter's writers produce, and what makes a folder recognisably theirs.

One list for both: `--overwrite` deletes the folder it replaces, so it may only delete what a writer made.
"""

from __future__ import annotations

import pathlib
import re

from diffjax.tasks import TASK_FILE

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PARAMS_FILE = "params.safetensors"  # the diffjax format (`convert.native`)
SINGLE_FILE = "model.safetensors"  # transformers' layout (`convert.hf`), unsharded ...
INDEX_FILE = "model.safetensors.index.json"  # ... or sharded
# What a transformers folder keeps beside the weights for its tokenizer and chat template; the converter
# copies them into the diffjax checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
WEIGHT_FILES = (PARAMS_FILE, SINGLE_FILE, INDEX_FILE)
# What a conversion carries across, in either direction, beside the weights and configs: the tokenizer, and
# the task a `diffjax train` model was trained on (its prompts and tokenizer; transformers ignores it).
COMPANION_FILES = (*TOKENIZER_FILES, TASK_FILE)
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# `diffjax train --out` writes its task.json beside the checkpoint (`diffjax.tasks`).
_CHECKPOINT_FILES = frozenset({CONFIG_FILE, GENERATION_CONFIG_FILE, *WEIGHT_FILES, *TOKENIZER_FILES, TASK_FILE})


def companion_files(folder: str | pathlib.Path) -> list[pathlib.Path]:
    """The `COMPANION_FILES` present in `folder`."""
    return [pathlib.Path(folder) / name for name in COMPANION_FILES if (pathlib.Path(folder) / name).is_file()]


def shard_file(number: int, count: int) -> str:
    """The name of shard `number` (from 1) of `count`, as transformers' `save_pretrained` names them."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def not_a_checkpoint(folder: pathlib.Path, shown: int = 5) -> str | None:
    """Why the existing `folder` is not one a writer could have made (None when it is, or is empty).

    It must be a directory holding `config.json` and a weights file, and nothing but files with the names the
    writers give (a subfolder such as `diffjax train`'s `train_state/` is never theirs). Up to `shown` of the
    other entries are named.
    """
    if not folder.is_dir():
        return "is a file, not a checkpoint folder"
    entries = sorted(folder.iterdir())
    foreign = [
        f"{entry.name}/" if entry.is_dir() else entry.name
        for entry in entries
        if not (entry.is_file() and (entry.name in _CHECKPOINT_FILES or _SHARD_FILE.fullmatch(entry.name)))
    ]
    if foreign:
        more = f", and {len(foreign) - shown} more" if len(foreign) > shown else ""
        return f"holds files that are not part of a checkpoint ({', '.join(foreign[:shown])}{more})"
    names = {entry.name for entry in entries}
    if entries and (CONFIG_FILE not in names or not names & set(WEIGHT_FILES)):
        return f"is not a checkpoint (it lacks {CONFIG_FILE} or a weights file: {', '.join(WEIGHT_FILES)})"
    return None
