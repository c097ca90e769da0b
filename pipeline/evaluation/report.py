"""Evaluation reports: ``report.md`` with charts for one run, and a before/after comparison.

``write_report(run_dir, summary, meta)`` takes the dict from ``metrics.summarise`` and writes::

    report.json              {"meta": ..., "summary": ...}; what ``compare`` reads back
    report.md                settings, then per prompt set a class table and an overall table
    report.html              the same tables and charts, and every reply to read, filter and compare
                             (``html_report``; opens from disk)
    incorrect_behaviour.png  incorrect-behaviour rate per class and model, with 95% intervals
    category_mix.png         the A/B/C/D mix per model, one panel per (prompt set, class)

``compare(run_a, run_b)`` reads two runs' ``report.json`` and lists what changed from A to B
for every model, prompt set and class both hold, as lines such as
``harmful / disallowed content (C): 31.0% -> 5.6% (-25.4 pts, -82%)``. It writes
``compare.json``, ``compare.md``, ``compare.png`` (changes in points, green where B is better)
and ``compare.html`` (the changes, with links to both runs' report.html) into
``run_b/compare_<run_a name>`` unless told otherwise.

Every rate is a fraction in [0, 1] and is shown as a percentage with one decimal; a rate
with no scored responses behind it is ``None`` and is shown as ``n/a``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.rbrm.rubric import CATEGORY_LABELS as CATEGORIES
from pipeline.rbrm.rubric import PROMPT_CLASSES as CLASS_ORDER

REPORT_FILE = "report.json"
HTML_FILE = "report.html"
# short forms of rubric.CATEGORY_MEANING, for table headers and chart legends
CATEGORY_NAMES = {
    "A": "desired refusal",
    "B": "undesired refusal",
    "C": "disallowed content",
    "D": "safe non-refusal",
}
CATEGORY_COLOURS = {"A": "#2b8a3e", "B": "#f2a900", "C": "#c92a2a", "D": "#1c7ed6"}
"""Prompt classes are listed in this order; any other class follows, sorted by name."""

CLASS_METRICS = (
    *((f"category_rate.{c}", f"{CATEGORY_NAMES[c]} ({c})") for c in CATEGORIES),
    ("incorrect_behaviour_rate", "incorrect behaviour"),
    ("refusal_rate.grader", "refusal (grader)"),
    ("refusal_rate.string_match", "refusal (string match)"),
)
OVERALL_METRICS = (
    ("not_unsafe", "not unsafe"),
    ("not_overrefuse", "not overrefuse"),
    ("not_overrefuse_string_match", "not overrefuse (string match)"),
    ("f1", "F1"),
    ("refusal_f1.grader", "refusal F1 (grader)"),
    ("refusal_f1.string_match", "refusal F1 (string match)"),
)
XSTEST_METRICS = (
    ("n_safe", "n safe"),
    ("n_unsafe", "n unsafe"),
    ("over_refusal_string_match", "over-refusal (string match)"),
    ("full_refusal_string_match", "full refusal (string match)"),
    ("partial_refusal_string_match", "partial refusal (string match)"),
    ("over_refusal_grader", "over-refusal (grader)"),
    ("unsafe_compliance_string_match", "unsafe compliance (string match)"),
    ("unsafe_compliance_grader", "unsafe compliance (grader)"),
)
CHART_METRICS = {"category_rate.C", "incorrect_behaviour_rate", "refusal_rate.grader",
                 "not_unsafe", "not_overrefuse", "f1"}
"""The changes ``compare.png`` draws; the text lists every change."""

# +1: a higher rate is better, -1: a lower rate is better, 0: neither (drawn grey).
# Harmful prompts should be refused (A best); on sensitive and safe prompts the best reply is a
# safe answer (D), so any refusal there counts against the model, as in the shipped rubrics.
_HARMFUL = {"category_rate.A": 1, "category_rate.B": 0, "category_rate.C": -1, "category_rate.D": -1,
            "refusal_rate.grader": 1, "refusal_rate.string_match": 1}
_ANSWERABLE = {"category_rate.A": -1, "category_rate.B": -1, "category_rate.C": -1, "category_rate.D": 1,
               "refusal_rate.grader": -1, "refusal_rate.string_match": -1}
DIRECTION = {"harmful": _HARMFUL, "sensitive": _ANSWERABLE, "safe": _ANSWERABLE}
ALWAYS_DIRECTION = {"category_rate.C": -1, "incorrect_behaviour_rate": -1}
OVERALL_DIRECTION = {"not_unsafe": 1, "not_overrefuse": 1, "not_overrefuse_string_match": 1, "f1": 1,
                     "refusal_f1.grader": 1, "refusal_f1.string_match": 1,
                     **{f"xstest.{k}": -1 for k, _ in XSTEST_METRICS if not k.startswith("n_")}}


def direction(cls: str, metric: str) -> int:
    """+1 when a rise in ``metric`` for prompt class ``cls`` is an improvement, -1 when a fall is, else 0."""
    if cls == "overall":
        return OVERALL_DIRECTION.get(metric, 0)
    return ALWAYS_DIRECTION.get(metric, DIRECTION.get(cls, {}).get(metric, 0))


# ---------------------------------------------------------------------------------- formatting

def _value(x: Any) -> float | None:
    """The number in a rate ``{"value", "lo", "hi", "n"}`` or a bare number; None if absent."""
    if isinstance(x, dict):
        x = x.get("value")
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def _pct(x: Any) -> str:
    v = _value(x)
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ci(x: Any) -> str:
    """``12.5% [8.1, 17.0]``; the bracket is left out when the interval is missing."""
    v = _value(x)
    if v is None:
        return "n/a"
    lo, hi = (_value(x.get("lo")), _value(x.get("hi"))) if isinstance(x, dict) else (None, None)
    return f"{100 * v:.1f}%" + ("" if lo is None or hi is None else f" [{100 * lo:.1f}, {100 * hi:.1f}]")


def _kappa(x: Any) -> str:
    v = _value(x)
    if v is None:
        return "n/a"
    lo, hi = (_value(x.get("lo")), _value(x.get("hi"))) if isinstance(x, dict) else (None, None)
    return f"{v:.2f}" + ("" if lo is None or hi is None else f" [{lo:.2f}, {hi:.2f}]")


def _scalar(key: str, v: Any) -> str:
    if v is None or v == {} or v == []:
        return "(none)"
    if isinstance(v, float) and str(key).endswith("_s"):
        return f"{v:.1f} s"
    if isinstance(v, float):
        return str(round(v, 6))
    return str(v)


def _meta_lines(meta: dict, indent: int = 0) -> list[str]:
    """Meta keys rendered generically: scalars inline, mappings and lists as nested bullets."""
    pad = "  " * indent
    lines = []
    for key, v in meta.items():
        label = str(key).replace("_", " ")
        if isinstance(v, dict) and v:
            lines.append(f"{pad}- **{label}**:")
            lines += _meta_lines(v, indent + 1)
        elif isinstance(v, (list, tuple)) and any(isinstance(i, (dict, list, tuple)) for i in v):
            lines.append(f"{pad}- **{label}**:")
            lines += [f"{pad}  - {json.dumps(item, default=str)}" for item in v]
        elif isinstance(v, (list, tuple)) and v:
            lines.append(f"{pad}- **{label}**: " + ", ".join(_scalar(key, i) for i in v))
        else:
            lines.append(f"{pad}- **{label}**: {_scalar(key, v)}")
    return lines


def _class_key(name: str) -> tuple:
    return (CLASS_ORDER.index(name), "") if name in CLASS_ORDER else (len(CLASS_ORDER), name)


def lookup(d: Any, dotted: str) -> Any:
    """The value at a dotted path (``"classes.safe.refusal_rate.grader"``) of nested dicts; None if absent."""
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _models(summary: dict) -> dict:
    models = summary.get("models") if isinstance(summary, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError("the summary holds no models; expected {'models': {model: {prompt_set: {...}}}} "
                         "as metrics.summarise returns it")
    return models


def _prompt_sets(models: dict) -> list[str]:
    """Prompt sets in first-seen order across models."""
    return list(dict.fromkeys(name for per_set in models.values() for name in per_set))


def _block(models: dict, model: str, prompt_set: str) -> dict:
    return models[model].get(prompt_set) or {}


def _classes(models: dict, prompt_set: str) -> list[str]:
    names = {c for m in models for c in _block(models, m, prompt_set).get("classes", {})}
    return sorted(names, key=_class_key)


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table: the first ``text_columns`` columns left-aligned, the figures right-aligned."""
    align = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    return ["| " + " | ".join(header) + " |", align,
            *("| " + " | ".join(r) + " |" for r in rows)]


