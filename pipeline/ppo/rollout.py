"""Sampling: which prompts a step draws (:class:`PromptSchedule`) and the responses, log-probs,
reference log-probs and values of one step (:func:`rollout`, :class:`Rollout`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from typing import Any, Optional, Sequence

import torch
from torch import nn

from pipeline.evaluation.refusal_match import is_refusal
from pipeline.models import encode_user_turns
from pipeline.ppo.config import PPOConfig
from pipeline.ppo.policy import PolicyWithValueHead, response_forward, sampling_weights


@dataclasses.dataclass
class Rollout:
    """One step's sampled responses and everything PPO needs about them."""

    query_ids: torch.Tensor      # (B, P) prompt token ids, left-padded
    query_mask: torch.Tensor     # (B, P) 1 for prompt tokens, 0 for left padding
    response_ids: torch.Tensor   # (B, T) sampled token ids, right-padded with the pad id
    response_mask: torch.Tensor  # (B, T) 1 for real response tokens, up to and including eos
    logprobs: torch.Tensor       # (B, T) log pi_old(a_t | s_t) under the rollout policy (at temperature)
    ref_logprobs: torch.Tensor   # (B, T) log pi_ref(a_t | s_t) of the same tokens
    values: torch.Tensor         # (B, T) V(s_t) from the value head at rollout time
    truncated: torch.Tensor      # (B,) bool: no eos within max_new_tokens
    prompts: list[str]           # B prompt texts
    prompt_classes: list[str]    # B prompt classes
    responses: list[str]         # B decoded responses (special tokens removed)

    @property
    def empty(self) -> torch.Tensor:
        """(B,) bool: the response has no real token at all (all-zero mask)."""
        return self.response_mask.sum(1) == 0

    @functools.cached_property
    def refused(self) -> list[bool]:
        """Per response: a refusal by string match, decided once for every use in the step."""
        return [is_refusal(r) for r in self.responses]


