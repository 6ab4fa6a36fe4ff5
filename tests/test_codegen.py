"""The offline Hopper code-generation report (`diffjax.kernels.codegen`): Triton's compiler, no GPU.

What these pin down is Triton 3.9's code for sm_90a, through the same pass stages XLA runs; XLA compiles the
same IR with the Triton jaxlib bundles, so a GPU session may still see other numbers (the module's docstring
says so).
"""

import re

import jax
import jax.numpy as jnp
import pytest

from diffjax.kernels import codegen
from diffjax.kernels.moe import MoeTiles, warps_for


def moe_reports(rows: int, fp8: bool = False, pretiled: bool = False, mlp: bool = False, **tiles
                ) -> dict[str, codegen.KernelReport]:
    fn, args, kwargs = codegen.moe_problem(rows, MoeTiles(**tiles), fp8=fp8, pretiled=pretiled, mlp=mlp)
    return {r.name: r for r in codegen.kernel_reports(fn, *args, **kwargs)}


def test_occupancy_follows_the_hopper_limits():
    assert codegen.occupancy(128, 40 * 1024, 4) == (4, "registers")  # 4 warps x 32 x 128 registers = 16K
    assert codegen.occupancy(130, 40 * 1024, 4) == (3, "registers")  # 136 per thread after rounding
    assert codegen.occupancy(64, 72 * 1024, 4) == (3, "shared")  # 228 KiB / (72 + 1) KiB
    assert codegen.occupancy(16, 0, 1) == (32, "programs")


def test_report_reads_the_batch_1_expert_kernels():
    reports = moe_reports(1)
    assert sorted(reports) == ["moe_down", "moe_gate_up"]
    gate_up = reports["moe_gate_up"]
    # 2048 assignments in 32-row tiles: at most 2048 + 128 * 31 padded rows = 188 row tiles; inter 704 = 11
    # column tiles of 64, launched first (one grid axis, decoded by the kernel).
    assert gate_up.grid == (11 * 188, 1, 1)
    assert (gate_up.num_warps, gate_up.num_stages) == (4, 3)
    # 32 rows are under the 64 a Hopper warpgroup MMA needs; the k-loop's loads are pipelined; no spills.
    assert gate_up.mma == "mma.sync" and gate_up.async_loads and not gate_up.spills and not gate_up.mma_pipelined
    assert 0 < gate_up.registers <= 255 and gate_up.shared_bytes > 0 and gate_up.programs_per_sm >= 1
    swapped = moe_reports(1, swap_ab=True, column_tiles_first=False)
    assert {r.mma for r in swapped.values()} == {"wgmma"}  # weight columns on the MMA's M side
    assert swapped["moe_gate_up"].grid == (188 * 11, 1, 1)


@pytest.mark.parametrize("fp8", [False, True])
def test_default_expert_tiles_do_not_spill_at_batch_8(fp8):
    reports = moe_reports(8, fp8=fp8)
    assert {r.num_warps for r in reports.values()} == {8}
    assert not any(r.spills for r in reports.values()), reports
    assert {r.mma for r in reports.values()} == {"wgmma"}
    # bf16 weight tiles go from shared memory straight into wgmma, which stays in flight across k-steps; fp8
    # tiles are widened in registers first, and the loop then waits on every MMA.
    assert all(r.mma_pipelined != fp8 for r in reports.values()), reports
    # 4 warps hold the same two 128 x 64 float32 accumulators in ~twice the registers per thread.
    four_warps = moe_reports(8, fp8=fp8, num_warps=4)["moe_gate_up"]
    assert four_warps.registers > 1.5 * reports["moe_gate_up"].registers


@pytest.mark.parametrize("fp8", [False, True])
def test_pretiled_expert_kernels_compile_for_hopper_at_released_shapes(fp8):
    for rows in (1, 8):
        reports = moe_reports(rows, fp8=fp8, pretiled=True)
        assert sorted(reports) == ["moe_down", "moe_gate_up"]
        assert all(r.async_loads and not r.spills for r in reports.values()), reports


