"""`diffjax.compiled`: counting what a step compiled for a GPU launches, from XLA's dump.

The fixture in tests/data/compiled/ is XLA's dump of a small function compiled here for the H200 target
(`diffjax.compiled.gpu_device("h200")`, JAX's CUDA plugin installed, no GPU):

    x = lax.scan(lambda x, w_b: (gelu(x @ w_b), None), x, w)[0]    # x bf16[64, 256], w bf16[3, 256, 256]
    return x @ wq[1] + x @ wk[1]                                   # wq, wk bf16[2, 256, 512]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import jax
import pytest

from diffjax import bench, kernels
from diffjax.compiled import LoopIteration, _array_bytes, generate_pass, gpu_device, step_structure
from diffjax.config import Config

DATA = pathlib.Path(__file__).parent / "data" / "compiled"
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and any(
    importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))


def _fixture_structure():
    return step_structure(*((DATA / name).read_text() for name in (
        "thunk_sequence.txt", "thunk_metadata.txt", "after_optimizations.txt")))


def test_a_compiled_step_is_counted_with_its_loop_and_its_copies():
    structure = _fixture_structure()
    # Outside the loop: 4 copies (the loop's initial values and the two static weight slices that XLA copies
    # to merge `x @ wq[1]` and `x @ wk[1]` into one matmul), the merged matmul and the add; each of the 3
    # iterations: the condition, the dynamic slice's copy, the counter, the matmul and the GELU.
    assert structure.loops == (3,)
    assert structure.launches == 4 + 2 + 3 * 5
    assert structure.copies == 4 + 3
    # s32[] counter + bf16[64, 256] x + 2 x bf16[1, 256, 512] slices + 3 x bf16[1, 256, 256] dynamic slices.
    assert structure.copy_bytes == 4 + 64 * 256 * 2 + 2 * 256 * 512 * 2 + 3 * 256 * 256 * 2
    assert dict(structure.kernels)["copy:wrapped_slice"] == 2
    assert dict(structure.kernels)["gemm_fusion_dot"] == 1 + 3
    assert (structure.command_buffers, structure.outside_command_buffers) == (0, structure.launches)
    assert "21 launches per call" in structure.summary()
    # Per iteration of the loop: the same five launches, one of them the dynamic slice's copy.
    (iteration,) = structure.loop_iterations
    assert (iteration.depth, iteration.launches, iteration.copies, iteration.copy_bytes) == (0, 5, 1, 256 * 256 * 2)
    assert dict(iteration.kernels)["gemm_fusion_dot"] == 1


def test_launches_inside_command_buffers_and_unknown_trip_counts():
    sequence = """\
000: kCommandBuffer [source | next=003 (1)]
    001: kCustomKernel [source | next=002 (1)] fusion_1 grid: [1, 1, 1]
    002: kCopy         [prev=001 (1) | sink] kCopy
003: kWhile [prev=000 (1) | next=000 (1)]
condition:
    004: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1]
  body:
    005: kCustomKernel [source | sink] moe_gate_up grid: [1, 1, 1]
    007: kAsyncStart [source | next=000 (1)] stream=computation_stream[2], async_id=7
        009: kDynamicSliceFusion [source | sink] params=1, results=1
            008: kCopy [source | sink] kCopy
