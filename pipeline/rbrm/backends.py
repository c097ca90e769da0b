"""Grader backends: where the option probabilities come from.

A log-prob backend answers one kind of question: for each grader input, what probability does
the grader model put on each option label ("A".."D", or "Yes"/"No") as the first token of its
reply? Inputs come in three parts so that work can be shared:

    shared     the same for every item in the call (the rubric text)
    items[i]   one per item (the fenced request and response)
    questions  asked of every item (the final question; one per proposition)

and the user turn the grader reads for item i and question j is ``shared + items[i] +
questions[j]``. The answer is read from the next-token distribution after the chat template's
assistant header: one forward pass, no free-form generation.

- ``HFBackend`` runs a local chat model. It encodes ``shared`` once and keeps its key/value
  cache, runs all items of a batch on top of it in one forward pass, then each question on top
  of that, so a rubric of 600 tokens costs nothing per item and a proposition costs only its
  own few tokens.
- ``OpenAIBackend`` asks an OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, TGI,
  llama.cpp server) for one token with ``top_logprobs``; failed calls are retried and then
  reported per item as not scored.

``pipeline.rbrm.embedding`` holds a third kind of backend that compares texts instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SENTINEL = "\x00CONTENT\x00"


class BackendError(RuntimeError):
    """A backend that cannot be used at all (bad model, unreachable server at start-up)."""


@dataclass
class OptionScores:
    """Result of one backend call.

    logprobs: (n_items, n_questions, n_options) log-probabilities renormalised over the
              options; rows of items that failed are NaN.
    mass:     (n_items, n_questions) raw probability the grader put on any option label at
              all (a grader that ignores the answer format shows a small mass).
    errors:   one entry per item, None where the item was scored.
    """

    logprobs: np.ndarray
    mass: np.ndarray
    errors: list[str | None]


def _option_variants(option: str) -> list[str]:
    # The first token of the reply may be "Yes", " Yes", "yes"...; all spellings count for the
    # option. Single letters keep their case: " a" is far more often the article than answer A.
    variants = [option, " " + option]
    if len(option) > 1 and option.lower() != option:
        variants += [option.lower(), " " + option.lower()]
    return variants


class HFBackend:
    """A local HF chat model as the grader (default: the embedded SmolLM2-135M-Instruct)."""

    kind = "logprob"

    def __init__(self, model: str = "smollm2-135m-instruct", batch_size: int = 8, device: str | None = None,
                 dtype: str | None = None, cache_dir: str | None = None, max_item_tokens: int = 1024,
                 model_obj=None, tokenizer=None):
        import torch

        from pipeline.models import load_causal_lm, load_tokenizer, resolve_model

        self.torch = torch
        self.batch_size = batch_size
        self.max_item_tokens = max_item_tokens
        if model_obj is None:
            path = resolve_model(model, cache_dir)
            tokenizer = load_tokenizer(path)
            torch_dtype = getattr(torch, dtype) if dtype else None
            model_obj = load_causal_lm(path, tokenizer=tokenizer, dtype=torch_dtype)
            self.name = str(model)
        else:
            self.name = getattr(model_obj.config, "_name_or_path", "") or "in-memory model"
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model_obj.to(self.device).eval()
        self.tok = tokenizer
        if self.tok.chat_template is None:
            raise BackendError(f"grader model '{self.name}' has no chat template; use an instruct/chat model")
        rendered = self.tok.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                                add_generation_prompt=True)
        if rendered.count(SENTINEL) != 1:
            raise BackendError(f"grader model '{self.name}': cannot locate the user turn in its chat template")
        self.template_head, self.template_tail = rendered.split(SENTINEL)
        self._shared_cache: dict[str, tuple] = {}
        self._option_ids: dict[tuple[str, ...], list[list[int]]] = {}

    @property
    def fingerprint(self) -> str:
        return f"hf:{self.name}"

    # ------------------------------------------------------------------ token helpers

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def option_ids(self, options: Sequence[str]) -> list[list[int]]:
        key = tuple(options)
        if key not in self._option_ids:
            ids = []
            for opt in options:
                firsts = {tokens[0] for tokens in map(self._encode, _option_variants(opt)) if tokens}
                ids.append(sorted(firsts))
            flat = [i for group in ids for i in group]
            if len(flat) != len(set(flat)):
                raise BackendError(f"options {list(options)} share a first token in the grader's tokenizer")
            self._option_ids[key] = ids
        return self._option_ids[key]

    def _read(self, last_logits, options):
        """(B, V) logits -> ((B, K) renormalised log-probs, (B,) mass on the options)."""
        torch = self.torch
        lp = last_logits.float().log_softmax(-1)
        per_option = torch.stack([torch.logsumexp(lp[:, ids], -1) for ids in self.option_ids(options)], -1)
        mass = per_option.exp().sum(-1)
        return per_option.log_softmax(-1), mass

    # ------------------------------------------------------------------ the forward passes

    def _shared_state(self, shared: str):
        """Key/value cache for the chat header plus the shared text, computed once per text."""
        from transformers import DynamicCache

        torch = self.torch
        if shared not in self._shared_cache:
            if len(self._shared_cache) > 8:
                self._shared_cache.clear()
            ids = self._encode(self.template_head + shared)
            input_ids = torch.tensor([ids], device=self.device)
            cache = DynamicCache(config=self.model.config)
            with torch.no_grad():
                self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            self._shared_cache[shared] = (len(ids), cache)
        return self._shared_cache[shared]

    def _expand(self, cache, n: int):
        """A fresh cache holding the shared prefix once per row. The prefix tensors are passed as
        broadcast views, so the only copy is the one the cache makes when it first appends."""
        from transformers import DynamicCache

        fresh = DynamicCache(config=self.model.config)
        for layer_idx, layer in enumerate(cache.layers):
            fresh.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), layer_idx)
        return fresh

    def option_logprobs(self, shared: str, items: Sequence[str], questions: Sequence[str],
                        options: Sequence[str]) -> OptionScores:
        torch = self.torch
        n, q, k = len(items), len(questions), len(options)
        out = np.full((n, q, k), np.nan)
        mass = np.full((n, q), np.nan)
        if n == 0:
            return OptionScores(out, mass, [])
        shared_len, shared_cache = self._shared_state(shared)
        question_ids = [self._encode(question + self.template_tail) for question in questions]
        item_ids = [self._encode(item)[-self.max_item_tokens:] for item in items]
        # Long items first so a batch holds similar lengths (less padding); results go back in order.
        order = sorted(range(n), key=lambda i: -len(item_ids[i]))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                b = len(idx)
                width = max(len(item_ids[i]) for i in idx)
                # Items are right-padded inside their own segment; the mask hides the padding and
                # position ids skip it, so each row reads exactly shared + item + question.
                tokens = torch.full((b, width), pad, dtype=torch.long, device=self.device)
                item_mask = torch.zeros((b, width), dtype=torch.long, device=self.device)
                for row, i in enumerate(idx):
                    tokens[row, :len(item_ids[i])] = torch.tensor(item_ids[i], device=self.device)
                    item_mask[row, :len(item_ids[i])] = 1
                cache = self._expand(shared_cache, b)
                mask = torch.cat([torch.ones((b, shared_len), dtype=torch.long, device=self.device), item_mask], 1)
                positions = (mask.cumsum(-1) - 1)[:, shared_len:]
                self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
                next_pos = mask.sum(-1, keepdim=True)
                for j, qids in enumerate(question_ids):
                    qt = torch.tensor([qids] * b, device=self.device)
                    qmask = torch.cat([mask, torch.ones_like(qt)], 1)
                    qpos = next_pos + torch.arange(len(qids), device=self.device)
                    logits = self.model(input_ids=qt, attention_mask=qmask, position_ids=qpos,
                                        past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                    lp, m = self._read(logits, options)
                    out[idx, j] = lp.cpu().numpy()
                    mass[idx, j] = m.cpu().numpy()
                    cache.crop(-len(qids))  # back to shared + items for the next question
        return OptionScores(out, mass, [None] * n)

    def full_text_logprobs(self, text: str, options: Sequence[str]) -> np.ndarray:
        """One input, no caching (used by tests and the benchmark as the plain reference)."""
        torch = self.torch
        ids = self._encode(self.template_head + text + self.template_tail)
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device), logits_to_keep=1).logits[:, -1]
        return self._read(logits, options)[0][0].cpu().numpy()


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint that returns log-probs (vLLM, TGI, llama.cpp server).

    For graders too large to sit beside the policy. Each (item, question) is one request for
    a single token with ``top_logprobs``; an option missing from the returned top list gets
    the smallest returned log-prob (an upper bound on its true value).
    """

    kind = "logprob"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 3, backoff: float = 0.5, top_logprobs: int = 20, workers: int = 8):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs
        self.workers = workers
        self.name = model

    @property
    def fingerprint(self) -> str:
        return f"openai:{self.base_url}:{self.model}"

    def _post(self, content: str) -> dict:
        import requests

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 1,
                "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}
        last = ""
        for attempt in range(self.retries + 1):
            try:
                r = requests.post(f"{self.base_url}/chat/completions", data=json.dumps(body),
                                  headers=headers, timeout=self.timeout)
                if r.status_code == 200:
                    return r.json()
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code in (400, 401, 403, 404, 422):  # the request itself is wrong: do not retry
                    break
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise BackendError(last)

    def _read(self, reply: dict, options: Sequence[str]) -> tuple[np.ndarray, float]:
        try:
            top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise BackendError("reply has no choices[0].logprobs.content[0].top_logprobs "
                               "(does the server support logprobs?)") from None
        if not top:
            raise BackendError("reply has an empty top_logprobs list")
        floor = min(float(t["logprob"]) for t in top)
        scores = []
        for opt in options:
            spellings = {v.strip() for v in _option_variants(opt)}
            hits = [float(t["logprob"]) for t in top if str(t.get("token", "")).strip() in spellings]
            scores.append(float(np.logaddexp.reduce(hits)) if hits else floor)
        arr = np.array(scores)
        mass = float(np.exp(arr).sum())
        return arr - np.logaddexp.reduce(arr), mass

    def option_logprobs(self, shared: str, items: Sequence[str], questions: Sequence[str],
                        options: Sequence[str]) -> OptionScores:
        from concurrent.futures import ThreadPoolExecutor

        n, q, k = len(items), len(questions), len(options)
        out = np.full((n, q, k), np.nan)
        mass = np.full((n, q), np.nan)
        errors: list[str | None] = [None] * n

        def one(ij):
            i, j = ij
            try:
                lp, m = self._read(self._post(shared + items[i] + questions[j]), options)
                return i, j, lp, m, None
            except BackendError as e:
                return i, j, None, None, str(e)

        jobs = [(i, j) for i in range(n) for j in range(q)]
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            for i, j, lp, m, err in pool.map(one, jobs):
                if err is not None:
                    errors[i] = errors[i] or err
                else:
                    out[i, j], mass[i, j] = lp, m
        for i, err in enumerate(errors):
            if err is not None:
                out[i] = np.nan
                mass[i] = np.nan
        return OptionScores(out, mass, errors)

