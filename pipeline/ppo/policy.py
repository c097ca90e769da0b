"""The policy PPO trains: a causal LM with a scalar value head, its frozen reference, and the
forward pass that gives the log-probs (and values) of a response given its prompt."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from pipeline.ppo import math as ppo_math

if TYPE_CHECKING:  # config imports validation, which imports this module
    from pipeline.ppo.config import PPOConfig


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state.

    ``forward`` returns ``(logits, values)``: ``(B, L, V)`` next-token logits (``(B, N, V)``, the
    last N positions, with ``logits_to_keep=N``) and ``(B, L)``
    ``V(s)`` for the state ending at each position. The head starts at zero so the first
    advantages are the raw returns, not noise from a random critic.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        """``logits_to_keep``: compute logits for the last N positions only (0 = all); values cover all."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, use_cache=False, logits_to_keep=logits_to_keep)
        hidden = out.hidden_states[-1]                                  # (B, L, H)
        values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()  # (B, L); fp32 under autocast too
        return out.logits, values


def build_policy(lm: nn.Module, cfg: PPOConfig) -> tuple[PolicyWithValueHead, Optional[nn.Module]]:
    """-> ``(policy, ref_lm)``. With LoRA ``ref_lm`` is None: the reference is ``policy.lm``
    under ``disable_adapter()``; otherwise it is a frozen copy of ``lm``."""
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                           target_modules="all-linear", task_type="CAUSAL_LM"))
        ref_lm = None
    else:
        ref_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    policy = PolicyWithValueHead(lm).eval()  # eval: no dropout anywhere in PPO
    return policy, ref_lm


@contextlib.contextmanager
def sampling_weights(lm: nn.Module):
    """A block in which a LoRA policy samples as fast as a plain model, from the same distribution
    up to float rounding. A no-op for a model without adapters. Inside it:

    - the adapters are added into their base weights and switched off, so each linear layer is one
      matmul instead of three;
    - under autocast, those folded weights and a frozen output layer are cast to autocast's dtype
      here, once. Autocast caches the casts of trainable weights only, so a LoRA model's frozen
      weights are otherwise cast again at every token ``generate`` samples.

    After the block every weight is the very tensor it was (a tied output layer is tied again) and
    the adapters are on. Not written with peft's ``merge_adapter()`` / ``unmerge_adapter()``:
    unmerging subtracts the update again and leaves fp32 rounding in the frozen weights after every
    step, and those weights are the KL reference (the adapters-off model), which must stay the SFT
    model. Under bf16 autocast the sampler's rounding differs from the unfolded model's, as it does
    for ``model/``, which is saved merged; PPO's log-probs come from the unfolded forward.
    """
    if not hasattr(lm, "disable_adapter"):
        yield
        return
    from peft.tuners.lora import LoraLayer

    device = next(lm.parameters()).device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    folded: list[tuple[nn.Parameter, torch.Tensor]] = []   # (weight, the tensor it held)
    replaced: list[tuple[nn.Module, nn.Parameter]] = []     # (output layer, its own weight)
    try:
        with torch.no_grad():
            for layer in lm.modules():
                if not isinstance(layer, LoraLayer) or layer.merged:
                    continue
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if not active:
                    continue
                weight = layer.get_base_layer().weight
                update = sum(layer.get_delta_weight(a) for a in active)
                folded.append((weight, weight.data))
                weight.data = (weight.data + update).to(dtype or weight.dtype)
            head = lm.get_output_embeddings()
            if (dtype is not None and isinstance(head, nn.Linear) and not head.weight.requires_grad
                    and head.weight.dtype != dtype):
                # a weight of its own: the tied input embedding keeps its dtype
                replaced.append((head, head.weight))
                head.weight = nn.Parameter(head.weight.to(dtype), requires_grad=False)
        with lm.disable_adapter():
            yield
    finally:
        for weight, original in folded:
            weight.data = original
        for head, original in replaced:
            head.weight = original


