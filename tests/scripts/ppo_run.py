"""Run PPO from a YAML config in a fresh process; with --kill-at N, SIGKILL this process
while the Nth batch of responses is being scored (used by the resume test)."""

import argparse
import os
import signal

import torch

from pipeline import config as config_lib
from pipeline import ppo
from pipeline.rewards import RewardComposer, build_reward_composer

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("--kill-at", type=int, default=0)
args = parser.parse_args()

torch.set_num_threads(1)
cfg = config_lib.from_dict(ppo.PPOConfig, config_lib.load_yaml(args.config), args.config)


class KilledWhileScoring(RewardComposer):
    calls = 0

    def __call__(self, *a, **kw):
        KilledWhileScoring.calls += 1
        if KilledWhileScoring.calls == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(*a, **kw)


composer = build_reward_composer(cfg.rewards)
composer.__class__ = KilledWhileScoring
ppo.main(cfg, reward_composer=composer)
