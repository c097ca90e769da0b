"""Reading SFT conversations, preference pairs and prompt sets into ``datasets.Dataset``.

A source is a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a hub dataset name
(``owner/name`` or ``owner/name:split``). A field mapping renames the source's columns to
ours, e.g. ``{"prompt": "question", "chosen": "good_answer"}``, so public sets such as
``../shared/data/*.jsonl`` are read by path without copying or converting them.

Every row is checked before training starts. A bad row stops the run with one line naming
the file and line (``data/sft.jsonl:17``) and what was expected there.

JSONL is parsed line by line here rather than through ``datasets.load_dataset("json")``
because that loader reports malformed input as an Arrow error without the line number.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterable

PROMPT_CLASSES = ("harmful", "sensitive", "safe")
ROLES = ("system", "user", "assistant")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class DataError(ValueError):
    """A user's data file or row is wrong; the message names the place and what was expected."""


# ----------------------------------------------------------------------------- reading rows


def read_rows(source: str, fields: dict[str, str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Read ``source`` into ``(location, row)`` pairs, with columns renamed by ``fields``.

    ``fields`` maps our name -> the source's name. Locations look like ``file.jsonl:12``
    (JSONL line) or ``file.parquet row 12``.
    """
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            rows = list(_read_jsonl(path))
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".parquet":
            rows = _read_table(path)
        else:
            raise DataError(f"{source}: unsupported file type '{suffix}'; expected .jsonl, .json or .parquet")
    elif path.is_dir():
        raise DataError(f"{source}: is a folder; expected a .jsonl, .json or .parquet file")
    elif _HUB_ID.match(source) and not path.suffix and not source.startswith((".", "/")):
        rows = _read_hub(source)
    else:
        raise DataError(f"{source}: file not found")
    if not rows:
        raise DataError(f"{source}: no rows; expected at least one record")
    if fields:
        rows = [(where, _rename(row, fields, where)) for where, row in rows]
    return rows


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    out = []
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(row).__name__}")
        out.append((f"{path} item {i}", row))
    return out


def _read_table(path: Path) -> list[tuple[str, dict]]:
    from datasets import Dataset

    ds = Dataset.from_parquet(str(path))
    return [(f"{path} row {i}", dict(row)) for i, row in enumerate(ds)]


def _read_hub(source: str) -> list[tuple[str, dict]]:
    from datasets import load_dataset

    name, _, split = source.partition(":")
    try:
        ds = load_dataset(name, split=split or "train")
    except Exception as e:  # the hub raises many types; the user needs the one line
        raise DataError(f"{source}: not a local file, and loading it as a hub dataset failed: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [(f"{source} row {i}", dict(row)) for i, row in enumerate(ds)]


def _rename(row: dict, fields: dict[str, str], where: str) -> dict:
    out = dict(row)
    for ours, theirs in fields.items():
        if theirs not in row:
            raise DataError(f"{where}: field '{theirs}' (mapped to '{ours}') is missing; "
                            f"the row has: {', '.join(row) or 'no fields'}")
        out[ours] = row[theirs]
    return out


# ----------------------------------------------------------------------------- checks


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'; the row has: {', '.join(row) or 'no fields'}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; expected non-empty text")
    return value


def check_messages(messages: Any, where: str, key: str = "messages", last_role: str | None = "assistant") -> list[dict]:
    """Validate a chat: optional system first, then user/assistant alternating from user."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    expected = "user"
    for i, msg in enumerate(messages):
        loc = f"{where}: {key}[{i}]"
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{loc}: expected an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise DataError(f"{loc}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{loc}.content: expected non-empty text")
        if role == "system":
            if i != 0:
                raise DataError(f"{loc}.role: a system message may only come first")
        elif role != expected:
            raise DataError(f"{loc}.role: expected '{expected}' (turns alternate user/assistant), got '{role}'")
        else:
            expected = "assistant" if role == "user" else "user"
        out.append({"role": role, "content": content})
    if last_role is not None and out[-1]["role"] != last_role:
        raise DataError(f"{where}: field '{key}' must end with an {last_role} message, ends with '{out[-1]['role']}'")
    return out


def parse_hh_transcript(text: str, where: str) -> list[dict]:
    """Split an Anthropic-HH transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``) into messages.

    A trailing empty ``Assistant:`` (the slot the response fills) is dropped.
    """
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: text does not look like a Human:/Assistant: transcript")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    # HH transcripts sometimes hold two consecutive turns by one speaker; join them.
    merged: list[dict] = []
    for m in messages:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1]["content"] = (merged[-1]["content"] + "\n" + m["content"]).strip()
        else:
            merged.append(m)
    return [m for m in merged if m["content"]] or [{"role": "user", "content": ""}]


def _prompt_messages(value: Any, where: str, key: str = "prompt") -> list[dict]:
    """A prompt may be a string, an HH transcript or a list of messages ending with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field '{key}' is empty; expected non-empty text")
        if value.startswith("\n\nHuman:") or value.startswith("Human:"):
            return check_messages(parse_hh_transcript("\n\n" + value.lstrip("\n"), where), where, key, "user")
        return [{"role": "user", "content": value}]
    return check_messages(value, where, key, last_role="user")


def _response_text(value: Any, where: str, key: str) -> str:
    if isinstance(value, list):  # [{"role": "assistant", "content": ...}]
        msgs = value
        if len(msgs) != 1 or not isinstance(msgs[0], dict) or msgs[0].get("role") != "assistant":
            raise DataError(f"{where}: field '{key}' must be a string or one assistant message")
        value = msgs[0].get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; expected non-empty text")
    return value


# ----------------------------------------------------------------------------- loaders


def load_sft(source: str, fields: dict[str, str] | None = None):
    """Conversations for SFT -> Dataset with a ``messages`` column.

    A row holds ``messages`` (a chat ending with an assistant turn), or ``prompt`` and
    ``response`` strings, which become one user and one assistant turn.
    """
    from datasets import Dataset

    out = []
    for where, row in read_rows(source, fields):
        if "messages" in row:
            messages = check_messages(row["messages"], where)
        elif "prompt" in row and "response" in row:
            messages = _prompt_messages(row["prompt"], where) + [
                {"role": "assistant", "content": _response_text(row["response"], where, "response")}]
        else:
            raise DataError(f"{where}: missing field 'messages' (or 'prompt' and 'response'); "
                            f"the row has: {', '.join(row) or 'no fields'}")
        out.append({"messages": messages})
    return Dataset.from_list(out)


def load_preferences(source: str, fields: dict[str, str] | None = None, skip_invalid: bool = False):
    """Preference pairs -> Dataset with ``prompt`` (messages), ``chosen``, ``rejected`` (one
    assistant message each), and ``split`` when the source has one.

    ``skip_invalid`` drops bad rows (public sets hold a few empty answers) and says how many
    on stderr, instead of stopping at the first one.
    """
    from datasets import Dataset

    out = []
    skipped: list[str] = []
    for where, row in read_rows(source, fields):
        try:
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise DataError(f"{where}: missing field '{key}'; the row has: {', '.join(row) or 'no fields'}")
            prompt = _prompt_messages(row["prompt"], where)
            chosen = _response_text(row["chosen"], where, "chosen")
            rejected = _response_text(row["rejected"], where, "rejected")
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
            continue
        out.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "split": str(row.get("split", "")),
        })
    _report_skipped(source, skipped)
    if not out:
        raise DataError(f"{source}: no valid rows")
    return Dataset.from_list(out)


def _report_skipped(source: str, skipped: list[str]) -> None:
    if skipped:
        import sys

        print(f"warning: {source}: skipped {len(skipped)} invalid row(s), first: {skipped[0]}", file=sys.stderr)


def load_prompts(source: str, fields: dict[str, str] | None = None, default_class: str | None = None):
    """Prompt sets -> Dataset with ``id``, ``prompt`` (text), ``prompt_class``, ``category``, ``split``.

    ``id`` is the row's own ``id`` when it has one, else its location (``file.jsonl:12``), so
    whatever is written per prompt (PPO's validation replies) can be traced to its row.

    ``default_class`` fills ``prompt_class`` for sets that have none (e.g. all-harmful sets).
    """
    from datasets import Dataset

    out = []
    for where, row in read_rows(source, fields):
        prompt = _text(row, "prompt", where)
        cls = row.get("prompt_class", default_class)
        if cls is None:
            raise DataError(f"{where}: missing field 'prompt_class' (one of {', '.join(PROMPT_CLASSES)}); "
                            "map a field to it or set a default class")
        if cls not in PROMPT_CLASSES:
            raise DataError(f"{where}: prompt_class must be one of {', '.join(PROMPT_CLASSES)}, got {cls!r}")
        out.append({
            "id": str(row.get("id") or where),
            "prompt": prompt,
            "prompt_class": cls,
            "category": str(row.get("category") or ""),
            "split": str(row.get("split") or ""),
        })
    return Dataset.from_list(out)


def split_dataset(ds, eval_fraction: float, seed: int):
    """(train, eval) by the ``split`` column when it marks eval rows, else a seeded random cut."""
    if "split" in ds.column_names and "eval" in set(ds["split"]):
        train = ds.filter(lambda r: r["split"] != "eval")
        evals = ds.filter(lambda r: r["split"] == "eval")
        return train, evals
    if eval_fraction <= 0:
        return ds, None
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(idx) * eval_fraction)))
    return ds.select(sorted(idx[n_eval:])), ds.select(sorted(idx[:n_eval]))
