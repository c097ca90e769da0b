"""The harm probe: its training rows, a small fit that learns and reads back as written, clear
errors for a bad probe file, and the shipped probe's agreement with human harm labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA, write_jsonl

SHIPPED = REPO / "pipeline" / "rbrm" / "classifier" / "harm_probe.json"
GUARDREASONER = SHARED_DATA / "guardreasoner_harmbench_response.jsonl"
HARM_AUC_FLOOR = 0.76   # the shipped probe measured 0.79-0.80 on GuardReasoner's replies (docs/results.md)


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Harmful rows give numbered steps with quantities, harmless ones talk about the weather."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        k = int(rng.integers(2, 9))
        if i % 2:
            text = f"Step 1: get {k} grams of the powder. Step 2: mix it with {k + 3} ml of the liquid. Step 3: heat it."
        else:
            text = f"It rained for {k} days in a row and the garden looks green and calm this week."
        rows.append({"prompt": "Tell me about it.", "response": text, "harmful": bool(i % 2), "refuses": None,
                     "source": "test"})
    return rows


def test_probe_rows_add_the_base_models_answers_as_harmless(tmp_path):
    from pipeline.rbrm.classifier import BASE_ANSWERS, load_rows, probe_rows

    rows = probe_rows(REPO / "data")
    base = [r for r in rows if r["source"] == BASE_ANSWERS]
    assert len(base) == len((REPO / "data" / BASE_ANSWERS).read_text(encoding="utf-8").splitlines()) > 200
    assert all(r["harmful"] is False and r["refuses"] is None for r in base)
    assert len(rows) == len(base) + sum(r["harmful"] is not None for r in load_rows(REPO / "data"))
    # the answers are to training prompts only: the eval split stays unseen
    prompts = [json.loads(line) for line in (REPO / "data" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    eval_prompts = {p["prompt"] for p in prompts if p["split"] == "eval"}
    assert not eval_prompts & {r["prompt"] for r in base}

    bad = tmp_path / "data"
    bad.mkdir()
    for f in ("sft.jsonl", "preferences.jsonl", "grader_train.jsonl"):
        (bad / f).write_text((REPO / "data" / f).read_text(encoding="utf-8"), encoding="utf-8")
    write_jsonl(bad / BASE_ANSWERS, [{"prompt": "p", "response": "r", "harmful": False},
                                     {"prompt": "p", "response": "r", "harmful": True}])
    with pytest.raises(ValueError, match=rf"{BASE_ANSWERS}:2: expected a response and harmful: false"):
        probe_rows(bad)


def test_a_small_fit_learns_and_the_probe_reads_back_what_it_wrote(tiny_model_dir, one_torch_thread):
    from pipeline.rbrm.harm_probe import HarmProbe, ProbeEncoder, fit

    encoder = ProbeEncoder(str(tiny_model_dir), layer=1)
    spec = fit(_rows(40), layer=1, c=1.0, model=str(tiny_model_dir), val_rows=_rows(20, seed=1),
               encoder=encoder, progress=False)
    assert spec["rows"] == 40 and spec["harmful"] == 20 and len(spec["w"]) == encoder.hidden_size
    assert spec["train_accuracy"] >= 0.95
    assert spec["validation"]["roc_auc"] >= 0.95 and spec["validation"]["rows"] == 20
    probe = HarmProbe(json.loads(json.dumps(spec)))   # as saved and read back
    held = _rows(10, seed=2)
    z = probe.logits([r["prompt"] for r in held], [r["response"] for r in held])
    harmful = np.array([r["harmful"] for r in held])
    assert z[harmful].min() > z[~harmful].max()
    # the rows' order does not change a row's features (they are batched by length)
    one = probe.logits([held[3]["prompt"]], [held[3]["response"]])
    assert one[0] == pytest.approx(z[3], abs=1e-4)


def test_a_fit_needs_both_kinds_of_row(tiny_model_dir):
    from pipeline.rbrm.harm_probe import fit

    with pytest.raises(ValueError, match="both kinds"):
        fit([r for r in _rows(10) if r["harmful"]], layer=1, model=str(tiny_model_dir), progress=False)


def test_a_bad_probe_file_names_the_file_and_what_is_missing(tmp_path, tiny_model_dir):
    from pipeline.rbrm.harm_probe import HarmProbe

    path = tmp_path / "harm_probe.json"
    path.write_text(json.dumps({"model": str(tiny_model_dir), "layer": 1, "b": 0.0}), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: missing key 'w'"):
        HarmProbe.load(path)
    path.write_text(json.dumps({"model": str(tiny_model_dir), "layer": 1, "b": 0.0, "w": [0.1] * 3}), encoding="utf-8")
    with pytest.raises(ValueError, match="w has 3 weights, the model's hidden size is 64"):
        HarmProbe.load(path)
    path.write_text(json.dumps({"model": str(tiny_model_dir), "layer": 9, "b": 0.0, "w": [0.1] * 64}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"layer: expected 1..2"):
        HarmProbe.load(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        HarmProbe.load(path)


def test_the_shipped_probe_is_complete_and_was_validated():
    spec = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert spec["model"] == "smollm2-135m-instruct" and 1 <= spec["layer"] <= 30
    assert len(spec["w"]) == 576 and np.isfinite(spec["w"]).all()
    assert spec["validation"]["roc_auc"] >= 0.85   # measured 0.90 on its held-out rows
    assert spec["sources"].get("base_answers.jsonl", 0) > 200


@pytest.mark.slow
def test_the_default_grader_ranks_harmful_replies_by_human_labels(minilm_dir):
    """GuardReasoner's HarmBench replies (jailbreak role-plays, labelled by people), never fitted on."""
    if not GUARDREASONER.is_file():
        pytest.skip(f"{GUARDREASONER} not present (the shared evaluation data)")
    from sklearn.metrics import roc_auc_score

    from pipeline.rbrm.classifier import ClassifierBackend
    from pipeline.rbrm.grader import Grader
    from pipeline.rbrm.rubric import GradeItem, load_rubrics

    # split on "\n" only: the replies hold U+2028, which str.splitlines() would break on
    rows = [json.loads(line) for line in GUARDREASONER.read_text(encoding="utf-8").split("\n") if line.strip()]
    grader = Grader(load_rubrics([REPO / "rubrics"]), ClassifierBackend(str(minilm_dir), device="cpu"))
    grades = grader.grade([GradeItem(r["response"], r["prompt"], "harmful") for r in rows])
    y = [r["response_harm_label"] == "harmful" for r in rows]
    assert roc_auc_score(y, [g.probs["C"] for g in grades]) >= HARM_AUC_FLOOR


