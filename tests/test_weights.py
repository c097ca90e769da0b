"""rbrm fit-weights: pairs of known order, ranking accuracy and the hinge fit on hand numbers,
the table PPO's rbrm source reads, and one run of the command on a small data folder."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.rbrm.grader import Grade
from pipeline.rbrm.rubric import load_rubrics
from pipeline.rbrm.weights import (Completion, fit_table, load_class_weights, load_table, make_pairs, ordered,
                                   ranked_completions, ranking_accuracy, total_reward)
from pipeline.rewards import RBRMSource, RewardComposer, parse_reward_specs

REPO = Path(__file__).resolve().parents[1]
HAND = {"harmful": {"A": 1.0, "B": 0.3, "C": -1.0, "D": -0.5},
        "safe": {"A": -2.0, "B": -2.2, "C": 0.5, "D": 1.0}}


def c(cls, labels, prompt="p"):
    return Completion(prompt, "r", cls, frozenset(labels), "test")


def test_pairs_follow_the_rubric_order_of_each_class():
    # harmful: A > B > D > C; safe: D > A > B > C
    assert ordered(c("harmful", "A"), c("harmful", "B")) and ordered(c("harmful", "D"), c("harmful", "C"))
    assert not ordered(c("harmful", "D"), c("harmful", "B"))
    assert ordered(c("safe", "D"), c("safe", "A")) and not ordered(c("safe", "A"), c("safe", "D"))
    # a refusal of unknown style ranks above D on harmful prompts but not against a B
    assert ordered(c("harmful", "AB"), c("harmful", "D")) and not ordered(c("harmful", "AB"), c("harmful", "B"))
    # never across classes, never with an unknown completion
    assert not ordered(c("harmful", "A"), c("safe", "C")) and not ordered(c("harmful", "A"), c("harmful", ""))
    comps = [c("harmful", "A"), c("harmful", "B"), c("harmful", "C"), c("safe", "D"), c("safe", "B"),
             c("safe", "")]
    pairs = make_pairs(comps, explicit=[(5, 4)], max_per_class=100)
    assert sorted(pairs) == sorted([(5, 4), (0, 1), (0, 2), (1, 2), (3, 4)])
    assert len(make_pairs(comps, [], max_per_class=2)) == 2 + 1  # harmful capped at 2, safe has 1


def test_ranking_accuracy_and_total_reward_on_hand_numbers():
    assert ranking_accuracy(np.array([3.0, 1.0, 2.0]), [(0, 1), (1, 2), (0, 2)]) == pytest.approx(2 / 3)
    assert ranking_accuracy(np.array([1.0, 1.0]), [(0, 1)]) == 0.5  # a tie counts half
    assert np.isnan(ranking_accuracy(np.array([1.0]), []))
    probs = np.array([[1.0, 0, 0, 0], [0, 0, 0.5, 0.5]])
    r = total_reward(probs, np.array([1.0, -1.0]), ["harmful", "safe"], HAND, w_rm=0.5)
    assert r == pytest.approx([0.5 + 1.0, -0.5 + 0.5 * 0.5 + 0.5 * 1.0])
    r = total_reward(probs, np.array([1.0, -1.0]), ["harmful", "safe"], HAND, w_rm={"harmful": 0.0, "safe": 2.0})
    assert r == pytest.approx([1.0, -2.0 + 0.75])


def test_the_fit_reranks_what_the_hand_table_gets_wrong_and_leaves_unpaired_classes_alone():
    # Harmful prompts: the grader calls the worse replies (rank by construction) mostly A and
    # the better ones split between B and D. The hand table ranks every pair wrong; a fitted
    # table that pays B and D above A ranks them right.
    probs = np.array([[0.1, 0.5, 0, 0.4], [0.1, 0.4, 0, 0.5], [0.9, 0.1, 0, 0], [0.8, 0, 0, 0.2]])
    classes = ["harmful"] * 4
    pairs = [(0, 2), (0, 3), (1, 2), (1, 3)]
    z = np.zeros(4)
    assert ranking_accuracy(total_reward(probs, z, classes, HAND, 0.0), pairs) == 0.0
    fitted, rm = fit_table(probs, z, classes, pairs, HAND, w_rm=0.0, margin=0.5, l2=1e-3, steps=400, lr=0.05)
    assert ranking_accuracy(total_reward(probs, z, classes, fitted, 0.0), pairs) == 1.0
    assert fitted["harmful"]["A"] < min(fitted["harmful"]["B"], fitted["harmful"]["D"])
    assert fitted["safe"] == HAND["safe"]  # no safe pair: the hand row stays
    # a strong pull keeps the hand table
    held, _ = fit_table(probs, z, classes, pairs, HAND, w_rm=0.0, l2=100.0, steps=400)
    assert all(abs(held["harmful"][k] - HAND["harmful"][k]) < 0.01 for k in "ABCD")


def test_the_fit_drops_a_reward_model_that_ranks_a_class_backwards_and_keeps_one_that_helps():
    # Equal category probabilities within each pair, so only the reward model can order them.
    # On harmful prompts it ranks both pairs backwards; on safe prompts both right.
    probs = np.array([[1.0, 0, 0, 0]] * 8)
    classes = ["harmful"] * 4 + ["safe"] * 4
    z = np.array([-1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0])
    pairs = [(0, 1), (2, 3), (4, 5), (6, 7)]
    table, rm = fit_table(probs, z, classes, pairs, HAND, w_rm=0.25, l2=1e-3, steps=300)
    assert rm["harmful"] == 0.0 and rm["safe"] > 0.25  # clamped at 0, not inverted
    assert ranking_accuracy(total_reward(probs, z, classes, table, rm), pairs[:2]) == 0.5  # a tie, not a misrank
    assert ranking_accuracy(total_reward(probs, z, classes, table, rm), pairs[2:]) == 1.0
    # without fit_rm the weight stays where the config put it
    _, kept = fit_table(probs, z, classes, pairs, HAND, w_rm=0.25, steps=50, fit_rm=False)
    assert kept == {"harmful": 0.25, "safe": 0.25}


def test_ranked_completions_from_the_project_data_keep_to_the_train_split():
    comps, explicit = ranked_completions(REPO / "data")
    rows = [json.loads(line) for line in (REPO / "data" / "prompts.jsonl").read_text().splitlines()]
    eval_prompts = {r["prompt"] for r in rows if r["split"] == "eval"}
    assert eval_prompts and not eval_prompts & {x.prompt for x in comps}
    # the reward model's held-out pairs stay out too
    prefs = [json.loads(line) for line in (REPO / "data" / "preferences.jsonl").read_text().splitlines()]
    assert len(explicit) == sum(r["split"] == "train" for r in prefs) < len(prefs)
    sft = [x for x in comps if x.source == "sft"]
    assert sft and all(x.labels == frozenset("A" if x.prompt_class == "harmful" else "D") for x in sft)
    assert all(comps[i].prompt == comps[j].prompt for i, j in explicit)
    harmful_c = [x for x in comps if x.prompt_class == "harmful" and x.labels == frozenset("C")]
    assert len(harmful_c) >= 80  # the grader training rows' harmful compliance


def test_load_table_checks_and_names_what_is_wrong(tmp_path):
    assert load_table(HAND) == HAND
    with pytest.raises(ConfigError, match="unknown prompt class 'toxic'"):
        load_table({"toxic": HAND["safe"]})
    with pytest.raises(ConfigError, match=r"harmful: expected rewards for exactly A, B, C and D"):
        load_table({"harmful": {"A": 1.0}})
    with pytest.raises(ConfigError, match="not found; `rbrm fit-weights` writes one"):
        load_table(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "w.yaml"
    bad.write_text("hand: {}\n")
    with pytest.raises(ConfigError, match=r"w\.yaml: expected a key 'category_rewards'; found hand"):
        load_table(str(bad))


class StubGrader:
    """Fixed category probabilities per response; the real rubrics."""

    def __init__(self, probs):
        self.probs = probs
        self.by_class = {r.applies_to[0]: r for r in load_rubrics([REPO / "rubrics"]).values()}

    def rubric_for(self, cls):
        return self.by_class[cls]

    def grade(self, items, progress=False):
        return [Grade("stub", it.prompt_class, probs=self.probs[it.response], category="A",
                      reward=123.0) for it in items]


def test_rbrm_source_pays_the_table_it_is_given_instead_of_the_rubrics():
    grader = StubGrader({"x": {"A": 0.5, "B": 0.0, "C": 0.0, "D": 0.5}})
    table = {"harmful": {"A": 2.0, "B": 0.0, "C": -1.0, "D": 1.0}, "safe": HAND["safe"]}
    assert RBRMSource(grader, ["harmful"])(["p"], ["x"], ["harmful"])[0] == 123.0  # the grader's own reward
    assert RBRMSource(grader, ["harmful"], table=table)(["p"], ["x"], ["harmful"])[0] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="category_rewards has no row for prompt class 'sensitive'"):
        RBRMSource(grader, ["harmful", "sensitive"], table=table)


def test_a_ppo_rewards_block_reads_a_fitted_file_and_names_a_bad_one(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_text("category_rewards:\n  harmful: {A: 2, B: 1, C: -2, D: 0}\n")
    specs = parse_reward_specs({"rbrm": {"grader": {"backend": "embedding"}, "category_rewards": str(path)}})
    assert specs["rbrm"].table == {"harmful": {"A": 2.0, "B": 1.0, "C": -2.0, "D": 0.0}}
    path.write_text("category_rewards:\n  harmful: {A: 2, B: one, C: -2, D: 0}\n")
    with pytest.raises(ConfigError, match=r"weights\.yaml: category_rewards\.harmful: expected numbers"):
        parse_reward_specs({"rbrm": {"grader": {"backend": "embedding"}, "category_rewards": str(path)}})


@pytest.mark.slow
def test_fit_weights_command_writes_a_table_ppo_reads(tmp_path, minilm_dir):
    from pipeline.rbrm.weights import FitWeightsConfig, main

    data = tmp_path / "data"
    data.mkdir()
    src = REPO / "data"
    for name, keep in (("sft.jsonl", 24), ("preferences.jsonl", 24), ("grader_train.jsonl", 60)):
        lines = (src / name).read_text().splitlines()
        (data / name).write_text("\n".join(lines[::max(1, len(lines) // keep)]) + "\n")
    ppo = tmp_path / "ppo.yaml"
    out = tmp_path / "w.yaml"
    # the PPO config already points at the file this run writes
    ppo.write_text(f"rewards:\n  rbrm:\n    weight: 1.0\n    category_rewards: {out}\n"
                   f"    grader: {{backend: classifier, model: {minilm_dir}, rubrics: [{REPO / 'rubrics'}]}}\n")
    payload = main(FitWeightsConfig(ppo_config=str(ppo), data_dir=str(data), output=str(out), steps=50))
    table = load_table(str(out))
    assert set(table) == {"harmful", "safe", "sensitive"} and table == payload["category_rewards"]
    acc = payload["ranking_accuracy"]
    assert acc["pairs"]["train"] > 0 and acc["pairs"]["held_out"] > 0
    # the fit does not rank its own training pairs worse than the hand table does
    assert acc["train"]["fitted"]["all"] >= acc["train"]["hand"]["all"] - 0.02


class Ones:
    name = "rm"

    def __call__(self, prompts, responses, prompt_classes=None):
        return np.ones(len(responses))


def test_the_composer_scales_a_source_by_the_class_of_each_sample():
    composer = RewardComposer([Ones()], weights={"rm": 0.5}, class_weights={"rm": {"harmful": 0.0, "safe": 3.0}})
    total, _ = composer(["a", "b", "c"], ["x", "y", "z"], ["harmful", "safe", "sensitive"])
    assert total == pytest.approx([0.0, 1.5, 0.5])  # sensitive is not named: the plain weight
    with pytest.raises(ValueError, match="need a prompt class for every sample"):
        composer(["a"], ["x"], None)
    with pytest.raises(ValueError, match="class_weights of source 'rm'"):
        RewardComposer([Ones()], class_weights={"rm": {"toxic": 1.0}})


def test_class_weights_come_from_a_mapping_or_a_fitted_file(tmp_path):
    assert load_class_weights({"harmful": 0.5}, "rm") == {"harmful": 0.5}
    path = tmp_path / "w.yaml"
    path.write_text("class_weights:\n  rm: {harmful: 0.1, safe: 1.2}\n")
    specs = parse_reward_specs({"rm": {"weight": 0.25, "class_weights": str(path)},
                                "length": {"max_chars": 10, "class_weights": {"safe": 2}}})
    assert specs["rm"].class_multipliers == {"harmful": 0.1, "safe": 1.2}
    assert specs["length"].class_multipliers == {"safe": 2.0}
    with pytest.raises(ConfigError, match=r"w\.yaml: expected a key 'class_weights\.rbrm'; found rm"):
        load_class_weights(str(path), "rbrm")
    with pytest.raises(ConfigError, match=r"rewards\.rm\.class_weights\.harmful: expected a number"):
        parse_reward_specs({"rm": {"class_weights": {"harmful": "lots"}}})
