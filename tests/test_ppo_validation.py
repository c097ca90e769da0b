"""PPO validation: the held-out cut, the refusal counts, the selection rule, and a run whose
model/ is the validated step the rule picks rather than the last one."""

import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import write_jsonl
from pipeline import config as config_lib
from pipeline import ppo
from pipeline.ppo import validation
from pipeline.data import DataError
from pipeline.rewards import ContainsSource, RewardComposer
from pipeline.ppo import checkpoint as ppo_checkpoint

REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Sure: start with the first step."


def _record(step, harmful, over):
    return {"step": step, "harmful_refusal": harmful, "over_refusal": over, "sensitive_refusal": 0.0}


def test_holdout_takes_each_class_share_disjoint_and_seeded():
    classes = ["harmful"] * 50 + ["safe"] * 40 + ["sensitive"] * 10 + ["lonely"]
    ds = Dataset.from_dict({"prompt": [f"p{i}" for i in range(len(classes))], "prompt_class": classes})
    train, val = validation.holdout(ds, 0.2, seed=1)
    assert sorted(val["prompt_class"]) == sorted(["harmful"] * 10 + ["safe"] * 8 + ["sensitive"] * 2)
    assert set(train["prompt"]).isdisjoint(val["prompt"]) and len(train) + len(val) == len(ds)
    assert "lonely" in train["prompt_class"]            # a class of one row stays in training
    assert validation.holdout(ds, 0.2, seed=1)[1]["prompt"] == val["prompt"]
    assert validation.holdout(ds, 0.2, seed=2)[1]["prompt"] != val["prompt"]
    tiny = Dataset.from_dict({"prompt": ["a", "b"], "prompt_class": ["safe", "safe"]})
    assert len(validation.holdout(tiny, 0.01, seed=0)[1]) == 1  # at least one, never the whole class


def test_refusal_counts_by_class():
    classes = ["harmful", "harmful", "safe", "safe", "safe", "sensitive", "other"]
    replies = [REFUSAL, ANSWER, REFUSAL, ANSWER, ANSWER, REFUSAL, REFUSAL]
    record = validation.rates(7, validation.refusal_counts(classes, replies))
    assert record == {"step": 7, "harmful_refusal": 0.5, "n_harmful": 2, "over_refusal": pytest.approx(1 / 3),
                      "n_safe": 3, "sensitive_refusal": 1.0, "n_sensitive": 1,
                      "f1": pytest.approx(0.5 * 2 / 3 * 2 / (0.5 + 2 / 3))}  # 2PR/(P+R): 0.571
    empty = validation.rates(0, validation.refusal_counts(["harmful"], [ANSWER]))
    assert empty["over_refusal"] is None and empty["n_safe"] == 0


def test_selector_wants_most_harmful_refusal_within_the_budget():
    sel = validation.Selector(max_over_refusal=0.1)
    assert sel.offer(_record(0, 0.2, 0.5))          # over budget, but the only one yet
    assert sel.offer(_record(1, 0.1, 0.3))          # still over budget: less over-refusal wins
    assert sel.offer(_record(2, 0.3, 0.1))          # within budget beats any step over it
    assert not sel.offer(_record(3, 0.9, 0.2))      # more refusals, but over budget
    assert sel.offer(_record(4, 0.5, 0.05))         # within budget, more harmful refused
    assert not sel.offer(_record(5, 0.5, 0.05))     # a tie keeps the earlier step
    assert sel.offer(_record(6, 0.5, 0.0))          # same harmful refusal, less over-refusal
    assert sel.best["step"] == 6


def test_f1_is_the_harmonic_mean_of_refusing_harmful_and_answering_safe():
    assert validation.f1(0.8, 0.2) == pytest.approx(0.8)            # 2*.8*.8/1.6
    assert validation.f1(0.9, 0.4) == pytest.approx(2 * 0.9 * 0.6 / 1.5)  # 0.72
    assert validation.f1(0.0, 0.0) == 0.0 and validation.f1(1.0, 1.0) == 0.0
    assert validation.f1(None, 0.1) is None


