"""The generation engine: one step = let waiting requests join (prefill), then decode one token for the rest.

Not thread-safe by design: one worker thread (``runner.py``) owns it and calls ``step`` in a loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptserve.adapters_store.errors import InputTooLong
from ptserve.adapters_store.format import Adapter
from ptserve.server.backbone import Backbone
from ptserve.server.generation.forward import FloatLMHead, decode_forward, decoder_forward
from ptserve.server.generation.kv_cache import SlotKVCache
from ptserve.server.generation.sampling import sample_next
from ptserve.server.generation.scheduler import AdmissionPolicy, Scheduler, TenantFair
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.resident import ResidentAdapter, gather_prefixes, make_resident
from ptserve.server.transfer import to_device


@dataclass(frozen=True)
class StepEvent:
    seq: Sequence
    text: str  # newly released text (may be empty)
    token: int | None  # the token generated this step (None if the sequence was cancelled)
    done: bool


@dataclass(frozen=True)
class GenerationLimits:
    max_running: int = 32  # sequences decoding together (cache slots)
    max_seq_tokens: int = 1024  # prompt + generated tokens per sequence (cache columns)
    max_batch_tokens: int = 16384  # sum over running sequences of prompt + max_new_tokens
    prefix_cap: int = 256  # longest prefix a slot holds


class GenerationEngine:
    def __init__(self, backbone: Backbone, limits: GenerationLimits = GenerationLimits(),
                 admission: AdmissionPolicy | None = None):
        """``admission``: who joins next when a slot frees (``scheduler.ADMISSION_POLICIES``; tenant-fair by
        default)."""
        self.backbone, self.fp, self.limits = backbone, backbone.fingerprint, limits
        max_tokens = min(limits.max_seq_tokens, backbone.max_positions)
        self.cache = SlotKVCache(
            self.fp.num_layers, limits.max_running, self.fp.num_kv_heads, self.fp.head_dim,
            min(limits.prefix_cap, backbone.max_positions - 1), max_tokens, backbone.device, backbone.dtype,
        )
        self.scheduler = Scheduler(limits.max_running, limits.max_batch_tokens,
                                   admission=admission if admission is not None else TenantFair())
        self.lm_head = FloatLMHead(backbone)  # logits in float32 whatever the backbone's dtype
        tok = backbone.tokenizer
        eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(x for x in [*eos, tok.eos_token_id] if x is not None)

    def make_resident(self, adapter: Adapter, adapter_id: str, version: int) -> ResidentAdapter:
        return make_resident(adapter, adapter_id, version, self.fp, self.backbone.device, self.backbone.dtype)

    # --- admission ------------------------------------------------------------------------------------------
    def new_sequence(self, adapter: ResidentAdapter, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Tokenise and check that prefix + prompt + max_new_tokens fit; ``InputTooLong`` otherwise."""
        ids = list(prompt) if isinstance(prompt, list) else self.backbone.tokenizer(prompt)["input_ids"]
        if not ids:
            ids = [self.backbone.tokenizer.bos_token_id or next(iter(self.eos_ids))]
        p, n, new = adapter.num_virtual_tokens, len(ids), params.max_new_tokens
        room = min(self.backbone.max_positions - p, self.cache.max_tokens)
        if p > self.cache.prefix_cap:
            raise InputTooLong(f"adapter has {p} virtual tokens; this server holds at most {self.cache.prefix_cap}")
        if n + new > room:
            raise InputTooLong(
                f"prompt has {n} tokens and max_new_tokens is {new}; with the adapter's {p} virtual tokens at most "
                f"{room} fit. Shorten the prompt or lower max_new_tokens."
            )
        return Sequence(adapter, ids, params, self.backbone.tokenizer, self.eos_ids,
                        max_positions=min(self.backbone.max_positions, p + self.cache.max_tokens))

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # --- one step -------------------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        events = self._reap_cancelled()
        decoding = list(self.scheduler.running)
        joining = self.scheduler.admit()
        with torch.inference_mode():
            if decoding:
                events += self._decode(decoding)
            if joining:
                events += self._prefill(joining, first_slot=len(decoding))
        for ev in events:
            if ev.done and ev.seq in self.scheduler.running:
                self._leave(ev.seq)
        return events

    def _prefill(self, seqs: list[Sequence], first_slot: int) -> list[StepEvent]:
        for i, seq in enumerate(seqs):
            self.cache.write_prefix(first_slot + i, seq.adapter.kv)
        kv = gather_prefixes([s.adapter for s in seqs], self.fp, self.backbone.device, self.backbone.dtype)
        hidden = decoder_forward(
            self.backbone, [s.prompt_ids for s in seqs], kv, [s.prefix_len for s in seqs],
            cache=self.cache, slots=slice(first_slot, first_slot + len(seqs)),
        )
        last = to_device(torch.tensor([len(s.prompt_ids) - 1 for s in seqs]), hidden.device)
        logits = self.lm_head(hidden[torch.arange(len(seqs), device=hidden.device), last])
        for s in seqs:
            s.cached = len(s.prompt_ids)
        return self._emit(seqs, logits)

    def _decode(self, seqs: list[Sequence]) -> list[StepEvent]:
        hidden = decode_forward(
            self.backbone, self.cache, [s.last_token for s in seqs], [s.cached for s in seqs],
            [s.prefix_len for s in seqs],
        )
        for s in seqs:
            s.cached += 1
        return self._emit(seqs, self.lm_head(hidden))

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepEvent]:
        events = []
        for seq, token in zip(seqs, sample_next(logits, seqs)):
            text = seq.append(token)
            events.append(StepEvent(seq, text, token, seq.finish_reason is not None))
        return events

    def _leave(self, seq: Sequence) -> None:
        move = self.scheduler.remove(seq)
        if move is not None:
            moved = self.scheduler.running[move.dst]
            self.cache.move(move.src, move.dst, moved.cached)

    def _reap_cancelled(self) -> list[StepEvent]:
        events = []
        for seq in [s for s in self.scheduler.waiting if s.cancelled.is_set()]:
            self.scheduler.drop_waiting(seq)
            seq.finish_reason = "cancelled"
            events.append(StepEvent(seq, "", None, True))
        for seq in [s for s in self.scheduler.running if s.cancelled.is_set()]:
            self._leave(seq)
            seq.finish_reason = "cancelled"
            events.append(StepEvent(seq, "", None, True))
        return events