006: kCustomKernel [prev=003 (1) | sink] fusion_2 grid: [1, 1, 1]
"""
    # As XLA writes it, the copy inside a dynamic-slice fusion has no annotation of its own: it writes the
    # fusion's result.
    metadata = "\n".join(f'thunk_info {{ profile_annotation: "{name}" thunk_id: {i} }}' for i, name in
                         [(2, "copy.3"), (3, "while.7"), (7, "fusion-start.1"), (9, "loop_dynamic_slice_fusion.2")])
    hlo = ('  %copy.3 = f32[10,4]{1,0} copy(%p)\n'
           '  %while.7 = (s32[], f32[4]) while(%t), condition=%c, body=%b, backend_config={"known_trip_count":{"n":"6"}}\n'
           '  %loop_dynamic_slice_fusion.2 = bf16[1,8,8]{2,1,0} fusion(%w, %i), kind=kLoop\n')
    structure = step_structure(sequence, metadata, hlo)
    assert (structure.launches, structure.outside_command_buffers, structure.command_buffers) == (
        2 + 3 * 6 + 1, 3 * 6 + 1, 1)
    assert (structure.copies, structure.copy_bytes, structure.loops) == (1 + 6, 160 + 6 * 128, (6,))
    assert dict(structure.kernels)["copy:loop_dynamic_slice_fusion"] == 6
    # Without a known trip count the body is counted once and the loop says so.
    unknown = step_structure(sequence, metadata, hlo.replace('"n":"6"', '"m":"6"'))
    assert (unknown.launches, unknown.loops) == (2 + 3 + 1, (None,))
    assert "?" in unknown.summary()
    assert unknown.loop_iterations == structure.loop_iterations == (
        LoopIteration(0, 3, 1, 128, (("loop_compare_fusion", 1), ("moe_gate_up", 1),
                                     ("copy:loop_dynamic_slice_fusion", 1))),)


def test_nested_loops_are_counted_per_iteration_of_each():
    """generate's shape: a canvas loop of unknown trips holding a denoising loop of unknown trips, which holds a
    scan of known trips; `generate_pass` picks the denoising loop."""
    sequence = """\
000: kCustomKernel [source | next=001 (1)] prefill grid: [1, 1, 1]
001: kWhile [prev=000 (1) | sink]
  body:
    002: kCustomKernel [source | next=003 (1)] encoder grid: [1, 1, 1]
    003: kWhile [prev=002 (1) | sink]
      body:
        004: kCustomKernel [source | next=005 (1)] sampler grid: [1, 1, 1]
        005: kCopy [prev=004 (1) | next=006 (1)] kCopy
        006: kWhile [prev=005 (1) | sink]
          body:
            007: kCustomKernel [source | sink] layer grid: [1, 1, 1]
