"""The refusal hold: a class that stops refusing weighs more in the next updates."""
import json

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from pipeline import config as config_lib
from pipeline import ppo
from pipeline.config import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(tmp_path, model, **kw):
    base = {"model": str(model), "prompts": "unset", "output_dir": str(tmp_path / "run"), "report_to": ["none"],
            "max_steps": 3, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4,
            "learning_rate": 1e-3, "kl_coef": 0.0, "rewards": {"contains": {"text": "a", "reward": 1}}}
    return config_lib.from_dict(ppo.PPOConfig, {**base, **kw}, "test")


def test_hold_refusal_raises_the_weight_of_a_class_that_stops_refusing(tmp_path, tiny_model_dir):
    # The tiny random model never writes a refusal phrase, so the harmful share is 0 every step
    # and the multiplier climbs to its cap; it is logged and checked before any model loads.
    prompts = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": f"Question {i}: tell me something short.", "prompt_class": c}
        for i, c in enumerate(["harmful", "safe"] * 2)])
    cfg = _cfg(tmp_path, tiny_model_dir, prompts=str(prompts), hold_refusal={"harmful": 0.9}, hold_max_weight=3.0)
    ppo.main(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["hold/harmful_refused"] for h in history] == [0.0] * 3
    assert history[0]["hold/harmful_weight"] == pytest.approx(min(3.0, np.exp(2.0 * 0.9)))
    assert history[-1]["hold/harmful_weight"] == pytest.approx(3.0)
    with pytest.raises(ConfigError, match="hold_refusal"):
        _cfg(tmp_path, tiny_model_dir, hold_refusal={"harmful": 1.5})
    with pytest.raises(ConfigError, match="hold_refusal.*'unsafe'"):
        ppo.main(_cfg(tmp_path, tiny_model_dir, prompts=str(prompts), output_dir=str(tmp_path / "other"),
                      hold_refusal={"unsafe": 0.9}))


def test_the_shipped_ppo_config_validates_and_anchors_both_sides_of_the_refusal_line():
    # configs/ppo.yaml is what `make demo` runs: it must parse; with refusal centring its PPO-ptx
    # term must draw on refusals and answers alike (a refusals-only anchor slid runs towards refusing).
    from pathlib import Path

    from pipeline.evaluation.refusal_match import is_refusal
    from pipeline.ppo.config import from_dict
    from pipeline.ppo.trainer import ptx_conversations

    repo = Path(__file__).resolve().parents[1]
    data = config_lib.load_yaml(str(repo / "configs" / "ppo.yaml"))
    data["ptx_data"] = str(repo / data["ptx_data"])
    cfg = from_dict(data, "configs/ppo.yaml")
    cfg.validate()
    demos = ptx_conversations(cfg)
    assert cfg.refusal_centring == 1.0 and cfg.ptx_coef > 0 and cfg.ptx_classes == []
    assert len(demos) >= 300
    assert 0.15 < sum(is_refusal(m[-1]["content"]) for m in demos) / len(demos) < 0.6
