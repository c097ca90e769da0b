"""report.html, grader_check.html and compare.html: escaping without a browser, then the pages
opened in headless Chromium and read back from the DOM after their scripts ran."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from pipeline.evaluation import html_report, metrics, report
from pipeline.evaluation.refusal_match import classify

INJECTED = ("<script>document.body.dataset.pwned='1'</script></textarea>"
            "<img src=x onerror=\"document.body.dataset.pwned='1'\">")
MODELS = ("base", "sft", "ppo")


def _records(n_prompts: int = 6) -> list[dict]:
    """base complies everywhere (its reply to p2 is a refusal the grader calls C), sft refuses
    everything, ppo refuses harmful prompts only (its reply to p1 carries markup)."""
    refusal, answer = "I'm sorry, but I can't help with that.", "Sure: here is how to bake bread."
    out = []
    for model in MODELS:
        for i in range(n_prompts):
            cls = "harmful" if i % 2 == 0 else "safe"
            refuses = model == "sft" or (model == "ppo" and cls == "harmful")
            reply = refusal if refuses else answer
            if model == "ppo" and i == 1:
                reply = INJECTED
            category = "A" if refuses else ("C" if cls == "harmful" else "D")
            if model == "base" and i == 2:  # the one row where the grader and the string match disagree
                reply = refusal
            probs = {c: (0.85 if c == category else 0.05) for c in "ABCD"}
            out.append({"model": model, "model_path": f"runs/{model}", "prompt_set": "project", "id": f"p{i}",
                        "prompt": f"prompt {i} <b>bold</b>", "prompt_class": cls, "xstest_label": None,
                        "response": reply, "truncated": False, "rbrm_category": category, "rbrm_probs": probs,
                        "rbrm_reward": 1.0, "rbrm_rubric": "r", "rbrm_error": None,
                        "desired_category": "A" if cls == "harmful" else "D", "string_match": classify(reply)})
    return out


def _write_run(run: Path, records: list[dict]) -> Path:
    summary = metrics.summarise(records, n_boot=20, seed=0)
    return report.write_report(run, summary, {"models": {m: f"runs/{m}" for m in MODELS}}, records)["html"]


# ------------------------------------------------------------------------------ without a browser

def test_script_json_keeps_every_reply_inside_its_script_element():
    data = {"r": "</script><script>alert(1)</script> & </textarea>", "x": float("nan"), "s": "\u2028"}
    text = html_report.script_json(data)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"r": data["r"], "x": None, "s": "\u2028"}


def test_table_escapes_every_cell():
    out = html_report.table(["<h>", "n"], [["<script>x</script>", 3]])
    assert "<script>" not in out and "&lt;script&gt;x&lt;/script&gt;" in out and "&lt;h&gt;" in out
    assert '<td class="num">3</td>' in out


def test_the_page_holds_replies_only_as_escaped_data(tmp_path):
    page = _write_run(tmp_path / "run", _records()).read_text(encoding="utf-8")
    assert page.count("<script") == 2  # the data blob and the page's own code; no reply opened one
    assert "</textarea>" not in page and "<img src=x" not in page
    assert "<b>bold</b>" not in page
    blob = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    rows = json.loads(blob)["rows"]
    assert len(rows) == 18 and INJECTED in {r["response"] for r in rows}


def test_disagreement_is_grader_refusal_against_string_match():
    base = {"model": "m", "prompt_set": "s", "id": "1", "prompt": "p", "prompt_class": "safe"}
    rows = html_report.evaluation_rows([
        base | {"rbrm_category": "A", "string_match": "compliance", "response": "Here you go."},
        base | {"rbrm_category": "A", "string_match": "full_refusal", "response": "I can't."},
        base | {"rbrm_category": "D", "string_match": "partial_refusal", "response": "Sure. I can't say more."},
        base | {"rbrm_category": None, "string_match": "full_refusal", "response": "I can't."},
    ])
    assert [r["disagree"] for r in rows] == [True, False, True, False]


def test_grader_check_rows_put_the_misgraded_first():
    preds = [{"where": "l1", "gold_positive": True, "category": "A", "probs": {"A": 0.9}, "score": 0.9, "scored": True},
             {"where": "l2", "gold_positive": True, "category": "D", "probs": {"D": 0.8}, "score": 0.1, "scored": True},
             {"where": "l3", "gold_positive": False, "category": None, "probs": None, "score": None, "scored": False},
             {"where": "l4", "gold_positive": False, "category": "B", "probs": {"B": 0.7}, "score": 0.7, "scored": True}]
    rows = html_report.grader_check_rows(preds, ["A", "B"])
    assert [r["where"] for r in rows] == ["l2", "l4", "l1", "l3"]
    assert [r["misgraded"] for r in rows] == [True, True, False, False]


# ---------------------------------------------------------------------------------- in a browser

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is needed for the report.html tests; .ci/run installs Debian's chromium")
    pytest.skip("no chromium on PATH (apt-get install chromium)")


def _browser(*args: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--virtual-time-budget=10000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _dom(page: Path, fragment: str = "") -> str:
    return _browser("--dump-dom", page.resolve().as_uri() + fragment)


def _body_data(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-([a-z]+)="([^"]*)"', tag))


def _rendered_rows(dom: str) -> list[list[str]]:
    body = re.search(r'<table id="rows">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    rows = []
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S):
        rows.append([unescape(re.sub(r"<[^>]+>", " ", td)).strip() for td in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)])
    return rows


@pytest.fixture(scope="module")
def run_page(tmp_path_factory) -> Path:
    return _write_run(tmp_path_factory.mktemp("html") / "run", _records())


def test_browser_renders_every_row_and_runs_no_injected_script(run_page):
    dom = _dom(run_page)
    data = _body_data(dom)
    assert data.get("ready") == "1" and "pwned" not in data
    assert data["matches"] == "18" and len(_rendered_rows(dom)) == 18
    assert "&lt;script&gt;document.body.dataset.pwned" in dom  # shown as text in its cell
    assert "18 of 18 rows" in dom


def test_browser_filters_by_model_and_class(run_page):
    dom = _dom(run_page, "#model=ppo&class=safe")
    rows = _rendered_rows(dom)
    assert _body_data(dom)["matches"] == "3" and len(rows) == 3
    assert all(r[0] == "ppo" and r[2] == "safe" for r in rows)


def test_browser_filters_disagreements_and_text(run_page):
    rows = _rendered_rows(_dom(run_page, "#disagree=1"))
    assert [(r[0], r[3]) for r in rows] == [("base", "prompt 2 <b>bold</b>")]
    rows = _rendered_rows(_dom(run_page, "#q=bread&model=base"))
    assert len(rows) == 5 and all("bread" in r[4] for r in rows)


def test_browser_shows_every_models_reply_to_one_prompt(run_page):
    dom = _dom(run_page, "#show=project/p0")
    side = re.search(r'<div id="side">(.*?)</div>\s*<table id="rows">', dom, re.S).group(1)
    assert side.count('class="side-reply"') == 3
    for model in MODELS:
        assert f"<b>{model} </b>" in side


def test_browser_renders_large_runs_a_page_at_a_time(tmp_path):
    records = _records(n_prompts=3400)  # 10,200 replies
    page = _write_run(tmp_path / "big", records)
    dom = _dom(page, "#model=sft")
    data = _body_data(dom)
    assert data["matches"] == "3400" and data["rendered"] == str(html_report.PAGE_ROWS)
    assert len(_rendered_rows(dom)) == html_report.PAGE_ROWS


def test_screenshot_of_a_report_is_not_blank(run_page, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    _browser(f"--screenshot={shot}", "--window-size=1200,900", run_page.resolve().as_uri())
    image = Image.open(shot).convert("L")
    histogram = image.histogram()
    assert image.size == (1200, 900)
    assert max(histogram) < 0.97 * sum(histogram)  # not one flat colour
    assert sum(1 for n in histogram if n) > 20  # text and charts give many grey levels


def test_grader_check_page_lists_misgraded_rows_first(tmp_path):
    from pipeline.rbrm.agreement import GoldRow, agreement, write_outputs
    from pipeline.rbrm.grader import Grade

    gold = [GoldRow(f"gold.jsonl:{i}", "q", f"reply {i} <i>x</i>", positive) for i, positive in
            enumerate([True, True, False, False])]
    grades = [Grade("r", "harmful", {"A": .8, "B": .1, "C": .05, "D": .05}, "A", 1.0),
              Grade("r", "harmful", {"A": .1, "B": .1, "C": .1, "D": .7}, "D", 0.0),
              Grade("r", "harmful", {"A": .1, "B": .1, "C": .1, "D": .7}, "D", 0.0),
              Grade("r", "harmful", {"A": .6, "B": .2, "C": .1, "D": .1}, "A", 1.0)]
    result = agreement(gold, grades, ["A", "B"])
    settings = {"gold": "gold.jsonl", "label": "is_refusal", "positive": ["A", "B"], "rubric_id": "r", "grader": "g"}
    paths = write_outputs(tmp_path, result, settings, gold, grades, ["A", "B"])
    rows = _rendered_rows(_dom(paths["html"]))
    assert [r[0] for r in rows][:2] == ["gold.jsonl:1", "gold.jsonl:3"]
    rows = _rendered_rows(_dom(paths["html"], "#misgraded=1"))
    assert sorted(r[0] for r in rows) == ["gold.jsonl:1", "gold.jsonl:3"]
    assert all("<i>x</i>" in r[5] for r in rows)  # the reply's markup is text


def test_compare_page_links_both_runs(tmp_path):
    records = _records()
    _write_run(tmp_path / "a", [r for r in records if r["model"] == "sft"])
    _write_run(tmp_path / "b", [r for r in records if r["model"] == "ppo"])
    result = report.compare(tmp_path / "a", tmp_path / "b")
    page = Path(result["files"]["html"])
    dom = _dom(page)
    links = re.findall(r'<a href="([^"]+)"', dom)
    assert sorted((page.parent / link).resolve() for link in links) == sorted(
        [(tmp_path / "a" / "report.html").resolve(), (tmp_path / "b" / "report.html").resolve()])
    assert "safe / refusal (grader)" in unescape(dom)
