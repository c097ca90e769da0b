"""PPO step time and peak memory: ours (pipeline/ppo/) against TRL 1.12's PPOTrainer.

Both sides train the same policy (SmolLM2-135M-Instruct from the project's model cache) on
the same prompt batches, in the same order, with the same batch size, mini-batch size, PPO
epochs, response length, sampling temperature and reward model; each runs in its own
subprocess so its peak resident memory (``ru_maxrss``) is its own. Rows:

  full   full fine-tuning, reward = the learned RM only         (like for like)
  lora   LoRA r=16 on every linear layer, reward = the RM only  (like for like)
  rbrm   ours with the RM plus the rubric grader (embedding backend); TRL has no slot for
         a second reward, so this row is compared with TRL's full fine-tuning row

TRL 1.12 is the last release with ``PPOTrainer`` (``trl.experimental.ppo``), while the
project uses TRL 1.16, so TRL runs in a virtual environment of its own that this script
creates on first use (``.cache/bench/trl112-venv``: torch pinned first, then trl 1.12 and
the transformers/accelerate/peft/datasets versions of the running interpreter). The TRL
worker imports only torch, transformers and trl, never ``pipeline``.

Step time is the median over steps 2..N (step 1 is warm-up): ours from ``time/step_s`` in
the run's history, TRL from the time between ``on_step_end`` callbacks. Peak memory is the
worker's ``ru_maxrss`` when training ends (before ours saves its model).

Run from the repository root:

    .venv/bin/python benchmarks/ppo_step.py --steps 3 --max-new-tokens 24     # quick check
    .venv/bin/python benchmarks/ppo_step.py --json runs/bench/ppo_step.json     # defaults
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".cache" / "bench" / "trl112-venv"
TRL_SPEC = "trl==1.12.0"
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")  # a plain "torch" would pull a CUDA build
TORCH_INDEX = os.environ.get("TORCH_INDEX", "")
# Installed into the TRL venv at the versions the running interpreter has, so the two sides
# differ only in the trainer code.
SHARED_PACKAGES = ("transformers", "accelerate", "peft", "datasets")
RANDOM_RM = ROOT / ".cache" / "bench" / "random-rm"
ROWS = ("full", "lora", "rbrm")
ROW_TITLES = {"full": "full fine-tuning, RM", "lora": "LoRA, RM", "rbrm": "full fine-tuning, RM + RBRM (ours only)"}
RBRM_REWARD = {"weight": 1.0, "grader": {"backend": "embedding", "rubrics": ["rubrics"]}}
GOAL_TIME, GOAL_MEMORY = 0.8, 1.0  # ours / TRL, like-for-like rows


def log(msg: str) -> None:
    print(f"[ppo_step] {msg}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


# ---------------------------------------------------------------------------- workers (one side each)


def worker_ours(spec: dict) -> dict:
    """Run ``pipeline.ppo.main`` for ``spec['steps']`` steps (main venv)."""
    import torch

    from pipeline import config as config_lib
    from pipeline import ppo
    from pipeline.ppo import trainer

    rewards = {"rm": {"model": spec["rm"], "weight": 1.0}}
    if spec["rbrm"]:
        rewards["rbrm"] = RBRM_REWARD
    cfg = config_lib.from_dict(ppo.PPOConfig, {
        "model": spec["policy"], "prompts": str(ROOT / "data" / "prompts.jsonl"), "output_dir": spec["output_dir"],
        "max_steps": spec["steps"], "batch_size": spec["batch_size"], "mini_batch_size": spec["mini_batch_size"],
        "ppo_epochs": spec["ppo_epochs"], "max_new_tokens": spec["max_new_tokens"],
        "max_prompt_length": spec["max_prompt_length"], "temperature": spec["temperature"],
        "kl_coef": spec["kl_coef"], "learning_rate": spec["learning_rate"], "lora": spec["lora"],
        "lora_r": spec["lora_r"], "lora_alpha": spec["lora_alpha"], "rewards": rewards, "seed": spec["seed"],
        "bf16": False,  # TRL's side runs in fp32 too
        "report_to": ["none"], "sample_every": 1,  # samples.jsonl records each step's prompts for the TRL side
    }, source="benchmarks/ppo_step.py")

    # Training ends where main() saves the policy: take the memory high-water mark there, so
    # writing the model folder (which TRL's side does not do) is not counted.
    at_train_end: dict[str, float] = {}
    save_policy = trainer.save_policy

    def save_policy_after_mark(*args, **kwargs):
        at_train_end.setdefault("peak_rss_mib", peak_rss_mib())
        return save_policy(*args, **kwargs)

    built: dict[str, int] = {}
    build_policy = trainer.build_policy

    def build_policy_counted(lm, cfg):
        policy, ref_lm = build_policy(lm, cfg)
        built["trainable_params"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        return policy, ref_lm

    trainer.save_policy, trainer.build_policy = save_policy_after_mark, build_policy_counted
    ppo.main(cfg)

    out = Path(spec["output_dir"])
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if line.strip()]
    if "time/step_s" not in history[0]:
        raise SystemExit("pipeline/ppo/trainer.py does not log time/step_s in history.jsonl; this benchmark needs it")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    step_s = [h["time/step_s"] for h in history]
    n_resp = spec["batch_size"] * len(history)
    return {
        "side": "ours", "step_s": step_s, "median_step_s": median_after_warmup(step_s),
        "peak_rss_mib": at_train_end["peak_rss_mib"], "process_peak_rss_mib": peak_rss_mib(),
        "eos_share": 1 - sum(h["rollout/truncated"] for h in history) / n_resp,
        "prompts": [s["prompt"] for s in samples],
        "trainable_params": built["trainable_params"],
        "threads": torch.get_num_threads(), "versions": _versions("torch", "transformers", "trl", "peft"),
    }


def worker_trl(spec: dict) -> dict:
    """Run TRL 1.12's PPOTrainer (TRL venv; imports no project code)."""
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise SystemExit(f"{spec['policy']}: the tokenizer needs a pad token distinct from eos (ours sets one)")
    # The prompts ours trained on, step by step, rendered and cut the same way as ours does.
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in spec["prompts"]]
    enc = tok(texts, add_special_tokens=False, truncation=True, truncation_side="left",
              max_length=spec["max_prompt_length"])
    dataset = Dataset.from_dict({"input_ids": enc["input_ids"]})

    policy = AutoModelForCausalLM.from_pretrained(spec["policy"])
    ref = None if spec["lora"] else AutoModelForCausalLM.from_pretrained(spec["policy"])
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm"], num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm"], num_labels=1)
    for model in (policy, ref, value, reward):
        if model is not None:
            model.config.pad_token_id = tok.pad_token_id
    policy.generation_config.pad_token_id = tok.pad_token_id

    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    b = spec["batch_size"]
    args = PPOConfig(
        output_dir=spec["output_dir"], report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        seed=spec["seed"], use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        gradient_checkpointing=False,  # TRL turns it on by default; ours does not checkpoint
        per_device_train_batch_size=b, gradient_accumulation_steps=1, local_rollout_forward_batch_size=b,
        num_mini_batches=b // spec["mini_batch_size"], num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=spec["steps"] * b, response_length=spec["max_new_tokens"], stop_token="eos",
        temperature=spec["temperature"], kl_coef=spec["kl_coef"], kl_estimator="k1", cliprange=0.2,
        cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, learning_rate=spec["learning_rate"],
        num_sample_generations=0, dataloader_num_workers=0,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s: list[float] = []
            self.eos: list[float] = []
            self.peak = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_s.append(now - self.last)
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "val/num_eos_tokens" in logs:
                self.eos.append(logs["val/num_eos_tokens"])

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = peak_rss_mib()

    timer = StepTimer()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, callbacks=[timer], peft_config=peft_config)
    # TRL shuffles its prompts; feed it ours' batches in ours' order instead, so both sides
    # pad and generate for the same prompts at every step.
    trainer.dataloader = trainer.accelerator.prepare(DataLoader(
        dataset, batch_size=b, shuffle=False, collate_fn=DataCollatorWithPadding(tok), drop_last=True))
    trainer.train()
    if len(timer.step_s) != spec["steps"]:
        raise SystemExit(f"TRL ran {len(timer.step_s)} steps, expected {spec['steps']}")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {
        "side": "trl", "step_s": timer.step_s, "median_step_s": median_after_warmup(timer.step_s),
        "peak_rss_mib": timer.peak, "process_peak_rss_mib": peak_rss_mib(),
        "eos_share": sum(timer.eos) / (b * len(timer.eos)) if timer.eos else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "optimizer": f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})",
        "threads": torch.get_num_threads(), "versions": _versions("torch", "transformers", "trl", "peft"),
    }


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    return out


