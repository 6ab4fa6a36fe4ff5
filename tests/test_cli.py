"""The `diffjax` command line: generate on the default model and on converted checkpoints, info, convert,
bench on a tiny config, and clean one-line errors with exit status 2."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import diffjax
from diffjax import bench, cli
from diffjax.config import FULL, Config, gemma4_layer_types
from diffjax.quantize import FP8


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    # One error line, nothing before it.
    assert len(lines) == 1 and lines[-1].startswith("diffjax: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1]


# ------------------------------------------------------------------------------------------ generate


def test_generate_default_model_sorts(capsys):
    """The embedded demo model (trained by diffjax on the sort task) answers a sort puzzle correctly."""
    code, out, err = run(capsys, "generate", "--no-live", "--seed", "3", "9402751")
    assert code == 0, err
    assert out.strip() == "0124579"
    assert "tokens/s" in err and "tokens per forward" in err and "decoder passes" in err
    assert "[canvas" not in err  # --no-live: no per-step output
    # Same seed: the same answer, byte for byte.
    assert run(capsys, "generate", "--no-live", "--seed", "3", "9402751")[1] == out


def test_generate_implementation_flags_pick_the_computation(capsys):
    """--moe / --global-attention / --sliding-attention reach the config: same answer through another expert
    path; an implementation this machine cannot run, or a misspelt kernel tile, is one clear error line."""
    reference = run(capsys, "generate", "--no-live", "--seed", "3", "9402751")[1]
    code, out, err = run(capsys, "generate", "--no-live", "--seed", "3", "--moe", "dense", "9402751")
    assert code == 0, err
    assert out == reference
    code, out, err = run(capsys, "generate", "--no-live", "--seed", "3", "--scan-unroll", "4", "9402751")
    assert code == 0, err
    assert out == reference
    code, out, err = run(capsys, "generate", "--no-live", "--seed", "3", "--dtype", "bfloat16", "9402751")
    assert code == 0 and out.strip(), err  # the embedded model cast as a checkpoint would be
    code, _, err = run(capsys, "generate", "--no-live", "--scan-unroll", "0", "31")
    assert_clean_error(code, err, "--scan-unroll")
    code, _, err = run(capsys, "generate", "--no-live", "--tiles", "experts.block_rowz=32", "31")
    assert_clean_error(code, err, "experts has no tile setting block_rowz (did you mean block_rows?)")
    # Tiles of a kernel that does not run would time or change nothing: refused, not ignored.
    code, _, err = run(capsys, "generate", "--no-live", "--tiles", "experts.block_rows=32,vocab.block_v=64", "31")
    assert_clean_error(code, err, "--tiles sets experts, vocab, whose kernel does not run here")
    code, _, err = run(capsys, "generate", "--no-live", "--tiles", "routing.num_warps=2,routing.num_warps=4", "31")
    assert_clean_error(code, err, "kernel tiles set routing.num_warps twice")
    code, _, err = run(capsys, "generate", "--no-live", "--no-adaptive-stop", "--stability-threshold", "2", "31")
    assert_clean_error(code, err, "--no-adaptive-stop turns adaptive stopping off")
    if jax.default_backend() != "gpu":
        code, _, err = run(capsys, "generate", "--no-live", "--sliding-attention", "cudnn", "31")
        assert_clean_error(code, err, "needs an NVIDIA GPU")


def test_generate_keeps_compiled_programs_for_the_next_run(monkeypatch, tmp_path):
    """JAX's persistent cache pointed at a folder under XDG_CACHE_HOME, unless the user chose one (what a second
    run gains is measured by hand: the README's demo command, 22 s -> 10 s of wall time on the 2-core CPU)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compilation_cache_dir() == tmp_path / "xdg" / "diffjax" / "jax"
    before = jax.config.jax_compilation_cache_dir  # the test session's shared cache (conftest.py)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setattr(jax.config, "update", lambda name, value: chosen.append((name, value)))
    chosen = []
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    cli.enable_compilation_cache()
    assert chosen == []  # the user's own cache stays
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    cli.enable_compilation_cache()
    assert chosen == [("jax_compilation_cache_dir", str(tmp_path / "xdg" / "diffjax" / "jax"))]
    monkeypatch.undo()
    jax.config.update("jax_compilation_cache_dir", before)


def test_generate_compact_steps_when_not_a_tty(capsys):
    code, _, err = run(capsys, "generate", "--steps", "2", "--no-adaptive-stop", "31")
    assert code == 0, err
    assert "[canvas 1/1 · step 1/2]" in err and "[canvas 1/1 · step 2/2]" in err
    assert "2 decoder passes" in err


def test_default_model_is_the_trained_demo():
    model = cli.default_model()
    assert model.task is not None and model.task.name in model.name
    assert model.config.vocab_size == model.tokenizer.vocab_size
    assert model.config.num_experts > model.config.top_k_experts > 1  # the real structure: MoE, top-k
    assert {"sliding_attention", "full_attention"} == set(model.config.layer_types)


def test_printable_strips_control_characters():
    assert cli.printable("a\x1b[31mb\tc\nd\x07\x9b") == "a\ufffd[31mb\tc\nd\ufffd\ufffd"


# -------------------------------------------------------------------------------- checkpoints, convert


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> pathlib.Path:
    """A tiny transformers folder with a tokenizer and a generation config, as a Hub checkpoint has."""
    pytest.importorskip("transformers")
    from reference import random_hf_model
    from test_tokenizer import make_tokenizer_dir

    path = tmp_path_factory.mktemp("hf") / "model"
    random_hf_model(Config.tiny(), seed=0).save_pretrained(path)
    make_tokenizer_dir(path)
    (path / "generation_config.json").write_text(
        json.dumps({"max_denoising_steps": 2, "max_new_tokens": 16, "eos_token_id": [1, 5]}), encoding="utf-8"
    )
    return path


