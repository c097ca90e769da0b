"""How fast report.html opens and filters with many replies, against a small page in the same run.

Writes an evaluation page of ``--replies`` synthetic replies (3 models, two classes, replies of
about 60 words) and one of 30, opens each ``--repeats`` times in headless Chromium with a filter
in the address (``#model=sft&class=safe``) and reads the page's own clock: the milliseconds from
navigation to the first filtered rows on screen (``data-ms`` on <body>). Prints the medians and
their ratio:

    .venv/bin/python benchmarks/html_report.py --replies 10000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation import metrics, report  # noqa: E402
from pipeline.evaluation.refusal_match import classify  # noqa: E402

WORDS = ("the request asks for a step by step plan and the reply gives one with care about safety and "
         "a note on where to read more about the topic in question for a general reader today").split()


def records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        model = ("base", "sft", "ppo")[i % 3]
        cls = "harmful" if (i // 3) % 2 == 0 else "safe"
        refuse = model == "sft" or (model == "ppo" and cls == "harmful")
        reply = "I'm sorry, but I can't help with that." if refuse else " ".join(WORDS[(i + k) % len(WORDS)]
                                                                                 for k in range(60))
        out.append({"model": model, "model_path": model, "prompt_set": "project", "id": f"p{i // 3}",
                    "prompt": f"prompt {i // 3}: " + " ".join(WORDS[:12]), "prompt_class": cls,
                    "xstest_label": None, "response": reply, "truncated": False,
                    "rbrm_category": "A" if refuse else "D", "rbrm_probs": {"A": 0.7, "B": 0.1, "C": 0.1, "D": 0.1},
                    "rbrm_reward": 1.0, "rbrm_rubric": "r", "rbrm_error": None, "desired_category": "A",
                    "string_match": classify(reply)})
    return out


def open_ms(chromium: str, page: Path, fragment: str) -> tuple[int, int]:
    """(milliseconds to the first filtered rows, rows matching) for one page load."""
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--no-first-run", "--virtual-time-budget=30000", "--dump-dom",
                           page.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=300)
    body = re.search(r"<body([^>]*)>", done.stdout)
    if done.returncode != 0 or body is None:
        raise SystemExit(f"chromium failed on {page}: {done.stderr[-500:]}")
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', body.group(1)))
    return int(attrs["ms"]), int(attrs["matches"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=10000, help="replies on the large page")
    parser.add_argument("--repeats", type=int, default=3, help="page loads per page (the median is kept)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("needs headless Chromium on PATH (Debian: apt-get install chromium)")
    fragment = "#model=sft&class=safe"
    result = {"fragment": fragment, "pages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in (("small", 30), ("large", args.replies)):
            recs = records(n)
            run = Path(tmp) / name
            page = report.write_report(run, metrics.summarise(recs, n_boot=10), {"replies": n}, recs)["html"]
            loads = [open_ms(chromium, page, fragment) for _ in range(args.repeats)]
            result["pages"][name] = {"replies": n, "bytes": page.stat().st_size, "matches": loads[0][1],
                                     "median_ms": statistics.median(ms for ms, _ in loads)}
    small, large = result["pages"]["small"], result["pages"]["large"]
    result["ratio"] = round(large["median_ms"] / max(small["median_ms"], 1), 2)
    for name, p in result["pages"].items():
        print(f"{name:>5}: {p['replies']:>6} replies, {p['bytes'] / 1e6:6.2f} MB, {p['matches']} matching "
              f"{fragment}: {p['median_ms']:.0f} ms to the first filtered rows")
    print(f"large / small: {result['ratio']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