class WeightAverage:
    """An exponential moving average of a module's trainable weights (Polyak averaging).

    PPO on a few replies a step makes the policy's refusal line swing from step to step; the
    average keeps what the steps agree on and damps the swing. Rollouts keep sampling from the
    live weights; :meth:`applied` puts the average in their place for validation and saving.
    Written here rather than with ``torch.optim.swa_utils.AveragedModel``, which deep-copies the
    whole module (with LoRA, the frozen base as well) and would need every caller to be handed
    the copy; this keeps one fp32 copy of the trainable tensors only.
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"decay: expected a number in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.average = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """average <- decay * average + (1 - decay) * weights."""
        torch._foreach_lerp_(self.average, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """The module's trainable weights are the average inside the block and exactly the live
        weights again after it."""
        live = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.average)
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, live)

    def state_dict(self) -> dict:
        return {"average": [a.clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        average = state["average"]
        if len(average) != len(self.average) or any(a.shape != b.shape for a, b in zip(average, self.average)):
            raise ValueError("weight average: the checkpoint's tensors do not match this policy's trainable weights")
        self.average = [a.float().clone() for a in average]


def build_optimizer(policy: nn.Module, lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable weights.

    ``fused``: one kernel over every tensor. On 2 CPU cores torch's default (foreach) AdamW step
    over SmolLM2-135M's weights took 0.63 s and the fused one 0.07 s; a PPO step takes four
    (transformers' Trainer, which SFT and the reward model use, is fused by default too)."""
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                             fused=fused)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids that skip left padding, as ``generate`` numbers them."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def response_forward(model, query_ids, query_mask, response_ids, response_mask, temperature: float,
                     lm_only: bool = False):
    """Log-probs (and values) of the response tokens given the prompt.

    Args:
        model: a :class:`PolicyWithValueHead` (``lm_only=False``) or a bare causal LM.
        query_ids: ``(B, P)`` left-padded prompt ids; ``query_mask`` ``(B, P)`` 1 for prompt tokens.
        response_ids: ``(B, T)`` right-padded response ids; ``response_mask`` ``(B, T)`` 1 for
            real response tokens (up to and including eos).
        temperature: the sampling temperature; logits are divided by it.

    Returns ``(logprobs, values)``: ``(B, T)`` ``log pi(a_t | s_t)`` and ``(B, T)`` ``V(s_t)``
    (``values`` is None with ``lm_only``). Position ``P - 1 + t`` is the state before token t.
    """
    input_ids = torch.cat([query_ids, response_ids], 1)                  # (B, P + T)
    attention_mask = torch.cat([query_mask, response_mask], 1).long()    # (B, P + T)
    position_ids = _positions(attention_mask)
    p, t = query_ids.shape[1], response_ids.shape[1]
    # Only the last T + 1 positions' logits are needed: the LM head over the prompt (a 49k-word
    # vocabulary for SmolLM2) would be computed, kept for backward and cast to fp32 for nothing.
    if lm_only:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, logits_to_keep=t + 1).logits
        values = None
    else:
        logits, values = model(input_ids, attention_mask, position_ids, logits_to_keep=t + 1)
        values = values[:, p - 1:-1]                                     # (B, T)
    logits = logits[:, :-1].float() / temperature                       # (B, T, V) position P - 1 + i predicts token i
    return ppo_math.logprobs_from_logits(logits, response_ids), values


def save_policy(policy: PolicyWithValueHead, tokenizer, path: Path, merge: bool, keep_training: bool = False) -> None:
    """Write the policy's LM (LoRA merged when ``merge``) and tokenizer to ``path``, plus the
    value head as ``value_head.pt`` beside them. ``keep_training``: merge a copy, because
    merging unloads the adapters of the model it is called on."""
    lm = policy.lm
    if merge and hasattr(lm, "merge_and_unload"):
        lm = (copy.deepcopy(lm) if keep_training else lm).merge_and_unload()
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    torch.save(policy.v_head.state_dict(), Path(path) / "value_head.pt")