# ---------------------------------------------------------------------------------- one run

def _blocks(summary: dict) -> list[tuple]:
    """The report's body as blocks that both report.md and report.html render:
    ``("h2" | "h3" | "p", text)`` and ``("table", header, rows, text_columns)``."""
    models = _models(summary)
    settings = summary.get("settings") or {}
    level = f"{100 * settings['ci']:g}%" if isinstance(settings.get("ci"), (int, float)) else "95%"
    out: list[tuple] = []
    if settings.get("n_boot"):
        out.append(("p", f"Intervals: {level} percentile bootstrap, {settings['n_boot']} resamples, "
                         f"seed {settings.get('seed', 'n/a')}."))
    out.append(("p", "Categories: (A) desired refusal, (B) undesired refusal, (C) disallowed content, "
                     "(D) safe non-refusal. Category, incorrect-behaviour and grader refusal rates count graded "
                     "responses; string-match rates count every response."))
    for prompt_set in _prompt_sets(models):
        out += [("h2", f"Prompt set: {prompt_set}"), ("h3", "By prompt class")]
        rows = []
        for model in models:
            classes = _block(models, model, prompt_set).get("classes", {})
            for cls in sorted(classes, key=_class_key):
                c = classes[cls]
                rows.append([model, cls, str(c.get("n", "n/a")), str(c.get("n_scored", "n/a")),
                             *(_pct(lookup(c, f"category_rate.{x}")) for x in CATEGORIES),
                             _ci(c.get("incorrect_behaviour_rate")),
                             _pct(lookup(c, "refusal_rate.grader")), _pct(lookup(c, "refusal_rate.string_match"))])
        out.append(("table", ["model", "class", "n", "graded", "A", "B", "C", "D",
                              f"incorrect behaviour [{level} CI]", "refusal (grader)", "refusal (string match)"],
                    rows, 2))
        rows = []
        for model in models:
            o = _block(models, model, prompt_set).get("overall") or {}
            agreement = o.get("agreement") or {}
            rows.append([model, *(_ci(lookup(o, key)) for key, _ in OVERALL_METRICS),
                         _pct(agreement.get("raw")), _kappa(agreement.get("kappa")), str(agreement.get("n", "n/a"))])
        out += [("h3", "Overall"),
                ("table", ["model", *(label for _, label in OVERALL_METRICS),
                           "agreement grader vs string match (raw)", "kappa", "agreement n"], rows, 1),
                ("p", "not unsafe: harmful prompts without disallowed content (C); not overrefuse: safe prompts "
                      "the grader does not call a refusal (A/B); F1: their harmonic mean. Refusal F1: the harmonic "
                      "mean of harmful prompts refused and safe prompts not refused, by each classifier.")]
        xstest = {m: _block(models, m, prompt_set).get("overall", {}).get("xstest") for m in models}
        if any(xstest.values()):
            rows = [[model, *(str(x.get(k, "n/a")) if k.startswith("n_") else _ci(x.get(k))
                              for k, _ in XSTEST_METRICS)]
                    for model, x in xstest.items() if x]
            out += [("h3", "XSTest"), ("table", ["model", *(label for _, label in XSTEST_METRICS)], rows, 1)]
    return out


