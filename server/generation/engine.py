"""The generation engine: one step = let waiting requests join (prefill), then decode one token for the rest.

Failures stay with the sequence that causes them: a row whose logits are not finite, or whose sampling or
detokenisation raises, fails alone; a forward pass that raises is retried on halves of its rows until the rows
that fail alone are found, and only those fail (see docs/design.md, "Fault isolation"). A failed sequence leaves
an event carrying its error; the others in the step get their token as if nothing happened.

Not thread-safe by design: one worker thread (``runner.py``) owns it and calls ``step`` in a loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ptserve.adapters_store.errors import APIError, GenerationFailed, InputTooLong, InvalidInput, NonFiniteLogits
from ptserve.adapters_store.format import Adapter
from ptserve.server.backbone import Backbone
from ptserve.server.generation.forward import FloatLMHead, decode_forward, decoder_forward
from ptserve.server.generation.kv_cache import SlotKVCache
from ptserve.server.generation.logprobs import TokenLogprob, log_probs, prompt_logprobs, score, temperature_of
from ptserve.server.generation.sampling import finite_mask, sample_tokens
from ptserve.server.generation.scheduler import AdmissionPolicy, Scheduler, TenantFair
from ptserve.server.generation.sequence import SamplingParams, Sequence
from ptserve.server.resident import ResidentAdapter, gather_prefixes, make_resident
from ptserve.server.transfer import to_device

log = logging.getLogger(__name__)
Forward = Callable[[list[Sequence], int], torch.Tensor]  # (rows, their first slot) -> logits [rows, vocab]


@dataclass(frozen=True)
class StepEvent:
    seq: Sequence
    text: str  # newly released text (may be empty)
    token: int | None  # the token generated this step (None if the sequence was cancelled or failed)
    done: bool
    error: APIError | None = None  # the sequence failed (done is True); no other sequence is affected
    logprob: TokenLogprob | None = None  # the token's, when asked for and the token is part of the output
    text_offset: int = 0  # characters of the output text before this token's


@dataclass(frozen=True)
class GenerationLimits:
    max_running: int = 32  # sequences decoding together (cache slots)
    max_seq_tokens: int = 1024  # prompt + generated tokens per sequence (cache columns)
    max_batch_tokens: int = 16384  # sum over running sequences of prompt + max_new_tokens
    prefix_cap: int = 256  # longest prefix a slot holds


def tokenize_prompt(tokenizer, prompt: str | list[int], vocab_size: int, eos_ids: frozenset[int]) -> list[int]:
    """A prompt's token ids (an empty prompt: BOS, else EOS); token-id prompts must lie in the vocabulary."""
    ids = list(prompt) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
    if not ids:
        ids = [tokenizer.bos_token_id or next(iter(eos_ids))]
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise InvalidInput(f"prompt token ids must be integers in [0, {vocab_size})")
    return ids


