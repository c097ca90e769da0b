"""Where a PPO step's time goes, each part against what the same work costs in one plain call.

One process, one model, one batch of the project's training prompts; every figure is the median
of ``--repeats`` timed repeats after one warm-up, all measured in the same run:

  rollout        ``pipeline.ppo.rollout.rollout`` (sampling, then the policy's and the
                 reference's log-probs and values), as response tokens per second
  generate       plain ``model.generate`` on the same prompts with the same sampling settings,
                 the floor for the rollout: response tokens per second
  update         ``pipeline.ppo.step.ppo_update`` over that rollout (``--ppo-epochs`` passes of
                 mini-batches of ``--mini-batch-size``)
  floor          the same passes and mini-batches as plain training: one forward of the causal
                 LM over prompt + response, a mean log-prob loss, backward, AdamW step (fused,
                 as the trainer's)
  update_foreach_adamw  ``ppo_update`` with torch's default AdamW, the optimizer the loop used
                 before it was fused
  generate_scores  ``generate`` that also returns each step's logits and last hidden state,
                 from which the policy's log-probs and values could be read instead of the
                 rollout's policy forward; printed with that forward's time and how far the
                 log-probs read from sampling stray from the forward's (the ratio PPO's first
                 mini-batch would start from)
  generate_unfolded  with ``--lora``: plain ``generate`` with the adapters applied as separate
                 matmuls, against ``generate`` with them folded into the weights (how the
                 rollout and validation sample, ``pipeline.ppo.policy.sampling_weights``)

It prints ``rollout / generate`` in tokens per second (goal >= 0.9) and ``update / floor`` in
time (goal <= 1.3x). ``--bf16 auto`` (the default) autocasts every part to bf16 where the
trainer would (``bf16: null``: a bf16 GPU, a CPU with AMX); ``on``/``off`` force it. Run from the
repository root (threads: ``OMP_NUM_THREADS``):

    .venv/bin/python benchmarks/ppo_parts.py --model runs/sft --repeats 3
    .venv/bin/python benchmarks/ppo_parts.py --json runs/bench/ppo_parts.json
    .venv/bin/python benchmarks/ppo_parts.py --model runs/sft --lora
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median seconds over ``repeats`` runs after one warm-up, the last result)."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="policy: a run folder, a path or a model id")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bf16 autocast for every part: auto = where the trainer uses it (bf16: null)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters (rank 16, every linear layer), as lora: true does, and time "
                             "sampling with the adapters folded into the weights against unfolded")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator

    from pipeline.data import read_rows
    from pipeline.models import encode_user_turns, load_causal_lm, load_tokenizer, resolve_model
    from pipeline.ppo import PPOConfig
    from pipeline.ppo.math import logprobs_from_logits
    from pipeline.ppo.policy import build_optimizer, build_policy, response_forward, sampling_weights
    from pipeline.ppo.rollout import response_mask_from_ids, rollout
    from pipeline.ppo.step import ppo_update
    from pipeline.training import use_bf16

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = use_bf16({"auto": None, "on": True, "off": False}[args.bf16])

    def amp():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    path = resolve_model(args.model, None)
    tokenizer = load_tokenizer(path)
    cfg = PPOConfig(model=str(path), prompts="data/prompts.jsonl", output_dir="unused", batch_size=args.batch_size,
                    mini_batch_size=args.mini_batch_size, ppo_epochs=args.ppo_epochs,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0,
                    rewards={"rm": {"model": "unused"}}, lora=args.lora)
    policy, ref_lm = build_policy(load_causal_lm(path, tokenizer), cfg)
    policy.to(device)
    if ref_lm is not None:
        ref_lm.to(device)
    rows = [r for _, r in read_rows(str(ROOT / "data" / "prompts.jsonl")) if r.get("split", "train") == "train"]
    prompts = [r["prompt"] for r in rows[:args.batch_size]]
    classes = [r["prompt_class"] for r in rows[:args.batch_size]]
    accelerator = Accelerator(cpu=device == "cpu")
    optimizer = build_optimizer(policy, 1e-7)                # as the trainer builds it (fused AdamW)
    foreach_optimizer = build_optimizer(policy, 1e-7, fused=False)  # torch's default AdamW, the loop's before
    torch.manual_seed(args.seed)

    def sample(fold: bool = True, **extra):
        """Plain ``generate`` on the batch with the rollout's sampling settings -> (encoding, output);
        ``fold``: LoRA adapters folded into the weights, as the rollout samples."""
        enc = encode_user_turns(tokenizer, prompts, cfg.max_prompt_length, device)
        with torch.no_grad(), amp(), (sampling_weights(policy.lm) if fold else contextlib.nullcontext()):
            return enc, policy.lm.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0,
                                           max_new_tokens=cfg.max_new_tokens, eos_token_id=[tokenizer.eos_token_id],
                                           pad_token_id=tokenizer.pad_token_id, **extra)

    def plain_generate(fold: bool = True):
        enc, out = sample(fold)
        return out[:, enc["input_ids"].shape[1]:]

    def our_rollout():
        with amp():
            return rollout(policy, ref_lm, tokenizer, prompts, classes, cfg)

    def generate_with_scores():
        return sample(return_dict_in_generate=True, output_logits=True, output_hidden_states=True)

    def n_tokens(response) -> int:
        return int((response != tokenizer.pad_token_id).sum())

    gen_s, generated = timed(plain_generate, args.repeats)
    gen_tokens = n_tokens(generated)
    if args.lora:  # the same seed again, so both sample the same tokens up to rounding
        torch.manual_seed(args.seed)
        unfolded_s, unfolded = timed(lambda: plain_generate(fold=False), args.repeats)
    scores_s, (enc, scored) = timed(generate_with_scores, args.repeats)
    roll_s, ro = timed(our_rollout, args.repeats)
    roll_tokens = int(ro.response_mask.sum())
    # the policy's log-probs of the sampled tokens two ways: from sampling's own logits (KV cache,
    # one position at a time) and from the one forward over prompt + response the rollout runs
    response_ids = scored.sequences[:, enc["input_ids"].shape[1]:]
    response_mask, _ = response_mask_from_ids(response_ids, [tokenizer.eos_token_id])
    response_ids = torch.where(response_mask.bool(), response_ids, torch.full_like(response_ids, tokenizer.pad_token_id))
    from_sampling = logprobs_from_logits(torch.stack(scored.logits, 1).float() / cfg.temperature, response_ids)

    def policy_forward():
        with torch.no_grad(), amp():
            return response_forward(policy, enc["input_ids"], enc["attention_mask"], response_ids, response_mask,
                                    cfg.temperature)[0]
    forward_s, from_forward = timed(policy_forward, args.repeats)
    gap = (from_sampling - from_forward)[response_mask.bool()].abs()
    mask = ro.response_mask.float()
    advantages = torch.randn_like(mask) * mask
    returns = torch.randn_like(mask) * mask
    generator = torch.Generator().manual_seed(args.seed)

    def our_update(opt=optimizer):
        return ppo_update(policy, opt, accelerator, ro, mask, advantages, returns, cfg, generator, amp)

    def floor_update():
        n = mask.shape[0]
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.mini_batch_size):
                idx = order[start:start + cfg.mini_batch_size]
                ids = torch.cat([ro.query_ids[idx], ro.response_ids[idx]], 1)
                attn = torch.cat([ro.query_mask[idx], ro.response_mask[idx]], 1)
                with amp():
                    logits = policy.lm(input_ids=ids, attention_mask=attn, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()

    update_s, _ = timed(our_update, args.repeats)
    foreach_s, _ = timed(lambda: our_update(foreach_optimizer), args.repeats)
    floor_s, _ = timed(floor_update, args.repeats)
    result = {
        "device": device, "threads": torch.get_num_threads(), "bf16": bf16, "model": str(path),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "model")},
        "prompt_tokens": int(ro.query_mask.sum()), "prompt_columns": int(ro.query_ids.shape[1]),
        "generate": {"seconds": gen_s, "tokens": gen_tokens, "tokens_per_s": gen_tokens / gen_s},
        "generate_unfolded": ({"seconds": unfolded_s, "tokens": n_tokens(unfolded),
                               "tokens_per_s": n_tokens(unfolded) / unfolded_s,
                               "same_tokens_as_folded": bool(torch.equal(unfolded, generated))}
                              if args.lora else None),
        "rollout": {"seconds": roll_s, "tokens": roll_tokens, "tokens_per_s": roll_tokens / roll_s},
        "generate_scores": {"seconds": scores_s, "policy_forward_seconds": forward_s,
                            "logprob_gap_mean": float(gap.mean()), "logprob_gap_max": float(gap.max())},
        "update": {"seconds": update_s}, "update_foreach_adamw": {"seconds": foreach_s}, "floor": {"seconds": floor_s},
    }
    result["rollout_vs_generate"] = result["rollout"]["tokens_per_s"] / result["generate"]["tokens_per_s"]
    result["update_vs_floor"] = update_s / floor_s
    result["update_vs_foreach_adamw"] = update_s / foreach_s
    result["rollout_update_vs_before"] = (roll_s + update_s) / (roll_s + foreach_s)
    print(f"device {device}, {result['threads']} thread(s), {'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch_size}, mini-batch "
          f"{args.mini_batch_size} x {args.ppo_epochs} epochs, {args.max_new_tokens} new tokens"
          f"{', LoRA adapters' if args.lora else ''}")
    if args.lora:
        unfolded_rate = result["generate_unfolded"]["tokens_per_s"]
        same = "the same" if result["generate_unfolded"]["same_tokens_as_folded"] else "not the same (rounding)"
        print(f"LoRA sampling: adapters folded {result['generate']['tokens_per_s']:7.1f} tokens/s, unfolded "
              f"{unfolded_rate:7.1f} tokens/s: folded is {result['generate']['tokens_per_s'] / unfolded_rate:.2f}x "
              f"the speed; {same} tokens sampled")
    print(f"rollout  {roll_s:6.2f} s  {result['rollout']['tokens_per_s']:7.1f} tokens/s   "
          f"plain generate {gen_s:6.2f} s  {result['generate']['tokens_per_s']:7.1f} tokens/s   "
          f"ratio {result['rollout_vs_generate']:.2f} (goal >= 0.90)")
    print(f"generate with logits and hidden states {scores_s:6.2f} s (plain {gen_s:.2f} s); the rollout's policy "
          f"forward it could replace {forward_s:.2f} s; log-prob gap sampling vs forward: mean {gap.mean():.4f}, "
          f"max {gap.max():.4f} nats")
    print(f"update   {update_s:6.2f} s   floor (plain forward+backward+AdamW) {floor_s:6.2f} s   "
          f"ratio {result['update_vs_floor']:.2f}x (goal <= 1.30x)")
    print(f"update with torch's default (foreach) AdamW {foreach_s:6.2f} s: the fused optimizer takes "
          f"{result['update_vs_foreach_adamw']:.2f}x the time; rollout + update {result['rollout_update_vs_before']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