# ---------------------------------------------------------------------------- orchestration


def ensure_trl_venv(venv: Path) -> Path:
    """The TRL 1.12 interpreter; the venv is created on first use and reused after."""
    from importlib.metadata import version

    python = venv / "bin" / "python"
    pins = [TRL_SPEC] + [f"{name}=={version(name)}" for name in SHARED_PACKAGES]
    stamp = venv / ".installed"
    wanted = "\n".join([TORCH_SPEC] + pins) + "\n"
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    log(f"setting up the TRL venv in {venv} ({TORCH_SPEC}, then {' '.join(pins)}); a few minutes, once")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(pip + (["--index-url", TORCH_INDEX] if TORCH_INDEX else []) + [TORCH_SPEC], check=True)
    subprocess.run(pip + [TORCH_SPEC] + pins, check=True)  # torch again so pip keeps the installed build
    stamp.write_text(wanted)
    return python


def reward_model_folder() -> tuple[str, bool]:
    """-> (folder, trained). The project's RM when it has been trained, else a SmolLM2 with a
    fresh one-output score head (random, which is fine for timing), built once."""
    from pipeline.models import DEFAULT_MODEL, fetch, is_model_folder

    trained = ROOT / "runs" / "reward_model" / "model"
    if is_model_folder(trained):
        return str(trained), True
    if not is_model_folder(RANDOM_RM):
        import torch

        from pipeline.models import load_sequence_classifier, load_tokenizer

        log(f"no trained reward model in {trained}; building one with a random head in {RANDOM_RM}")
        torch.manual_seed(0)
        path = str(fetch(DEFAULT_MODEL))
        tok = load_tokenizer(path)
        model = load_sequence_classifier(path, tok)
        model.save_pretrained(RANDOM_RM)
        tok.save_pretrained(RANDOM_RM)
    return str(RANDOM_RM), False


