"""The routing kernels (`diffjax.kernels.routing`) against their plain-JAX twins, interpreted on the CPU, and
lowered for CUDA at the released shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import lower_for_cuda, moe_case

from diffjax.config import Config
from diffjax.kernels import bench as kernel_bench
from diffjax.kernels import routing
from diffjax.kernels.moe import experts_pallas
from diffjax.kernels.routing import expert_rows_pallas, expert_rows_reference, route_pallas
from diffjax.layers import route
from diffjax.model import denoise_logits, encode, init_params


def _router_case(tokens: int, hidden: int, experts: int, seed: int, dtype=jnp.float32):
    """A normed residual, its scale, a projection giving scores of about one unit, and per-expert scales."""
    keys = jax.random.split(jax.random.key(seed), 4)
    normed = jax.random.normal(keys[0], (tokens, hidden)).astype(dtype)
    scale = jax.random.uniform(keys[1], (hidden,), minval=0.5, maxval=2.0)
    proj = jax.random.normal(keys[2], (hidden, experts))
    return normed, scale, proj, jax.random.uniform(keys[3], (experts,), minval=0.5, maxval=2.0)


@pytest.mark.parametrize(("tokens", "hidden", "experts", "k"), [
    (256, 2816, 128, 8),  # the released router at batch 1
    (37, 40, 6, 3),  # no axis a power of two, tokens not a multiple of the block
    (5, 16, 4, 4),  # every expert chosen
    (70, 64, 16, 1),
])
def test_route_kernel_matches_the_router(tokens, hidden, experts, k):
    args = _router_case(tokens, hidden, experts, seed=tokens + k)
    weights, ids = route_pallas(*args, k, interpret=True)
    want_weights, want_ids = route(*args, k)
    assert ids.dtype == jnp.int32 and weights.dtype == jnp.float32 and ids.shape == (tokens, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=2e-5, atol=1e-6)
    assert float(jnp.abs(want_weights).min()) > 1e-4  # never compare on zeros


@pytest.mark.parametrize("tiles", [
    routing.RouteTiles(block_tokens=16, block_hidden=64, num_stages=4),  # more steps than tokens' blocks
    routing.RouteTiles(block_tokens=64, block_hidden=256, num_warps=8),  # blocks wider than the hidden size
    *(routing.RouteTiles(**c) for c in kernel_bench.ROUTE_TILES[:2]),
    routing.RouteTiles(project=False),  # XLA's matmul, the kernel's pick
])
@pytest.mark.parametrize(("tokens", "hidden", "experts", "k"), [(70, 160, 16, 4), (37, 40, 6, 3)])
def test_route_kernel_under_other_tiles_matches_the_router(tiles, tokens, hidden, experts, k):
    """The tile settings the GPU sweep tries change the blocks, the Triton pipeline or who projects, not the
    answer; bf16, where the router rounds its input twice and its scores once, as the kernel must."""
    args = _router_case(tokens, hidden, experts, seed=9, dtype=jnp.bfloat16)
    weights, ids = route_pallas(*args, k, tiles=tiles, interpret=True)
    want_weights, want_ids = route(*args, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_weights, rtol=2e-5, atol=1e-6)


def test_route_tiles_refuse_blocks_that_are_not_powers_of_two():
    normed, scale, proj, per_expert = _router_case(4, 16, 8, seed=0)
    with pytest.raises(ValueError, match=r"RouteTiles\.block_hidden must be a power of two >= 16, got 48"):
        route_pallas(normed, scale, proj, per_expert, 2, tiles=routing.RouteTiles(block_hidden=48))
    with pytest.raises(ValueError, match=r"RouteTiles\.block_tokens must be a power of two >= 16, got 8"):
        route_pallas(normed, scale, proj, per_expert, 2, tiles=routing.RouteTiles(block_tokens=8))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_route_kernel_breaks_ties_like_top_k(dtype):
    """Integer inputs and a hidden size of 64 (multiplier 1/8): every score is exact whatever the order of the
    sums, in bf16 too, and most tokens have ties inside and across the top-k boundary. The lower expert wins,
    as in `jax.lax.top_k` over the router's probabilities (where -0 and +0 tie too)."""
    keys = jax.random.split(jax.random.key(1), 2)
    normed = jax.random.randint(keys[0], (64, 64), -1, 2).astype(dtype)
    proj = jax.random.randint(keys[1], (64, 16), -1, 2).astype(jnp.float32)
    scale, per_expert = jnp.ones(64), jnp.ones(16)
    ids = route_pallas(normed, scale, proj, per_expert, 4, interpret=True)[1]
    scores = (normed.astype(jnp.float32) / 8) @ proj
    want = jax.lax.top_k(jax.nn.softmax(scores), 4)[1]
    assert int(jnp.sum(scores == jnp.sort(scores, axis=1)[:, -5:-4])) > 64  # ties at the boundary exist
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(ids, route(normed, scale, proj, per_expert, 4)[1])


