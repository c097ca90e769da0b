"""What a PPO run writes as it goes: ``history.jsonl`` (one line of metrics a step),
``samples.jsonl`` (every ``sample_every``-th step's responses with each reward source), the
trackers' logs, and ``ppo_curves.png`` at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.ppo import validation
from pipeline.ppo.common import finite_or_none


def write_history(out: Path, metrics: dict[str, float]) -> None:
    with open(out / "history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({k: finite_or_none(v) for k, v in metrics.items()}) + "\n")


def write_samples(out: Path, step: int, ro, total, info, seq_kl) -> None:
    """Append one line per response of ``ro`` (a Rollout) with its total and per-source rewards."""
    with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
        for i in range(len(ro.responses)):
            f.write(json.dumps({
                "step": step, "prompt": ro.prompts[i], "prompt_class": ro.prompt_classes[i],
                "response": ro.responses[i], "truncated": bool(ro.truncated[i]),
                "reward": finite_or_none(total[i]),
                "rewards": {name: finite_or_none(raw[i]) for name, raw in info.raw.items()},
                "kl": float(seq_kl[i]),
            }) + "\n")


def plot_history(history: list[dict[str, float]], path: Path,
                 val_records: Sequence[dict[str, Any]] = ()) -> Optional[Path]:
    """``ppo_curves.png``: reward (total and per source), KL, the rubric grader's category
    rates per prompt class, and the validation refusal rates (the selected step marked),
    against the step. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = sorted({k for h in history for k in h})
    sources = [k for k in keys if k.startswith("reward/") and not k.endswith(("_nan", "_inf"))
               and k not in ("reward/score", "reward/unscored")]
    rates = [k for k in keys if k.count("/") == 2 and k.endswith("_rate")]
    panels = [("reward", ["reward/score", *sources]), ("KL to the reference (nats per response)", ["objective/kl"])]
    if rates:
        panels.append(("rubric grader: share of responses per category", rates))
    if val_records:
        panels.append(("validation: share refused (greedy, string match)", [*validation.RATES, "f1"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        rows = val_records if title.startswith("validation") else history
        for key in series:
            ys = [h.get(key, math.nan) for h in rows]
            ax.plot([h["step"] for h in rows], [math.nan if y is None else y for y in ys], marker=".", label=key)
        chosen = [r["step"] for r in rows if r.get("selected")]
        if rows is val_records and chosen:
            ax.axvline(chosen[-1], color="grey", linestyle="--", label=f"best (step {chosen[-1]})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
