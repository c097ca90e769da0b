"""Self-contained HTML pages for reading every reply: ``report.html`` and ``grader_check.html``.

One file each, opened from disk with no server and no network: CSS and JavaScript inline,
charts as embedded PNGs. The rows travel as one JSON blob inside a
``<script type="application/json">`` element and are rendered on demand (a page of rows at a
time), so a run with 10,000 replies opens and filters quickly.

Replies and prompts are untrusted text. Two rules keep them text:

- in Python, every string placed in HTML goes through ``html.escape``, and the JSON blob has
  ``<``, ``>`` and ``&`` written as ``\\u003c``/``\\u003e``/``\\u0026`` (``script_json``), so no
  reply can close the script element it travels in;
- in the page, rows are built with ``textContent``, never ``innerHTML``.

The filters live in the address's ``#`` part (``report.html#model=ppo&class=safe&q=bomb``),
so a view can be bookmarked or sent to a colleague.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.evaluation.refusal_match import COMPLIANCE

PAGE_ROWS = 200
"""Rows rendered at a time; "show more" renders the next page."""

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1400px;padding:0 16px 48px;
color:#1d2329}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;margin:26px 0 8px;border-bottom:1px solid #dde1e5}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#5b646d;font-size:12px}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #dde1e5;padding:3px 7px;vertical-align:top}
th{background:#f3f5f7;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
img.chart{max-width:100%;border:1px solid #dde1e5;margin:6px 0}
#controls{display:flex;flex-wrap:wrap;gap:8px 14px;align-items:center;position:sticky;top:0;background:#fff;
padding:8px 0;border-bottom:1px solid #dde1e5;z-index:1}
#controls label{font-size:12px;color:#5b646d}#controls select,#controls input{font-size:13px}
#rows td.text{white-space:pre-wrap;max-width:520px;overflow-wrap:anywhere}
#rows tr.flag td{background:#fff4e6}.cat{font-weight:600;padding:0 4px;border-radius:3px;color:#fff}
.cat-A{background:#2b8a3e}.cat-B{background:#b07d00}.cat-C{background:#c92a2a}.cat-D{background:#1c7ed6}
.cat-none{background:#868e96}.probs{color:#5b646d;font-size:11px}button{font-size:13px}
#side{border:1px solid #dde1e5;padding:8px 12px;margin:10px 0;background:#fafbfc}
#side .reply{white-space:pre-wrap;overflow-wrap:anywhere;border-left:3px solid #dde1e5;padding-left:8px}
"""