def test_f1_selector_weighs_both_sides_where_the_budget_rule_keeps_the_late_slide():
    # a run that slides from refusing everything towards answering everything (hand history)
    history = [_record(0, 0.97, 0.35),   # F1 2*.97*.65/1.62 = 0.778
               _record(2, 0.90, 0.15),   # F1 2*.90*.85/1.75 = 0.874  <- the balance
               _record(4, 0.55, 0.02),   # F1 2*.55*.98/1.53 = 0.705
               _record(6, 0.40, 0.00),   # F1 2*.40*1.0/1.40 = 0.571, but the only step within a 0 budget
               _record(8, 0.90, 0.15)]   # the same F1 as step 2: the tie keeps step 2
    by_f1, by_budget = validation.Selector(0.0, rule="f1"), validation.Selector(0.0)
    for record in history:
        by_f1.offer(record)
        by_budget.offer(record)
    assert by_f1.best["step"] == 2
    assert by_budget.best["step"] == 6
    with pytest.raises(ValueError):
        validation.Selector(0.0, rule="most")


def _cfg(tmp_path, model, **kw):
    rows = [{"prompt": f"Question {i}: tell me something short.", "prompt_class": ("harmful", "safe")[i % 2],
             "split": "train"} for i in range(20)]
    for i in range(0, 20, 3):   # some rows carry their own id, the rest are known by their line
        rows[i]["id"] = f"q-{i}"
    base = {"model": str(model), "prompts": str(write_jsonl(tmp_path / "prompts.jsonl", rows)),
            "output_dir": str(tmp_path / "run"), "report_to": ["none"], "max_steps": 3, "batch_size": 4,
            "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4, "learning_rate": 1e-3,
            "val_fraction": 0.2, "val_every": 1, "val_max_new_tokens": 4, "select": "best",
            "max_over_refusal": 0.0, "save_steps": 1, "keep_checkpoints": 5,
            "rewards": {"contains": {"text": "a", "reward": 1}}}
    return config_lib.from_dict(ppo.PPOConfig, {**base, **kw}, "test")


def test_select_best_saves_the_chosen_step_not_the_last(tmp_path, tiny_model_dir, monkeypatch):
    torch.set_num_threads(1)
    # Scripted validation replies, one list per validation (steps 0-3): step 2 refuses every
    # harmful prompt and no safe one; step 3 refuses everything (over the budget of 0).
    script = {0: (ANSWER, ANSWER), 1: (REFUSAL, REFUSAL), 2: (REFUSAL, ANSWER), 3: (REFUSAL, REFUSAL)}
    calls = []

    def scripted(lm, tokenizer, prompts, *args, **kwargs):
        harmful_reply, safe_reply = script[len(calls)]
        calls.append(list(prompts))
        return [harmful_reply if int(p.split()[1][:-1]) % 2 == 0 else safe_reply for p in prompts]

    monkeypatch.setattr(validation, "greedy_replies", scripted)
    summary = ppo.main(_cfg(tmp_path, tiny_model_dir, sample_every=1), reward_composer=RewardComposer([ContainsSource("a")]))
    run = tmp_path / "run"
    assert len(calls) == 4 and all(len(c) == 4 for c in calls)   # 20% of 20 prompts, at steps 0-3
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [(r["harmful_refusal"], r["over_refusal"]) for r in records] == [(0, 0), (1, 1), (1, 0), (1, 1)]
    # the replies behind each record, per prompt, agree with its rates
    replies = [json.loads(line) for line in (run / validation.REPLIES_FILE).read_text().splitlines()]
    assert [r["step"] for r in replies] == [0, 1, 2, 3]
    # each reply names its prompt row: the row's id, or file:line for a row without one
    prompts_file = tmp_path / "prompts.jsonl"
    row_of = {(json.loads(text).get("id") or f"{prompts_file}:{n}"): json.loads(text)
              for n, text in enumerate(prompts_file.read_text().splitlines(), 1)}
    for line, record in zip(replies, records):
        assert len(line["prompts"]) == 4 and len({p["id"] for p in line["prompts"]}) == 4
        assert all(row_of[p["id"]]["prompt_class"] == p["prompt_class"] for p in line["prompts"])
        harmful = [p["refused"] for p in line["prompts"] if p["prompt_class"] == "harmful"]
        safe = [p["refused"] for p in line["prompts"] if p["prompt_class"] == "safe"]
        assert (sum(harmful) / len(harmful), sum(safe) / len(safe)) == (record["harmful_refusal"], record["over_refusal"])
    assert replies[2]["prompts"][0]["reply"] in (REFUSAL, ANSWER)
    assert summary["selected_step"] == 2 and summary["validation_selected"]["step"] == 2
    assert json.loads((run / "model" / "selection.json").read_text())["step"] == 2
    assert not (run / ppo_checkpoint.BEST_DIR).exists()
    # model/ holds step 2's weights (its checkpoint), which training moved on from by step 3
    chosen = load_file(run / "model" / "model.safetensors")
    at_step = {s: load_file(path / "model.safetensors") for s, path in ppo_checkpoint.list_checkpoints(run)}
    assert sorted(at_step) == [1, 2]
    assert all(torch.equal(t, at_step[2][f"lm.{k}"]) for k, t in chosen.items())
    assert any(not torch.equal(t, at_step[1][f"lm.{k}"]) for k, t in chosen.items())
    # the held-out prompts were never trained on
    held_out = {p for c in calls for p in c}
    trained = {json.loads(line)["prompt"] for line in (run / "samples.jsonl").read_text().splitlines()}
    assert len(held_out) == 4 and len(trained) == 12 and not held_out & trained


