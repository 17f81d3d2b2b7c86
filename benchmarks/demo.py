"""The demo, timed as a new user meets it: ``lakevision demo`` run N times, each in a fresh process
on a fresh data root, timed from outside (process start and imports included), with the figures
the first-run goals are judged by:

- wall minutes of the whole command (goal: under 5) and the test split's mAP@0.5 (goal: >= 0.6);
- the fixed costs the demo reports: the train task less its epochs (goal: <= 40 s), the evaluate
  task (<= 20 s), the first query after deploy (<= 1 s);
- the Python warning lines and ANSI escapes that reached the console (goal: none).

Usage: python benchmarks/demo.py [--runs 3] [--images 400] [--keep]
Each run's console output is kept in benchmarks/.data/demo/run-<i>.log; its data root is removed
after the run unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / ".data" / "demo"
# what a library's warning looks like when it reaches the screen, and a colour escape
_WARNING = re.compile(r"Warning\b|warnings\.warn\(|color_warning\(|\x1b\[")

GOALS = {"minutes": 5.0, "map_50": 0.6, "train_overhead_s": 40.0, "evaluate_s": 20.0, "first_query_ms": 1000.0}


def run_once(i: int, images: int, keep: bool) -> dict:
    root, log = DATA / f"root-{i}", DATA / f"run-{i}.log"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "lakevision.cli", "demo", "--root", str(root),
                               "--images", str(images)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace")
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    try:
        figures = json.loads(text.rstrip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        sys.exit(f"run {i}: the demo exited {proc.returncode} without its figures; see {log}")
    figures.update(run=i, exit=proc.returncode, wall_minutes=round(wall / 60, 2),
                   warning_lines=[line for line in text.splitlines() if _WARNING.search(line)])
    return figures


def _cell(value, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--keep", action="store_true", help="keep each run's data root")
    args = parser.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; {args.runs} runs of `lakevision demo` "
          f"({args.images} images), each in a fresh process on a fresh root", flush=True)
    header = ("run", "status", "wall min", "test mAP@0.5", "train s", "train overhead s", "evaluate s",
              "first query ms", "console warnings")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    runs = []
    for i in range(1, args.runs + 1):
        f = run_once(i, args.images, args.keep)
        runs.append(f)
        print(f"| {i} | {f['status']} | {f['wall_minutes']:.2f} | {_cell(f['test_metrics'].get('map_50'), '.3f')} | "
              f"{_cell(f['stages'].get('train'), '.1f')} | {_cell(f['train_overhead_s'], '.1f')} | "
              f"{_cell(f['evaluate_s'], '.1f')} | {_cell(f['first_query_ms'], '.0f')} | {len(f['warning_lines'])} |",
              flush=True)
        for line in f["warning_lines"][:5]:
            print(f"    run {i} console: {line[:160]!r}")
    checks = {
        "wall minutes < 5": all(f["wall_minutes"] < GOALS["minutes"] for f in runs),
        "test mAP@0.5 >= 0.6": all((f["test_metrics"].get("map_50") or 0) >= GOALS["map_50"] for f in runs),
        "train overhead <= 40 s": all(f["train_overhead_s"] is not None
                                      and f["train_overhead_s"] <= GOALS["train_overhead_s"] for f in runs),
        "evaluate <= 20 s": all(f["evaluate_s"] is not None and f["evaluate_s"] <= GOALS["evaluate_s"] for f in runs),
        "first query <= 1 s": all(f["first_query_ms"] is not None
                                  and f["first_query_ms"] <= GOALS["first_query_ms"] for f in runs),
        "no warnings on the console": not any(f["warning_lines"] for f in runs),
    }
    print("\n" + "\n".join(f"{'met    ' if ok else 'NOT MET'}  {name} (every run)" for name, ok in checks.items()))
    print(json.dumps([{k: v for k, v in f.items() if k != "warning_lines"} for f in runs]))


if __name__ == "__main__":
    main()
