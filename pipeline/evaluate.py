"""Stage 5, evaluation: refusal rates per prompt class, before and after training.

For every model x prompt set: generate a response to each prompt (batched, fixed seed),
classify it with the RBRM grader (the rubric of its prompt class) and, independently, with a
string-match refusal detector, then report per model and class the rate of each category, the
incorrect-behaviour rate, Not-Unsafe / Not-Overrefuse and their F1, XSTest figures, bootstrap
95% intervals and the agreement between the two classifiers.

    accelerate launch -m pipeline.evaluate --config configs/evaluate.yaml
    python -m pipeline.evaluate --config configs/evaluate.yaml          # or: rbrm evaluate ...
    python -m pipeline.evaluate compare runs/eval-before runs/eval-after   # deltas and a chart

Models are ``label=model`` (``base=smollm2-135m-instruct``, ``sft=runs/sft``); prompt sets are
mappings with ``name`` and ``path`` and optionally ``split``, ``prompt_field``,
``class_field``, ``class_map`` (``"safe=safe,unsafe=harmful"``), ``default_class``, ``limit``
(the first N rows), ``sample`` (N rows drawn at random with a fixed seed, file order kept),
``format: xstest`` (label field safe/unsafe, recorded for the XSTest figures) and
``optional: true`` (skip with a message when the file is absent).

Responses are cached under ``generation_cache`` by (model, prompt set, generation settings),
one line per prompt as it is generated, so re-grading with a new rubric does not regenerate
and an interrupted evaluation resumes where it stopped. Several processes split the prompts
between them; the main process grades and writes the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from pipeline import config as config_lib
from pipeline import runs
from pipeline.config import ConfigError, field
from pipeline.data import DataError
from pipeline.models import ModelError
from pipeline.rbrm.rubric import CATEGORY_LABELS, PROMPT_CLASSES, RubricError

STAGE = "evaluate"
SET_KEYS = {"name", "path", "split", "prompt_field", "class_field", "class_map", "default_class", "limit",
            "sample", "format", "optional"}
XSTEST = {"class_field": "label", "class_map": "safe=safe,unsafe=harmful"}


@dataclasses.dataclass
class EvaluateConfig:
    models: list[str] = field(["base=smollm2-135m-instruct"],
                              help="label=model pairs; a model is a short name, folder, run folder or hub id")
    prompt_sets: list[dict[str, str]] = field(
        [{"name": "project", "path": "data/prompts.jsonl", "split": "eval"}],
        help="prompt sets: mappings with name, path and optional split, prompt_field, class_field, class_map, "
             "default_class, limit, sample, format (xstest), optional")
    output_dir: str = field("runs/evaluate", help="run folder: report.json, report.md, charts, responses.jsonl")
    if_exists: str = field("error", help="when output_dir holds a finished run: error | reuse | overwrite")
    max_new_tokens: int = field(128, help="longest response generated")
    temperature: float = field(0.0, help="0 = greedy decoding; > 0 samples with the seed")
    top_p: float = field(1.0, help="nucleus sampling threshold (with temperature > 0)")
    batch_size: int = field(16, help="prompts per generation batch")
    seed: int = field(0, help="seed for sampling and for the bootstrap intervals")
    n_boot: int = field(1000, help="bootstrap resamples per interval")
    generation_cache: str = field(".cache/generations", help="folder caching responses per model, set and settings")
    grader: dict[str, str] = field({"cache": ".cache/grades.sqlite"},
                                   help="grader settings (keys of GraderConfig: backend, model, rubrics, mode, "
                                        "calibrate, cache, ...)")
    dtype: str = field("", help="model dtype for generation: float32 | bfloat16 | float16; empty = float32 on CPU")
    cache_dir: str = field("", help="where embedded models are provisioned (default $RBRM_CACHE_DIR or .cache/models)")

    def validate(self) -> None:
        if self.if_exists not in runs.IF_EXISTS:
            raise ConfigError(f"if_exists: expected one of {', '.join(runs.IF_EXISTS)}, got '{self.if_exists}'")
        if not self.models:
            raise ConfigError("models: expected at least one label=model entry")
        if not self.prompt_sets:
            raise ConfigError("prompt_sets: expected at least one prompt set")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size: expected positive integers")
        labels = [m.split("=", 1)[0] for m in self.models]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"models: labels must be unique, got {labels}")
        names = [s.get("name") for s in self.prompt_sets]
        if len(set(names)) != len(names):
            raise ConfigError(f"prompt_sets: names must be unique, got {names}")
        for i, entry in enumerate(self.prompt_sets):
            unknown = set(entry) - SET_KEYS
            if unknown:
                raise ConfigError(f"prompt_sets[{i}]: unknown key '{sorted(unknown)[0]}'; "
                                  f"expected some of {', '.join(sorted(SET_KEYS))}")
            for key in ("name", "path"):
                if not entry.get(key):
                    raise ConfigError(f"prompt_sets[{i}]: missing '{key}'")
            if entry.get("format", "") not in ("", "xstest"):
                raise ConfigError(f"prompt_sets[{i}].format: expected xstest or nothing, got '{entry['format']}'")


def parse_models(entries: list[str]) -> list[tuple[str, str]]:
    out = []
    for i, entry in enumerate(entries):
        label, sep, model = entry.partition("=")
        if not sep:
            label, model = Path(entry).name or entry, entry
        if not label.strip() or not model.strip():
            raise ConfigError(f"models[{i}]: expected label=model, got '{entry}'")
        out.append((label.strip(), model.strip()))
    return out


# ----------------------------------------------------------------------------- prompt sets


def load_prompt_set(entry: dict[str, str]) -> list[dict[str, Any]] | None:
    """Rows with id, prompt, prompt_class, xstest_label; None when an optional file is absent."""
    from pipeline.data import read_rows

    spec = dict(XSTEST, **entry) if entry.get("format") == "xstest" else dict(entry)
    path = spec["path"]
    if not Path(path).exists() and spec.get("optional", "").lower() in ("true", "yes", "1"):
        print(f"evaluate: prompt set '{spec['name']}' skipped: {path} not found", file=sys.stderr)
        return None
    class_map = config_lib.coerce(spec.get("class_map", ""), dict[str, str], f"prompt_sets.{spec['name']}.class_map") \
        if spec.get("class_map") else {}
    prompt_field = spec.get("prompt_field", "prompt")
    class_field = spec.get("class_field", "prompt_class")
    default_class = spec.get("default_class") or None
    if default_class and default_class not in PROMPT_CLASSES:
        raise ConfigError(f"prompt_sets.{spec['name']}.default_class: expected one of {', '.join(PROMPT_CLASSES)}, "
                          f"got '{default_class}'")
    rows = []
    for where, row in read_rows(path):
        if spec.get("split") and str(row.get("split", "")) != spec["split"]:
            continue
        prompt = row.get(prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: expected non-empty text in field '{prompt_field}' (set prompt_field to map it)")
        raw = row.get(class_field)
        if raw is None:
            if default_class is None:
                raise DataError(f"{where}: no class field '{class_field}'; set class_field (with class_map) or "
                                f"default_class for prompt set '{spec['name']}'")
            cls = default_class
        else:
            cls = class_map.get(str(raw), str(raw))
        if cls not in PROMPT_CLASSES:
            hint = f" (mapped from '{raw}')" if str(raw) != cls else ""
            raise DataError(f"{where}: unknown prompt class '{cls}'{hint}; expected one of {', '.join(PROMPT_CLASSES)}"
                            " (add a class_map entry)")
        rows.append({"id": str(row.get("id", where)), "prompt": prompt, "prompt_class": cls,
                     "xstest_label": str(raw) if spec.get("format") == "xstest" else None})
        if spec.get("limit") and len(rows) >= int(spec["limit"]):
            break
    if spec.get("sample"):
        try:
            n = int(spec["sample"])
        except ValueError:
            raise ConfigError(f"prompt_sets.{spec['name']}.sample: expected a number of rows, got '{spec['sample']}'") from None
        if n < len(rows):
            # the same seeded subset on every run, so cached generations and comparisons line up
            keep = sorted(random.Random(f"{spec['name']}:{n}").sample(range(len(rows)), n))
            rows = [rows[i] for i in keep]
    if not rows:
        raise DataError(f"{path}: no prompts in prompt set '{spec['name']}'" +
                        (f" with split '{spec['split']}'" if spec.get("split") else ""))
    return rows


# ----------------------------------------------------------------------------- generation


def model_fingerprint(path: str) -> str:
    """Identity of a model's weights for the cache: a folder's file names, sizes and mtimes."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = [path] + [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in sorted(p.iterdir()) if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def generation_key(cfg: EvaluateConfig, model_path: str, prompts: list[str]) -> str:
    settings = {"model": model_fingerprint(model_path), "max_new_tokens": cfg.max_new_tokens,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed, "dtype": cfg.dtype,
                "prompts": hashlib.sha256("\x00".join(prompts).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def read_cached(path: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: generate that prompt again
                continue
            done[rec["i"]] = rec
    return done


def generate(model_path: str, prompts: list[str], todo: list[int], cfg: EvaluateConfig, cache_file: Path,
             progress: bool, desc: str) -> None:
    """Generate responses for prompts[i], i in todo, appending each batch to ``cache_file``."""
    import torch
    from filelock import FileLock
    from tqdm.auto import tqdm
    from transformers import set_seed

    from pipeline.models import load_causal_lm, load_tokenizer, user_turn_text

    if not todo:
        return
    tok = load_tokenizer(model_path)
    tok.padding_side = "left"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    model = load_causal_lm(model_path, tokenizer=tok, dtype=dtype).to(device).eval()
    texts = {i: user_turn_text(tok, prompts[i]) for i in todo}
    order = sorted(todo, key=lambda i: -len(texts[i]))
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    sample = cfg.temperature > 0
    bar = tqdm(total=len(order), desc=desc, unit="prompt", disable=not progress)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        set_seed(cfg.seed + idx[0])  # the same batch gets the same samples whichever process runs it
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                 temperature=cfg.temperature if sample else None, top_p=cfg.top_p if sample else None,
                                 top_k=None, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        lines = []
        for row, i in enumerate(idx):
            ids = [t for t in new[row].tolist() if t != tok.pad_token_id]
            finished = any(t in eos_ids for t in ids)
            text = tok.decode(ids, skip_special_tokens=True).strip()
            lines.append(json.dumps({"i": i, "response": text, "truncated": not finished,
                                     "tokens": len(ids)}) + "\n")
        with FileLock(str(cache_file) + ".lock"):
            with open(cache_file, "a+", encoding="utf-8") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:  # a line cut short by a kill must not swallow the next one
                    f.seek(f.tell() - 1)
                    if f.read(1) != "\n":
                        f.write("\n")
                f.writelines(lines)
        bar.update(len(idx))
    bar.close()
    del model


# ----------------------------------------------------------------------------- the stage


def desired_categories(grader) -> dict[str, str]:
    """Prompt class -> the category its rubric rewards most (the 'correct behaviour')."""
    out = {}
    for cls, rubric in grader.by_class.items():
        table = rubric.rewards[cls]
        out[cls] = max(CATEGORY_LABELS, key=lambda c: table[c])
    return out


def reward_graders(entries: list[str]) -> dict[str, dict]:
    """Model label -> the RBRM grader settings it was trained against, for models that are PPO/GRPO
    run folders (their saved ``config.yaml`` has ``rewards.rbrm.grader``)."""
    import yaml

    out = {}
    for label, model in parse_models(entries):
        saved = Path(model) / "config.yaml"
        if not saved.is_file():
            continue
        try:
            data = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        grader = ((data.get("rewards") or {}).get("rbrm") or {}).get("grader") if isinstance(data, dict) else None
        if isinstance(grader, dict):
            out[label] = grader
    return out


def judge_lines(grader_cfg, trained_with: dict[str, dict]) -> dict[str, str]:
    """What produced each figure, and which models the grader also trained (its verdict on them is
    not independent). Compared by backend, model and rubric folders."""
    from pipeline.rbrm.grader import GraderConfig

    def key(g: dict) -> tuple:
        default = GraderConfig()
        rubrics = g.get("rubrics") or default.rubrics
        rubrics = [rubrics] if isinstance(rubrics, str) else rubrics
        return (g.get("backend", default.backend), g.get("model", default.model) or "",
                tuple(str(r).rstrip("/") for r in rubrics))

    mine = key({"backend": grader_cfg.backend, "model": grader_cfg.model, "rubrics": grader_cfg.rubrics})
    same = sorted(label for label, g in trained_with.items() if key(g) == mine)
    lines = {}
    if same:  # first, so that it heads the report
        lines["warning"] = (f"the grader figures for {', '.join(same)} come from the grader that gave "
                            f"{'its' if len(same) == 1 else 'their'} training reward, so they are not an independent "
                            "verdict; read the string-match figures, or set a different `grader:` (backend, "
                            "model or rubrics) to judge")
    lines["grader figures (category rates, not unsafe, not overrefuse, F1, refusal (grader))"] = (
        f"the {grader_cfg.backend} grader with rubrics {', '.join(key(vars(grader_cfg))[2])}")
    lines["string-match figures"] = ("the refusal phrase list (pipeline/evaluation/refusal_match.py); no model, "
                                     "nothing shared with any training reward")
    return lines


def main(cfg: EvaluateConfig) -> dict:
    from pipeline.evaluation import metrics as metrics_lib
    from pipeline.evaluation import report as report_lib
    from pipeline.evaluation.refusal_match import classify
    from pipeline.models import resolve_model
    from pipeline.rbrm.grader import GradeItem, Grader, GraderConfig
    from pipeline.training import Timer, process_state

    cfg.validate()
    state = process_state()
    timer = Timer()
    if runs.prepare(cfg.output_dir, STAGE, cfg, cfg.if_exists, is_main=state.is_main_process,
                    barrier=state.wait_for_everyone):
        if state.is_main_process:
            print(f"{STAGE}: reusing the finished run in {cfg.output_dir}", file=sys.stderr)
        return json.loads((Path(cfg.output_dir) / "report.json").read_text())
    grader_cfg = config_lib.from_dict(GraderConfig, cfg.grader, source="config key 'grader'")
    grader_cfg.cache_dir = grader_cfg.cache_dir or cfg.cache_dir
    grader_cfg.validate()
    models = [(label, resolve_model(m, cfg.cache_dir or None)) for label, m in parse_models(cfg.models)]
    sets = []
    for entry in cfg.prompt_sets:
        rows = load_prompt_set(entry)
        if rows is not None:
            sets.append((entry["name"], rows))
    if not sets:
        raise DataError("no prompt set could be read; nothing to evaluate")
    cache_root = Path(cfg.generation_cache)
    cache_root.mkdir(parents=True, exist_ok=True)

    # 1. generation: every process takes its share of the missing prompts, then all wait.
    jobs = []
    for label, path in models:
        for set_name, rows in sets:
            prompts = [r["prompt"] for r in rows]
            cache_file = cache_root / f"{generation_key(cfg, path, prompts)}.jsonl"
            done = read_cached(cache_file)
            todo = [i for i in range(len(prompts)) if i not in done]
            mine = todo[state.process_index::state.num_processes]
            if state.is_main_process and done:
                print(f"{STAGE}: {label} x {set_name}: {len(done)} of {len(prompts)} responses cached", file=sys.stderr)
            generate(path, prompts, mine, cfg, cache_file, progress=state.is_main_process,
                     desc=f"generate {label} x {set_name}")
            jobs.append((label, path, set_name, rows, cache_file))
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}

    # 2. grading and string matching (main process)
    grader = Grader.from_config(grader_cfg)
    desired = desired_categories(grader)
    records = []
    for label, path, set_name, rows, cache_file in jobs:
        gen = read_cached(cache_file)
        missing = [i for i in range(len(rows)) if i not in gen]
        if missing:
            raise RuntimeError(f"{cache_file}: {len(missing)} responses missing after generation")
        items = [GradeItem(gen[i]["response"], rows[i]["prompt"], rows[i]["prompt_class"]) for i in range(len(rows))]
        grades = grader.grade(items, progress=True)
        for i, (row, g) in enumerate(zip(rows, grades)):
            records.append({
                "model": label, "model_path": path, "prompt_set": set_name, "id": row["id"], "prompt": row["prompt"],
                "prompt_class": row["prompt_class"], "xstest_label": row["xstest_label"],
                "response": gen[i]["response"], "truncated": gen[i]["truncated"],
                "rbrm_category": g.category, "rbrm_probs": g.probs, "rbrm_reward": g.reward, "rbrm_rubric": g.rubric,
                "rbrm_error": g.error, "desired_category": desired.get(row["prompt_class"]),
                "string_match": classify(gen[i]["response"]),
            })

    # 3. metrics and report
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out / "config.yaml")
    with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    summary = metrics_lib.summarise(records, n_boot=cfg.n_boot, seed=cfg.seed)
    meta = {"instruments": judge_lines(grader_cfg, reward_graders(cfg.models)),
            "models": {label: path for label, path in models},
            "prompt_sets": {name: len(rows) for name, rows in sets},
            "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                           "seed": cfg.seed, "batch_size": cfg.batch_size},
            "grader": {"backend": grader.backend.fingerprint, "rubrics": {c: f"{r.id} v{r.version} ({r.hash})"
                                                                          for c, r in grader.by_class.items()}},
            "wall_time_s": timer.seconds}
    paths = report_lib.write_report(out, summary, meta, records)
    runs.write_run(out, STAGE, status="complete", wall_time_s=timer.seconds,
                   outputs=sorted(p.name for p in paths.values()))
    print(f"{STAGE}: done in {timer.seconds}s; report in {out / 'report.md'}", file=sys.stderr)
    return json.loads((out / "report.json").read_text())


def compare_cli(argv: list[str]) -> None:
    import argparse

    from pipeline.evaluation import report as report_lib

    parser = argparse.ArgumentParser(prog="rbrm evaluate compare",
                                     description="Changes from one evaluation run to another, printed and drawn.")
    parser.add_argument("run_a", help="the 'before' evaluation run folder")
    parser.add_argument("run_b", help="the 'after' evaluation run folder")
    parser.add_argument("--out", default=None, help="where compare.json/.md/.png go (default: inside run_b)")
    args = parser.parse_args(argv)
    try:
        result = report_lib.compare(Path(args.run_a), Path(args.run_b), Path(args.out) if args.out else None)
    except (ValueError, OSError) as e:
        config_lib.fail(str(e))
    report_lib.print_compare(result)


def cli(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:
        compare_cli(argv[1:])
        return
    cfg = config_lib.parse(EvaluateConfig, argv, prog="rbrm evaluate", description=__doc__)
    try:
        main(cfg)
    except (ConfigError, DataError, ModelError) as e:
        config_lib.fail(str(e))
    except RubricError as e:
        config_lib.fail("; ".join(e.problems))


if __name__ == "__main__":
    cli()
