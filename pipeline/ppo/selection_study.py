"""Judge PPO's step-selection rules on validation prompts they did not choose on.

A run with ``val_every`` writes each validated step's replies to ``validation_replies.jsonl``.
This splits the validation prompts of each class in two at random (seeded, many times), lets
each rule pick a step on one half, and scores the picked step on the other half. A rule that
picks a step for one lucky check scores well on the half it chose on and worse on the other;
the held-half F1 is the figure to compare rules by. Nothing here reads an eval set.

    python -m pipeline.ppo.selection_study runs/ppo-seed42 runs/ppo-seed43 --windows 1,2,3

Rules: ``f1 window k`` keeps the step with the best mean F1 over its last k checks (``select: f1``
with ``select_window: k``), ties to the earlier step; ``step 0`` keeps the starting policy;
``last`` the last validated step. ``best possible`` is the held-half F1 of the held half's own
best step, a ceiling no rule can beat.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Sequence

from pipeline.ppo.validation import REPLIES_FILE, f1


def load_replies(run: Path) -> list[dict]:
    """[{step, prompts: [{id, prompt_class, refused}]}] of one run, in step order."""
    path = Path(run) / REPLIES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-prompt validation replies (a PPO run with val_every > 0 writes it)")
    steps = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            steps.append({"step": int(row["step"]),
                          "refused": {p["id"]: bool(p["refused"]) for p in row["prompts"]},
                          "classes": {p["id"]: p["prompt_class"] for p in row["prompts"]}})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected {{step, prompts: [{{id, prompt_class, refused}}]}} ({e})") from None
    return sorted(steps, key=lambda s: s["step"])


def f1_on(step: dict, ids: Sequence) -> float:
    harmful = [step["refused"][i] for i in ids if step["classes"][i] == "harmful"]
    safe = [step["refused"][i] for i in ids if step["classes"][i] == "safe"]
    if not harmful or not safe:
        raise ValueError("a half needs harmful and safe validation prompts")
    return f1(sum(harmful) / len(harmful), sum(safe) / len(safe))


def pick(scores: Sequence[float], window: int) -> int:
    """Index of the step with the best trailing mean of ``window`` scores; ties to the earlier."""
    best, best_score = 0, None
    for k in range(len(scores)):
        recent = scores[max(0, k - window + 1):k + 1]
        score = sum(recent) / len(recent)
        if best_score is None or score > best_score:
            best, best_score = k, score
    return best


def halves(steps: list[dict], rng: random.Random) -> tuple[list, list]:
    """Each class's prompts shuffled and cut in two."""
    by_class: dict[str, list] = {}
    for i, cls in sorted(steps[0]["classes"].items(), key=lambda kv: str(kv[0])):
        by_class.setdefault(cls, []).append(i)
    a, b = [], []
    for ids in by_class.values():
        rng.shuffle(ids)
        a += ids[:len(ids) // 2]
        b += ids[len(ids) // 2:]
    return a, b


def study(steps: list[dict], windows: Sequence[int], splits: int = 200, seed: int = 0) -> dict[str, dict]:
    """Per rule: mean F1 on the held half of the step it picked, and how often each step was picked."""
    rng = random.Random(seed)
    rules = [f"f1 window {w}" for w in windows] + ["step 0", "last", "best possible"]
    held = {r: [] for r in rules}
    picked = {r: {} for r in rules}
    for _ in range(splits):
        choose_on, score_on = halves(steps, rng)
        on_a = [f1_on(s, choose_on) for s in steps]
        on_b = [f1_on(s, score_on) for s in steps]
        chosen = {f"f1 window {w}": pick(on_a, w) for w in windows}
        chosen.update({"step 0": 0, "last": len(steps) - 1, "best possible": pick(on_b, 1)})
        for rule, k in chosen.items():
            held[rule].append(on_b[k])
            picked[rule][steps[k]["step"]] = picked[rule].get(steps[k]["step"], 0) + 1
    return {r: {"held_half_f1": sum(v) / len(v), "picked": dict(sorted(picked[r].items()))} for r, v in held.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ppo.selection_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="PPO run folders (each with validation_replies.jsonl)")
    parser.add_argument("--windows", default="1,2,3", help="select_window values to compare (comma-separated)")
    parser.add_argument("--splits", type=int, default=200, help="random halvings per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        windows = [int(w) for w in args.windows.split(",") if w.strip()]
        if not windows or min(windows) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--windows: expected comma-separated positive integers, got {args.windows!r}")
    results = {}
    try:
        for run in args.runs:
            results[run] = study(load_replies(Path(run)), windows, args.splits, args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rules = list(next(iter(results.values())))
    print("held-half validation F1 of the step each rule keeps (mean over random halvings)\n")
    print("| rule | " + " | ".join(Path(r).name for r in results) + " | mean |")
    print("|---|" + "---:|" * (len(results) + 1))
    for rule in rules:
        vals = [results[r][rule]["held_half_f1"] for r in results]
        print(f"| {rule} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
