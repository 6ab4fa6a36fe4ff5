"""`diffjax train` end to end on a tiny run: checkpoint folder, generate from it, export to transformers with the
same logits, resume, and one-line errors for bad arguments."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

import convert
from diffjax import cli, denoise_logits, encode
from diffjax.checkpoint import TrainCheckpointer
from diffjax.tasks import get_task

TINY_RUN = ["train", "--task", "sort", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--lr", "1e-2",
            "--checkpoint-every", "1", "--keep", "1", "--no-progress"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("diffjax: error: "), err
    for fragment in fragments:
        assert fragment in last, last


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sort"
    code = cli.main([*TINY_RUN, "--out", str(out)])
    assert code == 0
    return out


def test_train_writes_a_generate_ready_checkpoint(trained, capsys):
    assert {p.name for p in trained.iterdir()} == {
        "config.json", "generation_config.json", "params.safetensors", "task.json", "train_state"}
    assert TrainCheckpointer(trained / "train_state").all_steps() == [2]  # --keep 1
    config, _ = convert.load(trained)
    task = get_task("sort")
    assert config == task.model_config(config)

    code, out, err = run(capsys, "generate", "--checkpoint", trained, "--no-live", "--steps", "2", "52817")
    assert code == 0, err
    assert set(out.strip()) <= set("0123456789")  # decoded with the task's tokenizer
    code, _, err = run(capsys, "generate", "--checkpoint", trained, "--no-live", "hello")
    assert_clean_error(code, err, "a sort prompt is a string of digits")

    # Resuming a finished run trains nothing more and rewrites the same weights.
    before = (trained / "params.safetensors").read_bytes()
    code, _, err = run(capsys, *TINY_RUN, "--out", trained, "--resume")
    assert code == 0, err
    assert (trained / "params.safetensors").read_bytes() == before


def test_trained_model_exports_to_transformers_with_same_logits(trained, tmp_path, capsys):
    code, _, err = run(capsys, "convert", "--to-hf", trained, tmp_path / "hf", "--quiet")
    assert code == 0, err
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "hf").float().eval()
    config, params = convert.load(trained)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, (2, 9))
    canvas = rng.integers(0, config.vocab_size, (2, config.canvas_length))
    ours = denoise_logits(params, config, encode(params, config, jnp.asarray(prompt, jnp.int32)),
                          jnp.asarray(canvas, jnp.int32))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(prompt), decoder_input_ids=torch.tensor(canvas)).logits.numpy()
    diff = float(np.max(np.abs(np.asarray(ours) - theirs)))
    print(f"trained model, diffjax vs transformers logits: max |diff| {diff:.2e}")
    assert float(np.std(theirs)) > 0.1 and diff < 1e-4


def test_train_bad_arguments(trained, tmp_path, capsys):
    out = ["--out", tmp_path / "new"]
    cases = [
        ([*TINY_RUN, "--out", trained], "already holds a training run: pass --resume"),
        ([*TINY_RUN, *out, "--resume"], "--resume: no training checkpoints in"),
        ([*TINY_RUN, "--out", trained / "train_state"], "is not empty: a new run needs a new or empty folder"),
        ([*TINY_RUN, "--out", trained / "config.json"], "exists and is not a directory"),
        ([*TINY_RUN, *out, "--lora-alpha", "4"], "--lora-alpha and --lora-targets need --lora-rank"),
        ([*TINY_RUN, *out, "--warmup-steps", "2"], "--warmup-steps (2) must be below --steps (2)"),
        (["train", "--task", "sort", "--init", trained, "--steps", "2", *out, "--lora-rank", "2", "--lora-targets",
          "self_attn/qkv"], "match no linear layer"),
        ([*TINY_RUN, *out, "--lora-rank", "2"], "--lora-rank needs --init"),
        ([*TINY_RUN, *out, "--task", "chess"], "argument --task: invalid choice: 'chess'"),
        ([*TINY_RUN, *out, "--steps", "0"], "expected an integer > 0, got 0"),
        (["train", "--task", "sudoku4", "--init", trained, "--steps", "2", *out], "do not fit task sudoku4"),
        (["train", "--task", "sort", "--init", tmp_path, "--steps", "2", *out], "is neither a diffjax checkpoint"),
        (["train", "--task", "sort", "--preset", "tiny", "--init", trained, "--steps", "2", *out], "not allowed with"),
        ([*TINY_RUN[:-1], "--out", trained, "--resume", "--batch-size", "3"],
         "other settings: batch_size (checkpoint 2, now 3)"),
        ([*TINY_RUN[:-1], "--out", trained, "--resume", "--ar-targets", "response"],
         "other settings: ar_targets (checkpoint 'google', now 'not set')"),
        ([*TINY_RUN, *out, "--ar-targets", "prompt"], "argument --ar-targets: invalid choice: 'prompt'"),
        ([*TINY_RUN, *out, "--experts-fp8"], "--experts-fp8 needs --lora-rank"),
        ([*TINY_RUN, *out, "--dtype", "bfloat16"], "--dtype needs --init"),
        (["train", "--task", "sort", "--init", trained, "--steps", "2", *out, "--master-weights"],
         "--master-weights needs --dtype bfloat16 or float16"),
        (["train", "--task", "sort", "--init", trained, "--steps", "2", *out, "--master-weights", "--dtype",
          "bfloat16", "--lora-rank", "2"], "and full fine-tuning (no --lora-rank)"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert_clean_error(code, err, message)
    assert not (tmp_path / "new" / "params.safetensors").exists()


def test_lora_over_fp8_experts_of_a_bf16_base(trained, tmp_path, capsys):
    """QLoRA-style from the command line: a bf16 base with fp8 experts under a LoRA adapter; the exported model
    is a plain bf16 checkpoint whose experts are the fp8 values widened (what was trained against)."""
    from diffjax.quantize import dequantize_experts, quantize_experts

    out = tmp_path / "qlora"
    code, _, err = run(capsys, "train", "--task", "sort", "--init", trained, "--dtype", "bfloat16", "--experts-fp8",
                       "--lora-rank", "2", "--steps", "2", "--batch-size", "2", "--no-progress", "--out", out)
    assert code == 0, err
    config, params = convert.load(out)
    _, base = convert.load(trained, "bfloat16")
    assert config.expert_quantization == "none" and params["embedder"]["embedding"].dtype == jnp.bfloat16
    widened = dequantize_experts(quantize_experts(base), jnp.bfloat16)
    for layer in params["blocks"]:
        for name in ("gate_up_proj", "down_proj"):
            exported = np.asarray(params["blocks"][layer]["experts"][name], np.float32)
            np.testing.assert_array_equal(exported, np.asarray(widened["blocks"][layer]["experts"][name], np.float32))
            assert not np.array_equal(exported, np.asarray(base["blocks"][layer]["experts"][name], np.float32))
    # Four steps of training in all: the answer may be empty (an EOS first), the run must not fail.
    code, _, err = run(capsys, "generate", "52817", "--checkpoint", out, "--no-live", "--steps", "2")
    assert code == 0 and "2 decoder passes" in err, err
