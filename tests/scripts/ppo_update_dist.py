"""One PPO update on a fixed global batch, split over however many processes launched this;
rank 0 writes the loss statistics and the updated weights to the output file.

    python tests/scripts/ppo_update_dist.py MODEL_DIR OUT.pt
    torchrun --nproc_per_node 2 tests/scripts/ppo_update_dist.py MODEL_DIR OUT.pt
"""

import sys

import torch
from accelerate import Accelerator

from pipeline import config as config_lib
from pipeline import ppo
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.ppo import policy as ppo_policy
from pipeline.ppo import rollout as ppo_rollout
from pipeline.ppo.step import advantages_from_scores, ppo_update

GLOBAL_BATCH, P, T = 4, 5, 6

model_dir, out_path = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
accelerator = Accelerator(cpu=True)
world, rank = accelerator.num_processes, accelerator.process_index
local = GLOBAL_BATCH // world
cfg = config_lib.from_dict(ppo.PPOConfig, {
    "model": model_dir, "batch_size": local, "mini_batch_size": local, "ppo_epochs": 2,
    "learning_rate": 1e-3, "temperature": 1.0, "report_to": ["none"]}, "test")

torch.manual_seed(0)
tok = load_tokenizer(model_dir)
policy, ref_lm = ppo_policy.build_policy(load_causal_lm(model_dir, tok), cfg)
torch.nn.init.normal_(policy.v_head.weight, std=0.02)  # a non-zero critic, so the value loss has a gradient
optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
model, optimizer = accelerator.prepare(policy, optimizer)

# The same global batch on every process count: fixed ids, uneven response lengths (so the
# token counts differ between processes), fixed scores. Each process takes its rows.
g = torch.Generator().manual_seed(1)
query_ids = torch.randint(10, 1000, (GLOBAL_BATCH, P), generator=g)
query_mask = torch.ones(GLOBAL_BATCH, P, dtype=torch.long)
query_mask[1, :2] = 0
response_ids = torch.randint(10, 1000, (GLOBAL_BATCH, T), generator=g)
lengths = torch.tensor([6, 1, 2, 3])  # 7 and 5 tokens on two processes
response_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
score = torch.tensor([1.0, -0.5, 0.25, 2.0])
rows = slice(rank * local, (rank + 1) * local)
q, qm, r, rm, s = query_ids[rows], query_mask[rows], response_ids[rows], response_mask[rows], score[rows]

unwrapped = accelerator.unwrap_model(model)
with torch.no_grad():
    logprobs, values = ppo_policy.response_forward(unwrapped, q, qm, r, rm, cfg.temperature)
    ref_logprobs, _ = ppo_policy.response_forward(ref_lm, q, qm, r, rm, cfg.temperature, lm_only=True)
ro = ppo_rollout.Rollout(q, qm, r, rm, logprobs, ref_logprobs - 0.1, values, torch.zeros(local, dtype=torch.bool),
                 ["p"] * local, ["safe"] * local, ["r"] * local)
all_reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
# the loop's own arithmetic: KL penalty (beta 0.05), GAE, advantages whitened over the global batch
rec = advantages_from_scores(s, ro, cfg, 0.05, all_reduce=all_reduce)
stats = ppo_update(model, optimizer, accelerator, ro, rec.mask, rec.advantages, rec.returns, cfg,
                   torch.Generator().manual_seed(0))
if accelerator.is_main_process:
    torch.save({"stats": stats, "world": world,
                "weights": {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}}, out_path)
accelerator.wait_for_everyone()
