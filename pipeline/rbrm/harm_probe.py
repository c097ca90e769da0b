"""The harm question read from a small chat model's hidden states.

The classifier grader's MiniLM pair encoder tells refusals well, but whether a reply carries
harmful detail it ranks little better than topic similarity (ROC AUC ~0.75 on jailbreak replies,
docs/results.md): the sentence encoder was trained to say what a text is about, not what it
enables. A chat model has read both kinds of text and was tuned to refuse the harmful ones, so
its middle layers separate "explains how bootleggers hid liquor" from "gives the steps to do
it" better. This probe runs the embedded SmolLM2-135M-Instruct up to ``layer`` (the layers after
it and the LM head are dropped, so it costs about ``layer`` / 30 of a forward pass), averages the
hidden states over the reply's tokens, and applies a logistic regression fitted on human harm
labels (``fit``). Nothing here is trained but that linear head: the model stays as released.

The fitted head (``harm_probe.json``, beside the classifier adapter) records the model, the layer,
the token windows and the fit; the classifier grader reads it when it is there.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

PROBE_FILE = "harm_probe.json"
MODEL = "smollm2-135m-instruct"
LAYER = 22                # of 30; chosen on held-out harm labels (docs/results.md)
MAX_PROMPT_TOKENS = 128   # the request's end, where a role-play preamble puts the ask
MAX_REPLY_TOKENS = 384    # jailbreak replies open with a persona preamble; the content follows it
BATCH_SIZE = 16


class HarmProbe:
    """``logits(prompts, responses)``: (N,) log-odds that each reply is harmful."""

    def __init__(self, spec: dict, cache_dir: str | None = None, device="cpu",
                 batch_size: int = BATCH_SIZE, source: str = PROBE_FILE):
        for key in ("model", "layer", "w", "b"):
            if key not in spec:
                raise ValueError(f"{source}: missing key '{key}' (expected a probe written by "
                                 "`python -m pipeline.rbrm.classifier probe`)")
        self.spec = spec
        self.w = np.asarray(spec["w"], dtype=np.float64)
        self.b = float(spec["b"])
        self.encoder = ProbeEncoder(spec["model"], int(spec["layer"]), cache_dir, device, batch_size,
                                    int(spec.get("max_prompt_tokens", MAX_PROMPT_TOKENS)),
                                    int(spec.get("max_reply_tokens", MAX_REPLY_TOKENS)))
        if self.w.shape != (self.encoder.hidden_size,):
            raise ValueError(f"{source}: w has {self.w.size} weights, the model's hidden size is "
                             f"{self.encoder.hidden_size}")

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "HarmProbe":
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls(spec, source=str(path), **kwargs)

    def logits(self, prompts: Sequence[str | None], responses: Sequence[str]) -> np.ndarray:
        if not len(responses):
            return np.zeros(0)
        return self.encoder.features(prompts, responses) @ self.w + self.b


class ProbeEncoder:
    """The chat model cut after ``layer``: (request, reply) -> the reply tokens' mean hidden state."""

    def __init__(self, model: str, layer: int, cache_dir: str | None = None, device: str = "cpu",
                 batch_size: int = BATCH_SIZE, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                 max_reply_tokens: int = MAX_REPLY_TOKENS):
        import torch
        from transformers import AutoModel

        from pipeline.models import load_tokenizer, resolve_model
        from pipeline.training import bf16_available

        device = str(device)  # a torch.device works too
        path = resolve_model(model, cache_dir)
        self.tok = load_tokenizer(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        n = len(self.model.layers)
        if not 1 <= layer <= n:
            raise ValueError(f"layer: expected 1..{n} for {model}, got {layer}")
        # Only the first `layer` blocks are read; the final norm would rescale each token, which
        # the head was not fitted on, so it goes too.
        self.model.layers = self.model.layers[:layer]
        self.model.norm = torch.nn.Identity()
        self.hidden_size = int(self.model.config.hidden_size)
        self.device, self.batch_size = device, batch_size
        self.max_prompt_tokens, self.max_reply_tokens = max_prompt_tokens, max_reply_tokens
        # bf16 where the hardware runs it fast (a CPU with AMX, a CUDA GPU); the head sees fp32 means
        self.autocast = (device.startswith("cuda") or bf16_available())

    def _encode(self, prompt: str | None, response: str) -> tuple[list[int], int]:
        from pipeline.models import user_turn_text

        tok = self.tok
        ask = tok((prompt or "")[-4000:], add_special_tokens=False)["input_ids"][-self.max_prompt_tokens:]
        head = tok(user_turn_text(tok, tok.decode(ask)), add_special_tokens=False)["input_ids"]
        reply = tok((response or "")[:4000] or "(empty)", add_special_tokens=False)["input_ids"]
        return head + reply[:self.max_reply_tokens], len(head)

    def features(self, prompts: Sequence[str | None], responses: Sequence[str], progress: bool = False) -> np.ndarray:
        """(N, hidden) float64: the mean over each reply's tokens of the last kept layer's output."""
        import torch
        from tqdm.auto import tqdm

        encoded = [self._encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths, less padding
        out = np.zeros((len(encoded), self.hidden_size))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="harm probe features", disable=not progress):
            idx = order[start:start + self.batch_size]
            width = max(len(encoded[i][0]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)  # padding is masked out; id 0 exists in any vocabulary
            mask = torch.zeros_like(ids)
            reply = torch.zeros((len(idx), width))
            for j, i in enumerate(idx):
                seq, begin = encoded[i]
                ids[j, :len(seq)] = torch.tensor(seq)
                mask[j, :len(seq)] = 1
                reply[j, begin:len(seq)] = 1
            ids, mask, reply = ids.to(self.device), mask.to(self.device), reply.to(self.device)
            with torch.no_grad(), torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16,
                                                 enabled=self.autocast):
                hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            mean = (hidden.float() * reply[..., None]).sum(1) / reply.sum(1, keepdim=True)
            out[idx] = mean.cpu().double().numpy()
        return out


def fit(rows: list[dict], layer: int = LAYER, c: float = 0.01, model: str = MODEL, cache_dir: str | None = None,
        val_rows: list[dict] | None = None, record: dict | None = None, encoder: ProbeEncoder | None = None,
        progress: bool = True) -> dict:
    """Fit the probe's logistic head on ``rows`` that carry a ``harmful`` label; the spec to save.

    Features are standardised before the fit (so ``c``, the inverse L2 strength, means the same at
    every layer) and the scaling is folded into ``w`` and ``b``; each class weighs the same in all.
    With ``val_rows`` their figures land under ``validation``: the place to compare settings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.rbrm.classifier import validation_metrics

    rows = [r for r in rows if r["harmful"] is not None]
    if not rows or len({bool(r["harmful"]) for r in rows}) < 2:
        raise ValueError("the probe needs harm-labelled rows of both kinds (harmful and not)")
    t0 = time.time()
    encoder = encoder or ProbeEncoder(model, layer, cache_dir)
    x = encoder.features([r["prompt"] for r in rows], [r["response"] for r in rows], progress=progress)
    y = np.array([bool(r["harmful"]) for r in rows])
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(scaler.transform(x), y)
    w = clf.coef_[0] / scaler.scale_
    b = float(clf.intercept_[0] - (clf.coef_[0] * scaler.mean_ / scaler.scale_).sum())
    sources = dict(Counter(r["source"] for r in rows))
    spec = {"model": model, "layer": layer, "max_prompt_tokens": encoder.max_prompt_tokens,
            "max_reply_tokens": encoder.max_reply_tokens, "C": c, "rows": len(rows), "harmful": int(y.sum()),
            "sources": sources, **(record or {}),
            "train_accuracy": round(float(((x @ w + b > 0) == y).mean()), 4)}
    val = [r for r in (val_rows or []) if r["harmful"] is not None]
    if val:
        z = encoder.features([r["prompt"] for r in val], [r["response"] for r in val], progress=progress) @ w + b
        spec["validation"] = validation_metrics(np.zeros(len(val)), z, [{**r, "refuses": None} for r in val])["harmful"]
    spec["seconds"] = round(time.time() - t0)
    spec["b"] = round(b, 6)
    spec["w"] = [float(f"{v:.6g}") for v in w]
    return spec
