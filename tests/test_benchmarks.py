"""The PPO parts benchmark on the tiny model: it runs end to end and its figures mean what they say."""

import importlib.util

import pytest

from conftest import REPO


@pytest.fixture()
def ppo_parts():
    spec = importlib.util.spec_from_file_location("ppo_parts", REPO / "benchmarks" / "ppo_parts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ppo_parts_log_probs_from_sampling_equal_the_rollout_forward_in_fp32(ppo_parts, tiny_model_dir, tmp_path,
                                                                            one_torch_thread):
    out = tmp_path / "parts.json"
    result = ppo_parts.main(["--model", str(tiny_model_dir), "--repeats", "1", "--bf16", "off", "--batch-size", "4",
                             "--mini-batch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "8",
                             "--json", str(out)])
    # sampling's logits (KV cache, left-padded prompts) and the forward over prompt + response
    # must give the same log-probs in fp32: an off-by-one shift or a wrong temperature would not
    gap = result["generate_scores"]
    assert gap["logprob_gap_max"] < 1e-3
    assert gap["policy_forward_seconds"] > 0 and gap["seconds"] > 0
    assert result["rollout"]["tokens"] > 0 and result["generate"]["tokens"] > 0
    assert out.is_file() and '"update_vs_floor"' in out.read_text()


def test_ppo_parts_lora_times_folded_and_unfolded_sampling_of_the_same_tokens(ppo_parts, tiny_model_dir, one_torch_thread):
    result = ppo_parts.main(["--model", str(tiny_model_dir), "--repeats", "1", "--bf16", "off", "--batch-size", "4",
                             "--mini-batch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "8", "--lora"])
    folded, unfolded = result["generate"], result["generate_unfolded"]
    # fresh adapters are a no-op and both runs start from the same seed: the same replies, so the
    # two speeds are for the same work
    assert unfolded["same_tokens_as_folded"] and unfolded["tokens"] == folded["tokens"] > 0
    assert unfolded["seconds"] > 0 and result["generate_scores"]["logprob_gap_max"] < 1e-3