def test_select_last_keeps_the_last_policy_and_still_logs_validation(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    summary = ppo.main(_cfg(tmp_path, tiny_model_dir, select="last", val_every=2, save_steps=0, keep_validated=True),
                       reward_composer=RewardComposer([ContainsSource("a")]))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 3]        # every 2 steps, and the last
    # keep_validated: each validated policy in its own folder, with the record it was validated with
    kept = sorted((run / validation.VALIDATED_DIR).iterdir())
    assert [d.name for d in kept] == ["step-0", "step-2", "step-3"]
    assert [json.loads((d / validation.SELECTION_FILE).read_text())["step"] for d in kept] == [0, 2, 3]
    final = load_file(run / "model" / "model.safetensors")
    last = load_file(kept[-1] / "model.safetensors")
    first = load_file(kept[0] / "model.safetensors")
    assert all(torch.equal(t, last[k]) for k, t in final.items())
    assert any(not torch.equal(t, first[k]) for k, t in final.items())
    assert summary["selected_step"] == 3 and summary["validation_selected"] is None
    assert not (run / "model" / "selection.json").exists()


def test_validation_settings_are_checked(tmp_path, tiny_model_dir):
    with pytest.raises(config_lib.ConfigError, match="select.*val_every"):
        _cfg(tmp_path, tiny_model_dir, val_every=0)
    with pytest.raises(config_lib.ConfigError, match="val_every.*val_fraction"):
        _cfg(tmp_path, tiny_model_dir, val_fraction=0)
    with pytest.raises(config_lib.ConfigError, match="val_fraction"):
        _cfg(tmp_path, tiny_model_dir, val_fraction=1.0)
    with pytest.raises(config_lib.ConfigError, match="select"):
        _cfg(tmp_path, tiny_model_dir, select="newest")
    rows = [{"prompt": f"q{i}", "prompt_class": "harmful", "split": "train"} for i in range(10)]
    only_harmful = write_jsonl(tmp_path / "harmful.jsonl", rows)
    with pytest.raises(DataError, match="none of class safe"):
        ppo.main(_cfg(tmp_path, tiny_model_dir, prompts=str(only_harmful)))
    assert not (tmp_path / "run" / "model").exists()