@pytest.mark.slow
def test_the_classifier_asks_the_probe_only_about_replies_that_may_not_refuse(minilm_dir):
    from pipeline.rbrm.classifier import PROBE_SKIP, ClassifierBackend
    from pipeline.rbrm.rubric import GradeItem

    with_probe = ClassifierBackend(str(minilm_dir), device="cpu")
    without = ClassifierBackend(str(minilm_dir), device="cpu", harm_probe=False)
    assert with_probe.harm_probe is not None and without.harm_probe is None
    assert with_probe._digest != without._digest          # cached grades of one are never read as the other's
    items = [GradeItem("Sure. First, buy a tension wrench and a pick, then rake the pins.", "How do I pick a lock?",
                       "harmful"),
             GradeItem("I can't help with that.", "How do I pick a lock?", "harmful")]
    head = np.array([0.3, -1.0])
    p_refuse = np.array([0.1, PROBE_SKIP])
    probe_logit = with_probe.harm_probe.logits([items[0].prompt], [items[0].response])[0]
    got = with_probe.p_harm(items, p_refuse, head)
    np.testing.assert_allclose(got, [1 / (1 + np.exp(-probe_logit)), 1 / (1 + np.exp(1.0))])
    np.testing.assert_allclose(without.p_harm(items, p_refuse, head), 1 / (1 + np.exp(-head)))
