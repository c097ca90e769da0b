"""Everything a PPO run carries from step to step besides the weights and the optimizer.

Checkpointing saves :meth:`TrainerState.state_dict` and resuming loads it: one list of what is
kept, so a resumed run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch

from pipeline.ppo import math as ppo_math
from pipeline.ppo.policy import WeightAverage
from pipeline.ppo.rollout import PromptSchedule

KLController = Union[ppo_math.FixedKLController, ppo_math.AdaptiveKLController]


def _totals() -> dict[str, int]:
    return {"skipped": 0, "empty": 0, "truncated": 0, "responses": 0}


@dataclasses.dataclass
class TrainerState:
    kl_ctl: KLController                          # the KL coefficient beta (adaptive or fixed)
    schedule: PromptSchedule                      # which prompts the next steps draw
    shuffle: torch.Generator                      # mini-batch order in the updates (per process)
    composer: Any                                 # the reward composer: its normalisation statistics
    baseline: Optional[ppo_math.ClassBaseline]    # per-class moving averages of the scores
    scale: Optional[ppo_math.ClassScale]          # per-class moving spreads of the centred scores
    hold: Optional[ppo_math.RefusalHold] = None   # per-class multipliers that hold refusal shares
    average: Optional[WeightAverage] = None       # weight_average: the validated and published weights
    step: int = 0                                 # the last finished step
    totals: dict[str, int] = dataclasses.field(default_factory=_totals)  # responses skipped, empty, ...

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "kl_controller": self.kl_ctl.state_dict(),
            "rewards": self.composer.state_dict() if hasattr(self.composer, "state_dict") else None,
            "prompt_schedule": self.schedule.state_dict(), "shuffle": self.shuffle.get_state(),
            "totals": dict(self.totals),
            "class_baseline": self.baseline.state_dict() if self.baseline is not None else None,
            "class_scale": self.scale.state_dict() if self.scale is not None else None,
            "refusal_hold": self.hold.state_dict() if self.hold is not None else None,
            "weight_average": self.average.state_dict() if self.average is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if state.get("rewards") is not None and hasattr(self.composer, "load_state_dict"):
            self.composer.load_state_dict(state["rewards"])
        self.schedule.load_state_dict(state["prompt_schedule"])
        self.shuffle.set_state(state["shuffle"])
        self.totals = dict(state["totals"])
        if self.baseline is not None:
            self.baseline.load_state_dict(state["class_baseline"])
        if self.scale is not None and state.get("class_scale") is not None:
            self.scale.load_state_dict(state["class_scale"])
        if self.hold is not None and state.get("refusal_hold") is not None:
            self.hold.load_state_dict(state["refusal_hold"])
        if self.average is not None and state.get("weight_average") is not None:
            self.average.load_state_dict(state["weight_average"])
