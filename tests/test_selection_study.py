"""Selection rules judged on validation prompts they did not choose on."""

from __future__ import annotations

import json

import pytest

from pipeline.ppo import selection_study as study
from pipeline.ppo.validation import REPLIES_FILE, Selector


def _record(step, harmful, over):
    return {"step": step, "harmful_refusal": harmful, "over_refusal": over}


def test_selector_window_scores_a_step_by_its_last_checks():
    # F1 by step: 0.5, 1.0 (one lucky check), 0.0, 0.8, 0.8 -> window 2 means 0.5, 0.75, 0.5, 0.4, 0.8
    seq = [_record(0, 0.5, 0.5), _record(1, 1.0, 0.0), _record(2, 0.0, 0.0), _record(3, 0.8, 0.2),
           _record(4, 0.8, 0.2)]
    one, two = Selector(0.0, rule="f1"), Selector(0.0, rule="f1", window=2)
    chosen_one = [r["step"] for r in seq if one.offer(dict(r))]
    chosen_two = []
    for r in seq:
        r = dict(r)
        if two.offer(r):
            chosen_two.append(r["step"])
    assert chosen_one == [0, 1] and one.best["step"] == 1
    assert chosen_two == [0, 1, 4] and two.best["step"] == 4
    assert two.best["f1_window"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="select_window"):
        Selector(0.0, rule="f1", window=0)


def test_pick_takes_the_best_trailing_mean_and_ties_go_early():
    assert study.pick([0.1, 0.9, 0.2, 0.6, 0.6], 1) == 1
    assert study.pick([0.1, 0.9, 0.2, 0.6, 0.6], 2) == 4
    assert study.pick([0.5, 0.5], 1) == 0


def _write_run(path, steps):
    path.mkdir()
    lines = []
    for step, refused in steps:
        prompts = [{"id": f"h{i}", "prompt_class": "harmful", "refused": r} for i, r in enumerate(refused[0])]
        prompts += [{"id": f"s{i}", "prompt_class": "safe", "refused": r} for i, r in enumerate(refused[1])]
        lines.append(json.dumps({"step": step, "prompts": prompts}))
    (path / REPLIES_FILE).write_text("\n".join(lines) + "\n")
    return path


def test_a_step_that_is_good_on_every_prompt_beats_one_good_on_half(tmp_path):
    n = 20
    steady = ([True] * n, [False] * n)                              # F1 1.0 on any half
    weak = ([True] * (n // 2) + [False] * (n // 2), [False] * n)    # F1 about 0.67 on any half
    run = _write_run(tmp_path / "run", [(0, weak), (2, steady), (4, weak)])
    result = study.study(study.load_replies(run), windows=[1], splits=20)
    assert result["f1 window 1"]["picked"] == {2: 20}
    assert result["f1 window 1"]["held_half_f1"] == pytest.approx(1.0)
    assert result["step 0"]["held_half_f1"] < 0.8 and result["last"]["picked"] == {4: 20}
    assert result["best possible"]["held_half_f1"] >= result["f1 window 1"]["held_half_f1"]


def test_the_study_cli_names_a_run_without_replies(tmp_path, capsys):
    assert study.main([str(tmp_path)]) == 2
    assert REPLIES_FILE in capsys.readouterr().err
    (tmp_path / REPLIES_FILE).write_text('{"step": 0}\n')
    assert study.main([str(tmp_path)]) == 2
    assert f"{REPLIES_FILE}:1" in capsys.readouterr().err