def test_route_kernel_differentiates_through_its_twin():
    args = _router_case(40, 24, 8, seed=3)
    cotangent = jax.random.normal(jax.random.key(4), (40, 2))

    def loss(make):
        return lambda *args: jnp.sum(make(*args, 2)[0] * cotangent)

    got = jax.grad(loss(lambda *a: route_pallas(*a, interpret=True)), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(route), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(got, want, strict=True):
        assert float(jnp.abs(b).max()) > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_route_kernel_refuses_bad_arguments():
    normed, scale, proj, per_expert = _router_case(4, 16, 8, seed=0)
    with pytest.raises(ValueError, match="per_expert_scale has shape"):
        route_pallas(normed, scale, proj, per_expert[:4], 2)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.8"):
        route_pallas(normed, scale, proj, per_expert, 9)
    with pytest.raises(ValueError, match="normed_residual must be"):
        route_pallas(normed[None], scale, proj, per_expert, 2)
    with pytest.raises(ValueError, match=r"must be \[hidden=16\] and \[hidden=16, experts\]"):
        route_pallas(normed, scale, proj[:8], per_expert, 2)


def _routed(tokens: int, experts: int, k: int, seed: int, used: int | None = None):
    """Random top-k ids over the first `used` experts (the others get no assignment) and random weights."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(used or experts, k, replace=False) for _ in range(tokens)])
    return jnp.asarray(ids, jnp.int32), jnp.asarray(rng.uniform(0.1, 1.0, (tokens, k)), jnp.float32)


LAYOUT_CASES = [
    (256, 128, 8, 32, None),  # the released layer at batch 1
    (37, 8, 2, 16, 5),  # three experts without tokens
    (300, 16, 4, 16, None),  # more assignments than one pass of the kernel's loop (1024)
    (32, 32, 1, 16, None),  # the static bound's worst case when ids = arange: checked below
    (40, 4, 4, 64, None),  # every expert holds every token: a group of several tiles
]


@pytest.mark.parametrize(("tokens", "experts", "k", "block_rows", "used"), LAYOUT_CASES)
def test_expert_rows_kernel_equals_its_twin(tokens, experts, k, block_rows, used):
    ids, weights = _routed(tokens, experts, k, seed=tokens, used=used)
    if tokens == experts and k == 1:
        ids = jnp.arange(tokens, dtype=jnp.int32)[:, None]
    got = expert_rows_pallas(ids, weights, experts, block_rows, interpret=True)
    want = expert_rows_reference(ids, weights, experts, block_rows)
    assert got.padded_rows == want.padded_rows
    for name in ("row_token", "row_weights", "row_assignment", "tile_expert"):
        ours, theirs = getattr(got, name), getattr(want, name)
        np.testing.assert_array_equal(ours[: theirs.shape[0]], theirs, err_msg=name)


@pytest.mark.parametrize(("tokens", "experts", "k", "block_rows", "used"), LAYOUT_CASES)
def test_expert_rows_give_each_expert_whole_tiles_of_its_own(tokens, experts, k, block_rows, used):
    """Each expert gets ceil(group / block_rows) tiles and no more (an extra tile would stream its weights
    again), every row of a used tile holds one of its expert's assignments or padding, every assignment lands
    in exactly one row, in expert order (stable), and padding rows carry weight 0 and the spare assignment."""
    ids, weights = _routed(tokens, experts, k, seed=tokens, used=used)
    rows = expert_rows_reference(ids, weights, experts, block_rows)
    flat, assignments = np.asarray(ids).reshape(-1), tokens * k
    tile_expert, row_assignment = np.asarray(rows.tile_expert), np.asarray(rows.row_assignment)
    assert tile_expert.shape == (rows.padded_rows // block_rows,) and rows.padded_rows % block_rows == 0
    sizes = np.bincount(flat, minlength=experts)
    np.testing.assert_array_equal(np.bincount(tile_expert[tile_expert >= 0], minlength=experts),
                                  -(-sizes // block_rows))
    real = row_assignment < assignments
    np.testing.assert_array_equal(np.sort(row_assignment[real]), np.arange(assignments))
    np.testing.assert_array_equal(row_assignment[real], np.argsort(flat, kind="stable"))
    row_expert = np.repeat(tile_expert, block_rows)
    np.testing.assert_array_equal(row_expert[real], flat[row_assignment[real]])
    np.testing.assert_array_equal(np.asarray(rows.row_token)[real], row_assignment[real] // k)
    np.testing.assert_array_equal(np.asarray(rows.row_weights)[real], np.asarray(weights).reshape(-1)[
        row_assignment[real]])
    assert (np.asarray(rows.row_weights)[~real] == 0).all() and (row_assignment[~real] == assignments).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_experts_kernel_with_the_layout_kernel_is_unchanged(dtype):
    """The layout kernel feeds the expert kernels the same rows as the plain-JAX layout: bit for bit."""
    x, weights, ids, gate_up, down = moe_case(37, 8, 2, 64, 32, dtype, seed=9)
    outputs = [experts_pallas(x, weights, ids, gate_up, down, routing=r, interpret=True) for r in ("xla", "pallas")]
    assert float(jnp.abs(outputs[0].astype(jnp.float32)).max()) > 0.1
    np.testing.assert_array_equal(np.asarray(outputs[1], np.float32), np.asarray(outputs[0], np.float32))
    with pytest.raises(ValueError, match="routing must be"):
        experts_pallas(x, weights, ids, gate_up, down, routing="triton")


@pytest.mark.parametrize("moe", ["grouped", "pallas"])
def test_model_with_the_routing_kernels_matches_plain_routing(moe):
    """A tiny model (padding, batch 2) routed by the kernels against `route` and the plain layout, with
    the plain experts and with the Pallas experts (which then also take the layout kernel's rows)."""
    config = Config.tiny(moe_implementation=moe)
    params = init_params(config, jax.random.key(2))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 11)))
    mask = jnp.arange(11)[None] >= jnp.asarray([[0], [4]])
    canvas = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (2, config.canvas_length)))
    logits = {}
    for impl in ("xla", "pallas"):
        routed = config.replace(routing_implementation=impl)
        logits[impl] = denoise_logits(params, routed, encode(params, routed, ids, mask), canvas)
    assert float(jnp.abs(logits["xla"]).max()) > 0.1
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-5, atol=1e-5)


