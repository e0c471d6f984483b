"""One generation request as the engine sees it: its adapter, tokens, sampling settings and text so far.

Text is produced incrementally: each new token re-decodes the output and the part not yet sent is released,
except a tail that could still become a stop string or is an incomplete UTF-8 character. Served, that happens on
the API's side, in a mirror of the engine's sequence (``engine_core/streams.py``); the engine's own sequences have
no tokenizer and make token ids only.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ptserve.adapters_store.errors import InvalidInput
from ptserve.server.resident import ResidentAdapter

if TYPE_CHECKING:  # logprobs imports sampling, which imports this module
    from ptserve.server.generation.logprobs import TokenLogprob

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None = off; k = each generated token's logprob and its k most likely rivals
    prompt_logprobs: int | None = None  # the same for every prompt token (OpenAI echo), computed at prefill

    def __post_init__(self):
        """Refuse what sampling cannot compute (the API's schemas refuse it first; this guards every caller)."""
        checks = {
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": math.isfinite(self.temperature) and self.temperature >= 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,  # False for NaN too
            "seed": self.seed is None or 0 <= self.seed < 2**64,  # what torch.Generator.manual_seed takes
            "stop": all(isinstance(s, str) and s for s in self.stop),
            "logprobs": self.logprobs is None or self.logprobs >= 0,
            "prompt_logprobs": self.prompt_logprobs is None or self.prompt_logprobs >= 0,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidInput(f"sampling parameters out of range: {', '.join(bad)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(eq=False)  # identity: the scheduler finds, removes and compares sequences as objects
class Sequence:
    adapter: ResidentAdapter
    prompt_ids: list[int]
    params: SamplingParams
    tokenizer: object  # None: no text (an engine core's sequence; the API detokenises, engine_core/streams.py)
    eos_ids: frozenset[int]
    max_positions: int  # P + tokens may not exceed this
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in this row's cache slot
    written: int = 0  # token columns of its slot it wrote (prefill pads to its batch's longest prompt)
    first_step: int = 0  # the engine step that admitted it (0 = not yet) ...
    last_step: int = 0  # ... and the one that finished it: a row decodes one token per step in between
    sent: int = 0  # characters of the output text already released
    finish_reason: str | None = None
    matched_stop: str | None = None  # the stop string that ended the text, if one did
    text: str = ""
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token, when params.prompt_logprobs
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the runner once the engine holds the sequence no more (finished, cancelled, failed): the adapter's
    # lease may end only then (routes_generate)
    released: threading.Event = field(default_factory=threading.Event)
    _prefix_offset: int = 0  # output_ids[_prefix_offset:_read_offset] decode to the tail of ``text`` ...
    _read_offset: int = 0  # ... and output_ids[_read_offset:] are not in ``text`` yet

    def __post_init__(self):
        seed = self.params.seed
        self._seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(self._seed)
        self._device_generator: torch.Generator | None = None

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The request's own random stream on ``device`` (seeded alike; CUDA's stream differs from the cpu's)."""
        if device.type == "cpu":
            return self.generator
        if self._device_generator is None:
            self._device_generator = torch.Generator(device).manual_seed(self._seed)
        return self._device_generator

    @property
    def prefix_len(self) -> int:
        return self.adapter.num_virtual_tokens

    @property
    def tenant(self) -> str:
        return self.adapter.id.partition("/")[0]

    @property
    def reserved_tokens(self) -> int:
        """Cache columns this request may need: prompt + max_new_tokens (its prefix sits in the prefix area)."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def steps(self) -> int:
        """Engine steps from admission to finish (= tokens sampled, unless something held it back)."""
        return self.last_step - self.first_step + 1 if self.first_step and self.last_step else 0

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def append(self, token: int) -> str:
        """Record a generated token; returns the text it releases (maybe empty) and sets ``finish_reason``."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            self._detokenize(flush=True)
            return self._release(final=True)
        self.output_ids.append(token)
        before = len(self.text)
        self._detokenize(flush=False)
        if self._cut_at_stop(before):
            return self._release(final=True)
        if len(self.output_ids) >= self.params.max_new_tokens or (
            self.prefix_len + len(self.prompt_ids) + len(self.output_ids) >= self.max_positions
        ):
            self.finish_reason = "length"
            self._detokenize(flush=True)
            self._cut_at_stop(before)
            return self._release(final=True)
        return self._release(final=False)

    def _detokenize(self, flush: bool) -> None:
        """Extend ``text`` with the characters the newest tokens complete, decoding a short window of tokens
        (not the whole output, which would make every step cost O(output length)). Both decodes start at the same
        token, so tokenizers that drop a leading space at the start of a decode are handled (as vLLM does)."""
        if self.tokenizer is None:
            return
        ids, decode = self.output_ids, self.tokenizer.decode
        seen = decode(ids[self._prefix_offset: self._read_offset], skip_special_tokens=True)
        upto = decode(ids[self._prefix_offset:], skip_special_tokens=True)
        if len(upto) > len(seen) and (flush or not upto.endswith("\ufffd")):  # wait for a whole character
            self.text += upto[len(seen):]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def _cut_at_stop(self, searched_before: int) -> bool:
        longest = max((len(stop) for stop in self.params.stop), default=0)
        start = max(0, searched_before - longest + 1)  # a stop string may straddle the old end
        hits = [(at, stop) for stop in self.params.stop if (at := self.text.find(stop, start)) != -1]
        if not hits:
            return False
        at, self.matched_stop = min(hits)
        self.text, self.finish_reason = self.text[:at], "stop"
        return True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                end -= 1
            for stop in self.params.stop:  # hold back a tail that may grow into a stop string
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:k]):
                        end -= k  # from ``end``: a held-back partial character may follow the match
                        break
        delta = self.text[self.sent: max(end, self.sent)]
        self.sent = max(end, self.sent)
        return delta
