"""A PNG of the serve suite from a bench JSON file, when matplotlib is installed.

    python -m bench.serve.chart [--json bench/results/latest.json] [--png bench/results/serve.png]

One panel per workload, one bar per server and environment (the median over runs, the
whisker from the fastest to the slowest run); a path that was skipped or failed has no
bar.  matplotlib is not a dependency of ktls: without it this says so and writes nothing
(exit status 1); ``pip install matplotlib`` into the environment that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.serve import SERVERS, WORKLOADS

RESULTS = Path(__file__).resolve().parent.parent / "results"


class NoChart(Exception):
    """Why no PNG was written."""


def _bars(env: dict[str, Any], workload: str) -> list[tuple[float, float, float] | None]:
    """(median, min, max) of each server's path in ``env``, None where it has no value."""
    paths = env["suites"].get("serve", {}).get("paths", {})
    out: list[tuple[float, float, float] | None] = []
    for server in SERVERS:
        value = paths.get(f"{workload}/{server}", {}).get("summary", {}).get("value")
        out.append(None if value is None else (value["median"], value["min"], value["max"]))
    return out


def draw(document: dict[str, Any], png: Path) -> None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise NoChart(f"matplotlib is not installed here ({exc})") from exc
    matplotlib.use("Agg")  # files only, no display
    pyplot = importlib.import_module("matplotlib.pyplot")
    envs = [env for env in document["environments"] if "serve" in env["suites"]]
    if not envs:
        raise NoChart("the JSON has no results of the serve suite")
    figure, axes = pyplot.subplots(1, len(WORKLOADS), figsize=(4 * len(WORKLOADS), 4.5))
    width = 0.8 / len(envs)
    for ax, (workload, (label, unit)) in zip(axes, WORKLOADS.items(), strict=True):
        for i, env in enumerate(envs):
            for x, bar in enumerate(_bars(env, workload)):
                if bar is None:  # skipped, failed or not in this run
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
                    continue
                median, low, high = bar
                ax.bar(
                    x + (i - (len(envs) - 1) / 2) * width,
                    median,
                    width,
                    yerr=[[median - low], [high - median]],
                    capsize=3,
                    color=f"C{i}",
                )
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(unit)
        ax.set_xticks(range(len(SERVERS)))
        ax.set_xticklabels(list(SERVERS), rotation=30, ha="right", fontsize=8)
    handles = {
        env["environment"]["name"]: pyplot.Rectangle((0, 0), 1, 1, color=f"C{i}")
        for i, env in enumerate(envs)
    }
    figure.legend(handles.values(), handles.keys(), loc="upper right", fontsize=8)
    runs = ", ".join(f"{e['environment']['name']}: {e['config']['runs']}" for e in envs)
    figure.suptitle(f"ktls bench, serve suite: median and min-max over runs ({runs})")
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png, dpi=120)
    pyplot.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve.chart", description=__doc__)
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--png", type=Path, default=RESULTS / "serve.png")
    args = p.parse_args(argv)
    try:
        draw(json.loads(args.json.read_text()), args.png)
    except NoChart as exc:
        print(f"bench.serve.chart: no chart: {exc}", file=sys.stderr)
        return 1
    print(f"PNG: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