def test_config_names_the_routing_implementations():
    with pytest.raises(ValueError, match="routing_implementation must be one of"):
        Config.tiny(routing_implementation="triton")
    assert Config.tiny(routing_implementation="pallas").implementation()["routing_implementation"] == "pallas"


def test_routing_kernels_lower_for_cuda_at_released_shapes():
    cfg = Config.diffusiongemma_26b_a4b()
    for tokens in (cfg.canvas_length, 8 * cfg.canvas_length):  # batch 1 and 8
        normed = jax.ShapeDtypeStruct((tokens, cfg.hidden_size), jnp.bfloat16)
        scale = jax.ShapeDtypeStruct((cfg.hidden_size,), jnp.bfloat16)
        proj = jax.ShapeDtypeStruct((cfg.hidden_size, cfg.num_experts), jnp.bfloat16)
        per_expert = jax.ShapeDtypeStruct((cfg.num_experts,), jnp.bfloat16)
        text = lower_for_cuda(lambda *a: route_pallas(*a, cfg.top_k_experts, interpret=False),
                              normed, scale, proj, per_expert)
        assert text.count("__gpu$xla.gpu.triton") == 1 and "stablehlo.dot" not in text
        ids = jax.ShapeDtypeStruct((tokens, cfg.top_k_experts), jnp.int32)
        weights = jax.ShapeDtypeStruct((tokens, cfg.top_k_experts), jnp.float32)
        block_rows = 32 if tokens == cfg.canvas_length else 128
        text = lower_for_cuda(
            lambda i, w: expert_rows_pallas(i, w, cfg.num_experts, block_rows, interpret=False)[:4],  # noqa: B023
            ids, weights)
        assert text.count("__gpu$xla.gpu.triton") == 1
    assert 8 * cfg.canvas_length * cfg.top_k_experts > routing.ROWS_CHUNK  # batch 8 loops over chunks
