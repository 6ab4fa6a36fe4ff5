"""Where a jitted call's device time goes: one call under `jax.profiler.trace`, its device work summed by name.

    breakdown = kernel_times(lambda: step(params, cache, canvas))   # warm `step` first
    print(render_kernel_times(breakdown))

The trace's device plane (`/device:GPU:0`) has a line of kernel launches per CUDA stream ("Stream #..."),
beside lines derived from them (XLA modules, XLA ops); this sums the stream lines' kernels by name (a Pallas
kernel carries its `pallas_call` name, e.g. `moe_gate_up`). It also times the device's idle time between the
first kernel's start and the last one's end: on an H200 a full-size decoder step spent ~16% of its time
between its ~530 kernels, more than any part of the model but the experts. Where there is no device plane
(the CPU backend) it sums the busiest host thread's XLA ops instead, so the same code runs in CPU tests. The
trace files stay in `trace_dir` when one is given (TensorBoard / XProf read them).
"""

from __future__ import annotations

import collections
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax

# Host-thread events that are the profiler's own bookkeeping, not work.
_BOOKKEEPING = ("ThreadpoolListener", "ThunkExecutor", "end: ")


def kernel_times(fn: Callable[[], Any], trace_dir: str | pathlib.Path | None = None) -> dict[str, Any]:
    """Run `fn()` once under the profiler; returns {"source": the trace line(s) summed, "total_us",
    "kernels": [{"name", "count", "total_us", "share"}, ...] largest first}. Warm `fn` up first, or the
    compilation's own kernels are counted too."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(trace_dir or tmp)
        with jax.profiler.trace(str(directory)):
            jax.block_until_ready(fn())
        traces = sorted(directory.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
        if not traces:
            raise RuntimeError(f"the profiler wrote no trace under {directory}")
        data = jax.profiler.ProfileData.from_file(str(traces[-1]))
    source, events = _work_events(data)
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for name, _, duration_ns in events:
        totals[name][0] += 1
        totals[name][1] += duration_ns / 1e3
    total_us = sum(t for _, t in totals.values())
    kernels = [{"name": name, "count": count, "total_us": us, "share": us / total_us if total_us else 0.0}
               for name, (count, us) in sorted(totals.items(), key=lambda item: -item[1][1])]
    return {"source": source, "total_us": total_us, **idle_time(events), "kernels": kernels}


def idle_time(events: Sequence[tuple[str, float, float]], largest: int = 5) -> dict[str, Any]:
    """From `[(name, start ns, duration ns)]` (any streams, overlapping or not): {"span_us": first start to last
    end, "idle_us": the part of the span no event covers, "largest_gaps": the `largest` idle stretches as
    {"us", "after", "before"} (the names of the events that end and start them)}."""
    if not events:
        return {"span_us": 0.0, "idle_us": 0.0, "largest_gaps": []}
    ordered = sorted(events, key=lambda event: event[1])
    gaps = []
    covered_to, last = ordered[0][1] + ordered[0][2], ordered[0][0]
    for name, start, duration in ordered[1:]:
        if start > covered_to:
            gaps.append({"us": (start - covered_to) / 1e3, "after": last, "before": name})
        if start + duration >= covered_to:
            covered_to, last = start + duration, name
    return {"span_us": (covered_to - ordered[0][1]) / 1e3, "idle_us": sum(gap["us"] for gap in gaps),
            "largest_gaps": sorted(gaps, key=lambda gap: -gap["us"])[:largest]}


def _work_events(data: Any) -> tuple[str, list[tuple[str, float, float]]]:
    """(description, [(name, start ns, duration ns)]) of the trace's device kernels, or of the busiest host XLA
    thread."""
    planes = list(data.planes)
    streams = [(plane.name, line) for plane in planes if plane.name.startswith("/device:")
               for line in plane.lines if line.name.startswith("Stream")]
    if streams:
        events = [(e.name, e.start_ns, e.duration_ns) for _, line in streams for e in line.events]
        return f"{streams[0][0]}: {len(streams)} stream line(s)", events
    host = [line for plane in planes if plane.name.startswith("/host:") for line in plane.lines
            if "XLA" in line.name]
    if not host:
        names = {plane.name: [line.name for line in plane.lines] for plane in planes}
        raise RuntimeError(f"no device stream or host XLA line in the trace: {names}")

    def work(line: Any) -> list[tuple[str, float, float]]:
        return [(e.name, e.start_ns, e.duration_ns) for e in line.events if not e.name.startswith(_BOOKKEEPING)]

    busiest = max(host, key=lambda line: sum(d for _, _, d in work(line)))
    return f"host line {busiest.name}", work(busiest)


def render_kernel_times(breakdown: dict[str, Any], top: int = 25) -> str:
    """The `top` largest entries as a plain-text table."""
    lines = [f"{breakdown['total_us'] / 1e3:.3f} ms of work in {breakdown['source']}; from the first start to the "
             f"last end {breakdown['span_us'] / 1e3:.3f} ms, {breakdown['idle_us'] / 1e3:.3f} ms of it idle",
             f"{'share':>6} {'ms':>9} {'count':>5}  name"]
    for k in breakdown["kernels"][:top]:
        lines.append(f"{100 * k['share']:5.1f}% {k['total_us'] / 1e3:9.3f} {k['count']:>5}  {k['name'][:100]}")
    rest = breakdown["kernels"][top:]
    if rest:
        lines.append(f"{100 * sum(k['share'] for k in rest):5.1f}% {sum(k['total_us'] for k in rest) / 1e3:9.3f} "
                     f"{sum(k['count'] for k in rest):>5}  ({len(rest)} more names)")
    for gap in breakdown["largest_gaps"]:
        lines.append(f"idle {gap['us']:9.1f} us  after {gap['after'][:45]}, before {gap['before'][:45]}")
    return "\n".join(lines)


__all__: Sequence[str] = ("idle_time", "kernel_times", "render_kernel_times")