def response_mask_from_ids(response_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` sampled ids -> ``(mask, truncated)``.

    ``mask`` ``(B, T)`` is 1 up to and including the first eos of a row and 0 after it;
    a row without eos (``truncated``, ``(B,)`` bool) is 1 everywhere.
    """
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))  # (B, T)
    # eos strictly before position t: every token after the first eos is padding.
    eos_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return (~eos_before).long(), ~is_eos.any(1)


@torch.no_grad()
def rollout(policy: PolicyWithValueHead, ref_lm: Optional[nn.Module], tokenizer, prompts: list[str],
            prompt_classes: list[str], cfg: PPOConfig) -> Rollout:
    """Sample one response per entry of ``prompts`` and record log-probs, reference log-probs and values.

    ``policy`` is the unwrapped policy; ``ref_lm`` the frozen reference, or None to use the
    policy's LM with its LoRA adapters disabled. Prompts are rendered with the chat template
    (generation prompt added) and left-padded so every row's response starts at column P.
    """
    device = next(policy.parameters()).device
    enc = encode_user_turns(tokenizer, prompts, cfg.max_prompt_length, device)
    query_ids, query_mask = enc["input_ids"], enc["attention_mask"]     # (B, P)
    eos_ids = [tokenizer.eos_token_id]
    # The log-probs PPO compares against are the forward's below, not the sampler's, so sampling
    # may run on the folded weights (LoRA): the same distribution up to rounding, fewer matmuls.
    with sampling_weights(policy.lm):
        out = policy.lm.generate(
            input_ids=query_ids, attention_mask=query_mask, do_sample=True, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos_ids,
            pad_token_id=tokenizer.pad_token_id)
    response_ids = out[:, query_ids.shape[1]:]                          # (B, T), T <= max_new_tokens
    response_mask, truncated = response_mask_from_ids(response_ids, eos_ids)
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    logprobs, values = response_forward(policy, query_ids, query_mask, response_ids, response_mask, cfg.temperature)
    if ref_lm is None:
        with policy.lm.disable_adapter():
            ref_logprobs, _ = response_forward(policy.lm, query_ids, query_mask, response_ids, response_mask,
                                               cfg.temperature, lm_only=True)
    else:
        ref_logprobs, _ = response_forward(ref_lm, query_ids, query_mask, response_ids, response_mask,
                                           cfg.temperature, lm_only=True)
    responses = tokenizer.batch_decode(torch.where(response_mask.bool(), response_ids, tokenizer.pad_token_id),
                                       skip_special_tokens=True)
    return Rollout(query_ids, query_mask, response_ids, response_mask, logprobs, ref_logprobs, values,
                   truncated, list(prompts), list(prompt_classes), responses)


class PromptSchedule:
    """Endless batches of ``per_step`` row indices, reshuffled each epoch; resumable.

    With ``groups`` (a label per row, the prompt class) each epoch is stratified: every class's
    rows are shuffled and spread evenly through the epoch, so each batch holds the classes in
    about their proportion in the data. With 8 responses a step, plain shuffling of the demo's
    training prompts drew batches of 6 harmful and 1 safe prompt, and of 1 harmful and 7 safe
    (stratified: 2-4 of each); steps like that move the policy's overall readiness to refuse
    up or down with the draw instead of with the reward.

    With ``mix`` (class -> share of each batch; needs ``groups``) the batch holds the classes in
    that mix, whatever their proportion in the data: each class is drawn from its own stream of
    shuffled epochs, and each step's quota per class is the largest-remainder rounding of
    ``share * per_step`` plus what earlier steps' rounding owed it, so the mix holds exactly over
    the steps. A class with share 0 is never drawn. Without it, a data set with more safe than
    harmful prompts lets a shift of the refusal threshold towards answering earn more on the
    safe prompts than it costs on the harmful ones.

    Every process holds the same schedule (same seed) and takes its slice of each batch.
    """

    def __init__(self, n_rows: int, per_step: int, seed: int, groups: Optional[Sequence[Any]] = None,
                 mix: Optional[dict[str, float]] = None):
        if groups is not None and len(groups) != n_rows:
            raise ValueError(f"groups has {len(groups)} labels for {n_rows} rows")
        self.n_rows, self.per_step = n_rows, per_step
        self.members: Optional[dict[Any, list[int]]] = None     # class -> its rows, in row order
        if groups is not None:
            self.members = {}
            for i, g in enumerate(groups):
                self.members.setdefault(g, []).append(i)
        self.mix: Optional[dict[str, float]] = None
        if mix:
            if self.members is None:
                raise ValueError("a class mix needs the rows' classes (groups)")
            absent = [c for c, share in mix.items() if share > 0 and c not in self.members]
            if absent:
                raise ValueError(f"class mix names {', '.join(absent)}, which no row has")
            total = sum(mix.values())
            self.mix = {c: share / total for c, share in sorted(mix.items()) if share > 0}
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.streams: dict[str, list[int]] = {c: [] for c in (self.mix or {})}  # class -> its rows still to draw
        self.owed: dict[str, float] = {c: 0.0 for c in (self.mix or {})}         # rounding carried between steps

    def _epoch(self) -> list[int]:
        if self.members is None:
            epoch = list(range(self.n_rows))
            self.rng.shuffle(epoch)
            return epoch
        keyed = []
        for g in sorted(self.members, key=str):
            rows = list(self.members[g])
            self.rng.shuffle(rows)
            # the k-th of n rows of a class lands at a random point of the k-th n-th of the epoch
            keyed += [((k + self.rng.random()) / len(rows), i) for k, i in enumerate(rows)]
        return [i for _, i in sorted(keyed)]

    def quotas(self) -> dict[str, int]:
        """This step's rows per class under ``mix`` (largest remainder, carrying what is owed)."""
        want = {c: self.owed[c] + share * self.per_step for c, share in self.mix.items()}
        take = {c: math.floor(w) for c, w in want.items()}
        spare = self.per_step - sum(take.values())
        for c in sorted(want, key=lambda c: (-(want[c] - take[c]), c))[:spare]:
            take[c] += 1
        self.owed = {c: want[c] - take[c] for c in want}
        return take

    def next(self) -> list[int]:
        if self.mix is not None:
            batch = []
            for c, k in self.quotas().items():
                while len(self.streams[c]) < k:
                    rows = list(self.members[c])
                    self.rng.shuffle(rows)
                    self.streams[c] += rows
                batch += self.streams[c][:k]
                self.streams[c] = self.streams[c][k:]
            self.rng.shuffle(batch)  # so each process's slice holds a mix too
            return batch
        while len(self.order) < self.per_step:
            self.order += self._epoch()
        batch, self.order = self.order[:self.per_step], self.order[self.per_step:]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": list(self.order),
                "streams": {c: list(v) for c, v in self.streams.items()}, "owed": dict(self.owed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])
        self.streams = {c: list(v) for c, v in state.get("streams", self.streams).items()}
        self.owed = dict(state.get("owed", self.owed))
