"""Grader throughput: reading the answer from log-probs vs. generating it and parsing the text.

Both methods grade the same (prompt, response) pairs with the same grader model, the same
rubric input and the same batch size:

  ours      ``HFBackend.option_logprobs``: one batched forward pass per batch on top of the
            rubric's cached key/values; the category is the argmax over the A-D log-probs.
  generate  what most LLM judges do: the full chat-template text (rubric + item + question)
            per pair, greedy ``model.generate`` with left padding, then the first standalone
            A/B/C/D letter in the reply; a reply without one counts as "no answer".

The default grader backend (``classifier``, also without its harm probe and without its
off-topic gate) and the
``embedding`` backend grade the same pairs too, with the shipped rubrics; their examples/second are printed against the log-prob read-out's,
timed in the same run.

Run from the repository root:

    .venv/bin/python benchmarks/grader_throughput.py --n 40
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLD_DATA = ROOT.parent / "shared" / "data" / "pyrit_refusal_labelled.jsonl"
PREFERENCE_DATA = ROOT / "data" / "preferences.jsonl"
RUBRIC = ROOT / "rubrics" / "refusal_style.yaml"
LABELS = ("A", "B", "C", "D")
REFUSAL = {"A", "B"}  # desired or undesired refusal
# A capital A-D that is not part of a word: matches "A", "(B)", "C.", "Category: D".
# The article "A" ("A refusal...") also matches; a generate-then-parse judge has no way to tell.
LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


@dataclass
class Pair:
    id: str
    prompt: str
    response: str
    gold_refusal: bool | None  # None when the data has no refusal label


def load_pairs(n: int, path: Path | None) -> tuple[list[Pair], Path]:
    """The first n pairs: the labelled PyRIT set when present, else the preference pairs.

    A preference row gives two pairs (chosen and rejected response), neither with a label.
    """
    if path is None:
        path = GOLD_DATA if GOLD_DATA.exists() else PREFERENCE_DATA
    pairs: list[Pair] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if len(pairs) >= n:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            rid = str(row.get("id", f"line-{line_no}"))
            if "response" in row:
                gold = row.get("is_refusal")
                pairs.append(Pair(rid, row["prompt"], row["response"], None if gold is None else bool(gold)))
            else:
                pairs.append(Pair(rid + ":chosen", row["prompt"], row["chosen"], None))
                pairs.append(Pair(rid + ":rejected", row["prompt"], row["rejected"], None))
    return pairs[:n], path


def parse_letter(reply: str) -> str | None:
    m = LETTER.search(reply)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------- the two graders


def grade_logprob(backend, shared: str, question: str, items: list[str], order: list[int],
                  batch_size: int, progress: bool = True) -> tuple[list[str], np.ndarray]:
    """Categories from ``option_logprobs`` (argmax over A-D), and the probability mass on A-D."""
    from tqdm import tqdm

    cats: list[str] = [""] * len(items)
    mass = np.full(len(items), np.nan)
    with tqdm(total=len(order), desc="ours (log-prob)", unit="ex", disable=not progress) as bar:
        # One call per batch only so the bar can move; option_logprobs itself sorts and batches
        # the same way, and the rubric's key/values are computed once and reused across calls.
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            scores = backend.option_logprobs(shared, [items[i] for i in idx], [question], LABELS)
            for row, i in enumerate(idx):
                if scores.errors[row] is None:
                    cats[i] = LABELS[int(np.argmax(scores.logprobs[row, 0]))]
                    mass[i] = scores.mass[row, 0]
            bar.update(len(idx))
    return cats, mass


def grade_generate(backend, texts: list[str], order: list[int], batch_size: int, max_new_tokens: int,
                   progress: bool = True) -> tuple[list[str | None], list[str]]:
    """Greedy replies to the full grader texts, and the first A-D letter parsed from each."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    tok, model = backend.tok, backend.model
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=model.generation_config.eos_token_id)
    replies = [""] * len(texts)
    side = tok.padding_side
    tok.padding_side = "left"  # decoder-only generation: pad on the left so every row ends at its prompt
    try:
        with tqdm(total=len(order), desc="generate+parse", unit="ex", disable=not progress) as bar, torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                # The texts already hold the chat template's special tokens.
                enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(backend.device)
                out = model.generate(**enc, generation_config=config)
                new = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, reply in zip(idx, new):
                    replies[i] = reply
                bar.update(len(idx))
    finally:
        tok.padding_side = side
    return [parse_letter(r) for r in replies], replies


# ---------------------------------------------------------------------------- reporting


