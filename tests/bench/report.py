"""Bench results: results/bench_<name>.json per bench, merged into results/bench.json and a
markdown table results/bench.md, each stamped with the machine it ran on. bench.json is tracked,
so a bench run on a fresh clone replaces its own section and keeps the others'."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[2] / "results"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def _table(results: dict) -> str:
    rows = ["| figure | value |", "|---|---|"]
    for k, v in results.items():
        rows.append(f"| {k} | {v:,.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows) + "\n"


def write_report(name: str, figures: dict[str, float | str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    figures = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), **figures}
    (RESULTS / f"bench_{name}.json").write_text(json.dumps(figures, indent=1))
    merged_path = RESULTS / "bench.json"
    merged = json.loads(merged_path.read_text()) if merged_path.is_file() else {}
    merged = {k: v for k, v in merged.items() if isinstance(v, dict)}  # one section per bench
    merged[name] = figures
    merged_path.write_text(json.dumps(merged, indent=1))
    (RESULTS / "bench.md").write_text("".join(f"## {n}\n\n{_table(f)}\n" for n, f in merged.items()))
    print(_table(figures))


def chosen(parser: argparse.ArgumentParser, flag: str, value: str, available: list[str]) -> list[str]:
    """The comma-separated names of `value`, each checked against `available` (a parser error
    names the rest)."""
    names = value.split(",")
    if unknown := [n for n in names if n not in available]:
        parser.error(f"{flag} {','.join(unknown)}: this machine has {available}")
    return names


def section(name: str, whole: bool, names: list[str]) -> str:
    """The report section of a bench run over `names`: `name` for a `whole` run, else a section of
    its own, so that a partial run never overwrites the whole table."""
    return name if whole else name + "_" + "_".join(names)