def test_convert_and_generate_from_checkpoints(capsys, hf_folder, tmp_path):
    dst = tmp_path / "ckpt"
    code, _, err = run(capsys, "convert", str(hf_folder), str(dst), "--quiet")
    assert code == 0, err
    assert (dst / "params.safetensors").is_file() and (dst / "generation_config.json").is_file()

    # The transformers folder directly; its generation_config.json sets 2 steps and 16 tokens.
    code, out, err = run(capsys, "generate", "--checkpoint", str(hf_folder), "--no-live", "--no-adaptive-stop",
                         "Hello world")
    assert code == 0, err
    assert "RANDOM" not in err and "2 decoder passes" in err
    # The converted checkpoint carries the tokenizer: same weights, same seed, same answer.
    assert (dst / "tokenizer.json").is_file()
    code, out2, err = run(capsys, "generate", "--checkpoint", str(dst), "--no-live", "--no-adaptive-stop",
                          "Hello world")
    assert code == 0, err
    assert out2 == out

    # Without a tokenizer: a clean error that says what to do, before loading weights.
    (dst / "tokenizer.json").unlink()
    code, _, err = run(capsys, "generate", "--checkpoint", str(dst), "hi")
    assert_clean_error(code, err, "tokenizer.json", "--tokenizer")
    code, out3, err = run(capsys, "generate", "--checkpoint", str(dst), "--tokenizer", str(hf_folder),
                          "--no-live", "--no-adaptive-stop", "Hello world")
    assert code == 0, err
    assert out3 == out and "chat template" not in err
    # A tokenizer without a chat template of its own: chat mode says it falls back to Gemma 4's.
    from test_tokenizer import make_tokenizer_dir

    make_tokenizer_dir(tmp_path / "plain", template=None)
    code, _, err = run(capsys, "generate", "--checkpoint", str(dst), "--tokenizer", str(tmp_path / "plain"),
                       "--no-live", "--no-adaptive-stop", "Hello world")
    assert code == 0, err
    assert "has no chat template of its own: the prompt is wrapped in Gemma 4's (pass --raw" in err


def test_flags_and_paths_refused_before_any_work(capsys, tmp_path):
    for argv, fragment in [
        (("generate", "--seed", str(10**23), "123"), "--seed"),
        (("generate", "--t-max", "inf", "123"), "--t-max"),
        (("generate", "--t-min", "nan", "123"), "--t-min"),
        (("generate", "--entropy-bound", "inf", "123"), "--entropy-bound"),
        (("bench", "--json", str(tmp_path / "missing" / "out.json")), "folder"),
        (("bench", "--json", str(tmp_path)), "is a folder"),
    ]:
        code, _, err = run(capsys, *argv)
        assert_clean_error(code, err, fragment)


def test_a_checkpoint_that_does_not_fit_its_task_is_refused(capsys, tmp_path):
    """The embedded model with another canvas length in its config.json would run, as a model never trained
    on that canvas: refused, naming both lengths."""
    model = tmp_path / "model"
    shutil.copytree(cli.DEFAULT_MODEL_DIR, model)
    config = json.loads((model / "config.json").read_text())
    config["canvas_length"] //= 2
    (model / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "generate", "--checkpoint", str(model), "123")
    assert_clean_error(code, err, f"canvas {config['canvas_length']}", f"/ {2 * config['canvas_length']})")


