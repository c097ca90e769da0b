import json
import math

import numpy as np
import pytest
import torch

from test_ppo import _prompts_file
from pipeline import config as config_lib
from pipeline import ppo
from pipeline.ppo import config as ppo_config
from pipeline.data import DataError
from pipeline.models import load_causal_lm
from pipeline.rewards import ContainsSource, RewardComposer, RewardSource, prompt_text


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def _cfg(tmp_path, model, **kw):
    if "prompts" not in kw:
        kw["prompts"] = str(_prompts_file(tmp_path))
    base = {"model": str(model), "output_dir": str(tmp_path / "run"),
            "report_to": ["none"], "algo": "grpo", "max_steps": 2, "batch_size": 4, "num_generations": 2,
            "max_new_tokens": 4, "learning_rate": 1e-2, "sample_every": 0,
            "rewards": {"contains": {"text": "a", "reward": 1}}}
    return ppo_config.from_dict({**base, **kw}, "test")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("algo, extra", [
    ("grpo", {}),
    ("rloo", {"report_to": ["tensorboard"]}),
    ("grpo", {"lora": True, "lora_r": 4, "lora_alpha": 8}),
], ids=["grpo", "rloo", "grpo-lora"])
def test_runs_end_to_end_and_writes_the_run_folder(tmp_path, tiny_model_dir, algo, extra):
    cfg = _cfg(tmp_path, tiny_model_dir, algo=algo, sample_every=1, **extra)
    assert isinstance(cfg, ppo.CriticFreeConfig)
    summary = ppo.main(cfg, reward_composer=RewardComposer([ContainsSource("a")]))

    run = tmp_path / "run"
    assert summary["algo"] == algo and summary["steps"] == 2
    assert summary["responses"] == 8 and summary["skipped"] == 0  # 2 steps x 2 prompts x 2 responses
    # the first and last steps' mean reward: the mean of the 4 responses' rewards each step logged
    samples = _lines(run / "samples.jsonl")
    for key, step in (("reward_first", 1), ("reward_last", 2)):
        rewards = [s["reward"] for s in samples if s["step"] == step]
        assert len(rewards) == 4 and summary[key] == pytest.approx(sum(rewards) / 4), (key, rewards)
    assert json.loads((run / "metrics.json").read_text()) == summary
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    history = _lines(run / "history.jsonl")
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert math.isfinite(h["reward/score"]) and math.isfinite(h["reward/contains"])
        assert math.isfinite(h["objective/kl"])  # kl_coef 0.05 > 0: TRL logs the KL
    assert summary["reward_first"] == history[0]["reward/score"]
    if "report_to" in extra:
        assert any((run / "logs").rglob("events.out.tfevents*")), "tensorboard logs expected in <run>/logs"
    assert not (run / "model" / "value_head.pt").exists()
    assert not (run / "model" / "adapter_config.json").exists(), "LoRA adapters must be merged into model/"
    before = load_causal_lm(str(tiny_model_dir)).state_dict()
    after = load_causal_lm(str(run / "model")).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "two steps at lr 1e-2 must move the policy"


@pytest.mark.parametrize("overrides, keys", [
    ({"batch_size": 4, "num_generations": 3}, ("'batch_size' (4)", "'num_generations' (3)")),
    ({"adaptive_kl": True}, ("unknown key 'adaptive_kl'",)),
    ({"ppo_epochs": 4}, ("unknown key 'ppo_epochs'",)),
    ({"num_generations": 1}, ("'num_generations'", "at least 2")),
])
def test_impossible_settings_are_one_line_config_errors(tmp_path, tiny_model_dir, overrides, keys):
    with pytest.raises(config_lib.ConfigError) as info:
        ppo.main(_cfg(tmp_path, tiny_model_dir, **overrides), reward_composer=RewardComposer([ContainsSource("a")]))
    message = str(info.value)
    assert "\n" not in message and all(k in message for k in keys), message
    assert not (tmp_path / "run").exists(), "a config error must stop before the run folder is touched"


def test_too_few_prompts_for_one_step_is_a_data_error(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, prompts=str(_prompts_file(tmp_path, n=3)), batch_size=8, num_generations=2)
    with pytest.raises(DataError, match="3 training prompt.*takes 4"):
        ppo.main(cfg, reward_composer=RewardComposer([ContainsSource("a")]))


def test_each_algorithm_reads_its_own_settings_class_and_old_key_names_still_work(tmp_path, tiny_model_dir, capsys):
    grpo = _cfg(tmp_path, tiny_model_dir)
    assert type(grpo) is ppo.CriticFreeConfig and not hasattr(grpo, "ppo_epochs")
    ppo_cfg = ppo_config.from_dict({"model": "m", "rewards": {"contains": {"text": "a"}}, "steps": 7,
                                    "responses_per_prompt": 2, "batch_size": 4}, "old.yaml")
    assert type(ppo_cfg) is ppo.PPOConfig and (ppo_cfg.max_steps, ppo_cfg.num_generations) == (7, 2)
    err = capsys.readouterr().err
    assert "old.yaml: key 'steps' is now called 'max_steps'" in err and "'responses_per_prompt'" in err
    with pytest.raises(config_lib.ConfigError, match="keys 'steps' and 'max_steps' are the same setting"):
        ppo_config.from_dict({"steps": 7, "max_steps": 8}, "both.yaml")


class SafeOnly(RewardSource):
    """Records every (prompt, class) it is asked about; 1.0 for safe prompts, NaN for the rest."""

    name = "safe_only"

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def __call__(self, prompts, responses, prompt_classes=None):
        self.seen += [(prompt_text(p), c) for p, c in zip(prompts, prompt_classes)]
        return np.array([1.0 if c == "safe" else math.nan for c in prompt_classes])


def test_reward_gets_each_prompts_class_and_nan_is_unscored(tmp_path, tiny_model_dir):
    prompts = _prompts_file(tmp_path, classes=("harmful", "safe"), n=4)
    class_of = {r["prompt"]: r["prompt_class"] for r in _lines(prompts)}
    source = SafeOnly()
    # One step over all four prompts, two responses each.
    cfg = _cfg(tmp_path, tiny_model_dir, prompts=str(prompts), max_steps=1, batch_size=8, sample_every=1)
    summary = ppo.main(cfg, reward_composer=RewardComposer([source]))

    assert len(source.seen) == 8
    assert all(cls == class_of[prompt] for prompt, cls in source.seen), source.seen
    assert sorted(p for p, _ in source.seen) == sorted([p for p in class_of if p != "held out"] * 2)
    # Harmful prompts got NaN from the only source: None for TRL, counted as skipped.
    assert summary["skipped"] == 4 and summary["responses"] == 8
    samples = _lines(tmp_path / "run" / "samples.jsonl")
    assert len(samples) == 8
    for s in samples:
        assert s["prompt_class"] == class_of[s["prompt"]]
        assert s["reward"] == (1.0 if s["prompt_class"] == "safe" else None)
    assert _lines(tmp_path / "run" / "history.jsonl")[0]["reward/score"] == 1.0  # mean over scored responses only
