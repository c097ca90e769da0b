"""One markdown table of every benchmark result that exists in a folder (``make bench``).

Reads ``grader_throughput.json`` (benchmarks/grader_throughput.py), ``ppo_step.json``
(benchmarks/ppo_step.py) and ``ppo_parts.json`` (benchmarks/ppo_parts.py) from the folder when
they are there, prints the table and writes it:

    .venv/bin/python benchmarks/report.py runs/bench --out runs/bench/results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def grader_rows(data: dict) -> list[list[str]]:
    s = data["summary"]
    o, g = s["ours"], s["generate"]
    return [[
        "grader throughput", f"log-prob read-out vs generate-then-parse, n={s['n']}",
        f"{o['examples_per_second']:.2f} ex/s", f"{g['examples_per_second']:.2f} ex/s",
        f"{s['speedup_ours_over_generate']:.1f}x faster",
    ]]


def ppo_rows(data: dict) -> list[list[str]]:
    from ppo_step import ROW_TITLES  # same folder

    cfg = data["settings"]
    rows = []
    for name, r in data["rows"].items():
        what = f"{ROW_TITLES[name]}; batch {cfg['batch_size']}, {cfg['max_new_tokens']} new tokens"
        ours, trl = r["ours"], r["trl"]
        rows.append(["PPO step time vs TRL 1.12", what, f"{ours['median_step_s']:.2f} s",
                     f"{trl['median_step_s']:.2f} s" if trl else "-",
                     f"{r['time_ratio']:.2f}x the time" if r["time_ratio"] is not None else "-"])
        rows.append(["PPO peak memory vs TRL 1.12", what, f"{ours['peak_rss_mib']:.0f} MiB",
                     f"{trl['peak_rss_mib']:.0f} MiB" if trl else "-",
                     f"{r['memory_ratio']:.2f}x the memory" if r["memory_ratio"] is not None else "-"])
    return rows


def parts_rows(data: dict) -> list[list[str]]:
    s = data["settings"]
    what = f"batch {s['batch_size']}, {s['max_new_tokens']} new tokens, {data['threads']} thread(s), {data['device']}"
    return [
        ["PPO rollout vs plain generate", what, f"{data['rollout']['tokens_per_s']:.1f} tokens/s",
         f"{data['generate']['tokens_per_s']:.1f} tokens/s", f"{data['rollout_vs_generate']:.2f}x the speed"],
        ["PPO update vs plain training floor", f"{s['ppo_epochs']} epochs of mini-batches of {s['mini_batch_size']}",
         f"{data['update']['seconds']:.2f} s", f"{data['floor']['seconds']:.2f} s",
         f"{data['update_vs_floor']:.2f}x the time"],
    ] + ([[
        "policy log-probs read from sampling (not used)", what,
        f"+{alt['seconds'] - data['generate']['seconds']:.2f} s in generate",
        f"{alt['policy_forward_seconds']:.2f} s policy forward",
        f"log-prob gap mean {alt['logprob_gap_mean']:.4f}, max {alt['logprob_gap_max']:.4f} nats"]]
        if (alt := data.get("generate_scores")) else [])


READERS = {"grader_throughput.json": grader_rows, "ppo_step.json": ppo_rows, "ppo_parts.json": parts_rows}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="Collect the benchmark JSON files of a folder into one markdown table.")
    p.add_argument("folder", type=Path, nargs="?", default=Path("runs/bench"), help="folder holding the JSON files")
    p.add_argument("--out", type=Path, default=None, help="write the table here (default: <folder>/results.md)")
    args = p.parse_args(argv)

    rows, found = [], []
    for name, read in READERS.items():
        path = args.folder / name
        if path.is_file():
            rows += read(json.loads(path.read_text()))
            found.append(name)
    if not found:
        p.error(f"no benchmark results in {args.folder} (looked for {', '.join(READERS)})")
    lines = ["# Benchmark results", "", f"From {', '.join(found)} in {args.folder}.", "",
             "| benchmark | what | ours | baseline | ours vs baseline |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    out = args.out or args.folder / "results.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return text


if __name__ == "__main__":
    main()
