"""Checkpoint and resume: a run killed with SIGKILL and resumed ends where an uninterrupted
run ends; a checkpoint from other settings, or no checkpoint at all, is one clear message."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, write_jsonl
from pipeline import config as config_lib
from pipeline import ppo
from pipeline.ppo import common as ppo_common
from pipeline.ppo import checkpoint as ppo_checkpoint

pytestmark = pytest.mark.slow


def _config(tmp_path, model, name, **kw):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": f"Question {i}: say something.", "prompt_class": "safe", "split": "train"} for i in range(6)])
    cfg = {"model": str(model), "prompts": str(prompts), "output_dir": str(tmp_path / name), "report_to": ["none"],
           "max_steps": 6, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 4,
           "learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 2, "save_steps": 2, "adaptive_kl": True,
           "kl_target": 0.5, "kl_horizon": 100,
           # a running-normalised source, so the reward statistics must come back too
           "rewards": {"contains": {"text": "a", "reward": 1, "normalise": "running"}}, **kw}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config, *extra, expect_kill=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "ppo_run.py"), str(config), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if expect_kill:
        assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _history(run):
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


# weight_average: model/ is the average, which must come back from the checkpoint as well;
# lora: the adapters (and their optimizer state) come back; sampling folds them into the base weights
@pytest.mark.parametrize("settings", [{}, {"weight_average": 0.5}, {"lora": True, "lora_r": 4, "lora_alpha": 8}],
                         ids=["live", "weight_average", "lora"])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dir, settings):
    straight = _config(tmp_path, tiny_model_dir, "straight", **settings)
    _run(straight)
    killed = _config(tmp_path, tiny_model_dir, "killed", **settings)
    _run(killed, "--kill-at", "4", expect_kill=True)   # killed while scoring step 4
    run = tmp_path / "killed"
    assert [s for s, _ in ppo_checkpoint.list_checkpoints(run)] == [2]
    assert not (run / "model").exists()

    _run(_config(tmp_path, tiny_model_dir, "killed", resume=True, **settings))
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = [k for k in a if not torch.equal(a[k], load_file(tiny_model_dir / "model.safetensors")[k])]
    assert moved, "training should have changed the weights"
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("value_head.pt",):
        va, vb = torch.load(tmp_path / "straight" / "model" / name), torch.load(run / "model" / name)
        assert all(torch.equal(va[k], vb[k]) for k in va)

    # history: one line per step, steps 3-4 of the killed attempt replaced, same numbers as straight
    ha, hb = _history(tmp_path / "straight"), _history(run)
    assert [h["step"] for h in hb] == list(range(1, 7))
    for x, y in zip(ha, hb):
        for key in ("reward/score", "objective/kl", "objective/kl_coef", "loss/total", "optim/lr"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    # the adaptive KL coefficient moved, so restoring it was tested, not assumed
    assert ha[-1]["objective/kl_coef"] != ha[0]["objective/kl_coef"]
    # warmed up over 2 steps, then annealed
    assert [h["optim/lr"] for h in hb] == pytest.approx([1e-3 * (6 - k) / 6 * min(1, (k + 1) / 2) for k in range(6)])
    assert (run / "ppo_curves.png").stat().st_size > 1000
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["responses"] == 24


def _fake_checkpoint(tmp_path, cfg, step=2, world_size=1):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"stage": "ppo", "status": "running"}))
    (ckpt / ppo_checkpoint.STATE_FILE).write_text(json.dumps(
        {"step": step, "world_size": world_size, "config": ppo_common.jsonable(config_lib.to_dict(cfg))}))
    return ckpt


def _cfg(tmp_path, **kw):
    base = {"model": "tiny", "output_dir": str(tmp_path / "run"), "max_steps": 6, "save_steps": 2}
    return config_lib.from_dict(ppo.PPOConfig, {**base, **kw}, "test")


def test_resume_from_other_settings_names_each_difference(tmp_path):
    _fake_checkpoint(tmp_path, _cfg(tmp_path))
    with pytest.raises(config_lib.ConfigError, match=r"learning_rate: 1e-06 -> 2e-06"):
        ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume=True, learning_rate=2e-6), 1)
    # steps and logging may change
    path, meta = ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume=True, max_steps=10, sample_every=1), 1)
    assert path.name == "step-2" and meta["step"] == 2


def test_key_missing_from_an_older_checkpoint_counts_as_its_default(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, _cfg(tmp_path))
    meta = json.loads((ckpt / ppo_checkpoint.STATE_FILE).read_text())
    del meta["config"]["lr_scheduler_type"]  # written before the key existed
    (ckpt / ppo_checkpoint.STATE_FILE).write_text(json.dumps(meta))
    path, _ = ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume=True), 1)
    assert path == ckpt
    with pytest.raises(config_lib.ConfigError, match=r"lr_scheduler_type: 'constant' -> 'linear'"):
        ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume=True, lr_scheduler_type="linear"), 1)


def test_checkpoint_written_under_the_old_key_names_still_resumes(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, _cfg(tmp_path))
    meta = json.loads((ckpt / ppo_checkpoint.STATE_FILE).read_text())
    saved = meta["config"]
    for old, new in (("steps", "max_steps"), ("lr_schedule", "lr_scheduler_type"), ("save_every", "save_steps"),
                     ("responses_per_prompt", "num_generations"), ("lr_warmup_steps", "warmup_steps")):
        saved[old] = saved.pop(new)
    (ckpt / ppo_checkpoint.STATE_FILE).write_text(json.dumps(meta))
    path, _ = ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume=True), 1)
    assert path == ckpt
    with pytest.raises(config_lib.ConfigError, match=r"warmup_steps: 0 -> 3"):
        ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume=True, warmup_steps=3), 1)


def test_resume_with_another_process_count_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, _cfg(tmp_path), world_size=2)
    with pytest.raises(config_lib.ConfigError, match="written by 2 process"):
        ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume="auto"), 1)


def test_checkpoints_without_resume_are_kept_and_explained(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, _cfg(tmp_path))
    with pytest.raises(config_lib.ConfigError, match="--resume true"):
        ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path), 1)
    assert ckpt.is_dir()


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="no checkpoint"):
        ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume=True), 1)
    assert ppo_checkpoint.checkpoint_to_resume(_cfg(tmp_path, resume="auto"), 1) is None


def test_resume_key_accepts_only_true_false_auto(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="key 'resume'"):
        _cfg(tmp_path, resume="sometimes")
