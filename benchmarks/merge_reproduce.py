"""Merge ``curvlens reproduce --full`` runs made task by task into one table, JSON and figure.

``curvlens reproduce --full --tasks A,B --out dir1`` and ``... --tasks C --out dir2`` can run in
parallel (one process per group of tasks); this script reads their ``reproduce.json`` files and
writes the combined ``reproduce.json``, ``reproduce.txt`` and ``reproduce.png`` with the same
renderer as a single run, in the suite's task order. The time recorded is the sum of the runs'
times (the time one after the other) and the longest one (the wall time when they ran in
parallel).

Run: ``python benchmarks/merge_reproduce.py OUT_DIR RUN_DIR [RUN_DIR ...]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from curvlens._paper_table import paper_table
from curvlens._reproduce import FULL_TASKS, _write
from curvlens.report import load_reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    results, seconds, settings, samples = {}, [], {}, {}
    for run in args.runs:
        path = Path(run) / "reproduce.json"
        meta = json.loads(path.read_text())["meta"]
        seconds.append(float(meta["seconds"]))
        settings = {k: meta[k] for k in ("scale", "seed", "fixed_batch", "top_k", "lanczos_k")}
        for report in load_reports(path):
            results[report.meta["task"]] = report
            samples[report.meta["task"]] = meta.get("samples", {}).get(report.meta["task"])
    results = {t: results[t] for t in FULL_TASKS if t in results}
    total = sum(seconds)
    text = (paper_table(results) + f"\ntime: {total:.0f} s, the sum of {len(seconds)} runs "
            f"(the longest {max(seconds):.0f} s)")
    if len(results) < len(FULL_TASKS):
        text += f"\npartial: {len(results)} of {len(FULL_TASKS)} tasks"
    print(text)
    settings["parallel_wall_seconds"] = round(max(seconds), 1)
    settings["samples"] = {t: samples[t] for t in results}
    for line in _write(results, Path(args.out), list(FULL_TASKS), True, total, text, settings):
        print(line)


if __name__ == "__main__":
    main()