def run_worker(python: Path, side: str, spec: dict, tmp: Path) -> dict:
    spec_path, result_path = tmp / f"{spec['name']}-spec.json", tmp / f"{spec['name']}-result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TRL_EXPERIMENTAL_SILENCE="1")
    if spec["threads"]:
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    env.pop("PYTHONPATH", None)  # the TRL worker must not see the project package
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", side, "--spec", str(spec_path),
           "--result", str(result_path)]
    log(f"{spec['name']}: running ({python})")
    t0 = time.perf_counter()
    # The child's stdout (trainer log lines) goes to our stderr: stdout holds only the table.
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{spec['name']}: worker failed with exit status {done.returncode} (output above)")
    result = json.loads(result_path.read_text())
    log(f"{spec['name']}: {result['median_step_s']:.2f} s/step, peak {result['peak_rss_mib']:.0f} MiB "
        f"({time.perf_counter() - t0:.0f}s in all)")
    return result


def settings_rows(s: dict, trl_optimizer: str | None) -> list[tuple[str, str, str]]:
    ours_opt = "AdamW(fused=True) (pipeline.ppo.policy.build_optimizer)"
    return [
        ("policy", s["policy"], "same"),
        ("reward model", s["rm"] + ("" if s["rm_trained"] else " (random head: timing only)"), "same"),
        ("value function", "linear head on the policy's last hidden state (shared trunk)",
         "separate model initialised from the reward model (TRL's examples)"),
        ("reference", "frozen copy (full) / policy with adapters off (LoRA)", "same"),
        ("prompts", "data/prompts.jsonl train rows, chat template, left-padded", "the same batches in the same order"),
        ("steps (timed)", f"{s['steps']} ({s['steps'] - 1} after 1 warm-up)", "same"),
        ("batch size / mini-batch / PPO epochs",
         f"{s['batch_size']} / {s['mini_batch_size']} / {s['ppo_epochs']}",
         f"per_device_train_batch_size {s['batch_size']}, num_mini_batches {s['batch_size'] // s['mini_batch_size']}, "
         f"num_ppo_epochs {s['ppo_epochs']}"),
        ("response length", f"max_new_tokens {s['max_new_tokens']}, stops at eos",
         f"response_length {s['max_new_tokens']}, stop_token eos"),
        ("sampling", f"temperature {s['temperature']}, top_k off, top_p 1", "same"),
        ("KL", f"k1, kl_coef {s['kl_coef']}, fixed", "same"),
        ("LoRA", f"r {s['lora_r']}, alpha {s['lora_alpha']}, all linear layers, dropout 0", "same (policy only)"),
        ("learning rate", f"{s['learning_rate']} (full), {s['lora_learning_rate']} (LoRA)", "same"),
        ("gradient clipping", "max_grad_norm 1.0", "none (TRL's PPO loop never clips)"),
        ("gradient checkpointing / dtype", "off / fp32", "off (TRL's default is on) / fp32"),
        ("optimizer", ours_opt, trl_optimizer or "-"),
    ]


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def build_table(results: dict) -> list[list[str]]:
    rows = []
    for name, r in results["rows"].items():
        rows.append([ROW_TITLES[name], fmt(r["ours"]["median_step_s"]), fmt(r["trl"] and r["trl"]["median_step_s"]),
                     fmt(r.get("time_ratio"), ".2f") + ("x" if r.get("time_ratio") else ""),
                     fmt(r["ours"]["peak_rss_mib"], ".0f"), fmt(r["trl"] and r["trl"]["peak_rss_mib"], ".0f"),
                     fmt(r.get("memory_ratio"), ".2f") + ("x" if r.get("memory_ratio") else "")])
    return rows


