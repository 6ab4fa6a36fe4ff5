"""`diffjax.profile`: one call under the profiler, its work summed by name (on CPU: the host XLA thread)."""

import types

import jax
import jax.numpy as jnp
import pytest

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
    # Two matmuls of 384^3 and the sine hold most of the call (each ~1/3 on 2 CPU cores at optimisation level
    # 0; the largest alone dipped to 0.24 under load, so the three together are checked).
    assert sum(k["share"] for k in kernels[:3]) > 0.6
    text = render_kernel_times(breakdown, top=1)
    assert kernels[0]["name"][:40] in text.splitlines()[2]
    assert any(f"({len(kernels) - 1} more names)" in line for line in text.splitlines()) or len(kernels) == 1
    assert 0 <= breakdown["idle_us"] <= breakdown["span_us"]


def _trace(*planes):
    """A stand-in for `jax.profiler.ProfileData`: planes of (name, lines of (name, [(event, ns), ...])); a line's
    events run back to back from 0, or from a third element, their start."""
    def event(name, ns, start=None):
        return types.SimpleNamespace(name=name, duration_ns=ns, start_ns=start)

    def timed(events):
        out, clock = [], 0
        for e in events:
            start = e[2] if len(e) > 2 else clock
            out.append(event(e[0], e[1], start))
            clock = start + e[1]
        return out

    return types.SimpleNamespace(planes=[
        types.SimpleNamespace(name=plane, lines=[types.SimpleNamespace(name=line, events=timed(events))
                                                 for line, events in lines])
        for plane, lines in planes])


def _breakdown_of(monkeypatch, tmp_path, trace):
    monkeypatch.setattr(jax.profiler, "ProfileData", types.SimpleNamespace(from_file=lambda _: trace))
    return kernel_times(lambda: jnp.ones(3) + 1, tmp_path)


def test_kernel_times_sums_the_device_stream_lines(monkeypatch, tmp_path):
    """A GPU trace: the stream lines' kernels by name (in microseconds), not the derived XLA lines beside them
    nor the host's."""
    breakdown = _breakdown_of(monkeypatch, tmp_path, _trace(
        ("/host:CPU", [("XLA Ops", [("host_op", 9_000_000)])]),
        ("/device:GPU:0", [
            ("Stream #13(Compute)", [("moe_gate_up", 3000), ("moe_down", 1500), ("moe_gate_up", 1000)]),
            ("Stream #14(MemcpyD2D)", [("copy", 500)]),
            ("XLA Modules", [("jit_step", 6000)]),
            ("XLA Ops", [("moe_gate_up", 4000)]),
        ]),
    ))
    assert breakdown["source"] == "/device:GPU:0: 2 stream line(s)"
    assert breakdown["total_us"] == pytest.approx(6.0)
    assert [(k["name"], k["count"], k["total_us"]) for k in breakdown["kernels"]] == [
        ("moe_gate_up", 2, pytest.approx(4.0)), ("moe_down", 1, pytest.approx(1.5)), ("copy", 1, pytest.approx(0.5))]
    assert [k["share"] for k in breakdown["kernels"]] == pytest.approx([4 / 6, 1.5 / 6, 0.5 / 6])


def test_kernel_times_on_a_host_trace_takes_the_busiest_xla_thread(monkeypatch, tmp_path):
    breakdown = _breakdown_of(monkeypatch, tmp_path, _trace(
        ("/host:CPU", [
            ("XLA thread 1", [("dot.1", 2000), ("ThreadpoolListener::Record", 90_000), ("end: dot.1", 50_000)]),
            ("XLA thread 2", [("dot.2", 7000), ("sine", 1000), ("dot.2", 2000)]),
            ("python", [("big", 10**9)]),
        ]),
    ))
    assert breakdown["source"] == "host line XLA thread 2"
    assert [(k["name"], k["count"], k["total_us"]) for k in breakdown["kernels"]] == [
        ("dot.2", 2, pytest.approx(9.0)), ("sine", 1, pytest.approx(1.0))]
    # The profiler's own bookkeeping is not work: thread 1 is the busier only if it counted.
    breakdown = _breakdown_of(monkeypatch, tmp_path, _trace(
        ("/host:CPU", [("XLA thread 1", [("dot.1", 2000), ("ThreadpoolListener::Record", 90_000)])]),
    ))
    assert [k["name"] for k in breakdown["kernels"]] == ["dot.1"] and breakdown["total_us"] == pytest.approx(2.0)


def test_kernel_times_finds_the_idle_time_between_a_steps_kernels(monkeypatch, tmp_path):
    """Two streams: idle is the part of the span that no kernel on any stream covers; the gaps name the kernels
    around them, largest first, and the rendered table shows them."""
    breakdown = _breakdown_of(monkeypatch, tmp_path, _trace(
        ("/device:GPU:0", [
            ("Stream #13(Compute)", [("qkv", 4000, 1000), ("attention", 2000, 7000), ("experts", 1000, 20_000)]),
            # Inside qkv's time on the other stream (no gap), then one ending after the next starts.
            ("Stream #14(Compute)", [("copy", 1000, 2000), ("norm", 3000, 8000)]),
        ]),
    ))
    # Covered: 1000-5000 (qkv), 7000-11000 (attention, norm), 20000-21000: span 20 us, idle 2 + 9 us.
    assert breakdown["span_us"] == pytest.approx(20.0)
    assert breakdown["idle_us"] == pytest.approx(11.0)
    assert breakdown["largest_gaps"] == [
        {"us": pytest.approx(9.0), "after": "norm", "before": "experts"},
        {"us": pytest.approx(2.0), "after": "qkv", "before": "attention"},
    ]
    text = render_kernel_times(breakdown)
    assert "20.000 ms" not in text and "0.011 ms of it idle" in text
    assert text.splitlines()[-2].startswith("idle       9.0 us  after norm, before experts")
