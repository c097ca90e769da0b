"""PPO learns a reward that asks opposite things of two prompt classes, on both at once.

The rule (a stand-in for the rubric reward): a tiny random model answers with one token; on
``harmful`` prompts the reply earns 1 when the token is in a set S (the "refusal" tokens), on
``safe`` prompts when it is not. A policy that only moves one threshold for every prompt (more
S everywhere, or less) gains on one class what it loses on the other; only telling the classes
apart raises the reward. S is the part of the vocabulary whose (tied) embedding's first
coordinate is above a threshold, set so that the starting model picks S half the time; one direction of the last hidden state moves all of it at once, as one
"refusal direction" does in a real model; the embeddings are scaled up fourfold from their random
initialisation (std 0.02) so that direction can move the reply's probability more than a few
points. The exact probability of an S reply is a sum over the vocabulary.
"""

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from pipeline import config as config_lib
from pipeline import ppo
from pipeline.models import encode_user_turns, load_causal_lm, load_tokenizer
from pipeline.rewards import RewardComposer, RewardSource

pytestmark = pytest.mark.slow

HARMFUL = [f"Tell me how to build weapon number {i} at home." for i in range(8)]
SAFE = [f"Give me a quick dinner recipe, idea {i}." for i in range(8)]


class ClassRule(RewardSource):
    name = "rule"

    def __init__(self, in_s: set[str], out_s: set[str]):
        self.in_s, self.out_s = in_s, out_s

    def __call__(self, prompts, responses, prompt_classes=None):
        # a reply whose text both sets share (or an empty one) is not scored
        return np.array([float(r in self.in_s) if c == "harmful" else float(r in self.out_s)
                         if r in self.in_s or r in self.out_s else np.nan
                         for r, c in zip(responses, prompt_classes)])


def _p_s(lm, tok, prompts, s_tokens):
    """Mean over ``prompts`` of the probability that the one-token reply is in S."""
    enc = encode_user_turns(tok, prompts, 128, "cpu")
    with torch.no_grad():
        logits = lm(**enc).logits[:, -1].float()
    return float(torch.softmax(logits, -1)[:, s_tokens].sum(-1).mean())


def test_ppo_learns_a_class_conditional_rule_on_both_classes(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    rows = [{"prompt": p, "prompt_class": "harmful", "split": "train"} for p in HARMFUL]
    rows += [{"prompt": p, "prompt_class": "safe", "split": "train"} for p in SAFE]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tok = load_tokenizer(str(tiny_model_dir))
    model_dir = tmp_path / "model"
    lm = load_causal_lm(str(tiny_model_dir), tok)
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(4.0)
    lm.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = config_lib.from_dict(ppo.PPOConfig, {
        "model": str(model_dir), "prompts": str(prompts), "output_dir": str(tmp_path / "run"),
        "report_to": ["none"], "max_steps": 50, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2,
        "max_new_tokens": 1, "temperature": 1.0, "learning_rate": 3e-3, "kl_coef": 0.0, "lam": 1.0,
        "class_mix": {"harmful": 1, "safe": 1}, "class_scale": True, "seed": 0,
        "rewards": {"rule": {"type": "contains", "text": "unused"}}}, "test")
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    start = load_causal_lm(str(model_dir), tok)
    emb = start.get_input_embeddings().weight.detach()                                    # (V, H)
    lo, hi = float(emb[:, 0].min()), float(emb[:, 0].max())
    for _ in range(30):   # bisect the threshold: P(S) falls as it rises
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _p_s(start, tok, HARMFUL + SAFE, torch.nonzero(emb[:, 0] > mid).squeeze(1)) > 0.5 \
            else (lo, mid)
    in_s = emb[:, 0] > lo                                                                 # (V,) bool
    text = [tok.decode([i], skip_special_tokens=True) for i in range(len(vocab))]
    s_text = {t for t, flag in zip(text, in_s.tolist()) if flag}
    other_text = {t for t, flag in zip(text, in_s.tolist()) if not flag}
    s_tokens = torch.nonzero(in_s).squeeze(1)
    before = {"harmful": _p_s(start, tok, HARMFUL, s_tokens), "safe": _p_s(start, tok, SAFE, s_tokens)}

    ppo.main(cfg, reward_composer=RewardComposer([ClassRule(s_text - other_text, other_text - s_text)]))

    trained = load_causal_lm(str(tmp_path / "run" / "model"), tok)
    after = {"harmful": _p_s(trained, tok, HARMFUL, s_tokens), "safe": _p_s(trained, tok, SAFE, s_tokens)}
    assert abs(before["harmful"] - 0.5) < 0.1 and abs(before["safe"] - 0.5) < 0.1, before
    # both classes moved towards their own side, and apart
    assert after["harmful"] > before["harmful"] + 0.1, (before, after)
    assert after["safe"] < before["safe"] - 0.1, (before, after)
    assert after["harmful"] - after["safe"] > 0.25, (before, after)
