"""Tasks whose answers are checked exactly: generators, a symbol tokenizer, exact checkers, training batches.

    task = get_task("sort")                          # or "sudoku" (9x9), "sudoku4" (4x4)
    config = task.model_config(Config.demo())        # vocabulary, special ids and canvas length set
    batch = task.batch(config, batch_size=32, index=step, seed=0)   # a `diffjax.train.Batch`
    prompt, answer = task.sample(np.random.default_rng(0))
    task.check(prompt, answer)                       # True: answer solves the prompt

Every task shares one `SymbolTokenizer` (one id per character, pad 0, eos 1, bos 2), so a checkpoint trained
on one task decodes with any. A prompt is `<bos>` + the puzzle's characters; an answer is the solution's
characters (the training batch appends EOS). Pure numpy and Python: no model code runs here.
"""

from __future__ import annotations

import abc
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from diffjax.config import DEFAULT_AR_TARGETS, Config

if TYPE_CHECKING:
    from diffjax.train import Batch

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
SPECIALS = ("<pad>", "<eos>", "<bos>")
ALPHABET = "0123456789."
BLANK = "."
# A checkpoint folder trained on a task names it here; its tokenizer is then the task's (no tokenizer.json).
TASK_FILE = "task.json"


class SymbolTokenizer:
    """One id per character of `alphabet`, after the special tokens (pad 0, eos 1, bos 2)."""

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet {alphabet!r} repeats a character")
        self.alphabet = alphabet
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(alphabet)}
        self.pad_id, self.eos_id, self.bos_id = PAD_ID, EOS_ID, BOS_ID

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        """Characters -> ids (no special tokens added); a character outside the alphabet raises ValueError."""
        unknown = sorted(set(text) - set(self._ids))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the task alphabet {self.alphabet!r}")
        return [self._ids[c] for c in text]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Ids -> text; special tokens and ids outside the vocabulary are dropped."""
        offset = len(SPECIALS)
        return "".join(self.alphabet[i - offset] for i in (int(i) for i in ids) if offset <= i < self.vocab_size)


class Task(abc.ABC):
    """A generator of (prompt, answer) pairs with an exact checker.

    Subclasses define the text level (`sample_text`, `check_text`, `validate_prompt`) and the sizes:
    `max_prompt_chars` and `max_answer_chars`. The canvas holds the longest answer plus its EOS.
    """

    name: str
    max_prompt_chars: int
    max_answer_chars: int
    tokenizer: SymbolTokenizer = SymbolTokenizer()

    @abc.abstractmethod
    def sample_text(self, rng: np.random.Generator) -> tuple[str, str]:
        """A random (puzzle, solution) pair as text."""

    @abc.abstractmethod
    def check_text(self, prompt: str, answer: str) -> bool:
        """Whether `answer` exactly solves `prompt`."""

    @abc.abstractmethod
    def validate_prompt(self, prompt: str) -> None:
        """Raise ValueError naming the problem if `prompt` is not a puzzle of this task."""

    # ------------------------------------------------------------------ ids level
    @property
    def canvas_length(self) -> int:
        """The longest answer + EOS, rounded up to a multiple of 8."""
        return 8 * math.ceil((self.max_answer_chars + 1) / 8)

    @property
    def prompt_length(self) -> int:
        """Padded prompt length of a training batch: `<bos>` + the longest puzzle."""
        return self.max_prompt_chars + 1

    def prompt_ids(self, prompt: str) -> list[int]:
        """A user's puzzle text -> model input ids (`<bos>` first), validated."""
        self.validate_prompt(prompt)
        return [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]

    def sample(self, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """(prompt ids with `<bos>`, answer ids without EOS)."""
        prompt, answer = self.sample_text(rng)
        return self.prompt_ids(prompt), self.tokenizer.encode(answer)

    def check(self, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> bool:
        """Exact check of an answer (ids, EOS/pad already cut) against its prompt (ids, `<bos>` allowed).

        An answer holding special tokens or any extra character is wrong."""
        decoded = self.tokenizer.decode(answer_ids)
        if len(decoded) != len(answer_ids):
            return False
        prompt = self.tokenizer.decode(prompt_ids)
        try:
            self.validate_prompt(prompt)
        except ValueError:
            return False
        return self.check_text(prompt, decoded)

    def model_config(self, base: Config) -> Config:
        """`base` with this task's vocabulary, special ids and canvas length."""
        return base.replace(
            vocab_size=self.tokenizer.vocab_size, pad_token_id=PAD_ID, eos_token_id=(EOS_ID,),
            bos_token_id=BOS_ID, canvas_length=self.canvas_length,
        )

    def num_canvases(self, config: Config) -> int:
        """Canvases of `config.canvas_length` holding the longest answer and its EOS."""
        return math.ceil((self.max_answer_chars + 1) / config.canvas_length)

    def batch(
        self, config: Config, batch_size: int, index: int, seed: int, ar_targets: str = DEFAULT_AR_TARGETS
    ) -> Batch:
        """Training batch number `index` of the stream `seed`: the same (seed, index) gives the same batch.
        `ar_targets`: what the AR co-loss scores (`train.make_batch`)."""
        from diffjax.train import make_batch  # jax is only needed once a batch is built

        if config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"config.vocab_size {config.vocab_size} < the task vocabulary {self.tokenizer.vocab_size}: "
                "build the config with task.model_config(base)"
            )
        if batch_size < 1 or index < 0:
            raise ValueError(f"batch_size must be >= 1 and index >= 0, got {batch_size} and {index}")
        rng = np.random.default_rng([seed, index])
        pairs = [self.sample(rng) for _ in range(batch_size)]
        return make_batch(
            config, [p for p, _ in pairs], [a for _, a in pairs], self.prompt_length, self.num_canvases(config),
            ar_targets,
        )


class SortTask(Task):
    """Sort a list of digits: prompt "52817" -> answer "12578" (2 to `max_len` digits)."""

    name = "sort"

    def __init__(self, min_len: int = 2, max_len: int = 12) -> None:
        self.min_len, self.max_len = min_len, max_len
        self.max_prompt_chars = self.max_answer_chars = max_len

    def sample_text(self, rng: np.random.Generator) -> tuple[str, str]:
        digits = rng.integers(0, 10, int(rng.integers(self.min_len, self.max_len + 1)))
        return "".join(map(str, digits)), "".join(map(str, np.sort(digits)))

    def validate_prompt(self, prompt: str) -> None:
        if not prompt.isdigit() or not prompt.isascii():
            raise ValueError(f"a sort prompt is a string of digits, got {prompt!r}")
        if not self.min_len <= len(prompt) <= self.max_len:
            raise ValueError(f"a sort prompt has {self.min_len} to {self.max_len} digits, got {len(prompt)}")

    def check_text(self, prompt: str, answer: str) -> bool:
        return answer == "".join(sorted(prompt))


class SudokuTask(Task):
    """Fill a Sudoku: prompt = the n*n grid row by row, "." for blanks; answer = the completed grid's digits.

    n = box**2 (box 3: the classic 9x9 of Google's fine-tuning guide; box 2: a 4x4 warm-up). Puzzles are a
    random valid grid (a shuffled pattern grid) with `min_blanks..max_blanks` cells blanked: the solution is
    valid but not always unique, so the checker accepts ANY valid completion consistent with the givens.
    """

    def __init__(self, box: int = 3, min_blanks: int | None = None, max_blanks: int | None = None) -> None:
        self.box, self.size = box, box * box
        cells = self.size * self.size
        self.min_blanks = cells // 4 if min_blanks is None else min_blanks
        self.max_blanks = cells // 2 if max_blanks is None else max_blanks
        if not 0 <= self.min_blanks <= self.max_blanks <= cells:
            raise ValueError(f"need 0 <= min_blanks <= max_blanks <= {cells}")
        self.name = "sudoku" if box == 3 else f"sudoku{self.size}"
        self.max_prompt_chars = self.max_answer_chars = cells

    def solved_grid(self, rng: np.random.Generator) -> np.ndarray:
        """A random valid completed grid `[n, n]` of digits 1..n."""
        b, n = self.box, self.size
        r = np.arange(n)
        pattern = (b * (r[:, None] % b) + r[:, None] // b + r[None, :]) % n  # the canonical valid grid

        def shuffled_lines() -> np.ndarray:  # permute bands, then lines within each band
            return np.concatenate([band * b + rng.permutation(b) for band in rng.permutation(b)])

        grid = pattern[shuffled_lines()][:, shuffled_lines()]
        grid = rng.permutation(n)[grid] + 1
        return grid.T if rng.integers(2) else grid

    def sample_text(self, rng: np.random.Generator) -> tuple[str, str]:
        grid = self.solved_grid(rng)
        blanks = rng.choice(grid.size, int(rng.integers(self.min_blanks, self.max_blanks + 1)), replace=False)
        puzzle = grid.reshape(-1).astype(str)
        puzzle[blanks] = BLANK
        return "".join(puzzle), "".join(grid.reshape(-1).astype(str))

    def validate_prompt(self, prompt: str) -> None:
        allowed = set(BLANK + "".join(str(d) for d in range(1, self.size + 1)))
        if len(prompt) != self.size**2:
            raise ValueError(f"a {self.size}x{self.size} sudoku prompt has {self.size**2} cells, got {len(prompt)}")
        if bad := sorted(set(prompt) - allowed):
            raise ValueError(f"sudoku cells are digits 1-{self.size} or {BLANK!r}, got {bad}")

    def is_valid_grid(self, digits: str) -> bool:
        """Whether `digits` (n*n characters) is a completed grid: every row, column and box a permutation."""
        if len(digits) != self.size**2 or not digits.isdigit():
            return False
        grid = np.array([int(c) for c in digits]).reshape(self.size, self.size)
        b = self.box
        boxes = grid.reshape(b, b, b, b).transpose(0, 2, 1, 3).reshape(self.size, self.size)
        target = np.arange(1, self.size + 1)
        return all(np.array_equal(np.sort(g, axis=1), np.broadcast_to(target, g.shape)) for g in (grid, grid.T, boxes))

    def check_text(self, prompt: str, answer: str) -> bool:
        return self.is_valid_grid(answer) and all(p in (BLANK, a) for p, a in zip(prompt, answer, strict=True))


_TASKS: dict[str, Task] = {t.name: t for t in (SortTask(), SudokuTask(box=3), SudokuTask(box=2))}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str) -> Task:
    """The task called `name` (one of `TASK_NAMES`)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASK_NAMES)}")
    return _TASKS[name]


def write_task_file(folder: str | os.PathLike[str], task: Task) -> pathlib.Path:
    """Write `folder/task.json` naming `task`; returns its path."""
    path = pathlib.Path(folder) / TASK_FILE
    path.write_text(json.dumps({"task": task.name}) + "\n")
    return path


def read_task_file(folder: str | os.PathLike[str]) -> Task | None:
    """The task named by `folder/task.json`, or None if the folder has no such file."""
    path = pathlib.Path(folder) / TASK_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text())["task"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: expected {{\"task\": NAME}}, could not read it ({exc})") from None
    return get_task(name)


__all__ = [
    "TASK_FILE", "TASK_NAMES", "SortTask", "SudokuTask", "SymbolTokenizer", "Task", "get_task", "read_task_file",
    "write_task_file",
]
