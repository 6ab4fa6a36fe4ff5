"""The task suite: generators give valid pairs, checkers are exact, tokenizer round trip, deterministic batches."""

import numpy as np
import pytest

from diffjax.config import Config
from diffjax.tasks import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TASK_FILE,
    TASK_NAMES,
    SudokuTask,
    SymbolTokenizer,
    get_task,
    read_task_file,
    write_task_file,
)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generated_pairs_check_and_fit_the_canvas(name):
    task = get_task(name)
    rng = np.random.default_rng(0)
    for _ in range(50):
        prompt, answer = task.sample(rng)
        assert prompt[0] == BOS_ID and len(prompt) <= task.prompt_length
        assert len(answer) + 1 <= task.canvas_length  # the answer and its EOS fit one canvas
        assert task.check(prompt, answer)


def test_sort_checker_rejects_wrong_answers():
    task = get_task("sort")
    tok = task.tokenizer
    prompt = task.prompt_ids("52817")
    assert task.check(prompt, tok.encode("12578"))
    for wrong in ("12587", "1257", "125788", "", "12578."):
        assert not task.check(prompt, tok.encode(wrong)), wrong
    assert not task.check(prompt, [*tok.encode("1257"), EOS_ID])  # a special token inside the answer
    # The right digits with a special token among them: decoding alone would drop it and pass.
    assert not task.check(prompt, [*tok.encode("125"), EOS_ID, *tok.encode("78")])
    assert not task.check(prompt, [*tok.encode("125"), PAD_ID, *tok.encode("78")])


def test_sort_prompts_span_every_length():
    """The generator reaches both ends of min_len..max_len: the longest answer sizes the canvas, so it must be
    trained on."""
    task = get_task("sort")
    rng = np.random.default_rng(0)
    lengths = {len(task.sample_text(rng)[0]) for _ in range(400)}
    assert lengths == set(range(task.min_len, task.max_len + 1))


@pytest.mark.parametrize("box", [2, 3])
def test_sudoku_grids_are_valid_and_checker_is_exact(box):
    task = SudokuTask(box=box)
    rng = np.random.default_rng(box)
    n = box * box
    for _ in range(20):
        grid = task.solved_grid(rng)
        for lines in (grid, grid.T):
            assert all(sorted(line) == list(range(1, n + 1)) for line in lines)
        boxes = grid.reshape(box, box, box, box).transpose(0, 2, 1, 3).reshape(n, n)
        assert all(sorted(b) == list(range(1, n + 1)) for b in boxes)
    puzzle, solution = task.sample_text(rng)
    assert task.check_text(puzzle, solution)
    given = next(i for i, c in enumerate(puzzle) if c != ".")
    # A given changed: rows/columns/boxes break and the given is not respected.
    swapped = list(solution)
    swapped[given] = str(int(solution[given]) % n + 1)
    assert not task.check_text(puzzle, "".join(swapped))
    # Bands rotated: still a valid grid, but every cell changes (a column never repeats a digit), so it
    # contradicts the givens.
    grid = np.array(list(solution)).reshape(n, n)
    other = "".join(grid[[*range(box, n), *range(box)]].reshape(-1))
    assert task.is_valid_grid(other) and not task.check_text(puzzle, other)
    assert not task.check_text(puzzle, solution[:-1])


def test_sudoku_accepts_any_valid_completion():
    task = SudokuTask(box=2)
    solution = "1234341221434321"
    assert task.is_valid_grid(solution)
    assert task.check_text("." * 16, solution)  # no givens: any valid grid solves it
    assert not task.check_text("." * 16, "1234123412341234")
    # Every row and column a permutation, but the top-left box holds 1, 2, 2, 1: not a sudoku.
    latin = "1234214334124321"
    grid = np.array(list(latin), int).reshape(4, 4)
    assert all(sorted(line) == [1, 2, 3, 4] for line in (*grid, *grid.T))
    assert not task.is_valid_grid(latin) and not task.check_text("." * 16, latin)


def test_tokenizer_round_trip_and_errors():
    tok = SymbolTokenizer()
    text = "0123456789."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and min(ids) > BOS_ID and max(ids) < tok.vocab_size
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == text
    with pytest.raises(ValueError, match=r"\['x'\]"):
        tok.encode("12x")
    with pytest.raises(ValueError, match="repeats"):
        SymbolTokenizer("aa")


@pytest.mark.parametrize("name", ["sort", "sudoku4"])
def test_batch_is_deterministic_in_seed_and_index(name):
    task = get_task(name)
    config = task.model_config(Config.demo())
    assert (config.vocab_size, config.canvas_length) == (task.tokenizer.vocab_size, task.canvas_length)
    a, b = task.batch(config, 8, index=3, seed=1), task.batch(config, 8, index=3, seed=1)
    c, d = task.batch(config, 8, index=4, seed=1), task.batch(config, 8, index=3, seed=2)
    assert np.array_equal(a.response_ids, b.response_ids) and np.array_equal(a.prompt_ids, b.prompt_ids)
    assert not np.array_equal(a.prompt_ids, c.prompt_ids) and not np.array_equal(a.prompt_ids, d.prompt_ids)
    # Streams of other seeds never meet: (seed 1, index 4) and (seed 2, index 3) are different batches.
    assert not np.array_equal(c.prompt_ids, d.prompt_ids)
    # Each row: the prompt's answer, then EOS to the canvas end.
    for prompt, mask, response in zip(np.asarray(a.prompt_ids), np.asarray(a.prompt_mask),
                                      np.asarray(a.response_ids), strict=True):
        answer = [int(t) for t in response if t != EOS_ID]
        assert task.check(prompt[mask], answer) and response[-1] == EOS_ID


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")
    with pytest.raises(ValueError, match="digits"):
        get_task("sort").prompt_ids("12a")
    with pytest.raises(ValueError, match="2 to 12 digits"):
        get_task("sort").prompt_ids("1" * 13)
    with pytest.raises(ValueError, match="81 cells"):
        get_task("sudoku").prompt_ids("123")
    with pytest.raises(ValueError, match=r"task\.model_config"):
        get_task("sort").batch(Config.tiny(vocab_size=8, pad_token_id=0, bos_token_id=2), 2, 0, 0)
    with pytest.raises(ValueError, match="min_blanks"):
        SudokuTask(box=2, min_blanks=10, max_blanks=5)


def test_task_file_round_trip_and_errors(tmp_path):
    assert read_task_file(tmp_path) is None
    write_task_file(tmp_path, get_task("sudoku4"))
    assert read_task_file(tmp_path) is get_task("sudoku4")
    (tmp_path / TASK_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"task\.json"):
        read_task_file(tmp_path)
    (tmp_path / TASK_FILE).write_text('{"task": "chess"}')
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        read_task_file(tmp_path)


def test_readme_demo_model_snippet_runs_and_sorts(capsys, monkeypatch):
    """The README's Python snippet for the embedded demo model, as written there: it must run, and the model
    it loads sorts its prompt."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    (snippet,) = [block for block in blocks if 'diffjax.load("diffjax/assets/demo")' in block]
    monkeypatch.chdir(root)
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "11345"