"""
    metadata = "\n".join(f'thunk_info {{ profile_annotation: "{name}" thunk_id: {i} }}' for i, name in
                         [(1, "while.1"), (3, "while.2"), (5, "copy.1"), (6, "while.3")])
    hlo = ('  %copy.1 = bf16[4,8]{1,0} copy(%p)\n'
           '  %while.3 = (s32[]) while(%t), condition=%c, body=%b, backend_config={"known_trip_count":{"n":"30"}}\n')
    structure = step_structure(sequence, metadata, hlo)
    assert structure.loops == (None, None, 30)
    assert [(i.depth, i.launches, i.copies, i.copy_bytes) for i in structure.loop_iterations] == [
        (0, 1 + 2 + 30, 1, 64), (1, 2 + 30, 1, 64), (2, 1, 0, 0)]
    assert generate_pass(structure) is structure.loop_iterations[1]
    with pytest.raises(ValueError, match="no denoising loop among the loops"):
        generate_pass(_fixture_structure())


def test_array_bytes_reads_hlo_element_types():
    assert [_array_bytes(shape) for shape in ("s32[]", "bf16[1,2816,2112]{2,1,0}", "pred[4]", "f8e4m3fn[3,2]",
                                               "f32[0]", "(s32[], f32[2])", "token[]")] == [
        4, 2816 * 2112 * 2, 4, 6, 0, 0, 0]


def test_gpu_targets_are_checked_and_a_missing_plugin_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown GPU target 'h300': one of \['h200'\]"):
        gpu_device("h300")
    if HAS_CUDA_PLUGIN:
        pytest.skip("JAX's CUDA plugin is installed here")
    with pytest.raises(RuntimeError, match="needs JAX's CUDA plugin"):
        gpu_device("h200")


def test_kernels_compile_for_the_gpu_inside_compiling_for_gpu():
    interpreted_here = jax.default_backend() != "gpu"
    assert kernels.resolve_interpret(None) is interpreted_here
    with kernels.compiling_for_gpu():
        assert kernels.resolve_interpret(None) is False
        assert kernels.resolve_interpret(True) is True
    assert kernels.resolve_interpret(None) is interpreted_here


def test_compiled_full_size_counts_every_variant_and_keeps_a_failing_one(monkeypatch):
    import diffjax.compiled as compiled

    seen = []

    options_seen = []

    def fake_compile(config, batch, prompt, target, compiler_options):
        options_seen.append(compiler_options)
        seen.append((config.scan_unroll, config.projection_layout, config.block_layout, batch, prompt, target))
        if config.projection_layout == "fused" and config.scan_unroll == 1:
            raise ValueError("no such kernel")
        return _fixture_structure()

    monkeypatch.setattr(compiled, "gpu_device", lambda target: None)
    monkeypatch.setattr(compiled, "compile_decoder_step", fake_compile)
    encoder = dataclasses.replace(_fixture_structure(), launches=99, copy_bytes=7 * 10**9)
    monkeypatch.setattr(compiled, "compile_encoder_step", lambda *shapes: encoder)
    generate_seen = []

    def fake_generate(config, batch, prompt, target, statistics, compiler_options):
        generate_seen.append((config.scan_unroll, statistics))
        return dataclasses.replace(_fixture_structure(), loops=(None, None), loop_iterations=(
            LoopIteration(0, 50), LoopIteration(1, 40 + len(statistics), 2, 10**9)))

    monkeypatch.setattr(compiled, "compile_generate", fake_generate)
    # The XLA options vary fastest: each layout is compiled with the defaults, then without Triton matmuls.
    settings = bench.FullSizeSettings(batches=(2,), prompts=(8,), scan_unroll=(1, 3),
                                      projections=("separate", "fused"), blocks=("unstacked",),
                                      xla_options=("", "xla_gpu_enable_triton_gemm=false"), generate=False)
    settings_default = dataclasses.replace(settings, xla_options=("",))
    result = bench.compiled_full_size(settings_default, "h200", config=Config.tiny())
    assert seen == [(1, "separate", "unstacked", 2, 8, "h200"), (1, "fused", "unstacked", 2, 8, "h200"),
                    (3, "separate", "unstacked", 2, 8, "h200"), (3, "fused", "unstacked", 2, 8, "h200")]
    points = result["points"]
    assert "no such kernel" in points[1]["error"]
    assert [p["launches"] for p in points if "error" not in p] == [21, 21, 21]
    with_options = bench.compiled_full_size(
        dataclasses.replace(settings, scan_unroll=(3,), projections=("separate",)), "h200", config=Config.tiny())
    assert [p["xla_options"] for p in with_options["points"]] == ["", "xla_gpu_enable_triton_gemm=false"]
    assert all("error" not in p for p in with_options["points"])
    assert options_seen == [{}] * 5 + [{"xla_gpu_enable_triton_gemm": False}]
    assert points[0]["loops"] == (3,) and points[0]["compile_s"] >= 0
    assert points[0]["encoder"]["launches"] == 99 and "encoder" not in points[1]
    # The table gives a column only to what varies; the shared settings go to the caption.
    from rich.console import Console

    console = Console(width=200, record=True)
    bench.render(result, console)
    text = console.export_text()
    header = next(line for line in text.splitlines() if "launches" in line)
    assert "scan_unroll" in header and "projections" in header and "batch" not in header and "blocks" not in header
    assert "batch 2" in text and "blocks unstacked" in text and "no such kernel" in text
    assert "encoder launches" in header and " 99 " in text and "7.000" in text
    assert "generate" not in points[0] and not generate_seen
    # With generate, one pass of its denoising loop per statistics path.
    with_generate = bench.compiled_full_size(
        dataclasses.replace(settings, scan_unroll=(3,), projections=("separate",), xla_options=("",),
                            statistics=("logits", "pallas"), generate=True), "h200", config=Config.tiny())
    assert generate_seen == [(3, "logits"), (3, "pallas")]
    passes = with_generate["points"][0]["generate"]
    assert passes["logits"]["launches"] == 46 and passes["pallas"]["copy_bytes"] == 10**9
    console = Console(width=250, record=True)
    bench.render(with_generate, console)
    assert "logits: 46 / 1.000, pallas: 46 / 1.000" in console.export_text()


def test_cli_compiled_for_needs_full_size_and_a_plugin(capsys):
    from tests.test_cli import assert_clean_error, run

    code, _, err = run(capsys, "bench", "--compiled-for", "h200")
    assert_clean_error(code, err, "--compiled-for needs --full-size")
    if HAS_CUDA_PLUGIN:
        return
    code, _, err = run(capsys, "bench", "--full-size", "--compiled-for", "h200")
    assert_clean_error(code, err, "needs JAX's CUDA plugin")
