"""`ragcache bench serve --plot`: TTFT p50/p99 and output throughput against load, one line per engine and mode.

One row of two panels per loop that ran: closed loop against concurrency, open loop
against the arrival rate. p50 is the solid line, p99 the dashed one in the same colour.
"""

from __future__ import annotations

from pathlib import Path

from ragcache.bench.serve_load import BenchServeError

_LOOPS = (  # (summary key, load field, x-axis label)
    ("closed", "concurrency", "concurrency (closed loop)"),
    ("open", "rate", "arrival rate, requests/s (open loop)"),
)


def pyplot():
    """matplotlib's pyplot, drawing to files only; a clear error when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchServeError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot_serve_summary(summary: dict, path: Path) -> None:
    plt = pyplot()
    lines = [
        (f"{engine} {mode}", runs)
        for engine, data in summary["engines"].items()
        for mode, runs in data["modes"].items()
    ]
    loops = [loop for loop in _LOOPS if any(runs[loop[0]] for _, runs in lines)]
    figure, axes = plt.subplots(len(loops), 2, figsize=(12, 4.5 * len(loops)), squeeze=False)
    for (loop, key, xlabel), (ttft_axis, throughput_axis) in zip(loops, axes):
        for label, runs in lines:
            rows = runs[loop]
            x = [row[key] for row in rows]
            (p50,) = ttft_axis.plot(x, _y(rows, "ttft_p50_s"), marker="o", label=f"{label} p50")
            ttft_axis.plot(
                x, _y(rows, "ttft_p99_s"), marker="x", linestyle="--", color=p50.get_color(), label=f"{label} p99"
            )
            throughput_axis.plot(x, _y(rows, "output_tokens_per_s"), marker="o", color=p50.get_color(), label=label)
        ttft_axis.set(xlabel=xlabel, ylabel="TTFT, s", title="time to first token")
        throughput_axis.set(xlabel=xlabel, ylabel="output tokens/s", title="throughput")
        loads = sorted({row[key] for _, runs in lines for row in runs[loop]})
        for axis in (ttft_axis, throughput_axis):
            axis.set_xticks(loads)
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
    config = summary["config"]
    figure.suptitle(
        f"ragcache bench serve: {config['questions']} questions x {config['docs']} documents, "
        f"max_tokens {config['max_tokens']}, {summary['machine']['cpus']} CPUs"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _y(rows: list[dict], name: str) -> list[float]:
    return [float("nan") if row[name] is None else row[name] for row in rows]  # a level without successes: a gap