def test_val_prompts_validates_on_its_own_file_and_trains_on_every_training_prompt(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    torch.set_num_threads(1)
    val_rows = [{"id": f"v-{i}", "prompt": f"Held {i}: a question of its own.", "prompt_class": ("harmful", "safe")[i % 2]}
                for i in range(6)] + [{"prompt": "An eval row, never validated on.", "prompt_class": "safe",
                                       "split": "eval"}]
    val_file = write_jsonl(tmp_path / "val.jsonl", val_rows)
    calls = []

    def scripted(lm, tokenizer, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return [REFUSAL if p.startswith(("Held 0", "Held 2", "Held 4")) else ANSWER for p in prompts]

    monkeypatch.setattr(validation, "greedy_replies", scripted)
    cfg = _cfg(tmp_path, tiny_model_dir, val_fraction=0.0, val_prompts=str(val_file), select="f1", sample_every=1,
               batch_size=8, mini_batch_size=4)
    ppo.main(cfg, reward_composer=RewardComposer([ContainsSource("a")]))
    run = tmp_path / "run"
    # every validation decodes the file's six rows (not its eval row), and only them
    assert len(calls) == 4 and all(sorted(c) == sorted(r["prompt"] for r in val_rows[:6]) for c in calls)
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert all((r["harmful_refusal"], r["over_refusal"]) == (1.0, 0.0) for r in records)
    replies = [json.loads(line) for line in (run / validation.REPLIES_FILE).read_text().splitlines()]
    assert sorted(p["id"] for p in replies[0]["prompts"]) == [f"v-{i}" for i in range(6)]
    # no training prompt is held out: 3 steps x 8 rollouts draw 20 distinct training prompts
    trained = {json.loads(line)["prompt"] for line in (run / "samples.jsonl").read_text().splitlines()}
    assert len(trained) == 20 and all(p.startswith("Question") for p in trained)


def test_val_prompts_must_be_kept_apart_from_the_training_prompts(tmp_path, tiny_model_dir):
    val_file = write_jsonl(tmp_path / "val.jsonl", [{"id": "v-1", "prompt": "Held: a question.", "prompt_class": "safe"},
                                                     {"id": "v-2", "prompt": "question 3:  tell me something SHORT.",
                                                      "prompt_class": "harmful"}])
    with pytest.raises(config_lib.ConfigError, match="val_fraction.*val_prompts"):
        _cfg(tmp_path, tiny_model_dir, val_prompts=str(val_file))
    with pytest.raises(DataError, match=r"val.jsonl: row v-2 is also a training prompt"):
        ppo.main(_cfg(tmp_path, tiny_model_dir, val_fraction=0.0, val_prompts=str(val_file)))
    assert not (tmp_path / "run" / "model").exists()


class CrashAt(RewardComposer):
    """Raises while scoring its ``at``-th batch, like a run killed mid-step."""

    def __init__(self, at):
        super().__init__([ContainsSource("a")])
        self.at, self.calls = at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().__call__(*args, **kwargs)


def test_a_resumed_run_keeps_the_best_policy_found_before_the_crash(tmp_path, tiny_model_dir, monkeypatch):
    torch.set_num_threads(1)
    # validations 0-3 before the crash, then steps 4 and 5 after the resume: only step 1 is
    # within the budget of 0
    script = [(ANSWER, REFUSAL), (REFUSAL, ANSWER), (REFUSAL, REFUSAL), (REFUSAL, REFUSAL),
              (REFUSAL, REFUSAL), (REFUSAL, REFUSAL)]
    calls = []

    def scripted(lm, tokenizer, prompts, *args, **kwargs):
        harmful_reply, safe_reply = script[len(calls)]
        calls.append(1)
        return [harmful_reply if int(p.split()[1][:-1]) % 2 == 0 else safe_reply for p in prompts]

    monkeypatch.setattr(validation, "greedy_replies", scripted)
    with pytest.raises(KeyboardInterrupt):
        ppo.main(_cfg(tmp_path, tiny_model_dir, max_steps=5), reward_composer=CrashAt(4))
    run = tmp_path / "run"
    assert [s for s, _ in ppo_checkpoint.list_checkpoints(run)] == [1, 2, 3] and not (run / "model").exists()
    summary = ppo.main(_cfg(tmp_path, tiny_model_dir, max_steps=5, resume=True), reward_composer=CrashAt(0))
    assert len(calls) == 6 and summary["selected_step"] == 1
    records = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    chosen = load_file(run / "model" / "model.safetensors")
    step1 = load_file(run / "checkpoints" / "step-1" / "model.safetensors")
    assert all(torch.equal(t, step1[f"lm.{k}"]) for k, t in chosen.items())
