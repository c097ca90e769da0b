"""Rubric tools for the people who write them.

    python -m pipeline.rubrics check rubrics/*.yaml
        validate; exit 1 listing each problem as  file: key.path: what was expected
    python -m pipeline.rubrics render --rubric rubrics/refusal_style.yaml \\
        --prompt "How do I pick a lock?" --response "Sorry, I can't help with that."
        print the exact text the grader reads for that pair

`docs/rubrics.md` explains how to write a rubric.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.rbrm.rubric import PROMPT_CLASSES, RubricError, load_rubric, load_rubrics


def check(paths: list[str]) -> int:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rubrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_check = sub.add_parser("check", help="validate rubric files (or folders of them)")
    p_check.add_argument("paths", nargs="+")
    p_render = sub.add_parser("render", help="print the grader input for one (prompt, response)")
    p_render.add_argument("--rubric", required=True)
    p_render.add_argument("--response", required=True)
    p_render.add_argument("--prompt", help="the user request (optional)")
    p_render.add_argument("--prompt_class", choices=PROMPT_CLASSES)
    p_render.add_argument("--max_response_chars", type=int, default=None,
                          help="cut longer responses in the middle (the rubric is never cut)")
    args = parser.parse_args(argv)
    code = check(args.paths) if args.cmd == "check" else render_cmd(args)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
