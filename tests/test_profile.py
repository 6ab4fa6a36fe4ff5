"""`diffjax.profile`: one call under the profiler, its work summed by name (on CPU: the host XLA thread)."""

import jax
import jax.numpy as jnp

from diffjax.profile import kernel_times, render_kernel_times


def test_kernel_times_sums_a_calls_work_by_name(tmp_path):
    big = jax.jit(lambda x: jnp.sin(x @ x @ x).sum())
    x = jax.random.normal(jax.random.key(0), (384, 384))
    big(x).block_until_ready()  # warm: compilation is not the call's work
    breakdown = kernel_times(lambda: big(x), tmp_path / "trace")
    assert list((tmp_path / "trace").glob("**/*.xplane.pb"))  # the trace stays where asked
    kernels = breakdown["kernels"]
    assert kernels and breakdown["total_us"] > 0
    assert [k["total_us"] for k in kernels] == sorted((k["total_us"] for k in kernels), reverse=True)
    assert abs(sum(k["share"] for k in kernels) - 1) < 1e-6
    assert all(k["count"] >= 1 for k in kernels)
    assert not any(k["name"].startswith(("ThreadpoolListener", "end: ")) for k in kernels)
    # Two matmuls of 384^3 dominate a sine and a sum.
    assert kernels[0]["share"] > 0.3
    text = render_kernel_times(breakdown, top=1)
    assert kernels[0]["name"][:40] in text.splitlines()[2]
    assert f"({len(kernels) - 1} more names)" in text.splitlines()[-1] or len(kernels) == 1