def share(flags) -> float | None:
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summarise(pairs, ours, gen, t_ours, t_gen, mass) -> dict:
    n = len(pairs)
    parsed = [i for i in range(n) if gen[i] is not None]
    labelled = [i for i in range(n) if pairs[i].gold_refusal is not None]

    def gold_agreement(cats):
        # A missing category (no answer) never matches the gold label.
        return share((cats[i] in REFUSAL) == pairs[i].gold_refusal if cats[i] else False for i in labelled)

    def counts(cats):
        return {label: sum(c == label for c in cats) for label in LABELS}

    return {
        "n": n,
        "ours": {"seconds": t_ours, "examples_per_second": n / t_ours, "no_answer": share(not c for c in ours),
                 "categories": counts(ours), "mean_mass_on_options": float(np.nanmean(mass)),
                 "gold_refusal_agreement": gold_agreement(ours)},
        "generate": {"seconds": t_gen, "examples_per_second": n / t_gen, "no_answer": share(c is None for c in gen),
                     "categories": counts(gen), "gold_refusal_agreement": gold_agreement(gen)},
        "speedup_ours_over_generate": t_gen / t_ours,
        "category_agreement": share(ours[i] == gen[i] for i in range(n)),
        "category_agreement_parsed": share(ours[i] == gen[i] for i in parsed),
        "n_parsed": len(parsed),
        "n_labelled": len(labelled),
    }


def print_table(s: dict) -> None:
    o, g = s["ours"], s["generate"]
    cat = lambda d: "/".join(str(d["categories"][label]) for label in LABELS)  # noqa: E731
    rows = [
        ("", "ours (log-prob)", "generate+parse"),
        ("seconds", f"{o['seconds']:.1f}", f"{g['seconds']:.1f}"),
        ("examples/second", f"{o['examples_per_second']:.2f}", f"{g['examples_per_second']:.2f}"),
        ("no answer (unparseable)", pct(o["no_answer"]), pct(g["no_answer"])),
        ("categories A/B/C/D", cat(o), cat(g)),
        ("mean probability on A-D", f"{o['mean_mass_on_options']:.3f}", "-"),
    ]
    if s["n_labelled"]:
        rows.append((f"gold refusal agreement (n={s['n_labelled']})", pct(o["gold_refusal_agreement"]),
                     pct(g["gold_refusal_agreement"])))
    width = max(len(r[0]) for r in rows)
    for name, a, b in rows:
        print(f"  {name:<{width}}  {a:>16}  {b:>16}")
    print()
    print(f"  speed ratio (ours / generate, examples/second): {s['speedup_ours_over_generate']:.1f}x")
    print(f"  category agreement, ours vs generate: {pct(s['category_agreement'])} of {s['n']}"
          f" ({pct(s['category_agreement_parsed'])} of the {s['n_parsed']} parsed replies)")
    if s["n_labelled"]:
        print("  gold agreement: category A or B counts as a refusal; a reply with no answer counts as wrong")
    else:
        print("  gold agreement: not measured (the data has no refusal labels)")


