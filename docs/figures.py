"""Draw the documentation's pictures from the measurements committed in benchmarks/.

    pip install ".[plot]" && python docs/figures.py [--out docs/images]

Reads ``benchmarks/figures.json`` (figures copied from benchmarks/RESULTS.md's tables, each with
its section, date, CPU and commit) and the recipe search's ``benchmarks/recipe_runs*.json``, and
writes ``op_speedups.png``, ``samplers.png``, ``codec.png``, ``first_run.png`` and
``recipe_front.png``. Nothing is measured here: rerun it after RESULTS.md's figures change.
"""

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import bench_recipe  # noqa: E402 (the recipe front is drawn by the benchmark's own plot)

DPI = 110


def _source(entry: dict) -> str:
    return f"{entry['date']} · {entry['cpu']} · {entry['commit']}"


def op_speedups(data: dict, png: Path) -> None:
    """How many times faster vdm_fast's op ran than each alternative, per op (log scale)."""
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.9 * len(rows) + 1.6))
    kinds = [("reference", "eager reference", "C7"), ("compiled", "torch.compile of the reference", "C0"),
             ("baseline_ms", "strongest baseline (named)", "C2")]
    height = 0.26
    labels, named = [], set()
    for i, row in enumerate(rows):
        y = len(rows) - 1 - i
        labels.append((y, f"{row['op']}\n{row['case']}\n{row['cpu']}"))
        for k, (key, name, color) in enumerate(kinds):
            if row.get(key) is None:
                if key == "compiled" and row.get("compiled_note"):
                    ax.text(1.05, y, row["compiled_note"], va="center", fontsize=7, color=color)
                continue
            ratio = row[key] / row["vdm_fast"]
            bar_y = y + (1 - k) * height
            ax.barh(bar_y, ratio, height=height * 0.9, color=color, label=None if key in named else name)
            named.add(key)
            text = f"{ratio:.1f}x" + (f" ({row['baseline']})" if key == "baseline_ms" else "")
            ax.text(ratio * 1.05, bar_y, text, va="center", fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([y for y, _ in labels], [text for _, text in labels], fontsize=8)
    ax.set_xlim(0.8, max(r["reference"] / r["vdm_fast"] for r in rows) * 6)
    ax.set_xlabel("time of the alternative / time of vdm_fast (forward + backward; > 1: vdm_fast is faster)")
    ax.set_title("vdm_fast's ops on the CPU: times faster than each alternative", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


def samplers(data: dict, png: Path) -> None:
    """Sample quality against network evaluations, per sampler, with ancestral-1000 and the floor."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, distances in data["distance"].items():
        ax.plot(data["steps"], distances, marker="o", label=name)
    low, high = data["ancestral_1000_seeds"]
    ax.axhspan(low, high, color="C7", alpha=0.2, label="ancestral, 1000 steps: its two seeds")
    ax.axhline(data["ancestral_1000"], color="C7", lw=1.2, label=f"ancestral, 1000 steps ({data['ancestral_1000']})")
    ax.axhline(data["floor"], color="k", lw=0.8, ls=":", label=f"the test images' own distance ({data['floor']})")
    ax.set_xscale("log")
    ax.set_xticks(data["steps"], [str(s) for s in data["steps"]])
    ax.set_ylim(0, None)
    ax.set_xlabel("network evaluations (steps)")
    ax.set_ylabel("Frechet distance (lower is better)")
    ax.set_title(f"Samplers on a small digits model ({_source(data)})", fontsize=10)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


def codec(data: dict, png: Path) -> None:
    """Bits per dim of one file of the digits test images, by codec, against the model's bound."""
    names = list(data["bpd"])
    values = [data["bpd"][n] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    ax.barh(range(len(names))[::-1], values, color=["C2"] + ["C7"] * (len(names) - 1))
    for y, v in zip(range(len(names))[::-1], values):
        ax.text(v + 0.03, y, f"{v:.2f}", va="center", fontsize=8)
    ax.axvline(data["negative_elbo"], color="C3", lw=1, ls="--",
               label=f"the model's T = {data['T']} negative ELBO ({data['negative_elbo']})")
    ax.set_yticks(range(len(names))[::-1], names, fontsize=8)
    ax.set_xlim(0, max(values) * 1.45)
    ax.set_xlabel("bits per dim (lower is better)")
    ax.set_title(f"Lossless coding of the {data['images']} digits test images ({_source(data)})", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


def first_run(data: dict, png: Path) -> None:
    """Wall time of the default and of the earlier default (--preset digits-4000), by CPU, each
    bar labelled with its test bpd."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    ticks = []
    for i, machine in enumerate(data["runs"]):
        runs = [json.loads((BENCHMARKS / db).read_text()) for db in machine["db"]]
        for k, (key, name, color) in enumerate([("preset", "--preset digits-4000 (float32)", "C7"),
                                                ("default", "the default", "C0")]):
            walls = [r[key]["wall_s"] for r in runs]
            x = i + (k - 0.5) * width
            ax.bar(x, statistics.mean(walls), width * 0.9, color=color, label=name if i == 0 else None)
            ax.plot([x] * len(walls), walls, "k.", ms=4)
            r = runs[0][key]
            ax.text(x, max(walls) + 12, f"{r['bpd']:.4f}\n+- {r['se']:.4f}", ha="center", fontsize=7)
        ticks.append(f"{machine['cpu']}\n(default in {machine['precision']})")
    ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
    ax.set_ylabel("wall time, s (2 cores)")
    ax.set_ylim(0, max(ax.get_ylim()[1], 1) * 1.18)
    ax.set_title("vdm-fast train on the digits: wall time by CPU, test bpd above each bar", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=DPI)
    plt.close(fig)


def recipe_front(png: Path) -> None:
    """The recipe search's runs (benchmarks/recipe_runs.json), drawn by bench_recipe's plot."""
    with contextlib.redirect_stdout(io.StringIO()):  # the plot also prints RESULTS.md's table
        bench_recipe.plot(BENCHMARKS / "recipe_runs.json", png, {"default": "default", "preset": "digits-4000"})
    plt.close("all")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder of the PNGs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads((BENCHMARKS / "figures.json").read_text())
    op_speedups(data["op_timings"], out / "op_speedups.png")
    samplers(data["samplers"], out / "samplers.png")
    codec(data["codec"], out / "codec.png")
    first_run(data["first_run"], out / "first_run.png")
    recipe_front(out / "recipe_front.png")
    for name in ("op_speedups", "samplers", "codec", "first_run", "recipe_front"):
        print(out / f"{name}.png")


if __name__ == "__main__":
    main()
