"""PPO-ptx: the demonstrations' log-likelihood beside the PPO loss (Ouyang et al. 2022, eq. 2).

A rollout only carries signal where its replies differ. On harmful prompts the SFT model
already refuses nearly every time, so those replies have almost no advantage spread, while the
safe and sensitive prompts' "answer more" gradient is large and, in a 135M model, moves the
refusal threshold of every class at once. Adding ``ptx_coef`` times the negative
log-likelihood of SFT demonstrations to each update holds the behaviour the demonstrations
teach (refuse these, answer those) where the rollouts say nothing. The demonstrations answer
their safe prompts, so the term does not pull back towards over-refusal.

With every demonstration the term is mostly more SFT on the safe answers (61% of the project's
demonstrations), and in the demo it did not hold the harmful refusals. ``ptx_classes: [harmful]``
keeps only the refusals: a steady push up on the refusal openings for harmful prompts, which the
rollouts stop giving once nearly every reply refuses. At weight 1.0 it doubled the safe
refusals; at 0.25 no seed lost more than a quarter of its harmful validation refusals. With
``refusal_centring`` the rollouts no longer move the threshold, and that one-sided anchor slid
every run towards refusing; the shipped config anchors on every demonstration at 0.25, which
held both sides in three seeds (docs/results.md).

TRL has no PPO trainer to take this from (its PPO loop was removed), so it lives here, written
on :func:`pipeline.ppo.policy.response_forward`: the demonstration's earlier turns are the
query, its last assistant turn (with eos) the response.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from pipeline.ppo.policy import response_forward


def masked_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the real tokens: ``logprobs``, ``mask`` are ``(B, T)``."""
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


class Demonstrations:
    """SFT demonstrations tokenised once, drawn ``batch_size`` at a time (distinct within a batch).

    :meth:`reseed` at the start of each step makes the draws a function of (seed, step,
    process), so a resumed run draws what an uninterrupted one would."""

    def __init__(self, conversations: Sequence[list[dict]], tokenizer, batch_size: int, max_prompt_length: int,
                 max_response_length: int, seed: int):
        """``conversations``: chats ending in an assistant turn, as ``load_sft`` gives them."""
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.queries, self.responses = [], []
        eos = tokenizer.eos_token_id
        for messages in conversations:
            query = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            q_ids = tokenizer(query, add_special_tokens=False)["input_ids"][-max_prompt_length:]
            r_ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
            self.queries.append(q_ids)
            self.responses.append((r_ids + [eos])[:max_response_length])
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.queries)

    def reseed(self, step: int, process_index: int = 0) -> None:
        self.generator.manual_seed((self.seed * 1_000_003 + step) * 1009 + process_index)

    def next_indices(self) -> list[int]:
        return torch.randperm(len(self), generator=self.generator)[:self.batch_size].tolist()

    def batch(self, device: Any) -> dict[str, torch.Tensor]:
        """Left-padded queries and right-padded responses, as a rollout holds them."""
        idx = self.next_indices()
        pad = self.tokenizer.pad_token_id
        p = max(len(self.queries[i]) for i in idx)
        t = max(len(self.responses[i]) for i in idx)
        query_ids = torch.full((len(idx), p), pad, dtype=torch.long)
        query_mask = torch.zeros((len(idx), p), dtype=torch.long)
        response_ids = torch.full((len(idx), t), pad, dtype=torch.long)
        response_mask = torch.zeros((len(idx), t), dtype=torch.long)
        for row, i in enumerate(idx):
            q, r = self.queries[i], self.responses[i]
            query_ids[row, p - len(q):] = torch.tensor(q)
            query_mask[row, p - len(q):] = 1
            response_ids[row, :len(r)] = torch.tensor(r)
            response_mask[row, :len(r)] = 1
        return {k: v.to(device) for k, v in {"query_ids": query_ids, "query_mask": query_mask,
                                              "response_ids": response_ids, "response_mask": response_mask}.items()}

    def loss(self, model, device: Any, lm_only: bool = False) -> torch.Tensor:
        """The next batch's mean negative log-likelihood under ``model`` (at temperature 1): the
        policy with its value head, or a bare causal LM with ``lm_only``."""
        b = self.batch(device)
        logprobs, _ = response_forward(model, b["query_ids"], b["query_mask"], b["response_ids"], b["response_mask"],
                                       1.0, lm_only=lm_only)
        return masked_nll(logprobs, b["response_mask"].to(logprobs.dtype))