HEADER = ["row", "ours s/step", "TRL s/step", "time ours/TRL", "ours peak MiB", "TRL peak MiB", "memory ours/TRL"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(HEADER))]
    line = lambda cells: "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(HEADER))
    print("  " + "  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))


def markdown(results: dict) -> str:
    s = results["settings"]
    out = ["# PPO step: ours vs TRL 1.12 PPOTrainer", "",
           f"{s['steps']} steps per side (median of steps 2..{s['steps']}), batch {s['batch_size']}, "
           f"max_new_tokens {s['max_new_tokens']}, {s['device']}, {s['threads']} threads.", "",
           "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in build_table(results)]
    out += ["", "| setting | ours | TRL 1.12 |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in results["settings_table"]]
    out += ["", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description="Per-step wall time and peak memory of our PPO (pipeline/ppo/) against TRL 1.12's "
                    "experimental PPOTrainer, same policy, prompts, batch size, response length and reward model, "
                    "for full fine-tuning and LoRA; plus ours with the RBRM reward on. Each side runs in its own "
                    "subprocess; TRL 1.12 in its own venv (created on first use).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="PPO steps per side; the first is warm-up and not counted")
    p.add_argument("--batch-size", type=int, default=4, help="prompts (= responses) per step")
    p.add_argument("--mini-batch-size", type=int, default=2, help="responses per gradient step")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over each step's responses")
    p.add_argument("--max-new-tokens", type=int, default=32, help="response length limit")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker; 0 = torch's default. 1 by default: on a shared CPU, "
                        "multi-threaded steps swing by 5-30x with the other jobs' load")
    p.add_argument("--trl-venv", type=Path, default=TRL_VENV, help="virtual environment for TRL 1.12 (made if missing)")
    p.add_argument("--json", dest="json_out", type=Path, default=None, metavar="OUT", help="write the results here")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="write the tables as markdown here")
    # Internal: one side's worker.
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.spec.read_text())
        result = (worker_ours if args.worker == "ours" else worker_trl)(spec)
        args.result.write_text(json.dumps(result))
        return result

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        p.error(f"--rows: expected a comma-separated subset of {','.join(ROWS)}, got {args.rows!r}")
    if args.threads < 0:
        p.error("--threads must be 0 (torch's default) or more")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is warm-up)")
    if args.batch_size < 1 or args.mini_batch_size < 1 or args.batch_size % args.mini_batch_size:
        p.error("--mini-batch-size must divide --batch-size")

    import torch

    from pipeline.models import DEFAULT_MODEL, fetch

    policy = str(fetch(DEFAULT_MODEL).resolve())
    rm, rm_trained = reward_model_folder()
    trl_python = ensure_trl_venv(args.trl_venv)
    settings = {
        "policy": policy, "rm": rm, "rm_trained": rm_trained, "steps": args.steps, "batch_size": args.batch_size,
        "mini_batch_size": args.mini_batch_size, "ppo_epochs": args.ppo_epochs, "max_new_tokens": args.max_new_tokens,
        "max_prompt_length": 256, "temperature": 0.7, "kl_coef": 0.05, "learning_rate": 1e-6,
        "lora_learning_rate": 1e-5, "lora_r": 16, "lora_alpha": 32, "seed": args.seed,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": args.threads or torch.get_num_threads(),
    }
    # TRL has no RBRM slot: the rbrm row is set against TRL's full fine-tuning run.
    trl_runs = [r for r in ("full", "lora") if r in rows or (r == "full" and "rbrm" in rows)]

    results: dict = {"settings": settings, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="ppo_step-") as tmp:
        tmp = Path(tmp)
        trl_results = {}
        ours_results = {}
        for name in dict.fromkeys(rows + trl_runs):  # ours then TRL per row, so load drifts hit both alike
            lora = name == "lora"
            spec = dict(settings, lora=lora, rbrm=name == "rbrm",
                        learning_rate=settings["lora_learning_rate"] if lora else settings["learning_rate"])
            ours = run_worker(Path(sys.executable), "ours", dict(spec, name=f"ours-{name}",
                                                                 output_dir=str(tmp / f"ours-{name}")), tmp)
            ours_results[name] = ours
            if name in trl_runs:
                trl_results[name] = run_worker(trl_python, "trl", dict(
                    spec, name=f"trl-{name}", output_dir=str(tmp / f"trl-{name}"), prompts=ours.pop("prompts")), tmp)
            ours.pop("prompts", None)
        for name in rows:
            ours, trl = ours_results[name], trl_results.get("full" if name == "rbrm" else name)
            results["rows"][name] = {
                "ours": ours, "trl": trl,
                "time_ratio": ours["median_step_s"] / trl["median_step_s"] if trl else None,
                "memory_ratio": ours["peak_rss_mib"] / trl["peak_rss_mib"] if trl else None,
                "like_for_like": name != "rbrm",
            }

    trl_any = next(iter(trl_results.values()), None)
    results["settings_table"] = settings_rows(settings, trl_any and trl_any["optimizer"])
    notes = [
        "step time: median over steps 2..N; ours from time/step_s (rollout, rewards, GAE, PPO updates), "
        "TRL from the time between on_step_end callbacks (the same work plus TRL's per-step gc.collect()).",
        "peak memory: the worker process's ru_maxrss when training ends (models, optimizer state, activations, "
        "Python and library overhead); ours before it saves its model.",
        "design difference kept: TRL trains a separate value model (a full copy of the RM backbone), so each "
        "update runs two backbones forward and backward and holds four models; ours has a value head on the "
        "policy's trunk and holds three (policy, reference, RM). With LoRA, TRL still fine-tunes its whole value "
        "model; ours trains adapters plus the value head.",
        "rollout difference kept: TRL reads the rollout log-probs from generate()'s scores and runs the value "
        "model separately; ours runs one extra policy forward that yields log-probs and values together. "
        "Ours scores responses from decoded text re-tokenised for the RM; TRL scores the token ids.",
        "trainable parameters: " + ", ".join(
            f"{n} ours {r['ours']['trainable_params'] / 1e6:.2f}M / TRL "
            f"{fmt(r['trl'] and r['trl']['trainable_params'] / 1e6)}M" for n, r in results["rows"].items()) + ".",
        "responses ending in eos (share): " + ", ".join(
            f"{n} ours {fmt(r['ours']['eos_share'])} / TRL {fmt(r['trl'] and r['trl']['eos_share'])}"
            for n, r in results["rows"].items()) + "; generation length is the same cap, sampling differs.",
        "the rbrm row is ours with the RM plus the rubric grader (embedding backend) against TRL's full "
        "fine-tuning run with the RM only (TRL's PPOTrainer takes one reward model).",
        "timings from a shared machine are noisy; compare runs made on the same machine at the same time.",
    ]
    if not rm_trained:
        notes.insert(0, f"reward model: no trained RM in runs/reward_model; both sides used {rm}, SmolLM2 with a "
                        "random score head (timing only; its scores mean nothing).")
    results["notes"] = notes
    results["versions"] = {"ours": ours_results[rows[0]]["versions"], "trl": trl_any and trl_any["versions"]}

    print(f"\nPPO step, ours vs TRL 1.12 PPOTrainer: {settings['device']}, {settings['threads']} threads, "
          f"{args.steps} steps each (median of steps 2..{args.steps})\n")
    print_table(build_table(results))
    print("\nsettings")
    width = max(len(a) for a, _, _ in results["settings_table"])
    for a, b, c in results["settings_table"]:
        print(f"  {a:<{width}}  ours: {b}\n  {'':<{width}}  TRL:  {c}")
    print()
    for n in notes:
        print(f"  - {n}")
    like = [r for r in results["rows"].values() if r["like_for_like"] and r["trl"]]
    if like:
        ok = all(r["time_ratio"] <= GOAL_TIME and r["memory_ratio"] <= GOAL_MEMORY for r in like)
        print(f"\n  goal (like-for-like rows): time ours/TRL <= {GOAL_TIME}, memory ours/TRL <= {GOAL_MEMORY}: "
              f"{'met' if ok else 'NOT met'}")
    results["goal"] = {"time_ratio_max": GOAL_TIME, "memory_ratio_max": GOAL_MEMORY}

    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2))
        print(f"\n  wrote {args.json_out}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results))
        print(f"  wrote {args.markdown}")
    return results


if __name__ == "__main__":
    main()