def test_os_errors_are_one_line(capsys, tmp_path, monkeypatch):
    def unwritable(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run"))

    monkeypatch.setattr(cli, "cmd_info", unwritable)
    code, _, err = run(capsys, "info")
    assert_clean_error(code, err, "Permission denied", str(tmp_path / "run"))


def test_convert_errors(capsys, hf_folder, tmp_path):
    dst = tmp_path / "exists"
    dst.mkdir()
    code, _, err = run(capsys, "convert", str(hf_folder), str(dst), "--quiet")
    assert code == 2 and "Traceback" not in err and "exists" in err
    code, _, err = run(capsys, "convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--quiet")
    assert code == 2 and "Traceback" not in err and "error" in err


def test_convert_overwrite_refuses_a_folder_that_is_not_a_checkpoint(capsys, hf_folder, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "convert", str(hf_folder), str(notes), "--overwrite", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: destination {notes} holds files that are not part of a checkpoint (notes.txt)")
    assert [p.name for p in notes.iterdir()] == ["notes.txt"]


def test_check_finite_refuses_a_checkpoint_with_nan(capsys, tmp_path):
    """A diffjax checkpoint is scanned for NaN / inf only when asked (--check-finite): named in one line."""
    import numpy as np

    import convert
    from convert.tree import flatten, unflatten

    model = tmp_path / "model"
    shutil.copytree(cli.DEFAULT_MODEL_DIR, model)
    config, params = convert.load(model, as_numpy=True)
    flat = flatten(params)
    flat[("final_norm", "scale")] = np.array(flat[("final_norm", "scale")])
    flat[("final_norm", "scale")][3] = np.nan
    shutil.copy(convert.save(unflatten(flat), config, tmp_path / "nan") / convert.PARAMS_FILE, model)
    for argv in (["generate", "--checkpoint", str(model), "--check-finite", "123"],
                 ["train", "--task", "sort", "--init", str(model), "--steps", "2", "--out", str(tmp_path / "run"),
                  "--check-finite"]):
        code, _, err = run(capsys, *argv)
        assert_clean_error(code, err, "tensor 'final_norm/scale' holds NaN or inf: 1 of the", "nan at [3]")
    assert not (tmp_path / "run").exists()


def test_convert_round_trip_to_hf(capsys, hf_folder, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert run(capsys, "convert", str(hf_folder), str(ckpt), "-q")[0] == 0
    assert run(capsys, "convert", str(ckpt), str(back), "--to-hf", "-q", "--dtype", "bfloat16")[0] == 0
    assert (back / "model.safetensors").is_file() and (back / "config.json").is_file()


def test_convert_round_trip_keeps_a_trained_models_task(capsys, tmp_path):
    """The demo model's task.json (its tokenizer and prompts) travels to the transformers folder and back, so
    both folders run under `diffjax generate --checkpoint` as the embedded model does."""
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert run(capsys, "convert", "--to-hf", str(cli.DEFAULT_MODEL_DIR), str(hf), "-q")[0] == 0
    assert (hf / "task.json").read_bytes() == (cli.DEFAULT_MODEL_DIR / "task.json").read_bytes()
    assert run(capsys, "convert", str(hf), str(back), "-q")[0] == 0
    for folder in (hf, back):
        model = cli.load_model(folder, None, None)
        assert model.task is not None and model.task.name == cli.default_model().task.name


def test_checkpoint_kind(tmp_path):
    with pytest.raises(cli.CliError, match="does not exist"):
        cli.checkpoint_kind(tmp_path / "nope")
    with pytest.raises(cli.CliError, match="neither"):
        cli.checkpoint_kind(tmp_path)


# ------------------------------------------------------------------------------------------------ info


def test_info_released_model(capsys):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["params"] == 25_250_986_782
    assert 3.5e9 < info["active_params_per_token"] < 4.2e9  # "~3.8B active"
    assert info["config"]["num_experts"] == 128
    # fp8 experts: 1 byte per expert weight + float32 scales, 2 bytes for the rest (27.7 GB, README).
    assert 27.6e9 < info["bf16_fp8_experts_bytes"] < 27.8e9
    code, out, _ = run(capsys, "info")
    assert code == 0 and "25,250,986,782" in out


def test_info_presets_and_checkpoint(capsys, hf_folder):
    assert run(capsys, "info", "--preset", "tiny")[0] == 0
    code, out, _ = run(capsys, "info", "--preset", "default", "--json")
    assert code == 0 and json.loads(out)["config"]["vocab_size"] == cli.default_model().config.vocab_size
    code, out, _ = run(capsys, "info", "--checkpoint", str(hf_folder), "--json")
    assert code == 0 and json.loads(out)["config"]["hidden_size"] == Config.tiny().hidden_size


# ----------------------------------------------------------------------------------------------- bench


def test_bench_tiny(capsys, tmp_path):
    pytest.importorskip("transformers")
    out_json = tmp_path / "bench.json"
    code, out, err = run(
        capsys, "bench", "--hidden", "64", "--layers", "2", "--experts", "4", "--vocab", "512", "--canvas", "16",
        "--steps", "2", "--batch", "1", "--prompt", "8", "--new-tokens", "16", "--repeats", "1",
        "--json", str(out_json),
    )
    assert code == 0, err
    assert "ms / decoder step" in out and "transformers" in out and "diffjax" in out
    assert "ratio ours/transformers" in out
    result = json.loads(out_json.read_text())
    for side in ("diffjax", "transformers"):
        assert result[side]["decoder_passes"] == 2
        assert result[side]["ms_per_step"] > 0 and result[side]["tokens_per_s"] > 0
    assert result["diffjax"]["compile_s"] >= 0
    assert result["ratio"] == pytest.approx(result["diffjax"]["ms_per_step"] / result["transformers"]["ms_per_step"])


def test_bench_full_size_refuses_cpu(capsys):
    import jax

    if jax.devices()[0].platform != "cpu":
        pytest.skip("a GPU is present: --full-size would really run")
    code, _, err = run(capsys, "bench", "--full-size")
    assert_clean_error(code, err, "GPU", "--force")


def test_full_size_helpers():
    from diffjax import bench

    config = bench.full_size_config(3)
    assert config.num_layers == 3 and config.layer_types[-1] == "full_attention"
    assert bench.full_size_config(None) == Config.diffusiongemma_26b_a4b()
    tiny = Config.tiny()
    import jax

    params = diffjax.init_params(tiny, jax.random.key(0), jax.numpy.bfloat16)
    leaves = jax.tree_util.tree_leaves(params)
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in leaves)
    assert float(params["final_norm"]["scale"][0]) == 1.0
    assert bench.decoder_bytes_per_step(params) == 2 * (bench_count(params) - tiny.num_layers)
    parts = bench.decoder_bytes_by_part(params)
    blocks = params["blocks"]
    assert parts["experts"] == 2 * sum(bench_count(layer["experts"]) for layer in blocks.values())
    assert parts["attention"] == 2 * sum(bench_count(layer["self_attn"]) for layer in blocks.values())
    assert parts["embedding"] == 2 * tiny.vocab_size * tiny.hidden_size and min(parts.values()) > 0
    assert bench.copy_bandwidth(1 << 20, repeats=2) > 0


@pytest.mark.parametrize("batch,prompt", [(2, 24), (1, 40)])
def test_decoder_flops_match_xla_cost_analysis(batch, prompt):
    """The counted FLOPs of a decoder step against what XLA counts in the compiled step, on a model whose
    dense expert form is exactly the routed work (as many experts as each token picks), with prompts past the
    sliding window (the XLA path attends over the whole ring, the count over the keys a row sees)."""
    import jax.numpy as jnp

    from diffjax import bench
    from diffjax.model import _denoise_logits, init_cache, prefill

    config = Config.tiny(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, vocab_size=2048,
                         num_experts=2, top_k_experts=2, moe_implementation="dense", canvas_length=16)
    params = diffjax.init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (batch, prompt), 0, config.vocab_size)
    cache = prefill(params, config, ids, jnp.ones_like(ids, bool),
                    init_cache(config, batch, prompt + config.canvas_length), 64)
    canvas = ids[:, :config.canvas_length]
    sc_logits = jax.random.normal(jax.random.key(2), (batch, config.canvas_length, config.vocab_size))
    compiled = jax.jit(_denoise_logits, static_argnums=1).lower(
        params, config, cache, canvas, sc_logits, jnp.ones((batch,), bool)).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    counted = bench.decoder_flops_per_step(config, batch, prompt)
    assert counted <= xla_flops <= 1.03 * counted, (counted, xla_flops)
    # Routed work: each token's top-k experts, whatever the pool; a larger pool only widens the router.
    tokens = batch * config.canvas_length
    router = 2 * tokens * config.hidden_size * (8 - 2) * config.num_layers
    assert bench.decoder_flops_per_step(config.replace(num_experts=8), batch, prompt) == counted + router
    assert bench.decoder_flops_per_step(config.replace(top_k_experts=1), batch, prompt) < counted


def test_full_size_path_on_a_tiny_model(tmp_path):
    """The whole --full-size sweep (device init, bandwidth, chunked prefill, step timings, generate, floor,
    table, JSON) on Config.tiny(), with the transformers side eager on the CPU."""
    import json

    from rich.console import Console

    from diffjax import bench

    settings = bench.FullSizeSettings(batches=(2,), prompts=(20,), new_tokens=16, steps=2, repeats=1,
                                      force=True, bandwidth_bytes=1 << 20, matmul_size=128, prefill_chunk=8, transformers=True,
                                      transformers_compile=False, statistics=("logits", "xla"))
    result = bench.run_full_size(settings, config=Config.tiny().replace(canvas_length=8))
    assert [(p["prompt"], p["batch"], p["moe"], p["statistics"]) for p in result["points"]] == [
        (20, 2, "grouped", "logits"), (20, 2, "grouped", "xla")
    ]
    # transformers runs once per (prompt, batch); the decoder step once per variant, whatever the statistics
    # path (variants on one set of weights: test_full_size_times_each_layout_on_the_same_weights).
    assert result["points"][1]["transformers"] is result["points"][0]["transformers"]
    assert result["points"][0]["decoder_ms"] == result["points"][1]["decoder_ms"]
    for point in result["points"]:
        assert "error" not in point, point
        assert point["diffjax"]["decoder_passes"] == 4 and point["transformers"]["decoder_passes"] == 4
        assert point["decoder_ms"] > 0 and point["encoder_canvas_ms"] > 0 and point["floor_ms"] > 0
        assert point["cache_bytes"] > 0 and point["ratio"] > 0
        assert point["compute_floor_ms"] > 0 and point["flops"] == bench.decoder_flops_per_step(
            Config.tiny(canvas_length=8), 2, 20)
        assert point["ratio_to_roofline"] == point["decoder_ms"] / max(point["floor_ms"], point["compute_floor_ms"])
    assert result["matmul_flops_per_s"] > 0
    console = Console(record=True, width=250)
    bench.render(result, console)
    table = console.export_text()
    assert "x floor" in table and "x roofline" in table
    bench.write_json(result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["points"][1]["statistics"] == "xla"


def test_full_size_profiles_a_decoder_step_per_point(tmp_path, capsys):
    from diffjax import bench

    logged = []
    settings = bench.FullSizeSettings(batches=(1,), prompts=(8,), steps=1, repeats=1, force=True,
                                      bandwidth_bytes=1 << 20, generate=False, profile_dir=str(tmp_path))
    result = bench.run_full_size(settings, logged.append, config=Config.tiny(canvas_length=8))
    point = result["points"][0]
    assert "error" not in point, point
    kernels = point["decoder_kernels"]["kernels"]
    assert 0 < len(kernels) <= bench.PROFILED_KERNELS and kernels[0]["total_us"] > 0
    trace = "decoder_prompt8_batch1_grouped_xla_unroll1_separate_stacked_routing_xla_norms_xla_mlp_xla"
    assert list(tmp_path.glob(f"{trace}/**/*.xplane.pb"))
    assert any("decoder step kernels" in line and kernels[0]["name"][:40] in line for line in logged)
    parts = point["decoder_kernels"]["parts"]
    assert sum(p["total_us"] for p in parts.values()) == pytest.approx(point["decoder_kernels"]["total_us"])
    assert any("by part (launches): " in line for line in logged)
    code, _, err = run(capsys, "bench", "--profile", str(tmp_path))
    assert_clean_error(code, err, "--profile needs --full-size")


def test_full_size_times_xla_option_variants_on_the_same_weights(capsys):
    """Each --xla-options value is a variant compiled with those options (one process, one set of weights); an
    option XLA does not know fails its point with XLA's message and the others still run."""
    from diffjax import bench

    assert bench.parse_xla_options("") == {}
    assert bench.parse_xla_options("xla_a=true, xla_b=False,xla_c=4,xla_d=0.5,xla_e=FUSION,CUBLAS,xla_f=x") == {
        "xla_a": True, "xla_b": False, "xla_c": 4, "xla_d": 0.5, "xla_e": "FUSION,CUBLAS", "xla_f": "x"}
    assert bench.parse_xla_options("xla_e=") == {"xla_e": ""}
    for bad in ("gpu_x=1", "xla_x", "CUBLAS,xla_a=1"):
        with pytest.raises(ValueError, match="--xla-options: expected comma-separated xla_name=value"):
            bench.parse_xla_options(bad)
    settings = bench.FullSizeSettings(batches=(1,), prompts=(8,), steps=1, repeats=1, force=True,
                                      bandwidth_bytes=1 << 20, generate=False,
                                      xla_options=("", "xla_cpu_enable_fast_math=false", "xla_no_such_option=1"))
    points = bench.run_full_size(settings, config=Config.tiny(canvas_length=8))["points"]
    assert [p["xla_options"] for p in points] == list(settings.xla_options)
    for point in points[:2]:
        assert "error" not in point, point
        assert point["decoder_ms"] > 0 and point["decoder_queued_ms"] > 0 and point["decoder_compile_s"] > 0
    assert "No such compile option" in points[2]["error"] and "xla_no_such_option" in points[2]["error"]
    with pytest.raises(ValueError, match="--xla-options takes one or more option lists"):
        dataclasses.replace(settings, xla_options="xla_a=1").validate()
    code, _, err = run(capsys, "bench", "--xla-options", "xla_a=1")
    assert_clean_error(code, err, "--xla-options needs --full-size")


def test_looped_decoder_steps_are_the_step_applied_in_turn():
    """The looped timing runs real steps: each self-conditioned on the last one's logits (as `generate` does),
    so the loop's result is the step applied `count` times, not one step XLA could hoist out of the loop."""
    from diffjax import bench
    from diffjax.model import _denoise_logits

    config = Config.tiny(canvas_length=8)
    params = diffjax.init_params(config, jax.random.key(1), jax.numpy.float32)
    cache = bench.random_cache(config, 2, 12, jax.numpy.float32, seed=3)
    canvas = jax.random.randint(jax.random.key(4), (2, 8), 0, config.vocab_size)
    logits = jax.random.normal(jax.random.key(5), (2, 8, config.vocab_size))
    mask = jax.numpy.array([True, False])
    expected = logits
    for _ in range(3):
        expected = _denoise_logits(params, config, cache, canvas, expected, mask)
    looped = bench._looped_decoder_steps(params, config, cache, canvas, logits, mask, jax.numpy.int32(3))
    np.testing.assert_allclose(np.asarray(looped), np.asarray(expected), rtol=1e-5, atol=1e-5)
    once = bench._looped_decoder_steps(params, config, cache, canvas, logits, mask, jax.numpy.int32(1))
    assert np.abs(np.asarray(looped) - np.asarray(once)).max() > 1e-3  # three steps are not one


def test_random_cache_holds_the_prompt_and_decoder_only_points_skip_prefill_and_encoder(capsys):
    """`--decoder-only` times the step on a random cache: `prompt` slots written (mask, length), random keys
    and values in every layer, no prefill or encoder figures (None, not zeros) and a point like the others."""
    from diffjax import bench

    config = Config.tiny(canvas_length=8)
    cache = bench.random_cache(config, 2, 12, jax.numpy.bfloat16, seed=0)
    assert int(cache.length) == 12 and cache.capacity == 20
    assert np.asarray(cache.mask).sum(axis=1).tolist() == [12, 12] and np.asarray(cache.mask)[:, :12].all()
    for arrays in (cache.keys, cache.values):
        for x in arrays.values():
            assert x.dtype == jax.numpy.bfloat16 and 0.5 < float(jax.numpy.std(x.astype(float))) < 2
    assert not np.array_equal(np.asarray(cache.keys["layer_0"]), np.asarray(cache.values["layer_0"]))
    settings = bench.FullSizeSettings(batches=(2,), prompts=(12,), steps=1, repeats=1, force=True,
                                      bandwidth_bytes=1 << 20, matmul_size=128, generate=False, decoder_only=True)
    (point,) = bench.run_full_size(settings, config=config)["points"]
    assert "error" not in point, point
    assert point["prefill_s"] is None and point["encoder_canvas_ms"] is None and point["tokens_per_s_at_steps"] is None
    assert point["decoder_ms"] > 0 and point["decoder_looped_ms"] > 0 and point["looped_ratio_to_floor"] > 0
    assert point["cache_bytes"] == bench.cache_bytes(cache)
    with pytest.raises(ValueError, match="--decoder-only times the decoder step alone: add --no-generate"):
        dataclasses.replace(settings, generate=True).validate()
    code, _, err = run(capsys, "bench", "--decoder-only")
    assert_clean_error(code, err, "--decoder-only needs --full-size")


def test_full_size_times_kernel_tile_variants_and_refuses_bad_tiles(capsys):
    """Each --tiles value is a variant with its own `Config.kernel_tiles` (same weights); a bad setting is
    refused before anything runs, naming it."""
    from diffjax import bench

    settings = bench.FullSizeSettings(batches=(1,), prompts=(8,), steps=1, repeats=1, force=True,
                                      bandwidth_bytes=1 << 20, generate=False, tiles=("", "routing.num_warps=2"))
    points = bench.run_full_size(settings, config=Config.tiny(canvas_length=8))["points"]
    assert [p["tiles"] for p in points] == ["", "routing.num_warps=2"]
    assert all("error" not in p and p["decoder_ms"] > 0 for p in points), points
    with pytest.raises(ValueError, match="--tiles takes one or more tile settings"):
        dataclasses.replace(settings, tiles="routing.num_warps=2").validate()
    code, _, err = run(capsys, "bench", "--full-size", "--force", "--tiles", "routing.num_warp=2")
    assert_clean_error(code, err, "routing has no tile setting num_warp (did you mean num_warps?)")
    code, _, err = run(capsys, "bench", "--tiles", "routing.num_warps=2")
    assert_clean_error(code, err, "--tiles needs --full-size")


def test_step_parts_sum_kernels_by_the_part_of_the_step_they_run():
    """Names as an H200 profile of a full-size step gave them; the first matching part wins, the rest is
    "other"."""
    from diffjax import bench

    names = [("moe_gate_up", 30, 8000.0), ("moe_down", 30, 3700.0), ("global_attention_split_k", 25, 1400.0),
             ("global_attention_combine__1", 5, 38.0), ("attention_inputs", 25, 440.0), ("route", 30, 1025.0),
             ("expert_rows", 30, 104.0), ("moe_inputs", 30, 130.0), ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT", 25,
             486.0), ("gemm_fusion_dot_123", 1, 125.0), ("loop_reduce_fusion_59", 30, 93.0), ("Memset 0", 1, 1.0),
             ("MemcpyD2D", 2, 3.0)]
    parts = bench.step_parts([{"name": n, "count": c, "total_us": us} for n, c, us in names])
    assert list(parts) == ["experts", "attention", "routing", "norms", "vocabulary", "matmuls", "copies", "other"]
    assert parts["experts"] == {"count": 60, "total_us": 11700.0}
    assert parts["attention"] == {"count": 55, "total_us": pytest.approx(1878.0)}
    assert parts["routing"] == {"count": 60, "total_us": 1129.0}
    assert parts["norms"]["count"] == 30 and parts["vocabulary"]["count"] == 0
    assert parts["matmuls"] == {"count": 26, "total_us": 611.0}
    assert parts["copies"] == {"count": 2, "total_us": 3.0}
    assert parts["other"] == {"count": 31, "total_us": 94.0}


def test_full_size_records_a_failing_point_and_goes_on():
    from diffjax import bench

    # Points run in increasing (prompt, batch) order, whatever order they are given in.
    settings = bench.FullSizeSettings(batches=(1,), prompts=(100, 4), steps=1, repeats=1, force=True,
                                      bandwidth_bytes=1 << 20, generate=False)
    result = bench.run_full_size(settings, config=Config.tiny(max_position_embeddings=64))
    ok, failed = result["points"]
    assert (ok["prompt"], failed["prompt"]) == (4, 100)
    assert "error" not in ok and ok["decoder_ms"] > 0
    assert failed["error"].startswith("ValueError: prompt 100 + a canvas exceed")


def test_full_size_with_fp8_experts_counts_their_bytes(capsys, monkeypatch):
    import jax

    from diffjax import bench

    tiny = Config.tiny(canvas_length=8)
    fp8 = tiny.replace(expert_quantization="fp8")
    params = diffjax.init_params(fp8, jax.random.key(0), jax.numpy.bfloat16)
    unquantized = bench.decoder_bytes_per_step(diffjax.param_shapes(tiny))
    expert_weights = tiny.num_layers * tiny.num_experts * 3 * tiny.hidden_size * tiny.moe_intermediate_size
    scales = tiny.num_layers * tiny.num_experts * (2 * tiny.moe_intermediate_size + tiny.hidden_size)
    # One byte instead of two per expert weight, plus a float32 scale per output column.
    assert bench.decoder_bytes_per_step(params) == unquantized - expert_weights + 4 * scales
    # The sweep runs on fp8 weights (the timings themselves: test_full_size_path_on_a_tiny_model).
    timed = []
    monkeypatch.setattr(bench, "time_steps", lambda p, config, *_: timed.append((p, config)) or {
        "cache_bytes": 0, "decoder_ms": 1.0, "decoder_looped_ms": 0.9})
    settings = bench.FullSizeSettings(batches=(1,), prompts=(4,), steps=1, repeats=1, force=True,
                                      bandwidth_bytes=1 << 20, generate=False, experts_fp8=True)
    result = bench.run_full_size(settings, config=tiny)
    assert result["config"]["expert_quantization"] == "fp8" and timed[0][1] == fp8
    assert timed[0][0]["blocks"]["layer_0"]["experts"]["down_proj"].dtype == FP8
    assert result["weight_bytes"] == bench.decoder_bytes_per_step(params)
    assert "error" not in result["points"][0]
    code, _, err = run(capsys, "bench", "--experts-fp8")
    assert_clean_error(code, err, "--experts-fp8 needs --full-size")


def test_full_size_attention_choices_reach_the_config(capsys, monkeypatch):
    from diffjax import bench

    timed = []
    monkeypatch.setattr(bench, "time_steps", lambda p, config, *_: timed.append(config) or {
        "cache_bytes": 0, "decoder_ms": 1.0, "decoder_looped_ms": 0.9})
    settings = bench.FullSizeSettings(batches=(1,), prompts=(4,), steps=1, repeats=1, force=True,
                                      bandwidth_bytes=1 << 20, generate=False, global_attention="pallas",
                                      sliding_attention=("cudnn", "pallas"), scan_unroll=(1, 5))
    result = bench.run_full_size(settings, config=Config.tiny(canvas_length=8))
    assert all("error" not in point for point in result["points"])
    # Each sliding implementation x unroll timed once, on the same weights, and each point says which it is.
    variants = [("cudnn", 1), ("cudnn", 5), ("pallas", 1), ("pallas", 5)]
    assert [(c.sliding_attention_implementation, c.scan_unroll) for c in timed] == variants
    assert [(p["sliding_attention"], p["scan_unroll"]) for p in result["points"]] == variants
    assert {c.global_attention_implementation for c in timed} == {"pallas"}
    for flag, value in (("--sliding-attention", "cudnn"), ("--scan-unroll", "5")):
        code, _, err = run(capsys, "bench", flag, value)
        assert_clean_error(code, err, f"{flag} needs --full-size")
    for bad, match in ((dict(sliding_attention="cudnn"), "--sliding-attention takes"),  # a string, not a tuple
                       (dict(sliding_attention=()), "--sliding-attention takes"),
                       (dict(scan_unroll=(1, 0)), "--scan-unroll takes")):
        with pytest.raises(ValueError, match=match):
            bench.FullSizeSettings(**bad).validate()
    # From the command line: several values reach the settings.
    seen = []
    monkeypatch.setattr(bench, "run_full_size", lambda s, log: seen.append(s) or {"points": []})
    monkeypatch.setattr(bench, "render_full_size", lambda *_: None)
    code, _, err = run(capsys, "bench", "--full-size", "--force", "--sliding-attention", "cudnn", "pallas",
                       "--scan-unroll", "1", "5")
    assert code == 0, err
    assert (seen[0].sliding_attention, seen[0].scan_unroll) == (("cudnn", "pallas"), (1, 5))


def _tiny_full_size(monkeypatch, **settings):
    """`bench.run_full_size` on a tiny model with the step timing faked: (result, [(params, config) timed])."""
    from diffjax import bench

    timed = []
    monkeypatch.setattr(bench, "time_steps", lambda p, config, *_: timed.append((p, config)) or {
        "cache_bytes": 0, "decoder_ms": 1.0, "decoder_looped_ms": 0.9})
    result = bench.run_full_size(bench.FullSizeSettings(
        batches=(1,), prompts=(4,), steps=1, repeats=1, force=True, bandwidth_bytes=1 << 20, generate=False,
        **settings), config=Config.tiny(canvas_length=8))
    return result, timed


def test_full_size_with_pretiled_experts_makes_them_so(capsys, monkeypatch):
    import jax

    from diffjax import bench

    tiny = Config.tiny(canvas_length=8)
    result, timed = _tiny_full_size(monkeypatch, experts_pretiled=True, moe_implementations=("pallas",))
    assert "error" not in result["points"][0] and result["config"]["expert_layout"] == "pretiled"
    params, config = timed[0]
    assert (config.expert_layout, config.moe_implementation) == ("pretiled", "pallas")
    # Random weights made in the pretiled layout directly: [blocks, experts, tiles, rows, width], same bytes.
    assert params["blocks"]["layer_0"]["experts"]["gate_up_proj"].ndim == 5
    plain = diffjax.init_params(tiny, jax.random.key(0), jax.numpy.bfloat16)
    assert result["weight_bytes"] == bench.decoder_bytes_per_step(plain)
    with pytest.raises(ValueError, match="pass --moe pallas or pallas_mgpu only, not grouped"):
        bench.FullSizeSettings(experts_pretiled=True, moe_implementations=("pallas", "grouped")).validate()
    code, _, err = run(capsys, "bench", "--experts-pretiled")
    assert_clean_error(code, err, "--experts-pretiled needs --full-size")


def test_full_size_times_each_layout_on_the_same_weights(capsys, monkeypatch):
    from diffjax import bench

    tiny = Config.tiny(canvas_length=8)
    result, timed = _tiny_full_size(monkeypatch, projections=("separate", "fused"), blocks=("unstacked", "stacked"))
    # Made in the first layouts named (separate, unstacked), laid out for the others from those weights.
    assert [(p["projections"], p["blocks"]) for p in result["points"]] == [
        ("separate", "unstacked"), ("separate", "stacked"), ("fused", "unstacked"), ("fused", "stacked")]
    assert not any("error" in p for p in result["points"])
    assert [(c.projection_layout, c.block_layout) for _, c in timed] == [
        (p["projections"], p["blocks"]) for p in result["points"]]
    made, stacked, fused = timed[0][0], timed[1][0], timed[3][0]
    assert "block_0" in made and "blocks" not in made
    attention = fused["blocks"]["layer_0"]["self_attn"]
    assert "qkv_proj" in attention and "q_proj" not in attention
    np.testing.assert_array_equal(attention["qkv_proj"]["kernel"][0, :, :tiny.num_heads * tiny.sliding.head_dim],
                                  made["block_0"]["layer_0"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(stacked["blocks"]["layer_0"]["mlp"]["up_proj"]["kernel"][0],
                                  made["block_0"]["layer_0"]["mlp"]["up_proj"]["kernel"])
    for bad in ("fused", (), ("joined",)):
        with pytest.raises(ValueError, match="--projections takes values of"):
            bench.FullSizeSettings(projections=bad).validate()
        with pytest.raises(ValueError, match="--blocks takes values of"):
            bench.FullSizeSettings(blocks=bad).validate()
    code, _, err = run(capsys, "bench", "--projections", "fused")
    assert_clean_error(code, err, "--projections needs --full-size")


@pytest.mark.parametrize("flags", [("--moe", "pallas", "--experts-pretiled"),
                                   ("--fused-projections", "--scan-unroll", "4"),
                                   ("--fused-projections", "--unstacked-blocks"),
                                   ("--moe", "pallas", "--fused-projections", "--mlp", "pallas")])
def test_generate_with_load_time_layouts_gives_the_same_answer(capsys, flags):
    reference = run(capsys, "generate", "--no-live", "--seed", "3", "9402751")[1]
    code, out, err = run(capsys, "generate", "--no-live", "--seed", "3", *flags, "9402751")
    assert code == 0, err
    assert out == reference


def test_generate_refuses_the_mlp_kernel_without_what_it_reads(capsys):
    """--mlp pallas runs in the Pallas expert kernels on the fused gate/up weights: each missing piece named."""
    code, _, err = run(capsys, "generate", "--no-live", "--mlp", "pallas", "31")
    assert_clean_error(code, err, "it needs moe_implementation='pallas' (got 'grouped') and projection_layout")
    code, _, err = run(capsys, "generate", "--no-live", "--mlp", "pallas", "--moe", "pallas", "31")
    assert_clean_error(code, err, "it needs projection_layout='fused' (got 'separate'")
    with pytest.raises(ValueError, match="--mlp pallas runs the dense MLP in the Pallas expert kernels"):
        bench.FullSizeSettings(moe_implementations=("pallas",), projections=("separate", "fused"),
                               mlp=("xla", "pallas")).validate()
    bench.FullSizeSettings(moe_implementations=("pallas",), projections=("fused",), mlp=("xla", "pallas")).validate()


def test_generate_refuses_pretiled_experts_for_the_grouped_form(capsys):
    code, _, err = run(capsys, "generate", "--no-live", "--experts-pretiled", "31")
    assert_clean_error(code, err, "pass --moe pallas")


def bench_count(params) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["generate", "--checkpoint", "/nonexistent/ckpt", "hi"], "does not exist"),
        (["generate", "--steps", "0", "hi"], "--steps"),
        (["generate", "--steps", "two", "hi"], "--steps"),
        (["generate"], "prompt"),
        (["generate", "--chat", "--raw", "hi"], "not allowed"),
        (["generate", "--tokenizer", "/nonexistent/tok", "hi"], "--tokenizer needs --checkpoint"),
        (["generate", "--check-finite", "hi"], "--check-finite needs --checkpoint"),
        (["train", "--task", "sort", "--steps", "2", "--out", "/nonexistent/run", "--check-finite"],
         "--check-finite needs --init"),
        (["generate", "--t-min", "0.9", "--t-max", "0.5", "52817"], "t_"),
        (["generate", "hi"], "digits"),
        (["generate", "--system", "be brief", "52817"], "--system"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
        (["info", "--checkpoint", "/nonexistent"], "does not exist"),
        (["bench", "--top-k", "9", "--experts", "8", "--no-transformers"], "--top-k"),
        (["generate", "--mesh", "1,8", "52817"], "expected DATA,EXPERT,MODEL"),
        (["generate", "--mesh", "2,1,1", "52817"], "the data axis must be 1"),
        (["generate", "--mesh", "1,8,1", "52817"], "--mesh: mesh (data=1, expert=8, model=1) needs 8 devices, got 1"),
        (["generate", "--mesh", "1,1,1", "--moe", "pallas", "--sliding-attention", "cudnn", "52817"],
         "--mesh runs the experts expert-parallel and the rest as XLA partitions it: drop --moe, --sliding-attention "
         "cudnn (the Pallas"),
        (["generate", "--mesh", "1,1,1", "--tiles", "vocab.block_v=256,routing.project=false", "52817"],
         "drop --tiles routing (the Pallas"),
    ],
)
def test_errors_are_one_clean_line(capsys, argv, fragment):
    code, _, err = run(capsys, *argv)
    assert_clean_error(code, err, fragment)


def test_console_script_error_exit_code(tmp_path):
    """The real entry point: exit status 2 and a single stderr line, no traceback."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    exe = shutil.which("diffjax")
    cmd = [exe] if exe else [sys.executable, "-m", "diffjax.cli"]
    proc = subprocess.run([*cmd, "generate", "--checkpoint", str(tmp_path / "missing"), "hi"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("diffjax: error: ")


# The memory floor and the figures derived from it (a second mutation audit found none of them pinned).


def test_full_size_point_figures_from_their_measurements(monkeypatch):
    """Each derived figure of a --full-size point from its inputs, on fixed clocks: floor = (the decoder's
    weight bytes + the cache's K/V bytes) / copy bandwidth, x floor = step / floor, tokens/s at `steps` = canvas
    tokens / (steps decoder steps + one encoder canvas). The cache's bytes are counted from the config: every
    layer's keys and values, a full layer holding every position, a sliding one its ring."""
    from diffjax import bench

    # prefill, decoder step, three decoder steps queued (per step), the loop of 1 step and of 1 + LOOPED_STEPS
    # (per call), encoder canvas
    samples = iter([(1.0, 0.5), (1.0, 0.002), (1.0, 0.0015), (1.0, 0.005), (1.0, 0.011), (1.0, 0.003)])
    calls_seen = []

    def best_time(fn, repeats, calls=1):
        calls_seen.append(calls)
        return next(samples)

    monkeypatch.setattr(bench, "best_time", best_time)
    monkeypatch.setattr(bench, "copy_bandwidth", lambda nbytes: 1e9)
    monkeypatch.setattr(bench, "matmul_throughput", lambda size: 1e12)
    config = Config.tiny(canvas_length=8)
    batch, prompt, steps = 2, 12, 4
    settings = bench.FullSizeSettings(batches=(batch,), prompts=(prompt,), steps=steps, repeats=1, force=True,
                                      generate=False)
    result = bench.run_full_size(settings, config=config)
    point = result["points"][0]
    assert "error" not in point, point
    weights = bench.decoder_bytes_per_step(diffjax.init_params(config, jax.random.key(0), jax.numpy.bfloat16))
    assert result["weight_bytes"] == weights
    capacity = prompt + config.canvas_length
    cache = sum(2 * batch * (capacity if kind == FULL else min(config.sliding_window - 1, capacity))
                * config.attention(kind).num_kv_heads * config.attention(kind).head_dim * 2
                for kind in config.layer_types)  # K and V, bf16
    assert point["cache_bytes"] == cache
    assert point["floor_ms"] == pytest.approx(1e3 * (weights + cache) / 1e9)
    assert point["decoder_ms"] == pytest.approx(2.0) and point["encoder_canvas_ms"] == pytest.approx(3.0)
    assert point["decoder_queued_ms"] == pytest.approx(1.5) and calls_seen == [1, 1, 3, 1, 1, 1]
    # The call's own dispatch and wait cancel: (11 - 5) ms over the LOOPED_STEPS more steps.
    assert point["decoder_looped_ms"] == pytest.approx(6.0 / bench.LOOPED_STEPS)
    assert point["ratio_to_floor"] == pytest.approx(2.0 / point["floor_ms"])
    assert point["looped_ratio_to_floor"] == pytest.approx(6.0 / bench.LOOPED_STEPS / point["floor_ms"])
    assert point["compute_floor_ms"] == pytest.approx(1e3 * point["flops"] / 1e12)
    assert point["tokens_per_s_at_steps"] == pytest.approx(batch * config.canvas_length / (steps * 0.002 + 0.003))


def test_bandwidth_and_matmul_rate_from_their_timings(monkeypatch):
    """A copy reads and writes its bytes; a square matmul of side n does 2 n^3 FLOPs."""
    from diffjax import bench

    ticks = iter(np.arange(0.0, 100.0, 0.25))  # each clock reading 0.25 s after the last
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    assert bench.copy_bandwidth(1 << 20, repeats=3) == pytest.approx(2 * (1 << 20) / 0.25)
    monkeypatch.setattr(bench, "best_time", lambda fn, repeats, calls=1: (1.0, 0.5))
    assert bench.matmul_throughput(64, repeats=1) == pytest.approx(2 * 64**3 / 0.5)


def test_full_size_layers_follow_the_released_pattern():
    """Five sliding layers then a global one, and the last layer global, as in the released config."""
    from diffjax import bench

    released = Config.diffusiongemma_26b_a4b().layer_types
    assert gemma4_layer_types(30) == released
    for layers in (1, 5, 6, 7, 12):
        assert bench.full_size_config(layers).layer_types == (*released[:layers - 1], FULL)


def test_decoder_bytes_split_into_every_part():
    """Each part of the floor holds its own leaves (bf16: 2 bytes each): the dense MLPs (every layer's and the
    self-conditioning one) apart from the experts and the attention, the rest (norms, router, scalars but the
    encoder's) in "other"; the parts sum to the floor's bytes."""
    from diffjax import bench

    config = Config.tiny()
    params = diffjax.init_params(config, jax.random.key(0), jax.numpy.bfloat16)
    counts = dict.fromkeys(["experts", "attention", "dense mlp", "embedding", "other"], 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [p.key for p in path]
        if keys[-1] == "encoder_layer_scalar":
            continue
        part = ("experts" if "experts" in keys else "attention" if "self_attn" in keys else
                "dense mlp" if "mlp" in keys else "embedding" if keys[-1] == "embedding" else "other")
        counts[part] += leaf.size
    assert min(counts.values()) > 0
    parts = bench.decoder_bytes_by_part(params)
    assert parts == {part: 2 * n for part, n in counts.items()}
    assert sum(parts.values()) == bench.decoder_bytes_per_step(params)


def test_decoder_flops_keys_of_a_sliding_layer_stop_at_its_ring():
    """A canvas row of a sliding layer attends to the ring (the last window - 1 prompt positions) and the
    canvas: one more prompt token past the ring adds keys to the full layers only."""
    from diffjax import bench
    from diffjax.model import ring_size

    config = Config.tiny(canvas_length=8)
    batch, window = 2, config.sliding_window
    assert ring_size(config, 10 * window) == window - 1
    tokens = batch * config.canvas_length
    per_key = {kind: 2 * 2 * tokens * config.num_heads * config.attention(kind).head_dim
               for kind in set(config.layer_types)}
    full_key = sum(per_key[kind] for kind in config.layer_types if kind == FULL)
    for prompt in (window - 1, window, window + 5):
        grown = bench.decoder_flops_per_step(config, batch, prompt + 1) - bench.decoder_flops_per_step(
            config, batch, prompt)
        assert grown == full_key, prompt
    # Below the ring every layer gains the key.
    grown = bench.decoder_flops_per_step(config, batch, window - 1) - bench.decoder_flops_per_step(
        config, batch, window - 2)
    assert grown == sum(per_key[kind] for kind in config.layer_types)