# The explorer: reads the blob, builds the filters it names, renders the matching rows a page
# at a time with textContent only, and keeps the filter state in location.hash.
_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('data').textContent);
const cols = D.columns, rows = D.rows, filters = D.filters, pageRows = D.page_rows;
const ctl = document.getElementById('controls'), body = document.querySelector('#rows tbody');
const count = document.getElementById('count'), more = document.getElementById('more');
const state = {}; let matches = [], shown = 0;
function readHash(){
  const p = new URLSearchParams(location.hash.slice(1));
  for (const f of filters) state[f.key] = p.get(f.key) || '';
  state.q = p.get('q') || ''; state.show = p.get('show') || '';
}
function writeHash(){
  const p = new URLSearchParams();
  for (const k in state) if (state[k]) p.set(k, state[k]);
  history.replaceState(null, '', '#' + p.toString());
}
function el(tag, text, cls){ const e = document.createElement(tag); if (text !== undefined && text !== null) e.textContent = String(text); if (cls) e.className = cls; return e; }
function build(){
  for (const f of filters){
    const lab = el('label', f.label + ' ');
    let input;
    if (f.kind === 'flag'){
      input = el('input'); input.type = 'checkbox'; input.checked = state[f.key] === '1';
      input.addEventListener('change', () => { state[f.key] = input.checked ? '1' : ''; update(); });
    } else {
      input = el('select'); input.appendChild(el('option', 'all')).value = '';
      for (const v of f.values){ const o = el('option', v); o.value = v; input.appendChild(o); }
      input.value = state[f.key];
      input.addEventListener('change', () => { state[f.key] = input.value; update(); });
    }
    input.id = 'f-' + f.key; lab.appendChild(input); ctl.appendChild(lab);
  }
  const lab = el('label', 'search '), q = el('input'); q.type = 'search'; q.id = 'f-q'; q.value = state.q;
  q.placeholder = 'prompt or reply text'; q.addEventListener('input', () => { state.q = q.value; update(); });
  lab.appendChild(q); ctl.appendChild(lab); ctl.appendChild(count);
  const head = document.querySelector('#rows thead tr');
  for (const c of cols) head.appendChild(el('th', c.label));
  more.addEventListener('click', render);
}
function keep(r){
  for (const f of filters){
    const want = state[f.key]; if (!want) continue;
    if (f.kind === 'flag'){ if (!r[f.field]) return false; }
    else if (String(r[f.field]) !== want) return false;
  }
  if (state.q){
    const q = state.q.toLowerCase(); let hit = false;
    for (const c of D.search) if (String(r[c] || '').toLowerCase().includes(q)){ hit = true; break; }
    if (!hit) return false;
  }
  return true;
}
function cell(r, c){
  const td = el('td'); const v = r[c.field];
  if (c.kind === 'category'){
    td.appendChild(el('span', v || 'none', 'cat cat-' + (v || 'none')));
    if (c.probs && r[c.probs]){ td.appendChild(el('br')); td.appendChild(el('span', r[c.probs], 'probs')); }
  } else if (c.kind === 'group'){
    const b = el('button', 'side by side'); b.title = 'every model\u2019s reply to this prompt';
    b.addEventListener('click', () => { state.show = r[c.field]; update(); window.scrollTo(0, document.getElementById('side').offsetTop); });
    td.appendChild(b);
  } else { td.textContent = v === null || v === undefined ? '' : String(v); if (c.kind === 'text') td.className = 'text'; if (c.kind === 'num') td.className = 'num'; }
  return td;
}
function render(){
  const stop = Math.min(matches.length, shown + pageRows);
  for (let i = shown; i < stop; i++){
    const r = matches[i], tr = el('tr'); if (D.flag && r[D.flag]) tr.className = 'flag';
    for (const c of cols) tr.appendChild(cell(r, c));
    body.appendChild(tr);
  }
  shown = stop;
  more.hidden = shown >= matches.length;
  more.textContent = 'show ' + Math.min(pageRows, matches.length - shown) + ' more';
  document.body.dataset.rendered = String(shown);
}
function side(){
  const box = document.getElementById('side'); if (!box) return;
  box.replaceChildren();
  if (!state.show){ box.hidden = true; return; }
  const same = rows.filter(r => r[D.group.field] === state.show);
  box.hidden = false;
  const close = el('button', 'close'); close.addEventListener('click', () => { state.show = ''; update(); });
  box.appendChild(close);
  if (!same.length){ box.appendChild(el('p', 'no rows for ' + state.show)); return; }
  box.appendChild(el('h3', same[0][D.group.title]));
  for (const r of same){
    const d = el('div'); d.className = 'side-reply';
    const h = el('p'); h.appendChild(el('b', r[D.group.label] + ' ')); h.appendChild(el('span', r.category || 'none', 'cat cat-' + (r.category || 'none')));
    h.appendChild(el('span', ' string match: ' + r.string_match, 'probs'));
    d.appendChild(h); d.appendChild(el('div', r[D.group.text], 'reply')); box.appendChild(d);
  }
}
function update(){
  writeHash();
  matches = rows.filter(keep); shown = 0; body.replaceChildren();
  count.textContent = matches.length + ' of ' + rows.length + ' rows';
  document.body.dataset.matches = String(matches.length);
  render(); side();
}
readHash(); build(); update();
window.addEventListener('hashchange', () => { readHash(); for (const f of filters){ const i = document.getElementById('f-' + f.key); if (f.kind === 'flag') i.checked = state[f.key] === '1'; else i.value = state[f.key]; } document.getElementById('f-q').value = state.q; update(); });
document.body.dataset.ready = '1';
document.body.dataset.ms = String(Math.round(performance.now()));  // since navigation began; read by benchmarks
})();
"""


def _plain(x: Any) -> Any:
    """``x`` with NaN and infinities as None: JSON.parse rejects them."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def script_json(data: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` survives literally."""
    text = json.dumps(_plain(data), ensure_ascii=False, separators=(",", ":"), default=str)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> str:
    """An HTML table; every cell is escaped, and cells from column ``numeric_from`` on align right."""
    out = ["<table><thead><tr>", *(f"<th>{esc(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="num">{esc(v)}</td>' if i >= numeric_from else f"<td>{esc(v)}</td>"
                                    for i, v in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def png(path: Path, alt: str) -> str:
    """An ``<img>`` holding the PNG itself (base64), so the page needs no file beside it."""
    path = Path(path)
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="chart" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def page(title: str, summary_html: str, explorer: dict | None = None, subtitle: str = "") -> str:
    """A whole page: the summary sections, then (when given) the row explorer over ``explorer``'s rows.

    ``explorer``: {"columns": [{"field", "label", "kind"?: text|num|category|group, "probs"?}],
    "filters": [{"key", "label", "field", "kind": select|flag, "values"?}], "rows": [dict],
    "search": [fields], "flag"?: field marking rows to highlight, "group"?: {"field", "title",
    "label", "text"} for the side-by-side panel, "title"?: the section's heading}.
    """
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="meta">{esc(subtitle)}</p>')
    if explorer is not None:  # a button, not a #link: the address's fragment holds the filters
        parts.append('<p><button onclick="document.getElementById(\'replies\').scrollIntoView()">'
                     f'{esc(explorer.get("title", "Every reply")).lower()} ({len(explorer["rows"])})</button></p>')
    parts.append(summary_html)
    if explorer is not None:
        blob = {"page_rows": PAGE_ROWS, "flag": None, "group": None, **explorer}
        parts += [f'<h2 id="replies">{esc(explorer.get("title", "Every reply"))}</h2>', '<div id="controls"><span id="count"></span></div>',
                  '<div id="side" hidden></div>',
                  '<table id="rows"><thead><tr></tr></thead><tbody></tbody></table>',
                  '<button id="more" hidden>show more</button>',
                  f'<script type="application/json" id="data">{script_json(blob)}</script>',
                  f"<script>{_JS}</script>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def _probs_text(probs: dict | None) -> str:
    if not probs:
        return ""
    return " ".join(f"{c} {p:.2f}" for c, p in sorted(probs.items()))


# ------------------------------------------------------------------------------- evaluation page

def evaluation_rows(records: Sequence[dict]) -> list[dict]:
    """One explorer row per reply of ``responses.jsonl``; ``disagree`` marks a grader refusal
    (A/B) that the string match calls compliance, or the other way round (scored rows only)."""
    out = []
    for r in records:
        category = r.get("rbrm_category")
        grader_refusal = category in ("A", "B") if category else None
        match_refusal = r.get("string_match") != COMPLIANCE
        out.append({
            "model": r.get("model"), "prompt_set": r.get("prompt_set"), "prompt_class": r.get("prompt_class"),
            "id": r.get("id"), "group": f"{r.get('prompt_set')}/{r.get('id')}",
            "prompt": r.get("prompt"), "response": r.get("response"), "category": category,
            "probs": _probs_text(r.get("rbrm_probs")), "string_match": r.get("string_match"),
            "judge": r.get("judge_label"), "dataset_label": r.get("xstest_label"),
            "disagree": grader_refusal is not None and grader_refusal != match_refusal,
        })
    return out


def evaluation_explorer(records: Sequence[dict]) -> dict:
    rows = evaluation_rows(records)

    def values(field: str) -> list[str]:
        return sorted({str(r[field]) for r in rows if r[field] is not None})

    columns = [{"field": "model", "label": "model"}, {"field": "prompt_set", "label": "prompt set"},
               {"field": "prompt_class", "label": "class"}, {"field": "prompt", "label": "prompt", "kind": "text"},
               {"field": "response", "label": "reply", "kind": "text"},
               {"field": "category", "label": "grader", "kind": "category", "probs": "probs"},
               {"field": "string_match", "label": "string match"}]
    if any(r["judge"] is not None for r in rows):
        columns.append({"field": "judge", "label": "judge"})
    if any(r["dataset_label"] is not None for r in rows):
        columns.append({"field": "dataset_label", "label": "dataset label"})
    columns.append({"field": "group", "label": "compare", "kind": "group"})
    filters = [{"key": "model", "label": "model", "field": "model", "kind": "select", "values": values("model")},
               {"key": "set", "label": "prompt set", "field": "prompt_set", "kind": "select",
                "values": values("prompt_set")},
               {"key": "class", "label": "class", "field": "prompt_class", "kind": "select",
                "values": values("prompt_class")},
               {"key": "category", "label": "grader category", "field": "category", "kind": "select",
                "values": values("category")},
               {"key": "disagree", "label": "grader and string match disagree", "field": "disagree",
                "kind": "flag"}]
    return {"columns": columns, "filters": filters, "rows": rows, "search": ["prompt", "response"],
            "flag": "disagree", "group": {"field": "group", "title": "prompt", "label": "model", "text": "response"}}


def write_evaluation_page(path: Path, summary_html: str, records: Sequence[dict], charts: dict[str, Path],
                          subtitle: str = "") -> Path:
    """``report.html``: the summary tables (already HTML), the charts, and every reply in ``records``."""
    parts = [summary_html]
    if charts:
        parts.append("<h2>Charts</h2>")
        parts += [f"<h3>{esc(title)}</h3>{png(p, title)}" for title, p in charts.items()]
    path = Path(path)
    path.write_text(page("Refusal-rate evaluation", "\n".join(parts), evaluation_explorer(records), subtitle),
                    encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ grader check page

def grader_check_rows(predictions: Sequence[dict], positive: Sequence[str]) -> list[dict]:
    """Explorer rows for ``rubrics eval``'s predictions, misgraded rows first."""
    rows = []
    for p in predictions:
        category = p.get("category")
        scored = bool(p.get("scored", category is not None))
        predicted_positive = category in positive if scored else None
        misgraded = scored and predicted_positive != bool(p.get("gold_positive"))
        rows.append({"where": p.get("where"), "prompt": p.get("prompt"), "response": p.get("response"),
                     "gold": "positive" if p.get("gold_positive") else "negative", "category": category,
                     "probs": _probs_text(p.get("probs")),
                     "score": None if p.get("score") is None else round(float(p["score"]), 3),
                     "misgraded": bool(misgraded), "error": p.get("error")})
    rows.sort(key=lambda r: not r["misgraded"])
    return rows


def write_grader_check_page(path: Path, result: dict, settings: dict, predictions: Sequence[dict],
                            reliability_png: Path | None) -> Path:
    """``grader_check.html`` for ``rubrics eval``: agreement figures, confusion, reliability, rows."""
    positive = list(settings.get("positive") or [])
    figures = [(k, result.get(k)) for k in ("rows", "scored", "accuracy", "roc_auc", "calibration_error",
                                            "base_rate", "rows_per_second")]
    sections = ["<h2>Agreement</h2>", table(["figure", "value"], [(k, "n/a" if v is None else v) for k, v in figures])]
    if result.get("per_side"):
        sections.append(table(["label side", "precision", "recall", "support"],
                              [(side, m.get("precision"), m.get("recall"), m.get("support"))
                               for side, m in result["per_side"].items()]))
    if result.get("confusion"):
        cats = sorted(next(iter(result["confusion"].values())))
        sections += ["<h2>Confusion (label x grader category)</h2>",
                     table(["label", *cats], [(side, *(row[c] for c in cats))
                                              for side, row in result["confusion"].items()])]
    if reliability_png is not None:
        sections += ["<h2>Reliability</h2>", png(reliability_png, "reliability diagram")]
    sections += ["<h2>Settings</h2>", table(["key", "value"], sorted((k, json.dumps(v) if isinstance(v, (list, dict))
                                                                      else v) for k, v in settings.items()))]
    rows = grader_check_rows(predictions, positive)
    explorer = {
        "columns": [{"field": "where", "label": "row"}, {"field": "gold", "label": "label"},
                    {"field": "category", "label": "grader", "kind": "category", "probs": "probs"},
                    {"field": "score", "label": f"P({'+'.join(positive)})", "kind": "num"},
                    {"field": "prompt", "label": "prompt", "kind": "text"},
                    {"field": "response", "label": "reply", "kind": "text"}],
        "filters": [{"key": "label", "label": "label", "field": "gold", "kind": "select",
                     "values": ["negative", "positive"]},
                    {"key": "category", "label": "grader category", "field": "category", "kind": "select",
                     "values": sorted({r["category"] for r in rows if r["category"]})},
                    {"key": "misgraded", "label": "misgraded only", "field": "misgraded", "kind": "flag"}],
        "rows": rows, "search": ["prompt", "response", "where"], "flag": "misgraded",
        "title": "Every row, misgraded first"}
    subtitle = (f"{settings.get('gold')}: label {settings.get('label')} against P({'+'.join(positive)}); "
                f"rubric {settings.get('rubric_id')}; grader {settings.get('grader')}. Misgraded rows come first.")
    path = Path(path)
    path.write_text(page("Grader check", "\n".join(sections), explorer, subtitle), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- compare page

def write_compare_page(path: Path, result: dict, pages: dict[str, Path | None]) -> Path:
    """``compare.html``: links to both runs' pages (relative to ``path``), then every change."""
    path = Path(path)
    links = []
    for name, target in pages.items():
        if target is not None and Path(target).is_file():
            rel = _relative(Path(target), path.parent)
            links.append(f'<li>{esc(name)}: <a href="{esc(rel)}">{esc(rel)}</a></li>')
        else:
            links.append(f"<li>{esc(name)}: no report.html (an older run; re-run evaluate to get one)</li>")
    rows = [(f"{d['model_a']} -> {d['model_b']}" if d["model_a"] != d["model_b"] else d["model_a"],
             d["prompt_set"], d["class"], d["line"]) for d in result["deltas"]]
    body = ["<h2>Runs</h2>", "<ul>", *links, "</ul>", "<h2>Changes from A to B</h2>",
            table(["model", "prompt set", "class", "change"], rows, numeric_from=99)]
    chart = (result.get("files") or {}).get("chart")
    if chart:
        body.append(png(Path(chart), "changes from A to B"))
    path.write_text(page("Evaluation comparison", "\n".join(body), None,
                         f"A: {result['run_a']}  B: {result['run_b']}"), encoding="utf-8")
    return path


def _relative(target: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()
