"""Evaluation report and run comparison, checked against hand-made summaries and hand-worked changes."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.evaluation import report


def rate(value, lo=None, hi=None, n=50):
    """A rate in the metrics shape; the interval defaults to value +- 0.05 (clipped)."""
    if value is None:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    lo = max(0.0, value - 0.05) if lo is None else lo
    hi = min(1.0, value + 0.05) if hi is None else hi
    return {"value": value, "lo": lo, "hi": hi, "n": n}


def class_block(n, n_scored, mix, incorrect, refusal_grader, refusal_match):
    return {
        "n": n, "n_scored": n_scored,
        "category_rate": {c: rate(v, n=n_scored) for c, v in zip("ABCD", mix)},
        "incorrect_behaviour_rate": incorrect if isinstance(incorrect, dict) else rate(incorrect, n=n_scored),
        "refusal_rate": {"grader": rate(refusal_grader, n=n_scored), "string_match": rate(refusal_match, n=n)},
        "string_match_rate": {"full_refusal": rate(refusal_match, n=n), "partial_refusal": rate(0.0, n=n),
                              "compliance": rate(1 - refusal_match, n=n)},
    }


def overall_block(not_unsafe, not_overrefuse, f1, raw, kappa, xstest=None):
    out = {"n": 100, "n_scored": 96, "not_unsafe": rate(not_unsafe), "not_overrefuse": rate(not_overrefuse),
           "not_overrefuse_string_match": rate(not_overrefuse - 0.02), "f1": rate(f1),
           "agreement": {"n": 96, "raw": rate(raw), "kappa": rate(kappa)}}
    if xstest is not None:
        out["xstest"] = xstest
    return out


def before_summary(model="policy"):
    """Run A: the harmful class leaks disallowed content 31% of the time."""
    return {"settings": {"n_boot": 200, "seed": 0, "ci": 0.95}, "models": {model: {
        "eval": {
            "classes": {
                "harmful": class_block(40, 38, (0.5, 0.1, 0.31, 0.09), rate(0.125, 0.081, 0.170, 38), 0.6, 0.55),
                "safe": class_block(50, 50, (0.04, 0.0, 0.0, 0.96), 0.04, 0.04, 0.08),
            },
            "overall": overall_block(0.69, 0.96, 0.8029, 0.9, 0.62),
        },
        "xstest": {
            "classes": {"safe": class_block(10, 10, (0.2, 0.1, 0.0, 0.7), 0.3, 0.3, 0.2)},
            "overall": overall_block(None, 0.7, None, 0.8, 0.5, xstest={
                "n_safe": 10, "n_unsafe": 0, "over_refusal_string_match": rate(0.2),
                "full_refusal_string_match": rate(0.2), "partial_refusal_string_match": rate(0.0),
                "over_refusal_grader": rate(0.3), "unsafe_compliance_string_match": rate(None),
                "unsafe_compliance_grader": rate(None)}),
        },
    }}}


def after_summary(model="policy"):
    """Run B: far less disallowed content, a little more refusal of safe prompts."""
    s = before_summary(model)
    eval_set = s["models"][model]["eval"]
    eval_set["classes"]["harmful"] = class_block(40, 36, (0.8, 0.1, 0.056, 0.044), 0.2, 0.9, 0.85)
    eval_set["classes"]["safe"] = class_block(50, 50, (0.06, 0.0, 0.02, 0.92), 0.08, 0.06, 0.1)
    eval_set["overall"] = overall_block(0.944, 0.94, 0.9420, 0.92, 0.7)
    return s


META = {"models": {"policy": "runs/ppo/model"}, "prompt_sets": {"eval": 90, "xstest": 10},
        "generation": {"max_new_tokens": 128, "temperature": 0.0}, "grader": {"backend": "hf:smollm2"},
        "date": "2025-01-02", "wall_time_s": 12.34}


def two_model_summary():
    """Two models in one run (charts with several bars per group)."""
    s = before_summary("sft")
    s["models"]["ppo"] = after_summary("ppo")["models"]["ppo"]
    return s


@pytest.fixture()
def runs(tmp_path):
    run_a, run_b = tmp_path / "eval-before", tmp_path / "eval-after"
    report.write_report(run_a, before_summary(), META)
    report.write_report(run_b, after_summary(), META)
    return run_a, run_b


def check_png(path, min_bytes=1000):
    import matplotlib.image as mpimg

    assert path.is_file() and path.stat().st_size > min_bytes, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.02  # something is drawn, not a blank canvas


# ---------------------------------------------------------------------------------- one run


def test_write_report_files(tmp_path):
    summary = two_model_summary()
    paths = report.write_report(tmp_path / "run", summary, META)
    assert set(paths) == {"json", "markdown", "html", "incorrect_behaviour", "category_mix"}
    assert {p.name for p in paths.values()} == {"report.json", "report.md", "report.html", "incorrect_behaviour.png",
                                                 "category_mix.png"}
    for p in paths.values():
        assert p.parent == tmp_path / "run" and p.is_file()
    check_png(paths["incorrect_behaviour"])
    check_png(paths["category_mix"])
    saved = json.loads(paths["json"].read_text())
    assert saved == {"meta": META, "summary": summary}


def test_report_markdown_values(tmp_path):
    paths = report.write_report(tmp_path, before_summary(), META)
    md = paths["markdown"].read_text()
    assert md.startswith("# Refusal-rate evaluation")
    # meta, rendered generically
    assert "- **models**:" in md and "  - **policy**: runs/ppo/model" in md
    assert "**max new tokens**: 128" in md and "**temperature**: 0.0" in md and "**date**: 2025-01-02" in md
    assert "**wall time s**: 12.3 s" in md
    assert "95% percentile bootstrap, 200 resamples, seed 0" in md
    # one row per (model, class): n, graded, A..D, incorrect behaviour with interval, refusal rates
    assert ("| policy | harmful | 40 | 38 | 50.0% | 10.0% | 31.0% | 9.0% | 12.5% [8.1, 17.0] | 60.0% | 55.0% |"
            in md)
    assert "| policy | safe | 50 | 50 | 4.0% | 0.0% | 0.0% | 96.0% | 4.0% [0.0, 9.0] | 4.0% | 8.0% |" in md
    # overall: not unsafe, not overrefuse (grader, string match), F1, refusal F1 (absent from this
    # older summary: n/a), agreement raw and kappa
    assert ("| policy | 69.0% [64.0, 74.0] | 96.0% [91.0, 100.0] | 94.0% [89.0, 99.0] | 80.3% [75.3, 85.3] "
            "| n/a | n/a | 90.0% | 0.62 [0.57, 0.67] | 96 |") in md
    # a prompt set with no harmful prompts: not unsafe and F1 are n/a, and XSTest figures get a table
    assert ("| policy | n/a | 70.0% [65.0, 75.0] | 68.0% [63.0, 73.0] | n/a | n/a | n/a | 80.0% | 0.50 [0.45, 0.55] "
            "| 96 |") in md
    assert md.count("### XSTest") == 1
    assert ("| policy | 10 | 0 | 20.0% [15.0, 25.0] | 20.0% [15.0, 25.0] | 0.0% [0.0, 5.0] | 30.0% [25.0, 35.0] "
            "| n/a | n/a |") in md
    assert md.index("## Prompt set: eval") < md.index("## Prompt set: xstest") < md.index("### XSTest")
    assert "](incorrect_behaviour.png)" in md and "](category_mix.png)" in md


def test_report_rejects_empty_summary(tmp_path):
    with pytest.raises(ValueError, match="no models"):
        report.write_report(tmp_path, {"models": {}}, META)


def test_report_from_real_metrics(tmp_path):
    """The report reads what metrics.summarise really returns."""
    from pipeline.evaluation import metrics

    records = []
    for model, cats in (("sft", "AACDD"), ("ppo", "AAAAB")):
        for i, c in enumerate(cats):
            records.append({"model": model, "prompt_set": "eval", "prompt_class": "harmful", "rbrm_category": c,
                            "desired_category": "A", "string_match": "full_refusal" if c in "AB" else "compliance"})
        for c in "DDDA":
            records.append({"model": model, "prompt_set": "eval", "prompt_class": "safe", "rbrm_category": c,
                            "desired_category": "D", "string_match": "full_refusal" if c == "A" else "compliance"})
    summary = metrics.summarise(records, n_boot=50, seed=0)
    paths = report.write_report(tmp_path, summary, {"models": {"sft": "a", "ppo": "b"}})
    md = paths["markdown"].read_text()
    assert "| sft | harmful | 5 | 5 | 40.0% | 0.0% | 20.0% | 40.0% |" in md
    assert "| ppo | harmful | 5 | 5 | 80.0% | 20.0% | 0.0% | 0.0% | 20.0% [" in md
    check_png(paths["incorrect_behaviour"])
    check_png(paths["category_mix"])


# ---------------------------------------------------------------------------------- compare


def find(result, cls, metric, prompt_set="eval"):
    hits = [d for d in result["deltas"]
            if d["class"] == cls and d["metric"] == metric and d["prompt_set"] == prompt_set]
    assert len(hits) == 1, (cls, metric, hits)
    return hits[0]


def test_compare_hand_deltas(runs):
    run_a, run_b = runs
    result = report.compare(run_a, run_b)
    assert result["pairs"] == [{"model_a": "policy", "model_b": "policy"}]

    c = find(result, "harmful", "category_rate.C")
    assert (c["a"], c["b"]) == (0.31, 0.056)
    assert c["delta_pts"] == pytest.approx(-25.4)
    assert c["relative_pct"] == pytest.approx(-81.94, abs=0.01)  # (0.056 - 0.31) / 0.31
    assert c["better"] is True
    assert c["line"] == "harmful / disallowed content (C): 31.0% -> 5.6% (-25.4 pts, -82%)"

    r = find(result, "safe", "refusal_rate.grader")
    assert r["delta_pts"] == pytest.approx(2.0) and r["relative_pct"] == pytest.approx(50.0)
    assert r["better"] is False  # more refusals of safe prompts
    assert r["line"] == "safe / refusal (grader): 4.0% -> 6.0% (+2.0 pts, +50%)"

    h = find(result, "harmful", "refusal_rate.grader")
    assert h["better"] is True and h["line"] == "harmful / refusal (grader): 60.0% -> 90.0% (+30.0 pts, +50%)"

    ib = find(result, "harmful", "incorrect_behaviour_rate")
    assert ib["line"] == "harmful / incorrect behaviour: 12.5% -> 20.0% (+7.5 pts, +60%)" and ib["better"] is False

    f1 = find(result, "overall", "f1")
    assert f1["delta_pts"] == pytest.approx(13.91) and f1["better"] is True

    # a zero baseline: points only, no relative change
    z = find(result, "safe", "category_rate.C")
    assert z["relative_pct"] is None and z["delta_pts"] == pytest.approx(2.0)
    assert z["line"] == "safe / disallowed content (C): 0.0% -> 2.0% (+2.0 pts)"

    # unchanged figures have no direction; rates that are None in both runs are left out
    same = find(result, "safe", "category_rate.A", prompt_set="xstest")
    assert same["delta_pts"] == 0 and same["better"] is None
    assert not [d for d in result["deltas"] if d["prompt_set"] == "xstest" and d["metric"] in ("f1", "not_unsafe")]
    assert not [d for d in result["deltas"] if d["metric"].startswith("agreement")]


def test_compare_files(runs, capsys):
    run_a, run_b = runs
    result = report.compare(run_a, run_b)
    out = run_b / "compare_eval-before"
    assert result["files"] == {"json": str(out / "compare.json"), "markdown": str(out / "compare.md"),
                               "chart": str(out / "compare.png"), "html": str(out / "compare.html")}
    assert json.loads((out / "compare.json").read_text())["deltas"] == result["deltas"]
    md = (out / "compare.md").read_text()
    assert "| harmful | disallowed content (C) | 31.0% | 5.6% | -25.4 | -82% | better |" in md
    assert "| safe | disallowed content (C) | 0.0% | 2.0% | +2.0 | n/a | worse |" in md
    assert "](compare.png)" in md
    check_png(out / "compare.png")

    report.print_compare(result)
    printed = capsys.readouterr().out
    assert "policy / eval" in printed
    assert "  harmful / disallowed content (C): 31.0% -> 5.6% (-25.4 pts, -82%)" in printed
    assert "  safe / refusal (grader): 4.0% -> 6.0% (+2.0 pts, +50%)" in printed

    other = run_b.parent / "elsewhere"
    report.compare(run_a, run_b, out_dir=other)
    assert (other / "compare.png").is_file() and (other / "compare.md").is_file()


def test_compare_single_models_with_different_names(tmp_path):
    report.write_report(tmp_path / "a", before_summary("sft"), META)
    report.write_report(tmp_path / "b", after_summary("ppo"), META)
    result = report.compare(tmp_path / "a", tmp_path / "b")
    assert result["pairs"] == [{"model_a": "sft", "model_b": "ppo"}]
    assert find(result, "harmful", "category_rate.C")["line"] == (
        "harmful / disallowed content (C): 31.0% -> 5.6% (-25.4 pts, -82%)")
    assert "sft -> ppo / eval" in "\n".join(report.compare_lines(result))


def test_compare_shared_model_among_several(tmp_path):
    """Only the model both runs hold is compared."""
    report.write_report(tmp_path / "a", two_model_summary(), META)
    b = after_summary("sft")
    b["models"]["other"] = copy.deepcopy(b["models"]["sft"])
    report.write_report(tmp_path / "b", b, META)
    result = report.compare(tmp_path / "a", tmp_path / "b")
    assert result["pairs"] == [{"model_a": "sft", "model_b": "sft"}]
    assert {d["model_a"] for d in result["deltas"]} == {"sft"}


def test_compare_missing_report_names_the_file(runs, tmp_path):
    run_a, _ = runs
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(ValueError) as err:
        report.compare(run_a, empty)
    assert str(empty / "report.json") in str(err.value)
    with pytest.raises(ValueError, match="not-a-run"):
        report.compare(empty, run_a)


def test_compare_nothing_shared(tmp_path):
    report.write_report(tmp_path / "a", two_model_summary(), META)
    b = after_summary("x")
    b["models"]["y"] = copy.deepcopy(b["models"]["x"])
    report.write_report(tmp_path / "b", b, META)
    with pytest.raises(ValueError, match="share nothing to compare") as err:
        report.compare(tmp_path / "a", tmp_path / "b")
    assert str(tmp_path / "a" / "report.json") in str(err.value)
    # the same model but disjoint prompt sets is nothing to compare either
    c = after_summary("sft")
    c["models"]["sft"] = {"other_set": c["models"]["sft"]["eval"]}
    report.write_report(tmp_path / "c", c, META)
    with pytest.raises(ValueError, match="share nothing"):
        report.compare(tmp_path / "a", tmp_path / "c")
    assert not (tmp_path / "c" / "compare_a").exists()


def test_compare_two_models_of_one_run(tmp_path):
    summary = before_summary("base")
    summary["models"]["ppo"] = after_summary("ppo")["models"]["ppo"]
    report.write_report(tmp_path / "eval", summary, META)
    result = report.compare_models(tmp_path / "eval", "base", "ppo")
    assert result["pairs"] == [{"model_a": "base", "model_b": "ppo"}]
    assert find(result, "harmful", "category_rate.C")["line"] == (
        "harmful / disallowed content (C): 31.0% -> 5.6% (-25.4 pts, -82%)")
    assert (tmp_path / "eval" / "compare_base_ppo" / "compare.png").is_file()
    with pytest.raises(ValueError, match="no model 'sft'; it holds base, ppo"):
        report.compare_models(tmp_path / "eval", "base", "sft")


def test_demo_table_lists_each_model_per_class(tmp_path):
    from pipeline import demo

    summary = before_summary("base")
    summary["models"]["ppo"] = after_summary("ppo")["models"]["ppo"]
    lines = demo.results_table(summary)
    assert lines[0] == "| prompt set / class | figure | base | ppo |"
    row = next(line for line in lines if "harmful" in line and "disallowed content (C)" in line)
    assert row.endswith("| 31.0% | 5.6% |")
    assert {line.split(" / ")[0] for line in lines[2:]} == {"| eval", "| xstest"}
