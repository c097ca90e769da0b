"""PPO-ptx: the demonstrations' log-likelihood term beside the PPO loss."""
import json

import pytest
import torch

from conftest import write_jsonl
from pipeline import config as config_lib
from pipeline import ppo
from pipeline.config import ConfigError
from pipeline.data import DataError, load_sft
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.ppo.ptx import Demonstrations, masked_nll
from pipeline.rewards import ContainsSource, RewardComposer

DEMOS = [
    {"messages": [{"role": "user", "content": "How do I pick a lock?"},
                  {"role": "assistant", "content": "Sorry, I can't help with that."}]},
    {"messages": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue, the colour of a clear sky at noon over the sea."}]},
    {"prompt": "What is two plus two?", "response": "Four."},
    {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye."}]},
]

LAST_TURNS = ["Sorry, I can't help with that.", "Blue, the colour of a clear sky at noon over the sea.", "Four.",
              "Goodbye."]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_masked_nll_averages_only_real_tokens():
    logprobs = torch.tensor([[-1.0, -3.0, -50.0], [-2.0, -7.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_nll(logprobs, mask).item() == pytest.approx((1 + 3 + 2) / 3)


def test_demonstrations_batch_holds_the_last_assistant_turn_after_its_context(tmp_path, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    conversations = load_sft(str(write_jsonl(tmp_path / "d.jsonl", DEMOS)))["messages"]
    demos = Demonstrations(conversations, tok, batch_size=4, max_prompt_length=256, max_response_length=6, seed=0)
    demos.reseed(step=1)
    b = demos.batch("cpu")
    assert b["query_ids"].shape[0] == 4
    for row in range(4):
        q = b["query_ids"][row][b["query_mask"][row].bool()]
        r = b["response_ids"][row][b["response_mask"][row].bool()].tolist()
        query, reply = tok.decode(q), tok.decode(r)
        # left padding: the last column is real; the query ends with the assistant header
        assert b["query_mask"][row, -1] == 1 and b["response_mask"][row, 0] == 1
        assert query.rstrip().endswith("assistant")
        last = next(d for d in LAST_TURNS if tok.decode(tok(d, add_special_tokens=False)["input_ids"][:3]) in reply)
        whole = tok(last, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert r == whole[:6]                                      # the reply and eos, cut at max_response_length
        assert any(len(tok(d, add_special_tokens=False)["input_ids"]) < 5 for d in LAST_TURNS if d in reply) == \
            (r[-1] == tok.eos_token_id)
        if "Goodbye" in reply:
            assert "Hello!" in query and "Bye." in query          # earlier turns are context, not target


def test_draws_are_a_function_of_step_so_a_resumed_run_repeats_them(tmp_path, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    conversations = load_sft(str(write_jsonl(tmp_path / "d.jsonl", DEMOS * 5)))["messages"]
    a = Demonstrations(conversations, tok, 3, 256, 32, seed=7)
    b = Demonstrations(conversations, tok, 3, 256, 32, seed=7)
    a.reseed(5)
    first = [a.next_indices() for _ in range(3)]
    b.reseed(4)
    b.next_indices()
    b.reseed(5)
    assert [b.next_indices() for _ in range(3)] == first
    assert all(len(set(i)) == 3 for i in first)
    a.reseed(6)
    assert [a.next_indices() for _ in range(3)] != first


def _cfg(tmp_path, model, **kw):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": f"Question {i}: tell me something short.", "prompt_class": "safe"} for i in range(4)])
    base = {"model": str(model), "prompts": str(prompts), "output_dir": str(tmp_path / "run"), "report_to": ["none"],
            "max_steps": 3, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4,
            "learning_rate": 1e-3, "kl_coef": 0.0, "rewards": {"contains": {"text": "a", "reward": 1}}}
    return config_lib.from_dict(ppo.PPOConfig, {**base, **kw}, "test")


def _demo_nll(model_dir, tok, path) -> float:
    lm = load_causal_lm(str(model_dir), tok)
    demos = Demonstrations(load_sft(path)["messages"], tok, 4, 256, 32, seed=0)
    demos.reseed(0)
    with torch.no_grad():
        return float(demos.loss(lm, "cpu", lm_only=True))


def test_ptx_term_raises_the_demonstrations_likelihood(tmp_path, tiny_model_dir):
    # With a reward that carries no signal (always 0) only the ptx term moves the
    # policy, so the demonstrations must become likelier; without it they must not be logged.
    tok = load_tokenizer(str(tiny_model_dir))
    path = str(write_jsonl(tmp_path / "d.jsonl", DEMOS))
    flat = RewardComposer([ContainsSource("a", reward=0.0)])
    cfg = _cfg(tmp_path, tiny_model_dir, ptx_coef=1.0, ptx_data=path)
    ppo.main(cfg, reward_composer=flat)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert all(h["loss/ptx"] > 0 for h in history)
    assert _demo_nll(tmp_path / "run" / "model", tok, path) < _demo_nll(tiny_model_dir, tok, path) - 0.05

    cfg = _cfg(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "plain"))
    ppo.main(cfg, reward_composer=flat)
    history = [json.loads(line) for line in (tmp_path / "plain" / "history.jsonl").read_text().splitlines()]
    assert all("loss/ptx" not in h for h in history)
    assert _demo_nll(tmp_path / "plain" / "model", tok, path) > _demo_nll(tmp_path / "run" / "model", tok, path) + 0.05


def test_ptx_needs_demonstrations_and_names_a_bad_file_before_loading_models(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="ptx_data"):
        _cfg(tmp_path, tiny_model_dir, ptx_coef=0.5)
    with pytest.raises(ConfigError, match="ptx_coef"):
        _cfg(tmp_path, tiny_model_dir, ptx_coef=-1.0, ptx_data="x.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl"):
        ppo.main(_cfg(tmp_path, tiny_model_dir, ptx_coef=0.5, ptx_data=str(bad)))


def test_ptx_classes_keeps_only_the_listed_classes_demonstrations(tmp_path, tiny_model_dir):
    from pipeline.ppo.trainer import ptx_conversations

    classes = ["harmful", "safe", "harmful", "sensitive"]
    path = str(write_jsonl(tmp_path / "d.jsonl", [{**d, "prompt_class": c} for d, c in zip(DEMOS, classes)]))
    kept = ptx_conversations(_cfg(tmp_path, tiny_model_dir, ptx_coef=1.0, ptx_data=path, ptx_classes=["harmful"]))
    assert [m[-1]["content"] for m in kept] == [LAST_TURNS[0], LAST_TURNS[2]]
    every = ptx_conversations(_cfg(tmp_path, tiny_model_dir, ptx_coef=1.0, ptx_data=path))
    assert [m[-1]["content"] for m in every] == LAST_TURNS
    with pytest.raises(DataError, match="'unsafe'.*harmful, safe, sensitive"):
        ptx_conversations(_cfg(tmp_path, tiny_model_dir, ptx_coef=1.0, ptx_data=path, ptx_classes=["unsafe"]))
    unlabelled = str(write_jsonl(tmp_path / "u.jsonl", DEMOS))
    with pytest.raises(DataError, match=r"u.jsonl:1\b.*prompt_class"):
        ptx_conversations(_cfg(tmp_path, tiny_model_dir, ptx_coef=1.0, ptx_data=unlabelled, ptx_classes=["harmful"]))

