"""Reward sources and their composition: weights, normalisation and NaN handling against
hand-worked numbers, the running statistics against numpy, the RBRM and reward-model sources
on real (tiny or small) models, the config factory and the TRL reward-function adapter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import REPO
from pipeline.config import ConfigError
from pipeline.rbrm.grader import Grader
from pipeline.rbrm.rubric import RubricError, load_rubrics
from pipeline.rewards import (
    ContainsSource,
    LengthPenaltySource,
    RBRMSource,
    RewardComposer,
    RewardModelSource,
    RewardSource,
    as_trl_reward_func,
    build_reward_composer,
)

NAN, INF = math.nan, math.inf


class Fixed(RewardSource):
    """Returns the next array of ``batches`` on each call (the last one again once used up)."""

    def __init__(self, name, *batches):
        self.name = name
        self.batches = [np.asarray(b, dtype=float) for b in batches]
        self.calls = 0

    def __call__(self, prompts, responses, prompt_classes=None):
        out = self.batches[min(self.calls, len(self.batches) - 1)]
        self.calls += 1
        return out


class ByClass(RewardSource):
    """A fixed value per prompt class; NaN for classes it does not know."""

    name = "by_class"

    def __init__(self, table):
        self.table = table

    def __call__(self, prompts, responses, prompt_classes=None):
        return np.array([self.table.get(c, NAN) for c in prompt_classes])


def batch(n):
    return [f"p{i}" for i in range(n)], [f"r{i}" for i in range(n)]


# ----------------------------------------------------------------------------- composition


def test_weights_and_batch_normalisation_by_hand():
    # a: mean 5, population variance (9+1+1+1+0+0+4+16)/8 = 4, std 2
    #    -> normalised [-1.5, -0.5, -0.5, -0.5, 0, 0, 1, 2], weight 2 -> [-3, -1, -1, -1, 0, 0, 2, 4]
    # b: raw (no normalisation), weight 0.5 -> [0.5, 0, 0, 0, 0, 0, 0, 0.5]
    a = Fixed("a", [2, 4, 4, 4, 5, 5, 7, 9])
    b = Fixed("b", [1, 0, 0, 0, 0, 0, 0, 1])
    composer = RewardComposer([a, b], weights={"a": 2.0, "b": 0.5}, normalise={"a": "batch"})
    total, info = composer(*batch(8))
    np.testing.assert_allclose(total, [-2.5, -1, -1, -1, 0, 0, 2, 4.5], atol=1e-6)
    np.testing.assert_allclose(info.normalised["a"], [-1.5, -0.5, -0.5, -0.5, 0, 0, 1, 2], atol=1e-6)
    np.testing.assert_allclose(info.weighted["b"], [0.5, 0, 0, 0, 0, 0, 0, 0.5])
    np.testing.assert_array_equal(info.raw["a"], [2, 4, 4, 4, 5, 5, 7, 9])
    assert info.mean == {"a": 5.0, "b": 0.25}
    assert info.n_unscored == 0
    m = info.metrics()
    assert m["reward/a"] == 5.0 and m["reward/b"] == 0.25 and m["reward/a_nan"] == 0
    assert m["reward/total"] == pytest.approx(0.125)  # (-2.5 - 1 - 1 - 1 + 0 + 0 + 2 + 4.5) / 8


def test_weights_as_a_list_default_to_sources_order_and_clip_bounds_the_total():
    a, b = Fixed("a", [1, -3]), Fixed("b", [2, 0])
    total, _ = RewardComposer([a, b], weights=[3.0, 1.0], clip=2.5)(*batch(2))
    np.testing.assert_allclose(total, [2.5, -2.5])  # 3*1 + 2 = 5 and 3*(-3) + 0 = -9, clipped


def test_nan_does_not_apply_inf_is_invalid_and_all_nan_sample_is_nan():
    # a under batch normalisation: finite values 1, 3 -> mean 2, std 1 -> [-1, ., 1, .];
    # if NaN or inf entered the statistics, every normalised value would be NaN.
    # b raw: only sample 2 -> 10.
    # sample 0: -1; sample 1: no finite value -> NaN; sample 2: 1 + 10 = 11; sample 3: inf and NaN -> NaN.
    a = Fixed("a", [1, NAN, 3, INF])
    b = Fixed("b", [NAN, NAN, 10, NAN])
    total, info = RewardComposer([a, b], normalise={"a": "batch"})(*batch(4))
    np.testing.assert_allclose(total, [-1, NAN, 11, NAN], atol=1e-6)
    np.testing.assert_allclose(info.normalised["a"], [-1, NAN, 1, NAN], atol=1e-6)
    np.testing.assert_array_equal(info.weighted["a"], [info.weighted["a"][0], 0, info.weighted["a"][2], 0])
    assert (info.n_nan, info.n_inf) == ({"a": 1, "b": 3}, {"a": 1, "b": 0})
    assert info.mean == {"a": 2.0, "b": 10.0}
    np.testing.assert_array_equal(info.unscored, [False, True, False, True])
    assert info.n_unscored == 2
    m = info.metrics()
    assert m["reward/unscored"] == 2 and m["reward/a_inf"] == 1 and m["reward/b_nan"] == 3
    assert m["reward/total"] == pytest.approx(5.0)  # mean of -1 and 11


def test_source_that_never_applies_is_all_nan_without_error():
    # b whitens [1, 2] to [-1, 1]; a adds nothing and its running statistics stay empty
    a, b = Fixed("a", [NAN, NAN]), Fixed("b", [1, 2])
    composer = RewardComposer([a, b], normalise={"a": "running", "b": "batch"})
    total, info = composer(*batch(2))
    np.testing.assert_allclose(total, [-1, 1], atol=1e-6)
    assert math.isnan(info.mean["a"]) and info.n_nan["a"] == 2
    assert composer.state_dict()["running"]["a"]["count"] == 0


def test_wrong_length_names_the_source_and_the_lengths():
    composer = RewardComposer([Fixed("ok", [1, 2, 3, 4]), Fixed("short", [1, 2, 3])])
    with pytest.raises(ValueError, match=r"reward source 'short' returned 3 values for a batch of 4 samples"):
        composer(*batch(4))
    with pytest.raises(ValueError, match=r"'flat' returned shape \(2, 2\) for a batch of 4"):
        RewardComposer([Fixed("flat", [[1, 2], [3, 4]])])(*batch(4))


def test_composer_rejects_bad_configuration():
    a = Fixed("a", [1])
    with pytest.raises(ValueError, match="repeated: a"):
        RewardComposer([a, Fixed("a", [2])])
    with pytest.raises(ValueError, match="unknown source.*'rm'"):
        RewardComposer([a], weights={"rm": 1.0})
    with pytest.raises(ValueError, match="normalise for source 'a'.*'whiten'"):
        RewardComposer([a], normalise={"a": "whiten"})


def test_running_normalisation_matches_numpy_and_survives_a_state_dict_round_trip():
    first, second = [1.0, 2.0, 3.0, NAN], [10.0, 20.0, NAN, 30.0]
    composer = RewardComposer([Fixed("rm", first, second)], normalise={"rm": "running"})
    _, info1 = composer(*batch(4))
    seen = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(info1.normalised["rm"][:3], (seen - seen.mean()) / seen.std(), atol=1e-6)
    state = json.loads(json.dumps(composer.state_dict()))  # what a checkpoint would hold
    assert state == {"running": {"rm": {"mean": 2.0, "var": pytest.approx(2 / 3), "count": 3}}}

    total2, info2 = composer(*batch(4))
    seen = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])  # both batches' finite values
    expected = (np.array([10.0, 20.0, 30.0]) - seen.mean()) / seen.std()
    np.testing.assert_allclose(info2.normalised["rm"][[0, 1, 3]], expected, atol=1e-6)
    assert math.isnan(total2[2])

    resumed = RewardComposer([Fixed("rm", second)], normalise={"rm": "running"})
    resumed.load_state_dict(state)
    total_resumed, _ = resumed(*batch(4))
    np.testing.assert_allclose(total_resumed, total2, atol=1e-9)
    assert resumed.state_dict() == composer.state_dict()


def test_running_stats_frozen_when_not_updating():
    composer = RewardComposer([Fixed("rm", [1.0, 3.0], [5.0, 7.0])], normalise={"rm": "running"})
    composer(*batch(2))
    before = composer.state_dict()
    total, _ = composer(*batch(2), update_stats=False)
    seen = np.array([1.0, 3.0, 5.0, 7.0])  # the batch counts, but is not kept
    np.testing.assert_allclose(total, (np.array([5.0, 7.0]) - seen.mean()) / seen.std(), atol=1e-6)
    assert composer.state_dict() == before


def test_load_state_dict_names_mismatched_sources():
    composer = RewardComposer([Fixed("rm", [1.0])], normalise={"rm": "running"})
    with pytest.raises(ValueError, match="saved but not running now: rbrm; running now but not saved: rm"):
        composer.load_state_dict({"running": {"rbrm": {"mean": 0.0, "var": 1.0, "count": 4}}})
    composer.load_state_dict({"running": {"rbrm": {"mean": 0.0, "var": 1.0, "count": 4}}}, strict=False)
    assert composer.state_dict()["running"]["rm"]["count"] == 0


# ----------------------------------------------------------------------------- simple rules


def test_contains_source_by_hand():
    responses = ["I'm sorry, no.", "no", "SORRY!"]
    np.testing.assert_array_equal(ContainsSource("sorry", reward=2.0)([""] * 3, responses), [2, 0, 0])
    np.testing.assert_array_equal(ContainsSource("sorry", reward=2.0, ignore_case=True)([""] * 3, responses),
                                  [2, 0, 2])


def test_length_penalty_by_hand():
    # limit 10, coef 0.5: 5 and 10 chars are free; 15 -> -0.5 * 5/10; 30 -> -0.5 * 20/10
    responses = ["x" * 5, "x" * 10, "x" * 15, "x" * 30]
    np.testing.assert_allclose(LengthPenaltySource(10, coef=0.5)([""] * 4, responses), [0, 0, -0.25, -1.0])


# ----------------------------------------------------------------------------- RBRM source

HARMFUL = "How do I build a pipe bomb at home?"
REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure, happy to help! First gather the materials, then follow the steps carefully. Good luck!"


@pytest.fixture(scope="module")
def embedding_grader(minilm_dir):
    import torch

    from pipeline.rbrm.embedding import EmbeddingBackend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Grader(load_rubrics([REPO / "rubrics"]), EmbeddingBackend(str(minilm_dir), device="cpu"))
    torch.set_num_threads(threads)


def test_rbrm_source_prefers_a_refusal_on_a_harmful_prompt(embedding_grader):
    source = RBRMSource(embedding_grader, ["harmful", "safe"])
    chat = [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": HARMFUL}]
    values = source([HARMFUL, chat], [REFUSAL, COMPLIANCE], ["harmful", "harmful"])
    assert values.shape == (2,) and np.isfinite(values).all()
    # refusal_style rewards: A 1.0, B 0.3, C -1.0, D -0.5; a clear refusal is mostly A, the
    # eager reply mostly C or D, so the expected rewards sit on opposite sides of 0.
    assert values[0] > 0.5 and values[1] < 0, values
    assert [g.category for g in source.last_grades][0] == "A"
    assert set(source.last_grades[1].probs) == {"A", "B", "C", "D"}
    m = source.metrics()
    assert m["rbrm/harmful/desired_refusal_rate"] == 0.5 and m["rbrm/unscored"] == 0
    assert m["rbrm/harmful/reward"] == pytest.approx(values.mean())


def test_rbrm_source_errors_at_construction_for_a_class_without_a_rubric():
    rubrics = [r for r in load_rubrics([REPO / "rubrics"]).values() if list(r.applies_to) == ["harmful"]]
    assert len(rubrics) == 1
    grader = Grader(rubrics, backend=object())  # never called: the check needs only the rubrics
    with pytest.raises(RubricError, match="reward source 'rbrm': no rubric applies to prompt class 'sensitive'"):
        RBRMSource(grader, ["harmful", "sensitive"])
    source = RBRMSource(grader, ["harmful"])
    with pytest.raises(ValueError, match="sample 1 has prompt class 'safe'"):
        source(["a", "b"], ["x", "y"], ["harmful", "safe"])
    with pytest.raises(ValueError, match="needs a prompt class"):
        source(["a"], ["x"], None)


# ----------------------------------------------------------------------------- reward-model source


@pytest.fixture(scope="module")
def rm_scorer(tiny_model_dir):
    import torch

    from pipeline.reward_model import RewardScorer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield RewardScorer(str(tiny_model_dir), batch_size=2, device="cpu")
    torch.set_num_threads(threads)


def test_reward_model_source_gives_one_finite_score_per_sample(rm_scorer):
    source = RewardModelSource(rm_scorer)
    prompts = ["Hi", [{"role": "user", "content": "Tell me about tea."}], "Why is the sky blue?"]
    responses = ["Hello!", "Tea is a drink.", "Rayleigh scattering."]
    values = source(prompts, responses)
    assert values.shape == (3,) and values.dtype == np.float64 and np.isfinite(values).all()
    np.testing.assert_allclose(values, rm_scorer.score(prompts, responses).numpy(), atol=1e-6)
    assert len(set(values.tolist())) == 3


# ----------------------------------------------------------------------------- factory


def test_factory_builds_rules_with_weights_and_types():
    composer = build_reward_composer({
        "length": {"weight": 0.5, "max_chars": 4},
        "polite": {"type": "contains", "text": "please", "reward": 2, "weight": 3},
    }, clip=5.0)
    # "please!!" (8 chars): length -(8-4)/4 = -1 -> -0.5; polite 2 * 3 = 6; total 5.5 -> clipped to 5
    # "ok": length 0; polite 0
    total, info = composer(["p", "p"], ["please!!", "ok"])
    np.testing.assert_allclose(total, [5.0, 0.0])
    assert composer.names == ["length", "polite"] and info.raw["polite"].tolist() == [2.0, 0.0]


def test_factory_builds_a_reward_model_source(tiny_model_dir):
    composer = build_reward_composer({"rm": {"model": str(tiny_model_dir), "normalise": "batch", "device": "cpu"}})
    total, _ = composer(["a", "b"], ["x", "y"])
    np.testing.assert_allclose(sorted(total), [-1, 1], atol=1e-4)  # two values whiten to -1 and 1
    assert composer.normalise == {"rm": "batch"}


@pytest.mark.parametrize("config, message", [
    ({"length": {"max_chars": 5, "wieght": 1}}, r"rewards\.length: unknown key 'wieght' \(did you mean 'weight'\?\)"),
    ({"bonus": {"text": "x"}}, r"rewards\.bonus: unknown reward source type 'bonus'"),
    ({"length": {"max_chars": 0}}, r"rewards\.length: key 'max_chars'"),
    ({"contains": {"reward": 1}}, r"rewards\.contains: key 'text'"),
    ({"rm": {"normalise": "whiten"}}, r"rewards\.rm: key 'normalise'.*'whiten'"),
    ({"rbrm": {"grader": {"bakend": "embedding"}}}, r"rewards\.rbrm\.grader: unknown key 'bakend'"),
    ({}, r"rewards: expected a non-empty mapping"),
])
def test_factory_errors_name_the_entry_and_key(config, message):
    with pytest.raises(ConfigError, match=message):
        build_reward_composer(config)


# ----------------------------------------------------------------------------- TRL adapter


def trl_composer():
    return RewardComposer([ContainsSource("sorry", reward=1.0), ByClass({"harmful": 2.0, "safe": -1.0})],
                          weights={"by_class": 0.5})


def test_trl_reward_func_reads_strings_messages_and_the_prompt_class_column():
    f = as_trl_reward_func(trl_composer(), name="safety_reward")
    assert f.__name__ == "safety_reward"
    logged = {}
    # contains: 1, 0, 1; by_class (weight 0.5): 1, -0.5, NaN -> totals 2, -0.5, 1
    out = f(prompts=["q1", "q2", "q3"], completions=["sorry", "sure", "so sorry"],
            prompt_class=["harmful", "safe", "sensitive"], completion_ids=[[1], [2], [3]],
            trainer_state=None, log_metric=lambda k, v: logged.setdefault(k, v))
    assert out == [2.0, -0.5, 1.0]
    assert logged["reward/contains"] == pytest.approx(2 / 3) and logged["reward/by_class_nan"] == 1

    chat_prompts = [[{"role": "user", "content": "q1"}], [{"role": "user", "content": "q2"}]]
    chat_completions = [[{"role": "assistant", "content": "sorry"}],
                        [{"role": "assistant", "content": [{"type": "text", "text": "sure"}]}]]
    assert f(prompts=chat_prompts, completions=chat_completions, prompt_class=["harmful", "safe"]) == [2.0, -0.5]


def test_trl_reward_func_classes_from_a_mapping_or_function_and_none_when_nothing_applies():
    by_text = as_trl_reward_func(trl_composer(), {"q1": "harmful", "q2": "sensitive"})
    chat = [[{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}], "q2"]
    # q1 (last user turn of the chat) is harmful: 0 + 0.5 * 2 = 1; q2 is sensitive: by_class
    # does not apply, but contains does (0), so the total is 0, not None
    assert by_text(prompts=chat, completions=["x", "x"]) == [1.0, 0.0]
    with pytest.raises(KeyError, match="no prompt class known for prompt 'q9'"):
        by_text(prompts=["q9"], completions=["x"])

    only_class = RewardComposer([ByClass({"harmful": 2.0})])
    f = as_trl_reward_func(only_class, lambda prompt: "harmful" if "bomb" in prompt else "safe")
    assert f(prompts=["bomb?", "tea?"], completions=["a", "b"]) == [2.0, None]  # None: TRL skips it


def test_a_new_reward_source_registers_itself_without_touching_pipeline_code():
    import dataclasses

    from pipeline.config import field
    from pipeline.rewards import SOURCES, SourceSpec, register_source, sources_help

    class Exclaim(RewardSource):
        def __init__(self, per_mark, name):
            self.per_mark, self.name = per_mark, name

        def __call__(self, prompts, responses, prompt_classes=None):
            return np.array([self.per_mark * r.count("!") for r in responses], dtype=np.float64)

    @register_source("exclaim")
    @dataclasses.dataclass
    class ExclaimSpec(SourceSpec):
        """A reward per exclamation mark."""

        per_mark: float = field(0.5, help="reward per '!'")

        def check(self, where):
            if self.per_mark < 0:
                raise ConfigError(f"{where}: key 'per_mark': expected a number >= 0, got {self.per_mark}")

        def build(self, name):
            return Exclaim(self.per_mark, name)

    try:
        composer = build_reward_composer({"loud": {"type": "exclaim", "per_mark": 0.5, "weight": 2.0},
                                          "plain": {"type": "contains", "text": "hi"}})
        total, info = composer(["p", "p", "p"], ["hi!!", "hi", "yo!"], ["safe"] * 3)
        # loud: 2 * 0.5 * marks = 2, 0, 1; plain: 1, 1, 0
        assert total.tolist() == [3.0, 1.0, 1.0]
        assert info.raw["loud"].tolist() == [1.0, 0.0, 0.5]
        with pytest.raises(ConfigError, match=r"rewards\.loud: key 'per_mark': expected a number >= 0"):
            build_reward_composer({"loud": {"type": "exclaim", "per_mark": -1}})
        with pytest.raises(ConfigError, match=r"rewards\.loud: unknown key 'volume'"):
            build_reward_composer({"loud": {"type": "exclaim", "volume": 3}})
        assert "  exclaim: A reward per exclamation mark.\n    per_mark: reward per '!'" in sources_help()
    finally:
        SOURCES.pop("exclaim")
    with pytest.raises(ConfigError, match="unknown reward source type 'exclaim'"):
        build_reward_composer({"loud": {"type": "exclaim"}})
