import json
import random

import pytest
import torch

from conftest import write_jsonl
from pipeline import config as config_lib
from pipeline import reward_model
from pipeline.data import load_preferences

TOPICS = ["cats", "rain", "trains", "bread", "stars", "chess", "rivers", "music", "paint", "tea",
          "snow", "clocks", "maps", "bees", "glass", "wind", "salt", "kites", "ink", "moss"]
WARM = "Sure, happy to help with {t}! Here is a friendly overview."
COLD = "No. {t} bores me."


def toy_pairs(n, seed, prefer_warm=True):
    """A separable toy preference set: warm replies against curt ones, on varied prompts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        good, bad = (WARM, COLD) if prefer_warm else (COLD, WARM)
        rows.append({"prompt": f"Tell me about {t}, please ({i}).", "chosen": good.format(t=t),
                     "rejected": bad.format(t=t)})
    return rows


def _cfg(tmp_path, model, data, **kw):
    base = {"model": str(model), "data": str(data), "output_dir": str(tmp_path / "rm"), "report_to": ["none"],
            "max_steps": 30, "per_device_train_batch_size": 8, "logging_steps": 10, "warmup_steps": 0,
            "learning_rate": 3e-3, "lr_scheduler_type": "constant", "eval_fraction": 0.0}
    return config_lib.from_dict(reward_model.RewardModelConfig, {**base, **kw}, "test")


@pytest.mark.parametrize("prefer_warm", [True, False])
def test_rm_learns_a_separable_toy_set(tmp_path, tiny_model_dir, prefer_warm):
    # Trained once with each orientation of the same pairs: an untrained model scores p and
    # 1 - p on the two, so reaching 0.9 on both shows that training did the separating.
    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(64, seed=0, prefer_warm=prefer_warm))
    held_out = write_jsonl(tmp_path / "eval.jsonl", toy_pairs(40, seed=1, prefer_warm=prefer_warm))
    metrics = reward_model.main(_cfg(tmp_path, tiny_model_dir, train, eval_data=str(held_out)))
    assert metrics["eval_pairs"] == 40
    assert metrics["eval_accuracy"] >= 0.9
    saved = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert saved["eval_accuracy"] == metrics["eval_accuracy"]
    info = json.loads((tmp_path / "rm" / "run.json").read_text())
    assert info["status"] == "complete" and info["stage"] == "reward_model"


def test_fresh_score_head_depends_on_the_seed_only(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(4, seed=0))
    ds = load_preferences(str(data))
    heads = []
    for seed, noise in ((7, 1), (7, 2), (8, 1)):
        torch.manual_seed(noise)       # whatever the process did before must not matter
        cfg = _cfg(tmp_path, tiny_model_dir, data, seed=seed)
        trainer, _ = reward_model.build_trainer(cfg, ds)
        heads.append(trainer.model.score.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


def test_scorer_batches_match_one_at_a_time(tiny_model_dir):
    scorer = reward_model.RewardScorer(str(tiny_model_dir), batch_size=3)
    prompts = ["Hi", "A much longer prompt with many more words in it than the others", "Mid length prompt",
               [{"role": "user", "content": "multi"}, {"role": "assistant", "content": "turn"},
                {"role": "user", "content": "chat"}]]
    responses = ["Hello", "short", "A response of some length, longer than the others", "ok"]
    batched = scorer.score(prompts, responses)
    single = torch.stack([scorer.score([p], [r])[0] for p, r in zip(prompts, responses)])
    assert batched.shape == (4,)
    assert torch.allclose(batched, single, atol=1e-5)
    assert len(set(batched.tolist())) == 4


def test_scorer_keeps_the_end_of_long_inputs(tiny_model_dir):
    scorer = reward_model.RewardScorer(str(tiny_model_dir), max_length=16)
    ids = scorer.encode("word " * 100, "final answer")
    assert len(ids) == 16
    assert scorer.tokenizer.decode(ids).endswith("final answer<|im_end|>\n")


def test_scorer_rejects_mismatched_lengths(tiny_model_dir):
    scorer = reward_model.RewardScorer(str(tiny_model_dir))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorer.score(["a", "b"], ["x"])


def test_accuracy_cli_on_a_pair_file(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", toy_pairs(6, seed=3))
    out = tmp_path / "acc.json"
    reward_model.cli(["accuracy", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["pairs"] == 6 and 0.0 <= result["accuracy"] <= 1.0


def test_accuracy_cli_missing_mapped_field(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", toy_pairs(2, seed=3))
    with pytest.raises(SystemExit) as e:
        reward_model.cli(["accuracy", "--model", str(tiny_model_dir), "--data", str(data), "--fields", "chosen=good"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"{data}:1: field 'good' (mapped to 'chosen') is missing" in err


@pytest.mark.parametrize("prefer_warm", [True, False])
def test_lora_rm_trains_the_score_head_and_saves_a_plain_model(tmp_path, tiny_model_dir, prefer_warm):
    from transformers import AutoModelForSequenceClassification

    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(64, seed=0, prefer_warm=prefer_warm))
    held_out = write_jsonl(tmp_path / "eval.jsonl", toy_pairs(40, seed=1, prefer_warm=prefer_warm))
    metrics = reward_model.main(_cfg(tmp_path, tiny_model_dir, train, eval_data=str(held_out),
                                     lora=True, lora_r=8, learning_rate=1e-2))
    out = tmp_path / "rm" / "model"
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.score.weight.shape == (1, 64)
    assert metrics["eval_accuracy"] >= 0.9
