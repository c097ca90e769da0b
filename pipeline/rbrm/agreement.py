"""How well the grader agrees with human labels: ``python -m pipeline.rubrics eval``.

A gold file holds (prompt, response, label) rows labelled by people. The label is binary
and the mapping says what it means in rubric terms: which gold values are "positive" and
which categories stand for a positive label, e.g. ``is_refusal: true`` <-> categories A or B.
The grader's score for a row is the probability it puts on those categories, so

- accuracy: the predicted category falls on the same side as the label;
- ROC AUC of the score against the label;
- precision and recall for each side, and a confusion matrix of label x predicted category;
- expected calibration error (10 equal-width bins) and a reliability diagram (PNG).

Results go to ``agreement.json`` (with the resolved settings), ``predictions.jsonl`` and
``reliability.png`` in the output folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.rbrm.rubric import CATEGORY_LABELS

TRUE_VALUES = {"true", "1", "yes", "y"}


class GoldError(ValueError):
    """The gold file or its mapping is wrong; the message names the file, line and field."""


@dataclass
class GoldRow:
    where: str
    prompt: str | None
    response: str
    positive: bool


def parse_categories(text: str) -> tuple[str, ...]:
    cats = tuple(c.strip().upper() for c in text.split(",") if c.strip())
    bad = [c for c in cats if c not in CATEGORY_LABELS]
    if not cats or bad:
        raise GoldError(f"--positive: expected categories from A, B, C, D separated by commas, got '{text}'")
    if len(set(cats)) == len(CATEGORY_LABELS):
        raise GoldError("--positive: naming all four categories leaves nothing to tell apart")
    return cats


def _is_positive(value: Any, positive_values: set[str]) -> bool:
    if isinstance(value, bool):
        return ("true" if value else "false") in positive_values
    return str(value).strip().lower() in positive_values


def load_gold(path: str, label: str, positive_values: Sequence[str] = ("true",), prompt_field: str = "prompt",
              response_field: str = "response", limit: int = 0) -> list[GoldRow]:
    from pipeline.data import DataError, read_rows

    try:
        rows = read_rows(path)
    except DataError as e:
        raise GoldError(str(e)) from None
    wanted = {v.strip().lower() for v in positive_values}
    out: list[GoldRow] = []
    seen_values: set[str] = set()
    for where, row in rows:
        if label not in row:
            raise GoldError(f"{where}: no field '{label}' (the --label field); fields here: {', '.join(sorted(row))}")
        if response_field not in row or not isinstance(row[response_field], str):
            raise GoldError(f"{where}: expected a text field '{response_field}' holding the response")
        prompt = row.get(prompt_field)
        if prompt is not None and not isinstance(prompt, str):
            raise GoldError(f"{where}: field '{prompt_field}' should be text, got {type(prompt).__name__}")
        seen_values.add(str(row[label]).strip().lower())
        out.append(GoldRow(where, prompt, row[response_field], _is_positive(row[label], wanted)))
        if limit and len(out) >= limit:
            break
    n_pos = sum(r.positive for r in out)
    if n_pos == 0 or n_pos == len(out):
        side = "positive" if n_pos == 0 else "negative"
        raise GoldError(f"{path}: no {side} rows for label '{label}' with positive values {sorted(wanted)} "
                        f"(values seen: {', '.join(sorted(seen_values)[:10])}); check --positive_value")
    return out


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width bins, and the bins for the diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        conf, acc = float(p[m].mean()), float(y[m].mean())
        ece += m.mean() * abs(conf - acc)
        table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(m.sum()),
                      "mean_predicted": round(conf, 4), "fraction_positive": round(acc, 4)})
    return float(ece), table


def f1_score(y: np.ndarray, guess: np.ndarray) -> float | None:
    """F1 of the positive side: harmonic mean of precision and recall (None with no positives at all)."""
    tp = int((y.astype(bool) & guess).sum())
    denom = int(guess.sum()) + int(y.sum())
    return 2 * tp / denom if denom else None


def best_threshold(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """The cut on ``p`` (call positive when ``p >= threshold``) with the highest agreement on
    this set, and that cut's agreement and F1. Chosen on the same rows it is scored on, so it is
    an upper bound on what a threshold fitted elsewhere would reach: it tells ranking from
    decision quality, not a setting to ship."""
    values = np.unique(p)
    # every distinct way to split the sorted scores: below the lowest, between neighbours, above the highest
    cuts = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-9]])
    best = None
    for cut in cuts:
        guess = p >= cut
        acc = float((guess == y.astype(bool)).mean())
        if best is None or acc > best[1]:
            best = (float(cut), acc, f1_score(y, guess))
    return {"threshold": round(best[0], 4), "accuracy": round(best[1], 4),
            "f1": None if best[2] is None else round(best[2], 4)}


def agreement(gold: Sequence[GoldRow], grades, positive: Sequence[str]) -> dict[str, Any]:
    scored = [(g_row, g) for g_row, g in zip(gold, grades) if g.scored]
    out: dict[str, Any] = {"rows": len(gold), "scored": len(scored), "not_scored": len(gold) - len(scored)}
    if not scored:
        return out
    y = np.array([r.positive for r, _ in scored], dtype=int)
    p = np.array([sum(g.probs[c] for c in positive) for _, g in scored])
    pred_pos = np.array([g.category in positive for _, g in scored])
    out["accuracy"] = round(float((pred_pos == y.astype(bool)).mean()), 4)
    out["roc_auc"] = round(roc_auc(y, p), 4) if 0 < y.sum() < len(y) else None
    f1 = f1_score(y, pred_pos)
    out["f1"] = None if f1 is None else round(f1, 4)
    out["best_threshold"] = best_threshold(y, p)
    out["base_rate"] = round(float(y.mean()), 4)
    sides = {}
    for name, truth, guess in (("positive", y == 1, pred_pos), ("negative", y == 0, ~pred_pos)):
        tp = int((truth & guess).sum())
        sides[name] = {"precision": round(tp / guess.sum(), 4) if guess.sum() else None,
                       "recall": round(tp / truth.sum(), 4) if truth.sum() else None,
                       "support": int(truth.sum())}
    out["per_side"] = sides
    cats = np.array([g.category for _, g in scored])
    out["confusion"] = {name: {c: int(((y == val) & (cats == c)).sum()) for c in CATEGORY_LABELS}
                        for name, val in (("positive", 1), ("negative", 0))}
    out["predicted_category_rates"] = {c: round(float((cats == c).mean()), 4) for c in CATEGORY_LABELS}
    ece, bins = calibration(y, p)
    out["calibration_error"] = round(ece, 4)
    out["reliability"] = bins
    return out


def reliability_diagram(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = result.get("reliability", [])
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if bins:
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(centres, [b["fraction_positive"] for b in bins], width=0.09, alpha=0.7, label="share labelled positive")
        ax.plot([b["mean_predicted"] for b in bins], [b["fraction_positive"] for b in bins], "o-", color="C3",
                label="mean predicted vs observed")
        hist.bar(centres, [b["n"] for b in bins], width=0.09, color="C7")
    ax.set_ylabel("share of rows labelled positive")
    ax.set_ylim(0, 1)
    auc = result.get("roc_auc")
    ax.set_title(f"{title}\nAUC {auc if auc is not None else 'n/a'}, ECE {result.get('calibration_error', math.nan)}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    hist.set_xlabel("grader's probability of the positive categories")
    hist.set_ylabel("rows")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, result: dict[str, Any], settings: dict[str, Any], gold: Sequence[GoldRow],
                  grades, positive: Sequence[str]) -> dict[str, Path]:
    """agreement.json, predictions.jsonl, reliability.png and grader_check.html (every row to read,
    misgraded ones first) in ``out_dir``; returns their paths."""
    from pipeline.evaluation import html_report

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "agreement.json", "predictions": out_dir / "predictions.jsonl",
             "reliability": out_dir / "reliability.png", "html": out_dir / "grader_check.html"}
    paths["json"].write_text(json.dumps({"settings": settings, "result": result}, indent=2) + "\n", encoding="utf-8")
    predictions = []
    for row, g in zip(gold, grades):
        score = sum(g.probs[c] for c in positive) if g.scored else None
        predictions.append({"where": row.where, "gold_positive": row.positive, "score": score} | g.to_dict())
    with open(paths["predictions"], "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    reliability_diagram(result, paths["reliability"], f"{Path(settings['gold']).name}: "
                        f"{settings['label']} vs P({'+'.join(positive)})")
    page_rows = [p | {"prompt": row.prompt, "response": row.response} for p, row in zip(predictions, gold)]
    html_report.write_grader_check_page(paths["html"], result, settings, page_rows,
                                        paths["reliability"] if result.get("scored") else None)
    return paths