@pytest.mark.parametrize("rows", [1, 8])
def test_the_dense_mlp_costs_the_expert_launches_no_occupancy(rows):
    """With the MLP's programs in them (default `mlp_tile`), each expert launch keeps the warps, shared memory,
    programs per SM and spill-free code of the experts alone, and its grid gains the MLP's programs (256 x
    rows tokens; inter 2112 and hidden 2816 in columns of 16 at batch 1, 64 at batch 8)."""
    alone, together = moe_reports(rows), moe_reports(rows, mlp=True)
    tokens, tile = 256 * rows, {1: (64, 16), 8: (128, 64)}[rows]
    for name, columns in (("moe_gate_up", 2112), ("moe_down", 2816)):
        mine, theirs = together[name], alone[name]
        assert (mine.num_warps, mine.shared_bytes, mine.programs_per_sm) == (
            theirs.num_warps, theirs.shared_bytes, theirs.programs_per_sm), (mine, theirs)
        assert not mine.spills
        assert mine.grid[0] - theirs.grid[0] == (tokens // tile[0]) * (columns // tile[1])
    if rows == 1:  # why the batch-1 default is 16 wide: 64 x 64 MLP tiles take the launch's shared memory up
        wide = moe_reports(1, mlp=True, mlp_block_rows=64, mlp_block_n=64)["moe_gate_up"]
        assert wide.programs_per_sm < alone["moe_gate_up"].programs_per_sm


def test_sliding_split_k_tiles_set_the_width_of_its_mmas():
    """The report reads the wgmma shapes: the split-K kernel's 8 warps are two warpgroups, which share a 64-row
    query block by splitting each product's columns, so the default 32-key blocks give the score product
    m64n16 instructions; 128-row, 64-key blocks (a `tests/gpu_run.sh tiles` candidate) give each warpgroup
    its own rows, m64n64 for the scores and m64n256 for the values, without spilling at head_dim 256."""
    from diffjax.kernels.attention import AttentionTiles

    def split_k(tiles: AttentionTiles) -> codegen.KernelReport:
        fn, args, kwargs = codegen.sliding_problem(8, tiles)
        return next(r for r in codegen.kernel_reports(fn, *args, **kwargs) if r.name == "global_attention_split_k")

    assert split_k(AttentionTiles()).mma_shapes == ("m64n16k16", "m64n128k16")
    wide = split_k(AttentionTiles(block_q=128, block_k=64))
    assert wide.mma_shapes == ("m64n64k16", "m64n256k16") and not wide.spills


def test_skewed_k_loops_stay_pipelined():
    reports = moe_reports(1, skew_k=True)
    assert all(r.async_loads and not r.spills and r.programs_per_sm >= 4 for r in reports.values()), reports
    # The option costs nothing when off: no modulo in the default k-loops (it took 13-15 registers per thread);
    # on, one for the start and one in the loop, beside the one that decodes the program's column tile.
    for skew_k, modulos in ((False, 1), (True, 3)):
        fn, args, kwargs = codegen.moe_problem(1, MoeTiles(skew_k=skew_k))
        kernels = codegen.triton_kernels(jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)))
        assert [k.ttir.count("arith.remsi") for k in kernels] == [modulos, modulos]


def test_warps_for_holds_accumulators_in_64_registers_per_thread():
    assert warps_for(2 * 32 * 64) == 4 and warps_for(64 * 128) == 4
    assert warps_for(2 * 128 * 64) == 8 and warps_for(128 * 128) == 8
    with pytest.raises(ValueError, match="num_warps"):
        MoeTiles(num_warps=6).validate()


def test_hot_spills_are_the_local_memory_instructions_between_the_matrix_instructions():
    sass = "\n".join([
        "/*0010*/ STL [R1], R2 ;",  # before the loop: cheap
        "/*0020*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;",
        "/*0030*/ LDL.LU R3, [R1] ;",
        "/*0040*/ STL [R1+0x4], R5 ;",
        "/*0050*/ HMMA.16816.F32.BF16 R8, R12, R16, R8 ;",
        "/*0060*/ LDL R7, [R1+0x4] ;",  # after the last matrix instruction
    ])
    assert codegen.hot_spill_instructions(sass) == 2
    assert codegen.hot_spill_instructions("/*0010*/ STL [R1], R2 ;") == 0


def test_the_triton_ir_stage_folds_the_accumulation_into_the_dot():
    """XLA runs Triton's IR clean-up before the GPU stages and so must the report: without it `acc + dot(x, w)`
    stays a dot into zeros plus an add, and the batch-8 down kernel waits on every MMA."""
    fn, args, kwargs = codegen.moe_problem(8)
    down = next(k for k in codegen.triton_kernels(
        jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))) if k.name == "moe_down")
    folded = codegen.make_ttir(down)
    dot = r"tt\.dot %\w+, %\w+, (%[\w#]+)"
    raw_accumulators, folded_accumulators = re.findall(dot, down.ttir), re.findall(dot, folded)
    assert raw_accumulators and not any(acc.startswith("%arg") for acc in raw_accumulators)  # a splat of zeros
    assert folded_accumulators and all(acc.startswith("%arg") for acc in folded_accumulators)  # the loop's carry
    assert codegen.compile_for_hopper([down])[0].mma_pipelined


def test_triton_runs_in_a_child_process_and_its_absence_is_named(monkeypatch, tmp_path):
    import sys

    import triton

    def in_this_process(*_args, **_kwargs):
        raise AssertionError("Triton compiled inside the process that compiles with XLA")

    with monkeypatch.context() as patch:  # its LLVM/MLIR never run in this process, beside jaxlib's
        patch.setattr(triton, "compile", in_this_process)
        assert sorted(moe_reports(1)) == ["moe_down", "moe_gate_up"]
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '{\"error\": \"No module named triton\"}'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(RuntimeError, match=r"pip install triton==3\.9\.0 .*No module named triton"):
        moe_reports(1)


def test_a_function_without_pallas_kernels_has_no_report():
    assert codegen.kernel_reports(lambda x: jnp.sin(x) @ x, jax.ShapeDtypeStruct((16, 16), jnp.float32)) == []


def test_cli_prints_one_line_per_kernel(capsys):
    assert codegen.main(["--rows", "1", "--sections", "vocab"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["section", "rows", "kernel"]
    assert len(lines) == 2 and lines[1].split()[:3] == ["vocab", "1", "vocab_stats"]


def test_cli_takes_tile_settings_and_refuses_unknown_fields(capsys):
    assert codegen.main(["--rows", "8", "--sections", "moe", "--tiles", "num_warps=4", "swap_ab=false"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 2 and all(line.split()[3] == "4" and "num_warps=4" in line for line in lines)
    with pytest.raises(SystemExit):
        codegen.main(["--sections", "moe", "vocab", "--tiles", "swap_ab=true"])  # VocabTiles has no swap_ab
    assert "VocabTiles (vocab) has no field 'swap_ab'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        codegen.main(["--sections", "moe", "--tiles", "num_warps"])
    assert "FIELD=VALUE" in capsys.readouterr().err