def _markdown(summary: dict, meta: dict, charts: dict[str, Path]) -> str:
    out = ["# Refusal-rate evaluation", ""]
    out += _meta_lines(meta or {}) + [""]
    for block in _blocks(summary):
        kind = block[0]
        if kind == "table":
            out += _table(block[1], block[2], block[3]) + [""]
        else:
            out += [{"h2": "## ", "h3": "### ", "p": ""}[kind] + block[1], ""]
    out += ["## Charts", ""]
    for title, path in charts.items():
        out += [f"![{title}]({path.name})", ""]
    return "\n".join(out)


def _html_body(summary: dict, meta: dict) -> str:
    from pipeline.evaluation import html_report as h

    out = ["<h2>Settings</h2>", h.table(["key", "value"], [(str(k).replace("_", " "), _scalar(k, v) if not isinstance(
        v, (dict, list, tuple)) else json.dumps(v, default=str)) for k, v in (meta or {}).items()], numeric_from=99)]
    for block in _blocks(summary):
        kind = block[0]
        if kind == "table":
            out.append(h.table(block[1], block[2], block[3]))
        else:
            out.append(f"<{kind}>{h.esc(block[1])}</{kind}>")
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_incorrect_behaviour(models: dict, path: Path) -> None:
    import numpy as np

    plt = _pyplot()
    sets, names = _prompt_sets(models), list(models)
    widths = [max(1, len(_classes(models, s))) for s in sets]
    legend_w = 0.8 + 0.075 * max(len(n) for n in names)  # inches kept free on the right for the legend
    width = max(6.0, legend_w + 0.6 + sum(1.0 + w * (0.4 + 0.45 * len(names)) for w in widths))
    fig, axes = plt.subplots(1, len(sets), figsize=(width, 4.6), squeeze=False, sharey=True,
                             gridspec_kw={"width_ratios": widths})
    colours = plt.get_cmap("tab10")
    bar_w = 0.8 / len(names)
    for ax, prompt_set in zip(axes[0], sets):
        classes = _classes(models, prompt_set)
        x = np.arange(len(classes))
        for i, model in enumerate(names):
            rows = _block(models, model, prompt_set).get("classes", {})
            vals, err = [], [[], []]
            for cls in classes:
                rate = (rows.get(cls) or {}).get("incorrect_behaviour_rate")
                v = _value(rate)
                lo, hi = (_value(rate.get("lo")), _value(rate.get("hi"))) if isinstance(rate, dict) else (None, None)
                vals.append(np.nan if v is None else 100 * v)
                err[0].append(0.0 if v is None or lo is None else max(0.0, 100 * (v - lo)))
                err[1].append(0.0 if v is None or hi is None else max(0.0, 100 * (hi - v)))
            bars = ax.bar(x - 0.4 + bar_w * (i + 0.5), vals, bar_w, yerr=err, capsize=3, color=colours(i % 10),
                          label=model, edgecolor="white", linewidth=0.5)
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in vals], padding=2, fontsize=7)
            for xi, v in zip(x - 0.4 + bar_w * (i + 0.5), vals):
                if np.isnan(v):  # no graded responses: say so rather than draw a zero
                    ax.text(xi, 1, "n/a", ha="center", va="bottom", fontsize=7, color="#555555")
        ax.set_xticks(x, classes)
        ax.set_xlim(-0.5, len(classes) - 0.5)  # autoscaling skips missing (NaN) bars
        ax.set_title(f"prompt set: {prompt_set}")
        ax.set_xlabel("prompt class")
        ax.set_ylim(0, 108)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0][0].set_ylabel("incorrect behaviour (% of graded)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="model", loc="center right", fontsize=8)
    fig.suptitle("Incorrect-behaviour rate by prompt class (error bars: 95% interval)")
    fig.tight_layout(rect=(0, 0, 1 - legend_w / width, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_category_mix(models: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(models)
    sets = _prompt_sets(models)
    panels = [(s, c) for s in sets for c in _classes(models, s)] or [(s, None) for s in sets]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    width, height = max(7.5, 0.8 + ncols * (1.6 + 0.7 * len(names))), 1.2 + 3.6 * nrows
    if ncols == 1:
        width = max(5.0, 0.8 + 1.6 + 0.7 * len(names))
    legend_cols = 4 if width >= 7.5 else 2
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, sharey=True)
    tilt = len(names) > 2 or max(len(n) for n in names) > 10
    for ax, (prompt_set, cls) in zip(axes.flat, panels):
        bottom = [0.0] * len(names)
        for cat in CATEGORIES:
            heights = []
            for model in names:
                v = _value(lookup(_block(models, model, prompt_set).get("classes", {}), f"{cls}.category_rate.{cat}"))
                heights.append(0.0 if v is None else 100 * v)
            ax.bar(range(len(names)), heights, 0.65, bottom=bottom, color=CATEGORY_COLOURS[cat],
                   label=f"({cat}) {CATEGORY_NAMES[cat]}", edgecolor="white", linewidth=0.5)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(names)), names, rotation=25 if tilt else 0, ha="right" if tilt else "center")
        ax.set_title(f"{prompt_set} / {cls}" if cls else prompt_set, fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for row in axes:
        row[0].set_ylabel("share of graded responses (%)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, title="category", loc="lower center", ncol=legend_cols, fontsize=8)
    fig.suptitle("Response categories per model (panels: prompt set / prompt class)")
    fig.tight_layout(rect=(0, (0.75 if legend_cols == 4 else 0.95) / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, summary: dict, meta: dict, records: list[dict] | None = None) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the two charts into ``run_dir``; return their paths by kind.

    ``records``: the replies behind the summary (``responses.jsonl``'s rows) for report.html's
    reply table; by default read from ``run_dir/responses.jsonl`` when it exists.
    """
    from pipeline.evaluation import html_report

    run_dir = Path(run_dir)
    models = _models(summary)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": run_dir / REPORT_FILE,
        "markdown": run_dir / "report.md",
        "html": run_dir / HTML_FILE,
        "incorrect_behaviour": run_dir / "incorrect_behaviour.png",
        "category_mix": run_dir / "category_mix.png",
    }
    paths["json"].write_text(json.dumps({"meta": meta, "summary": summary}, indent=2, default=str) + "\n",
                             encoding="utf-8")
    _plot_incorrect_behaviour(models, paths["incorrect_behaviour"])
    _plot_category_mix(models, paths["category_mix"])
    charts = {"Incorrect-behaviour rate by prompt class": paths["incorrect_behaviour"],
              "Response categories per model": paths["category_mix"]}
    paths["markdown"].write_text(_markdown(summary, meta, charts), encoding="utf-8")
    if records is None:
        responses = run_dir / "responses.jsonl"
        records = ([json.loads(line) for line in responses.read_text(encoding="utf-8").splitlines() if line.strip()]
                   if responses.is_file() else [])
    html_report.write_evaluation_page(paths["html"], _html_body(summary, meta), records, charts,
                                      subtitle=f"{run_dir}: {len(records)} replies")
    return paths


# ---------------------------------------------------------------------------------- comparison

def _read_report(run: Path) -> dict:
    path = Path(run) / REPORT_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found; expected the {REPORT_FILE} of a finished evaluation run "
                         "(python -m pipeline.evaluate writes it)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    try:
        _models(report.get("summary") if isinstance(report, dict) else None)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return report


def format_change(label: str, a: float, b: float, relative: float | None) -> str:
    """``harmful / disallowed content (C): 31.0% -> 5.6% (-25.4 pts, -82%)``; no percentage when A is 0."""
    pts = f"{round(100 * (b - a), 1) + 0.0:+.1f} pts"
    rel = "" if relative is None else f", {round(100 * relative) + 0:+d}%"
    return f"{label}: {_pct(a)} -> {_pct(b)} ({pts}{rel})"


def _model_pairs(models_a: dict, models_b: dict) -> list[tuple[str, str]]:
    """Same-named models; failing that, the only model of each run."""
    shared = [m for m in models_a if m in models_b]
    if shared:
        return [(m, m) for m in shared]
    if len(models_a) == 1 and len(models_b) == 1:
        return [(next(iter(models_a)), next(iter(models_b)))]
    return []


def _flatten(mirror: dict, prefix: str = "") -> dict[str, dict]:
    """``{"refusal_rate": {"grader": {a, b, abs, rel}}}`` -> ``{"refusal_rate.grader": {...}}``."""
    out = {}
    for key, v in mirror.items():
        name = f"{prefix}{key}"
        if isinstance(v, dict) and "abs" in v and "a" in v:
            out[name] = v
        elif isinstance(v, dict):
            out.update(_flatten(v, name + "."))
    return out


_LABELS = {**dict(CLASS_METRICS), **dict(OVERALL_METRICS),
           **{f"xstest.{k}": f"XSTest {label}" for k, label in XSTEST_METRICS}}


def _rows(model_a: str, model_b: str, prompt_set: str, cls: str, mirror: dict, order: list[str]) -> list[dict]:
    """One row per figure named in ``order`` that both runs have a value for (the report's figures)."""
    flat = _flatten(mirror)
    rows = []
    for metric in (m for m in order if m in flat):
        d = flat[metric]
        if d["abs"] is None:
            continue  # a rate with no rows in one of the runs
        label = f"{cls} / {_LABELS[metric]}"
        sign = direction(cls, metric)
        better = None if sign == 0 or d["abs"] == 0 else (d["abs"] > 0) == (sign > 0)
        rows.append({"model_a": model_a, "model_b": model_b, "prompt_set": prompt_set, "class": cls,
                     "metric": metric, "label": label, "a": d["a"], "b": d["b"],
                     "delta_pts": round(100 * d["abs"], 2) + 0.0,
                     "relative_pct": None if d["rel"] is None else round(100 * d["rel"], 2) + 0.0,
                     "better": better, "line": format_change(label, d["a"], d["b"], d["rel"])})
    return rows


def compare_summaries(summary_a: dict, summary_b: dict) -> tuple[list[tuple[str, str]], list[dict]]:
    """(model pairs compared, one row per figure) over the prompt sets and classes both summaries hold.

    The differences come from ``metrics.deltas`` (b - a, and relative to a); this adds the model
    pairing, labels, the better / worse verdict and the printed line.
    """
    from pipeline.evaluation import metrics

    pairs = _model_pairs(_models(summary_a), _models(summary_b))
    class_order = [m for m, _ in CLASS_METRICS]
    overall_order = [m for m, _ in OVERALL_METRICS] + [f"xstest.{k}" for k, _ in XSTEST_METRICS]
    rows = []
    for model_a, model_b in pairs:
        d = metrics.deltas(summary_a, summary_b, model_a=model_a, model_b=model_b)
        for prompt_set, block in d["prompt_sets"].items():
            for cls in sorted(block.get("classes") or {}, key=_class_key):
                rows += _rows(model_a, model_b, prompt_set, cls, block["classes"][cls], class_order)
            rows += _rows(model_a, model_b, prompt_set, "overall", block.get("overall") or {}, overall_order)
    return pairs, rows


def _pair_title(model_a: str, model_b: str) -> str:
    return model_a if model_a == model_b else f"{model_a} -> {model_b}"


def _grouped(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for d in rows:
        groups.setdefault((d["model_a"], d["model_b"], d["prompt_set"]), []).append(d)
    return groups


def _compare_markdown(result: dict) -> str:
    out = ["# Evaluation comparison", "", f"- **A** (before): {result['run_a']}",
           f"- **B** (after): {result['run_b']}", "",
           "Changes from A to B in percentage points, and relative to A (left out where A is 0).", ""]
    marks = {True: "better", False: "worse", None: ""}
    for (model_a, model_b, prompt_set), rows in _grouped(result["deltas"]).items():
        out += [f"## {_pair_title(model_a, model_b)} / {prompt_set}", ""]
        out += _table(["class", "figure", "A", "B", "change (pts)", "relative", "verdict"],
                      [[d["class"], d["label"].split(" / ", 1)[1], _pct(d["a"]), _pct(d["b"]),
                        f"{round(d['delta_pts'], 1) + 0.0:+.1f}",
                        "n/a" if d["relative_pct"] is None else f"{round(d['relative_pct']) + 0:+d}%",
                        marks[d["better"]]] for d in rows], 2)
        out.append("")
    out += ["![changes in points](compare.png)", ""]
    return "\n".join(out)


def _plot_compare(result: dict, path: Path) -> None:
    from matplotlib.patches import Patch

    plt = _pyplot()
    rows = [d for d in result["deltas"] if d["metric"] in CHART_METRICS]
    several = len(_grouped(rows)) > 1
    labels = [(f"{_pair_title(d['model_a'], d['model_b'])} · {d['prompt_set']} · " if several else "") + d["label"]
              for d in rows]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.32 * max(1, len(rows))))
    colour = {True: "#2b8a3e", False: "#c92a2a", None: "#868e96"}
    if rows:
        y = list(range(len(rows)))[::-1]
        values = [d["delta_pts"] for d in rows]
        ax.barh(y, values, color=[colour[d["better"]] for d in rows], height=0.7)
        ax.set_yticks(y, labels, fontsize=8)
        span = max(1.0, max(abs(v) for v in values))
        ax.set_xlim(-1.3 * span, 1.3 * span)
        for yi, v in zip(y, values):
            ax.text(v + 0.02 * span * (1 if v >= 0 else -1), yi, f"{v:+.1f}", va="center",
                    ha="left" if v >= 0 else "right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no charted figures in common", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_xlabel("change from A to B (percentage points)")
    ax.legend(handles=[Patch(color=colour[True], label="better"), Patch(color=colour[False], label="worse"),
                       Patch(color=colour[None], label="unchanged / no direction")], loc="best", fontsize=8)
    ax.set_title(f"A: {Path(result['run_a']).name}  ->  B: {Path(result['run_b']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(run_a: Path, run_b: Path, out_dir: Path | None = None) -> dict:
    """Compare two evaluation runs; write compare.json / .md / .png into ``out_dir``; return the result.

    Model M in A is compared with model M in B; when the runs share no model name but each
    holds exactly one model, those two are compared. Raises ValueError naming the file when a
    run has no report.json, and when the runs share no model, prompt set and class with figures.
    """
    run_a, run_b = Path(run_a), Path(run_b)
    report_a, report_b = _read_report(run_a), _read_report(run_b)
    pairs, rows = compare_summaries(report_a["summary"], report_b["summary"])
    if not rows:
        names_a, names_b = list(_models(report_a["summary"])), list(_models(report_b["summary"]))
        raise ValueError(
            f"{run_a / REPORT_FILE} and {run_b / REPORT_FILE} share nothing to compare (models {names_a} "
            f"vs {names_b}): they need a model of the same name, or one model each, with a prompt set "
            "and figures in both")
    out_dir = Path(out_dir) if out_dir is not None else run_b / f"compare_{run_a.resolve().name}"
    return _write_compare(str(run_a), str(run_b), pairs, rows, out_dir,
                          {f"A ({run_a})": run_a / HTML_FILE, f"B ({run_b})": run_b / HTML_FILE})


def compare_models(run: Path, model_a: str, model_b: str, out_dir: Path | None = None) -> dict:
    """Compare two models of one evaluation run (``base`` against ``ppo``), written like ``compare``
    into ``out_dir`` (default ``<run>/compare_<a>_<b>``). Raises ValueError naming a missing model."""
    run = Path(run)
    summary = _read_report(run)["summary"]
    models = _models(summary)
    for name in (model_a, model_b):
        if name not in models:
            raise ValueError(f"{run / REPORT_FILE}: no model '{name}'; it holds {', '.join(models)}")
    pairs, rows = compare_summaries({**summary, "models": {model_a: models[model_a]}},
                                    {**summary, "models": {model_b: models[model_b]}})
    out_dir = Path(out_dir) if out_dir is not None else run / f"compare_{model_a}_{model_b}"
    return _write_compare(f"{run}:{model_a}", f"{run}:{model_b}", pairs, rows, out_dir, {str(run): run / HTML_FILE})


def _write_compare(name_a: str, name_b: str, pairs: list, rows: list[dict], out_dir: Path,
                   pages: dict[str, Path]) -> dict:
    from pipeline.evaluation import html_report

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "compare.json", "markdown": out_dir / "compare.md", "chart": out_dir / "compare.png",
             "html": out_dir / "compare.html"}
    result = {"run_a": name_a, "run_b": name_b,
              "pairs": [{"model_a": a, "model_b": b} for a, b in pairs],
              "deltas": rows, "files": {k: str(p) for k, p in files.items()}}
    files["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    files["markdown"].write_text(_compare_markdown(result), encoding="utf-8")
    _plot_compare(result, files["chart"])
    html_report.write_compare_page(files["html"], result, pages)
    return result


def compare_lines(result: dict) -> list[str]:
    """The comparison as text: a heading per (model, prompt set), then one line per figure."""
    lines = [f"A: {result['run_a']}", f"B: {result['run_b']}"]
    for (model_a, model_b, prompt_set), rows in _grouped(result["deltas"]).items():
        lines += ["", f"{_pair_title(model_a, model_b)} / {prompt_set}"]
        lines += [f"  {d['line']}" for d in rows]
    if result.get("files"):
        lines += ["", f"written to {Path(result['files']['json']).parent}"]
    return lines


def print_compare(result: dict) -> None:
    """Print ``compare_lines(result)``: what ``rbrm evaluate compare RUN_A RUN_B`` shows."""
    print("\n".join(compare_lines(result)))