def grade_encoders(pairs, args, t_logprob: float, progress: bool) -> dict:
    """The MiniLM backends (``classifier``, the default, and ``embedding``) on the same pairs with
    the shipped rubrics, timed after a warm-up; their speed is given against the log-prob read-out
    timed in this run."""
    from pipeline.rbrm.classifier import ClassifierBackend
    from pipeline.rbrm.embedding import EmbeddingBackend
    from pipeline.rbrm.grader import Grader
    from pipeline.rbrm.rubric import GradeItem, load_rubrics

    rubrics = load_rubrics([ROOT / "rubrics"])
    items = [GradeItem(pair.response[:args.max_response_chars], pair.prompt, args.prompt_class) for pair in pairs]
    labelled = [i for i, pair in enumerate(pairs) if pair.gold_refusal is not None]
    out = {}
    def ungated():
        # the classifier as it graded before the off-topic gate: what the gate costs, in this run
        backend = ClassifierBackend(device=args.device)
        backend.dodge_cosine = None
        return backend

    for kind, make in (("classifier", lambda: ClassifierBackend(device=args.device)),
                       ("classifier, no harm probe", lambda: ClassifierBackend(device=args.device, harm_probe=False)),
                       ("classifier, no off-topic gate", ungated),
                       ("embedding", lambda: EmbeddingBackend(device=args.device))):
        grader = Grader(rubrics, make())
        grader.grade(items[:2])
        t0 = time.perf_counter()
        grades = grader.grade(items, progress=progress)
        seconds = time.perf_counter() - t0
        out[kind] = {"seconds": seconds, "examples_per_second": len(items) / seconds,
                     "speedup_over_logprob": t_logprob / seconds,
                     "categories": {label: sum(g.category == label for g in grades) for label in LABELS},
                     "gold_refusal_agreement": share((grades[i].category in REFUSAL) == pairs[i].gold_refusal
                                                     for i in labelled)}
    return out


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=(
            "Compare grader throughput on CPU/GPU: the log-prob read-out of HFBackend.option_logprobs "
            "(one batched forward pass on the cached rubric) against generate-then-parse (greedy "
            "model.generate, then the first A-D letter in the reply). Both grade the same pairs with "
            "the same model, rubric (rubrics/refusal_style.yaml, categories A-D) and batch size. "
            "Prints examples/second for each, the speed ratio, how often the two agree on the category, "
            "the share of replies with no parseable letter and, for labelled data, each method's "
            "agreement with the gold refusal label (A or B = refusal)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="number of (prompt, response) pairs to grade")
    p.add_argument("--data", type=Path, default=None,
                   help=f"JSONL with prompt+response(+is_refusal) or prompt+chosen+rejected rows "
                        f"(default: {GOLD_DATA} when present, else {PREFERENCE_DATA})")
    p.add_argument("--model", default="smollm2-135m-instruct", help="grader model: short name, folder or hub id")
    p.add_argument("--batch_size", type=int, default=8, help="batch size for both methods")
    p.add_argument("--max_response_chars", type=int, default=800,
                   help="responses longer than this are cut in the middle, for both methods")
    p.add_argument("--max_new_tokens", type=int, default=32, help="generation length for generate-then-parse")
    p.add_argument("--prompt_class", default="harmful", help="prompt class named in the rubric text")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own default)")
    p.add_argument("--json", dest="json_out", type=Path, default=None, metavar="OUT",
                   help="also write the numbers (and each pair's categories and reply) to this JSON file")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = p.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--n, --batch_size and --max_new_tokens must be at least 1")

    import torch

    from pipeline.rbrm.backends import HFBackend
    from pipeline.rbrm.prompt import category_parts, render_item
    from pipeline.rbrm.rubric import load_rubric

    if args.threads:
        torch.set_num_threads(args.threads)

    pairs, data_path = load_pairs(args.n, args.data)
    if not pairs:
        p.error(f"no pairs in {data_path}")
    if len(pairs) < args.n:
        print(f"note: {data_path} holds only {len(pairs)} pairs; grading all of them")

    # One model, loaded once, shared by both methods.
    backend = HFBackend(args.model, batch_size=args.batch_size, device=args.device)
    rubric = load_rubric(RUBRIC)
    shared, question = category_parts(rubric, args.prompt_class)
    items = [render_item(pair.response, pair.prompt, args.max_response_chars) for pair in pairs]
    # The same user turn for generate-then-parse, wrapped in the chat template (assistant header included).
    texts = [backend.template_head + shared + item + question + backend.template_tail for item in items]
    # One order for both: longest first (as option_logprobs does), so batches hold similar lengths.
    lengths = [len(backend.tok.encode(t, add_special_tokens=False)) for t in texts]
    order = sorted(range(len(items)), key=lambda i: -lengths[i])

    print(f"grader {args.model} on {backend.device} ({torch.get_num_threads()} threads); "
          f"{len(pairs)} pairs from {data_path}")
    print(f"rubric {rubric.id} (categories A-D, prompt class {args.prompt_class}); batch size {args.batch_size}, "
          f"max_response_chars {args.max_response_chars}, max_new_tokens {args.max_new_tokens}; "
          f"grader input {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f})")

    # Warm-up: one pass of each method over a couple of items, so neither timing includes
    # first-call setup (kernel selection, allocator growth, lazy imports).
    warm = order[:2]
    grade_logprob(backend, shared, question, items, warm, args.batch_size, progress=False)
    grade_generate(backend, texts, warm, args.batch_size, args.max_new_tokens, progress=False)
    # Forget the rubric's cached key/values: encoding the rubric once is part of a real grading
    # run, so the timed run pays for it.
    backend._shared_cache.clear()

    progress = not args.no_progress
    t0 = time.perf_counter()
    ours, mass = grade_logprob(backend, shared, question, items, order, args.batch_size, progress)
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    gen, replies = grade_generate(backend, texts, order, args.batch_size, args.max_new_tokens, progress)
    t_gen = time.perf_counter() - t0

    summary = summarise(pairs, ours, gen, t_ours, t_gen, mass)
    summary["encoder_backends"] = grade_encoders(pairs, args, t_ours, progress)
    print()
    print_table(summary)
    for kind, e in summary["encoder_backends"].items():
        agree = f", gold refusal agreement {pct(e['gold_refusal_agreement'])}" if summary["n_labelled"] else ""
        print(f"  {kind} backend: {e['examples_per_second']:.1f} examples/second, "
              f"{e['speedup_over_logprob']:.1f}x the log-prob read-out{agree}")

    if args.json_out:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json_out"}
        config.update(data=str(data_path), device=str(backend.device), threads=torch.get_num_threads(),
                      rubric=rubric.id)
        examples = [{"id": pair.id, "gold_refusal": pair.gold_refusal, "ours": ours[i] or None,
                     "generate": gen[i], "reply": replies[i]} for i, pair in enumerate(pairs)]
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"config": config, "summary": summary, "examples": examples}, indent=2))
        print(f"\n  wrote {args.json_out}")
    return summary


if __name__ == "__main__":
    main()
