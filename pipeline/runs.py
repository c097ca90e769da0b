"""Run folders: what a stage writes, and the guarantees around it.

A stage's ``output_dir`` holds::

    run.json       stage, status (running / complete), timings and metrics; written by the main process
    config.yaml    the resolved config of this run (re-readable with --config)
    model/         the final model, an HF folder; appears in one rename when training ends
    checkpoints/   the trainer's intermediate checkpoints (if any)
    logs/          TensorBoard event files

``model/`` is written under a temporary name and renamed into place, then ``run.json`` is
marked complete, so an interrupted run never leaves a folder that looks like a finished one.
A folder we did not create is never written into, and an existing finished run is only
replaced when the user says ``if_exists: overwrite``. ``run.json`` also records a fingerprint of
every local file and folder the config names, so ``if_exists: reuse`` notices edited data,
rubrics or a retrained upstream run, not only changed settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pipeline import config as config_lib

RUN_FILE = "run.json"
MODEL_DIR = "model"
IF_EXISTS = ("error", "reuse", "overwrite")
# config keys that name what a run writes or keeps between runs, not what it reads (and any
# key with "cache" in its name)
NOT_INPUTS = frozenset({"output_dir", "logging_dir"})
HASH_LIMIT = 64 << 20  # bytes: larger files and folders (model weights) are not fingerprinted


def _path_values(value: Any, key: str = ""):
    if key in NOT_INPUTS or "cache" in key:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _path_values(v, str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _path_values(v, key)
    elif isinstance(value, str) and value:
        yield value
        if "=" in value:  # "name=path", as in evaluate's model list
            yield value.split("=", 1)[1]


def _fingerprint(path: Path) -> str | None:
    if (path / RUN_FILE).is_file():  # an upstream run: it changes when that run is redone
        return hashlib.sha256((path / RUN_FILE).read_bytes()).hexdigest()[:16]
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    if sum(f.stat().st_size for f in files) > HASH_LIMIT:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def input_fingerprints(cfg: Any) -> dict[str, str]:
    """A short content hash of each local file or folder (up to 64 MiB) that ``cfg`` names.

    Written here rather than found in a library: what counts as an input is this project's
    config layout, and hashing a few data files needs nothing more than hashlib.
    """
    data = config_lib.to_dict(cfg)
    own = Path(data.get("output_dir") or "").resolve()
    found: dict[str, str] = {}
    for value in _path_values(data):
        path = Path(value)
        if value in found or not path.exists() or path.resolve() == own:
            continue
        fingerprint = _fingerprint(path)
        if fingerprint is not None:
            found[value] = fingerprint
    return found


def read_run(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def is_complete(output_dir: str | os.PathLike, stage: str | None = None) -> bool:
    info = read_run(output_dir)
    return bool(info and info.get("status") == "complete" and (stage is None or info.get("stage") == stage))


def prepare(output_dir: str | os.PathLike, stage: str, cfg: Any, if_exists: str, is_main: bool = True,
            barrier: Callable[[], None] = lambda: None) -> bool:
    """Check ``output_dir`` before a run; return True when a finished run can be reused.

    Raises ConfigError (one clear line) when the folder holds something we must not touch.
    Under several processes pass ``barrier`` (e.g. ``accelerator.wait_for_everyone``): every
    process checks the folder as it was, then the main process starts the run in it. Without
    it a slower process could find the main process's half-written folder and refuse it.
    """
    out = Path(output_dir)
    info = read_run(out)
    if out.exists() and not out.is_dir():
        raise config_lib.ConfigError(f"output_dir '{out}' is a file; expected a folder")
    if info is None:
        if out.exists() and any(out.iterdir()):
            raise config_lib.ConfigError(
                f"output_dir '{out}' is not empty and holds no run of this tool; nothing was changed. "
                "Choose an empty or new folder.")
    elif info.get("stage") != stage:
        raise config_lib.ConfigError(
            f"output_dir '{out}' holds a '{info.get('stage')}' run, not a '{stage}' run; nothing was changed. "
            "Choose another folder.")
    elif info.get("status") == "complete":
        if if_exists == "reuse":
            saved = (config_lib.with_defaults(type(cfg), config_lib.load_yaml(out / "config.yaml"))
                     if (out / "config.yaml").is_file() else {})
            current = config_lib.to_dict(cfg)
            differ = sorted(k for k in current if k != "if_exists" and saved.get(k) != current[k])
            if differ:
                raise config_lib.ConfigError(
                    f"output_dir '{out}' holds a finished {stage} run with different settings "
                    f"({', '.join(differ)}); nothing was changed. Use if_exists: overwrite or another folder.")
            saved_inputs = info.get("inputs")
            current_inputs = input_fingerprints(cfg)
            # an input that is there now and was not then (an optional prompt set added since) counts too
            changed = [] if saved_inputs is None else sorted(
                k for k, v in current_inputs.items() if saved_inputs.get(k) != v)
            if changed:
                raise config_lib.ConfigError(
                    f"output_dir '{out}' holds a finished {stage} run made from other contents of "
                    f"{', '.join(changed)} (edited, added, or that run was redone since); nothing was changed. "
                    "Use if_exists: overwrite to run on what is there now, or another folder.")
            barrier()
            return True
        if if_exists != "overwrite":
            raise config_lib.ConfigError(
                f"output_dir '{out}' already holds a finished {stage} run; nothing was changed. "
                "Set if_exists: reuse to keep it, if_exists: overwrite to train again, or choose another folder.")
    # an unfinished run of the same stage (status running) is simply started again
    barrier()
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        config_lib.save(cfg, out / "config.yaml")
        write_run(out, stage, status="running", started_at=time.time(), inputs=input_fingerprints(cfg))
    return False


def write_run(output_dir: str | os.PathLike, stage: str, **fields: Any) -> None:
    out = Path(output_dir)
    info = read_run(out) or {}
    info.update(fields, stage=stage)
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_FILE)


def publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a fully written folder into place with a rename, replacing an older one."""
    staging, final = Path(staging), Path(final)
    old = final.with_name(final.name + ".previous")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def staging_dir(output_dir: str | os.PathLike, name: str = MODEL_DIR) -> Path:
    path = Path(output_dir) / f".{name}.partial"
    if path.exists():
        shutil.rmtree(path)
    return path


def start(output_dir: str | os.PathLike, stage: str, cfg: Any, if_exists: str, is_main: bool,
          barrier: Callable[[], None] = lambda: None) -> dict | None:
    """``prepare`` for a stage's main(): the saved metrics when a finished run is reused, else None."""
    if not prepare(output_dir, stage, cfg, if_exists, is_main=is_main, barrier=barrier):
        return None
    if is_main:
        print(f"{stage}: reusing the finished run in {output_dir}", file=sys.stderr)
    return json.loads((Path(output_dir) / "metrics.json").read_text())


def finish(output_dir: str | os.PathLike, stage: str, model: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` and mark the run complete (main process only)."""
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_run(output_dir, stage, status="complete", model=str(model), **metrics)
