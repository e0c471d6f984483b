"""The generation engine: one step = let waiting requests join (prefill), then decode one token for the rest.

Not thread-safe by design: one worker thread (``runner.py``) owns it and calls ``step`` in a loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ptserve.adapters_store.errors import InputTooLong, InvalidInput
from ptserve.adapters_store.format import Adapter
from ptserve.server.backbone import Backbone
from ptserve.server.generation.forward import decode_forward, decoder_forward, lm_logits
from ptserve.server.generation.kv_cache import SlotKVCache
from ptserve.server.generation.logprobs import TokenLogprob, log_probs, prompt_logprobs, score, temperature_of
from ptserve.server.generation.sampling import sample_next
from ptserve.server.generation.scheduler import AdmissionPolicy, Scheduler, TenantFair
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.resident import ResidentAdapter, gather_prefixes, make_resident


@dataclass(frozen=True)
class StepEvent:
    seq: Sequence
    text: str  # newly released text (may be empty)
    token: int | None  # the token generated this step (None if the sequence was cancelled)
    done: bool
    logprob: TokenLogprob | None = None  # the token's, when asked for and the token is part of the output
    text_offset: int = 0  # characters of the output text before this token's


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
        tok = backbone.tokenizer
        eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(x for x in [*eos, tok.eos_token_id] if x is not None)

    def make_resident(self, adapter: Adapter, adapter_id: str, version: int) -> ResidentAdapter:
        return make_resident(adapter, adapter_id, version, self.fp, self.backbone.device, self.backbone.dtype)

    # --- admission ------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (token-id prompts are checked against the vocabulary; ``InvalidInput``)."""
        if isinstance(prompt, list):
            vocab = self.backbone.model.get_input_embeddings().num_embeddings
            if any(not 0 <= t < vocab for t in prompt):
                raise InvalidInput(f"a prompt token id is outside the vocabulary [0, {vocab})")
            ids = list(prompt)
        else:
            ids = self.backbone.tokenizer(prompt)["input_ids"]
        return ids or [self.backbone.tokenizer.bos_token_id or next(iter(self.eos_ids))]

    def room(self, adapter: ResidentAdapter) -> int:
        """Prompt + generated tokens that fit in one row beside the adapter's prefix."""
        return min(self.backbone.max_positions - adapter.num_virtual_tokens, self.cache.max_tokens)

    def new_sequence(self, adapter: ResidentAdapter, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Tokenise and check that prefix + prompt + max_new_tokens fit; ``InputTooLong`` otherwise."""
        ids = self.tokenize(prompt)
        p, n, new = adapter.num_virtual_tokens, len(ids), params.max_new_tokens
        room = self.room(adapter)
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
        last = torch.tensor([len(s.prompt_ids) - 1 for s in seqs], device=hidden.device)
        logits = lm_logits(self.backbone, hidden[torch.arange(len(seqs), device=hidden.device), last])
        for i, s in enumerate(seqs):
            s.cached = len(s.prompt_ids)
            if s.params.prompt_logprobs is not None:
                s.prompt_logprobs = prompt_logprobs(lambda a, b, h=hidden[i]: lm_logits(self.backbone, h[a:b]),
                                                    s.prompt_ids, s.params.prompt_logprobs, s.params.temperature)
        return self._emit(seqs, logits)

    def _decode(self, seqs: list[Sequence]) -> list[StepEvent]:
        hidden = decode_forward(
            self.backbone, self.cache, [s.last_token for s in seqs], [s.cached for s in seqs],
            [s.prefix_len for s in seqs],
        )
        for s in seqs:
            s.cached += 1
        return self._emit(seqs, lm_logits(self.backbone, hidden))

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepEvent]:
        """logits [B, vocab] float32: sample each row's token, score it when asked, append it."""
        tokens = sample_next(logits, seqs)
        scored = self._score(seqs, logits, tokens)
        events = []
        for seq, token in zip(seqs, tokens):
            offset, before = len(seq.text), len(seq.output_ids)
            text = seq.append(token)
            kept = scored.get(seq.id) if len(seq.output_ids) > before else None  # an EOS is not output
            events.append(StepEvent(seq, text, token, seq.finish_reason is not None, kept, offset))
        return events

    @staticmethod
    def _score(seqs: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> dict[int, TokenLogprob]:
        """The chosen tokens' logprobs (and top-k) of the rows that asked, by sequence id."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return {}
        temps = torch.tensor([temperature_of(seqs[i].params.temperature) for i in rows])
        lp = log_probs(logits[rows], temps)
        found = score(lp, [tokens[i] for i in rows], [seqs[i].params.logprobs for i in rows])
        return {seqs[i].id: entry for i, entry in zip(rows, found)}

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