def check_fits(prefix: int, prompt: int, new: int, room: int, prefix_cap: int) -> None:
    """``InputTooLong`` unless a prefix of ``prefix`` tokens, the prompt and ``new`` tokens fit in one row."""
    if prefix > prefix_cap:
        raise InputTooLong(f"adapter has {prefix} virtual tokens; this server holds at most {prefix_cap}")
    if prompt + new > room:
        raise InputTooLong(
            f"prompt has {prompt} tokens and max_new_tokens is {new}; with the adapter's {prefix} virtual tokens "
            f"at most {room} fit. Shorten the prompt or lower max_new_tokens."
        )


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
        self.steps = 0  # steps taken so far (a sequence records the steps it joined and finished at)
        self.vocab_size = backbone.model.get_input_embeddings().num_embeddings
        tok = backbone.tokenizer
        eos = getattr(getattr(backbone.model, "generation_config", None), "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = frozenset(x for x in [*eos, tok.eos_token_id] if x is not None)

    def make_resident(self, adapter: Adapter, adapter_id: str, version: int) -> ResidentAdapter:
        return make_resident(adapter, adapter_id, version, self.fp, self.backbone.device, self.backbone.dtype)

    # --- admission ------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (token-id prompts are checked against the embedding's vocabulary)."""
        return tokenize_prompt(self.backbone.tokenizer, prompt, self.vocab_size, self.eos_ids)

    def room(self, adapter: ResidentAdapter) -> int:
        """Prompt + generated tokens that fit in one row beside the adapter's prefix."""
        return min(self.backbone.max_positions - adapter.num_virtual_tokens, self.cache.max_tokens)

    def new_sequence(self, adapter: ResidentAdapter, prompt: str | list[int], params: SamplingParams,
                     detokenize: bool = True) -> Sequence:
        """Tokenise and check that prefix + prompt + max_new_tokens fit; ``InputTooLong`` otherwise. Without
        ``detokenize`` the sequence yields tokens only (its caller makes the text, and applies stop strings)."""
        ids = self.tokenize(prompt)
        room = self.room(adapter)
        check_fits(adapter.num_virtual_tokens, len(ids), params.max_new_tokens, room, self.cache.prefix_cap)
        return Sequence(adapter, ids, params, self.backbone.tokenizer if detokenize else None, self.eos_ids,
                        max_positions=adapter.num_virtual_tokens + room)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # --- one step -------------------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        self.steps += 1
        events = self._reap_cancelled()
        decoding = list(self.scheduler.running)
        joining = self.scheduler.admit()
        for seq in joining:
            seq.first_step = self.steps
        with torch.inference_mode():
            if decoding:
                events += self._decode(decoding)
            if joining:
                events += self._prefill(joining, first_slot=len(decoding))
        for ev in events:
            if ev.done:
                ev.seq.last_step = self.steps
                if ev.seq in self.scheduler.running:
                    self._leave(ev.seq)
        return events

    def abort(self) -> list[Sequence]:
        """Drop every sequence and zero the cache (after a step failed outside the per-row isolation)."""
        sched = self.scheduler
        dropped = [*sched.running, *sched.waiting]
        sched.running.clear()
        sched.waiting.clear()
        sched.reserved = 0
        self.cache.clear_all()
        return dropped

    def _prefill(self, seqs: list[Sequence], first_slot: int) -> list[StepEvent]:
        width = max(len(s.prompt_ids) for s in seqs)
        for i, seq in enumerate(seqs):
            self.cache.write_prefix(first_slot + i, seq.adapter.kv)
            seq.written = width  # the padded prompt's columns, even if the forward fails half-way

        def forward(rows: list[Sequence], first: int) -> torch.Tensor:
            kv = gather_prefixes([s.adapter for s in rows], self.fp, self.backbone.device, self.backbone.dtype)
            hidden = decoder_forward(
                self.backbone, [s.prompt_ids for s in rows], kv, [s.prefix_len for s in rows],
                cache=self.cache, slots=slice(first, first + len(rows)),
            )  # [rows, T_max, hidden]
            for i, s in enumerate(rows):  # echo + logprobs: every prompt token scored (a pure function of the row)
                if s.params.prompt_logprobs is not None:
                    s.prompt_logprobs = prompt_logprobs(lambda a, b, h=hidden[i]: self.lm_head(h[a:b]).cpu(),
                                                        s.prompt_ids, s.params.prompt_logprobs, s.params.temperature)
            last = to_device(torch.tensor([len(s.prompt_ids) - 1 for s in rows]), hidden.device)
            return self.lm_head(hidden[torch.arange(len(rows), device=hidden.device), last])

        ok, logits, failed = self._isolated(seqs, first_slot, forward)
        for s in ok:
            s.cached = len(s.prompt_ids)
        return failed + self._emit(ok, logits)

    def _decode(self, seqs: list[Sequence]) -> list[StepEvent]:
        for s in seqs:
            s.written = max(s.written, s.cached + 1)

        def forward(rows: list[Sequence], first: int) -> torch.Tensor:
            hidden = decode_forward(
                self.backbone, self.cache, [s.last_token for s in rows], [s.cached for s in rows],
                [s.prefix_len for s in rows], first_slot=first,
            )  # [rows, hidden]
            return self.lm_head(hidden)  # [rows, vocab] float32 on the device

        ok, logits, failed = self._isolated(seqs, 0, forward)
        for s in ok:
            s.cached += 1
        return failed + self._emit(ok, logits)

    def _isolated(
        self, seqs: list[Sequence], first_slot: int, forward: Forward
    ) -> tuple[list[Sequence], torch.Tensor | None, list[StepEvent]]:
        """Run ``forward`` on rows in consecutive slots; if it raises, run each half on its own (recursively),
        so only rows that fail alone fail. A retried row computes what it computes alone, and cache writes are
        idempotent (each row writes its own columns), so the survivors' results do not depend on the failure.
        Returns (rows computed, their logits [rows, vocab], failure events)."""
        try:
            return seqs, forward(seqs, first_slot), []
        except Exception as exc:
            if len(seqs) == 1:
                return [], None, [self._failed(seqs[0], exc)]
            log.warning("a generation forward of %d rows failed (%s); retrying its halves", len(seqs), exc)
        mid = len(seqs) // 2
        parts = [self._isolated(seqs[:mid], first_slot, forward),
                 self._isolated(seqs[mid:], first_slot + mid, forward)]
        ok = [s for part in parts for s in part[0]]
        logits = [part[1] for part in parts if part[1] is not None]
        return ok, torch.cat(logits) if logits else None, [ev for part in parts for ev in part[2]]

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor | None) -> list[StepEvent]:
        """One token per row (logits [rows, vocab] float32 on the device), each row on its own: a row that cannot
        be sampled, scored or decoded fails alone. Tokens are chosen for all rows on the device (a row whose logits
        are not finite draws from zeros, harmlessly, and is failed) and read back with the rows' finiteness in one
        transfer: a step's only host sync, unless a request asked for logprobs."""
        if not seqs:
            return []
        ok = finite_mask(logits)  # [B]
        try:
            tokens = sample_tokens(torch.where(ok[:, None], logits, 0.0), seqs)  # [B]
        except Exception as exc:  # sampling is total over the admitted parameters; a row that still fails, alone
            if len(seqs) == 1:
                return [self._failed(seqs[0], exc)]
            return [ev for i in range(len(seqs)) for ev in self._emit(seqs[i: i + 1], logits[i: i + 1])]
        chosen, finite = torch.stack([tokens, ok.to(tokens.dtype)]).tolist()
        events = []
        for i, (seq, token, fine) in enumerate(zip(seqs, chosen, finite)):
            try:
                if not fine:
                    raise NonFiniteLogits(
                        f"generation stopped after {len(seq.output_ids)} tokens: the logits are not finite "
                        f"(adapter {seq.adapter.id} v{seq.adapter.version} overflows the backbone's arithmetic)"
                    )
                scored = self._score(seq, logits[i: i + 1], token)
                offset, before = len(seq.text), len(seq.output_ids)
                text = seq.append(token)
            except Exception as exc:
                events.append(self._failed(seq, exc))
                continue
            kept = scored if len(seq.output_ids) > before else None  # an EOS is not part of the output
            events.append(StepEvent(seq, text, token, seq.finish_reason is not None, logprob=kept,
                                    text_offset=offset))
        return events

    @staticmethod
    def _score(seq: Sequence, logits: torch.Tensor, token: int) -> TokenLogprob | None:
        """logits [1, vocab]: the chosen token's logprob and the top-k, when the request asked for them."""
        k = seq.params.logprobs
        if k is None:
            return None
        lp = log_probs(logits.cpu(), torch.tensor([temperature_of(seq.params.temperature)]))  # asked for: read back
        return score(lp, [token], [k])[0]

    def _failed(self, seq: Sequence, exc: Exception) -> StepEvent:
        if isinstance(exc, APIError):
            log.warning("sequence %d (%s) failed: %s", seq.id, seq.adapter.id, exc.message)
            error = exc
        else:
            log.error("sequence %d (%s) failed", seq.id, seq.adapter.id, exc_info=exc)
            error = GenerationFailed(
                f"generating this sequence failed ({type(exc).__name__}); nothing else was affected")
        seq.finish_reason = "error"
        return StepEvent(seq, "", None, True, error=error)

    def _leave(self, seq: Sequence) -> None:
        """Take a sequence out of its slot; its columns are zeroed (kv_cache's invariant), and the last running
        row moves into the slot so the batch stays packed."""
        slot = self.scheduler.slot_of(seq)
        move = self.scheduler.remove(seq)
        self.cache.clear(slot, seq.prefix_len, seq.written)
        if move is not None:
            moved = self.scheduler.running[move.dst]
            self.cache.move(move.src, move.dst, moved.prefix_len, moved.written)

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
