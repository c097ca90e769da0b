"""Rubric tools for the people who write them.

    python -m pipeline.rubrics check rubrics/*.yaml [--backend embedding] [--mode auto]
        validate; exit 1 listing each problem as  file: key.path: what was expected;
        warn (exit 0) about each key the chosen grader backend does not read
    python -m pipeline.rubrics render --rubric rubrics/refusal_style.yaml \\
        --prompt "How do I pick a lock?" --response "Sorry, I can't help with that."
        print the exact text the grader reads for that pair
    python -m pipeline.rubrics eval --rubric rubrics/refusal_style.yaml \\
        --gold ../shared/data/pyrit_refusal_labelled.jsonl --label is_refusal --positive A,B
        measure the grader against human labels: accuracy, ROC AUC, precision/recall,
        confusion matrix, calibration error, reliability diagram (written under --out)

`docs/rubrics.md` explains how to write a rubric.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.rbrm.rubric import (GRADER_BACKENDS, GRADER_MODES, PROMPT_CLASSES, RubricError, load_rubric,
                                  load_rubrics, unread_fields)


def check(paths: list[str], backend: str = "classifier", mode: str = "auto") -> int:
    try:
        rubrics = load_rubrics(paths)
    except RubricError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(e.problems)} problem(s) found", file=sys.stderr)
        return 1
    for rubric in rubrics.values():
        print(f"ok  {rubric.path}  id={rubric.id} v{rubric.version}  applies to {', '.join(rubric.applies_to)}"
              f"  ({len(rubric.propositions)} propositions, hash {rubric.hash})")
    for rubric in rubrics.values():
        by_reason: dict[str, list[str]] = {}
        for key, why in unread_fields(rubric, backend, mode):
            by_reason.setdefault(why, []).append(key)
        for why, keys in by_reason.items():
            print(f"warning: {rubric.path}: the {backend} backend does not read {', '.join(keys)}; {why}",
                  file=sys.stderr)
    return 0


def render_cmd(args: argparse.Namespace) -> int:
    from pipeline.rbrm.prompt import render

    try:
        rubric = load_rubric(args.rubric)
    except RubricError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    print(render(rubric, args.response, prompt=args.prompt, prompt_class=args.prompt_class,
                 max_response_chars=args.max_response_chars))
    return 0


def eval_cmd(args: argparse.Namespace) -> int:
    import time

    from pipeline.config import ConfigError
    from pipeline.models import ModelError
    from pipeline.rbrm import agreement as agree
    from pipeline.rbrm.grader import GradeItem, Grader, GraderConfig

    try:
        rubric = load_rubric(args.rubric)
        prompt_class = args.prompt_class or rubric.applies_to[0]
        if prompt_class not in rubric.applies_to:
            raise agree.GoldError(f"--prompt_class {prompt_class}: rubric '{rubric.id}' applies to "
                                  f"{', '.join(rubric.applies_to)} only")
        positive = agree.parse_categories(args.positive)
        gold = agree.load_gold(args.gold, args.label, args.positive_value.split(","), args.prompt_field,
                               args.response_field, args.limit)
        cfg = GraderConfig(backend=args.backend, model=args.model, base_url=args.base_url, mode=args.mode,
                           calibrate=not args.no_calibrate, batch_size=args.batch_size,
                           max_response_chars=args.max_response_chars, cache=args.cache, rubrics=[args.rubric])
        grader = Grader.from_config(cfg)
    except RubricError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except (agree.GoldError, ConfigError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    items = [GradeItem(r.response, r.prompt if not args.no_prompt else None, prompt_class) for r in gold]
    start = time.perf_counter()
    grades = grader.grade(items, progress=True)
    seconds = time.perf_counter() - start
    result = agree.agreement(gold, grades, positive)
    result["seconds"] = round(seconds, 1)
    result["rows_per_second"] = round(len(gold) / seconds, 2) if seconds > 0 else None
    settings = {"rubric": args.rubric, "rubric_id": rubric.id, "rubric_hash": rubric.hash, "gold": args.gold,
                "label": args.label, "positive_value": args.positive_value, "positive": list(positive),
                "prompt_class": prompt_class, "with_prompt": not args.no_prompt, "grader": grader.backend.fingerprint,
                "mode": grader.mode_for(rubric), "calibrate": cfg.calibrate, "limit": args.limit,
                "max_response_chars": cfg.max_response_chars}
    out = Path(args.out)
    paths = agree.write_outputs(out, result, settings, gold, grades, positive)
    print(f"{args.gold}: {result['scored']}/{result['rows']} scored in {seconds:.0f} s by {grader.backend.fingerprint} "
          f"({settings['mode']})")
    if result["scored"]:
        print(f"  accuracy {result['accuracy']:.3f}   ROC AUC {result['roc_auc']}   calibration error "
              f"{result['calibration_error']:.3f}   base rate {result['base_rate']:.3f}")
        best = result["best_threshold"]
        print(f"  F1 {result['f1']}   at the best cut on P({'+'.join(positive)}) >= {best['threshold']}: accuracy "
              f"{best['accuracy']:.3f}, F1 {best['f1']} (fitted on these rows: an upper bound)")
        for side, m in result["per_side"].items():
            print(f"  {side:8s} precision {m['precision']}  recall {m['recall']}  (n={m['support']})")
        print("  confusion (label x predicted):  " + "  ".join(
            f"{side}: " + " ".join(f"{c}={n}" for c, n in row.items()) for side, row in result["confusion"].items()))
    print(f"  wrote {', '.join(str(p) for p in paths.values())}; open {paths['html']} to read every row")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rubrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_check = sub.add_parser("check", help="validate rubric files (or folders of them)")
    p_check.add_argument("paths", nargs="+")
    p_check.add_argument("--backend", default="classifier", choices=GRADER_BACKENDS,
                         help="warn about rubric keys this grader backend does not read (default: classifier)")
    p_check.add_argument("--mode", default="auto", choices=GRADER_MODES,
                         help="hf/openai: categories or propositions (auto: propositions where the rubric has them)")
    p_render = sub.add_parser("render", help="print the grader input for one (prompt, response)")
    p_render.add_argument("--rubric", required=True)
    p_render.add_argument("--response", required=True)
    p_render.add_argument("--prompt", help="the user request (optional)")
    p_render.add_argument("--prompt_class", choices=PROMPT_CLASSES)
    p_render.add_argument("--max_response_chars", type=int, default=None,
                          help="cut longer responses in the middle (the rubric is never cut)")
    p_eval = sub.add_parser("eval", help="measure the grader against a file of human labels",
                            description="Grade every (prompt, response) of a gold file and compare with its label.")
    p_eval.add_argument("--rubric", required=True)
    p_eval.add_argument("--gold", required=True, help="JSONL/JSON/parquet file (or hub dataset) of labelled rows")
    p_eval.add_argument("--label", required=True, help="gold field holding the human label, e.g. is_refusal")
    p_eval.add_argument("--positive_value", default="true",
                        help="comma-separated label values that count as positive (default: true)")
    p_eval.add_argument("--positive", required=True,
                        help="categories that mean a positive label, e.g. A,B (refusal) or C (disallowed content)")
    p_eval.add_argument("--prompt_field", default="prompt")
    p_eval.add_argument("--response_field", default="response")
    p_eval.add_argument("--no_prompt", action="store_true", help="grade the response without showing the request")
    p_eval.add_argument("--prompt_class", choices=PROMPT_CLASSES, help="default: the rubric's first class")
    p_eval.add_argument("--backend", default="classifier", choices=GRADER_BACKENDS)
    p_eval.add_argument("--model", default="", help="grader model (default: the backend's default)")
    p_eval.add_argument("--base_url", default="", help="openai backend: server URL")
    p_eval.add_argument("--mode", default="auto", choices=["auto", "categories", "propositions"])
    p_eval.add_argument("--no_calibrate", action="store_true", help="skip the content-free prior calibration")
    p_eval.add_argument("--batch_size", type=int, default=8)
    p_eval.add_argument("--max_response_chars", type=int, default=2000)
    p_eval.add_argument("--cache", default="", help="SQLite grade cache file (re-runs skip graded rows)")
    p_eval.add_argument("--limit", type=int, default=0, help="grade only the first N rows")
    p_eval.add_argument("--out", default="runs/grader_eval", help="folder for agreement.json, predictions, PNG")
    args = parser.parse_args(argv)
    commands = {"check": lambda: check(args.paths, args.backend, args.mode), "render": lambda: render_cmd(args), "eval": lambda: eval_cmd(args)}
    raise SystemExit(commands[args.cmd]())


if __name__ == "__main__":
    main()
