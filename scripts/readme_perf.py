#!/usr/bin/env python
"""Regenerate the README's Performance section from a benchmark's results.json.

    python scripts/readme_perf.py --results results/results.json [--readme README.md]

Only the text between `<!-- perf:start -->` and `<!-- perf:end -->` is replaced, so numbers in the README
are always the output of a recorded run (table, plot, the exact command and the machine), never typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from checkpoint import UserError, atomic_write_text, run_cli  # noqa: E402

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def perf_block(results: dict, plot: str | None) -> str:
    """The markdown that goes between the markers: command, machine, roofline, table, plot."""
    from benchmark import ROOFLINE_LEGEND, machine_line, markdown_table, random_model_note
    cfg, roof = results["config"], results["roofline"]
    lines = [
        f"Measured with (`{cfg['n_prompts']}` prompts from `{cfg['prompts']}`, {cfg['max_new_tokens']} new tokens, "
        f"{'compiled' if cfg['compile'] else 'eager'}):", "",
        "```", results["command"], "```", "",
        f"Machine: {machine_line(results['machine'])}"
        + (f", commit {results['machine']['git_commit']}" if results["machine"].get("git_commit") else "")
        + (f"; the whole run took {results['wall_s'] / 60:.1f} min" if results.get("wall_s") else "") + ".",
        f"Measured memory read bandwidth {roof['bandwidth_gb_s']:.1f} GB/s; the decode roofline (bandwidth / weight "
        "bytes) is " + ", ".join(f"{p} {t:.0f} tok/s" for p, t in roof["tok_s"].items()) + ".", "",
        *([random_model_note(results), ""] if random_model_note(results) else []),
        markdown_table(results["summary"]).rstrip("\n"), "",
        "Speedups are ratios to plain decoding (`ar`) on the same prompts in the same process, interleaved "
        "prompt by prompt; \"vs base ar\" compares with the first precision's `ar` "
        f"({(cfg.get('precisions') or ['?'])[0]}). τ = tokens accepted per target forward (bonus token included); "
        "accept@d = fraction of rounds accepting at least d drafted tokens; \"same text as ar\" counts "
        "temperature-0 outputs that are token-identical to plain decoding. " + ROOFLINE_LEGEND,
    ]
    if plot:
        lines += ["", f"![speedup and τ per method]({plot})"]
    return "\n".join(lines)


def replace_block(readme_text: str, block: str, readme_name: str = "README.md") -> str:
    if readme_text.count(START) != 1 or readme_text.count(END) != 1 \
            or readme_text.index(START) > readme_text.index(END):
        raise UserError(f"{readme_name} must contain exactly one '{START}' followed by one '{END}' "
                        f"(put them where the Performance section goes)")
    head, rest = readme_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="results/results.json", help="results.json written by benchmark.py")
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--plot", default=None,
                   help="image link to use (default: results.png next to results.json, relative to the README)")
    a = p.parse_args(argv)
    results_path, readme = Path(a.results), Path(a.readme)
    if not results_path.exists():
        raise UserError(f"{results_path} not found (run scripts/benchmark.py --out {results_path.parent} first)")
    try:
        results = json.loads(results_path.read_text())
        results["summary"], results["config"], results["roofline"]  # noqa: B018 - shape check
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{results_path} is not a results.json written by scripts/benchmark.py")
    if not readme.exists():
        raise UserError(f"{readme} not found")
    plot = a.plot
    if plot is None and (results_path.parent / "results.png").exists():
        plot = os.path.relpath(results_path.parent / "results.png", readme.resolve().parent)
    atomic_write_text(readme, replace_block(readme.read_text(), perf_block(results, plot), readme.name))
    print(f"updated the Performance section of {readme} from {results_path}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
