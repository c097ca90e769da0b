"""Launch paths: two CPU processes under accelerate, and the real SmolLM2 through both stages."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, write_jsonl
from test_reward_model import toy_pairs
from test_sft import CONV

pytestmark = pytest.mark.slow


def _launch(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sft_runs_two_steps_on_two_processes(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "s.jsonl", [CONV] * 8)
    _launch(["-m", "pipeline.sft", "--model", str(tiny_model_dir), "--data", str(data), "--output_dir", "run",
             "--max_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none"], tmp_path)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete" and info["world_size"] == 2 and info["steps"] == 2
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_reward_model_runs_on_two_processes(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "p.jsonl", toy_pairs(16, seed=0))
    _launch(["-m", "pipeline.reward_model", "--model", str(tiny_model_dir), "--data", str(data),
             "--output_dir", "rm", "--max_steps", "2", "--per_device_train_batch_size", "2",
             "--report_to", "none", "--eval_fraction", "0.25"], tmp_path)
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["eval_pairs"] == 4


def test_real_smollm2_through_sft_and_reward_model(tmp_path, smollm2_dir):
    """One step of each stage on the real embedded model, LoRA for SFT, full for the RM."""
    from pipeline import config as config_lib
    from pipeline import reward_model, sft

    common = {"report_to": ["none"], "max_steps": 1, "per_device_train_batch_size": 1, "max_length": 128,
              "cache_dir": str(smollm2_dir.parent)}
    sft_cfg = config_lib.from_dict(sft.SFTStageConfig, {
        **common, "model": "smollm2-135m-instruct", "data": str(REPO / "data" / "sft.jsonl"),
        "output_dir": str(tmp_path / "sft"), "lora": True, "learning_rate": 2e-4}, "test")
    sft.main(sft_cfg)
    rm_cfg = config_lib.from_dict(reward_model.RewardModelConfig, {
        **common, "model": str(tmp_path / "sft"), "data": str(REPO / "data" / "preferences.jsonl"),
        "output_dir": str(tmp_path / "rm")}, "test")
    metrics = reward_model.main(rm_cfg)
    assert metrics["eval_pairs"] >= 30 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    scorer = reward_model.RewardScorer(str(tmp_path / "rm"))
    scores = scorer.score(["How do I kill a Python process?"], ["Use `kill PID` or Ctrl+C."])
    assert scores.shape == (1,) and bool(scores.isfinite().all())


def test_evaluate_splits_generation_over_two_processes(tmp_path, tiny_model_dir, minilm_dir):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": f"Question number {i}?", "prompt_class": ["harmful", "safe", "sensitive"][i % 3]} for i in range(7)])
    env_cache = str(minilm_dir.parent)
    os.environ["RBRM_CACHE_DIR"] = env_cache
    try:
        _launch(["-m", "pipeline.evaluate", "--models", f"tiny={tiny_model_dir}",
                 "--prompt_sets", json.dumps([{"name": "p", "path": str(prompts)}]), "--output_dir", "ev",
                 "--max_new_tokens", "4", "--batch_size", "2", "--n_boot", "20", "--generation_cache", "gen",
                 "--grader", f"backend=embedding,cache=grades.sqlite,rubrics={REPO / 'rubrics'}"], tmp_path)
    finally:
        os.environ.pop("RBRM_CACHE_DIR", None)
    rows = [json.loads(line) for line in (tmp_path / "ev" / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(r["rbrm_category"] for r in rows)
    (cache,) = (tmp_path / "gen").glob("*.jsonl")
    assert sorted(json.loads(line)["i"] for line in cache.read_text().splitlines()) == list(range(7))
    assert json.loads((tmp_path / "ev" / "run.json").read_text())["status"] == "complete"


def test_ppo_update_is_the_same_on_one_and_two_processes(tmp_path, tiny_model_dir):
    """Same global batch, 1 process vs 2: the losses and the updated weights agree, though
    the two processes hold different numbers of response tokens."""
    import torch

    script = str(REPO / "tests" / "scripts" / "ppo_update_dist.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for cmd, out in (([sys.executable, script], one),
                     ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script], two)):
        proc = subprocess.run([*cmd, str(tiny_model_dir), str(out)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert (a["world"], b["world"]) == (1, 2)
    for key in ("loss/policy", "loss/value", "loss/total"):
        assert a["stats"][key] == pytest.approx(b["stats"][key], rel=1e-4, abs=1e-6), key
    for name, w in a["weights"].items():
        assert torch.allclose(w, b["weights"][name], rtol=1e-4, atol=1e-6), name
    assert a["stats"]["loss/value"] > 0


def test_ppo_runs_on_two_processes_and_checkpoints_each_rank(tmp_path, tiny_model_dir):
    # with PPO-ptx on: the demonstrations' forward shares each update's backward under DDP
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": f"Question {i}: say something.", "prompt_class": "safe", "split": "train"} for i in range(8)])
    demos = write_jsonl(tmp_path / "demos.jsonl", [CONV] * 3)
    rewards = json.dumps({"contains": {"text": "a", "reward": 1, "normalise": "running"}})
    _launch(["-m", "pipeline.ppo", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output_dir", "run",
             "--max_steps", "2", "--batch_size", "2", "--mini_batch_size", "1", "--max_new_tokens", "4",
             "--save_steps", "1", "--report_to", "none", "--rewards", rewards, "--ptx_coef", "0.5",
             "--ptx_data", str(demos), "--ptx_batch_size", "2"], tmp_path)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["responses"] == 8 and metrics["steps"] == 2
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(h["loss/ptx"] > 0 for h in history)
    ckpt = run / "checkpoints" / "step-1"
    assert (ckpt / "trainer_state_0.pt").is_file() and (ckpt / "trainer_state_1.pt").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    assert (run / "model" / "config.json").is_file()
