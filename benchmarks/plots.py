"""PNG plots of a sweep: tokens/s by level (and peer), compile time per stage and per pass.

matplotlib is optional (the `test` extra installs it); without it no plot is written and the
caller says so.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.report import passed
from benchmarks.stats import Summary


def _median(data: dict) -> float:
    return Summary.from_json(data).median


def throughput_series(model: dict) -> tuple[list[str], list[float], list[float]]:
    """Runner labels with decode tok/s and longest-prefill tok/s (gated levels, then peers)."""
    longest = str(model["plan"]["lengths"][-1])
    labels, decode, prefill = [], [], []
    runs = [(f"mlcc {lv}", e["run"]) for lv, e in model["levels"].items() if passed(e)]
    runs += [(f"HF {dt}", p) for dt, p in model["peers"].items() if "error" not in p]
    for label, run in runs:
        labels.append(label)
        decode.append(_median(run["decode"]["tokens_per_second"]))
        prefill.append(_median(run["prefill"][longest]["tokens_per_second"]))
    return labels, decode, prefill


def write_plots(results: dict, out: Path) -> list[str]:
    """Write throughput.png and compile_time.png into `out`; their names, or [] without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    models = results["models"]
    _throughput(plt, models, out / "throughput.png")
    _compile_time(plt, models, out / "compile_time.png")
    return ["throughput.png", "compile_time.png"]


def _throughput(plt, models: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        labels, decode, prefill = throughput_series(model)
        xs = range(len(labels))
        longest = model["plan"]["lengths"][-1]
        ax.bar([x - 0.2 for x in xs], decode, 0.4, label="decode (batch 1)")
        ax.bar([x + 0.2 for x in xs], prefill, 0.4, label=f"prefill ({longest} tokens)")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("tokens / s (log scale)")
        ax.set_title(f"{model['name']}: tokens/s by level")
        ax.legend()
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _compile_time(plt, models: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8), squeeze=False)
    for column, model in enumerate(models):
        built = {lv: e["compile"] for lv, e in model["levels"].items()
                 if "error" not in e["compile"]}
        levels = list(built)
        ax = axes[0][column]
        left = [0.0] * len(levels)
        stages = list(next(iter(built.values()))["stage_seconds"]) if built else []
        for stage in stages:
            widths = [built[lv]["stage_seconds"].get(stage, 0.0) for lv in levels]
            ax.barh(levels, widths, left=left, label=stage)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_xlabel("seconds")
        ax.set_title(f"{model['name']}: compile time per stage")
        ax.legend(fontsize="small")
        ax = axes[1][column]
        passes: list[str] = []
        for c in built.values():
            passes += [p for p in c["pass_seconds"] if p not in passes]
        height = 0.8 / max(1, len(levels))
        for i, lv in enumerate(levels):
            ys = [p + i * height for p in range(len(passes))]
            ax.barh(ys, [built[lv]["pass_seconds"].get(p, 0.0) * 1e3 for p in passes],
                    height, label=lv)
        ax.set_yticks([p + 0.4 - height / 2 for p in range(len(passes))], passes)
        ax.set_xlabel("milliseconds")
        ax.set_title("time per pass")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
