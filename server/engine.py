"""The engine: tokenise, gather each row's prefix, run the whole mixed batch in one forward pass, then give
each row its own output: its adapter's head's logits (classification) or its pooled embedding.

Rows of one batch may use different adapters with different prefix lengths, and the bare backbone (a prefix of
length 0). Prefixes are left-padded to the longest one and the pad slots masked; real tokens are right-padded;
each row's position ids start at its own prefix length (DESIGN decision 1), so every row computes exactly what
it would compute alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ptserve.adapters_store.errors import InputTooLong
from ptserve.adapters_store.format import Adapter, AdapterConfig
from ptserve.adapters_store.heads import MEAN_HEAD
from ptserve.server.backbone import Backbone
from ptserve.server.heads import apply_heads
from ptserve.server.pooling import mean_pool, mean_states
from ptserve.server.prefix_attention import PrefixContext
from ptserve.server.resident import ResidentAdapter, gather_prefixes, make_resident
from ptserve.server.transfer import to_device


LOGITS, EMBEDDING = "logits", "embedding"  # what a row asks of the pass (Row.output)


@dataclass(frozen=True)
class Row:
    """One input text under one adapter, and the output it wants: ``LOGITS`` (through the adapter's head) or
    ``EMBEDDING`` (the mean-pooled, L2-normalised last hidden state; any adapter's prefix, or the bare backbone)."""

    adapter: ResidentAdapter
    input_ids: tuple[int, ...]  # token ids with the tokenizer's special tokens
    output: str = LOGITS

    @property
    def length(self) -> int:  # positions this row occupies: virtual + real tokens
        return self.adapter.num_virtual_tokens + len(self.input_ids)


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, T_max, hidden]; row r's real tokens are columns [0, len(r))
    pooled: torch.Tensor | None  # [B, hidden] (backbones with a pooler)
    lengths: list[int]  # real tokens per row


@dataclass
class BatchStats:
    rows: int
    real_tokens: int  # sum over rows of (P + T)
    computed_tokens: int  # rows * (P_max + T_max): what the padded batch costs


class Engine:
    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.fp = backbone.fingerprint
        self.bare = self._bare_backbone()

    def _bare_backbone(self) -> ResidentAdapter:
        """The backbone without a prefix, as an adapter of length 0 (embeddings under the backbone's own name)."""
        fp, bb = self.fp, self.backbone
        kv = torch.zeros(fp.num_layers, 2, fp.num_kv_heads, 0, fp.head_dim, device=bb.device, dtype=bb.dtype)
        return ResidentAdapter(bb.name, 0, AdapterConfig(task="embed", num_virtual_tokens=0, backbone=fp), kv, {})

    # --- adapters -------------------------------------------------------------------------------------------
    def make_resident(self, adapter: Adapter, adapter_id: str, version: int) -> ResidentAdapter:
        return make_resident(adapter, adapter_id, version, self.fp, self.backbone.device, self.backbone.dtype)

    # --- tokenisation ---------------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], prefix_len: int, truncate: bool = False) -> list[tuple[int, ...]]:
        return tokenize(self.backbone, texts, prefix_len, truncate)

    # --- one forward pass -----------------------------------------------------------------------------------
    def gather_prefixes(self, rows: list[Row]) -> torch.Tensor:
        """Rows' prefixes left-padded to P_max: [layers, 2, B, kv_heads, P_max, head_dim]."""
        return gather_prefixes([r.adapter for r in rows], self.fp, self.backbone.device, self.backbone.dtype)

    def encode(self, rows: list[Row]) -> tuple[EncoderOutput, BatchStats]:
        kv = self.gather_prefixes(rows)
        prefix_lens = [r.adapter.num_virtual_tokens for r in rows]
        with torch.inference_mode():
            hidden, pooled = encoder_forward(self.backbone, [r.input_ids for r in rows], kv, prefix_lens)
        stats = BatchStats(
            rows=len(rows),
            real_tokens=sum(r.length for r in rows),
            computed_tokens=len(rows) * (kv.shape[4] + hidden.shape[1]),
        )
        return EncoderOutput(hidden, pooled, [len(r.input_ids) for r in rows]), stats

    def run(self, rows: list[Row]) -> tuple[list[torch.Tensor], BatchStats]:
        """All rows in one forward pass; per row its own output (float32, cpu): logits [num_labels] for
        ``LOGITS`` rows, an embedding [hidden] for ``EMBEDDING`` rows. What the batcher runs."""
        enc, stats = self.encode(rows)
        with torch.inference_mode():
            return row_outputs(rows, enc), stats

    def classify(self, rows: list[Row]) -> tuple[list[torch.Tensor], BatchStats]:
        """Logits per row ([num_labels] float32, cpu) of ``LOGITS`` rows (the default), in one forward pass."""
        return self.run(rows)


def tokenize(bb: Backbone, texts: list[str], prefix_len: int, truncate: bool = False) -> list[tuple[int, ...]]:
    """Token ids per text; inputs that do not fit beside the prefix raise ``InputTooLong`` or are cut. Needs only
    the tokenizer and the backbone's geometry: API workers, which hold no weights, tokenise with it too."""
    room = bb.max_positions - prefix_len
    tok = bb.tokenizer
    encoder = _plain_encoder(tok)
    if encoder is not None:  # the Rust tokenizer itself: a third of the wrapper's cost per text
        ids = [e.ids for e in encoder.encode_batch(texts, add_special_tokens=True)] if len(texts) > 1 \
            else [encoder.encode(texts[0], add_special_tokens=True).ids]
    else:
        ids = tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
    for i, row in enumerate(ids):
        if len(row) <= room:
            continue
        if not truncate:
            raise InputTooLong(
                f"input {i} has {len(row)} tokens; with the adapter's {prefix_len} virtual tokens at most "
                f"{room} fit ({bb.max_positions} positions). Shorten it or pass truncate=true."
            )
        ids[i] = tok(texts[i], add_special_tokens=True, truncation=True, max_length=room)["input_ids"]
    return [tuple(r) for r in ids]


@functools.lru_cache(maxsize=8)  # one per loaded tokenizer (a server holds one)
def _plain_encoder(tokenizer):
    """A private copy of a fast tokenizer's Rust ``Tokenizer`` with truncation and padding off: what
    ``tokenizer(texts, add_special_tokens=True, truncation=False)`` computes, without the Python wrapper, and
    without touching the state the wrapper sets on its own backend per call. None for a slow tokenizer."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


def row_outputs(rows: list[Row], enc: EncoderOutput) -> list[torch.Tensor]:
    """The per-row output stage: head rows through their adapters' heads, embedding rows mean-pooled."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    heads = [i for i, r in enumerate(rows) if r.output == LOGITS]
    pooled_rows = [i for i, r in enumerate(rows) if r.output == EMBEDDING]
    if heads:
        idx = to_device(torch.tensor(heads), enc.hidden.device)
        pooler = enc.pooled.index_select(0, idx) if enc.pooled is not None else None
        adapters = [rows[i].adapter for i in heads]
        mean = None
        if any(a.config.head == MEAN_HEAD for a in adapters):  # [len(heads), H]
            mean = mean_states(enc.hidden.index_select(0, idx), [enc.lengths[i] for i in heads])
        logits = apply_heads(adapters, enc.hidden[:, 0].index_select(0, idx), pooler, mean)
        for i, row_logits in zip(heads, logits):
            out[i] = row_logits
    if pooled_rows:
        idx = to_device(torch.tensor(pooled_rows), enc.hidden.device)
        vectors = mean_pool(enc.hidden.index_select(0, idx), [enc.lengths[i] for i in pooled_rows]).cpu()
        for i, vector in zip(pooled_rows, vectors):
            out[i] = vector
    return out


def encoder_forward(
    bb: Backbone,
    token_ids: list[tuple[int, ...]],  # B rows of token ids (special tokens included)
    kv: torch.Tensor,  # [layers, 2, B, kv_heads, P_max, head_dim]; row b's prefix in the last P_b slots
    prefix_lens: list[int],  # P_b per row
    record=None,  # an object with ``write_prompt(layer, slots, key, value)``: gets every layer's token K/V
    attention_dtype: torch.dtype | None = None,  # attention computed in this dtype (``PrefixContext.compute_dtype``)
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prefixed forward pass of an encoder: (hidden [B, T_max, H], pooled [B, H] or None).

    Differentiable with respect to ``kv``: the trainer calls this same function, so what is trained is what is
    served. Real tokens are right-padded; the mask hides pad tokens and the pad slots of shorter prefixes.
    ``record`` (the trainer's prefix initialisation, ``training.prefix_init``) is handed each layer's keys and
    values of the real tokens, [B, kv_heads, T_max, head_dim], as a decoder's prefill hands them to its cache.
    """
    dev, b = bb.device, len(token_ids)
    t_max, p_max = max(len(t) for t in token_ids), kv.shape[4]
    input_ids = torch.full((b, t_max), bb.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(token_ids):
        input_ids[i, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(t) for t in token_ids])
    p_lens = torch.tensor(prefix_lens)
    token_valid = torch.arange(t_max)[None, :] < lengths[:, None]  # [B, T_max]
    prefix_valid = torch.arange(p_max)[None, :] >= (p_max - p_lens)[:, None]  # [B, P_max]
    positions = bb.family.first_position + p_lens[:, None] + torch.arange(t_max)[None, :]
    positions = positions.clamp(max=bb.fingerprint.max_positions - 1)  # pad columns only; real ones fit
    mask = torch.cat([prefix_valid, token_valid], dim=1)[:, None, None, :]  # [B, 1, 1, P_max + T_max]
    out = bb.model(
        input_ids=to_device(input_ids, dev),
        token_type_ids=torch.zeros_like(input_ids, device=dev),
        position_ids=to_device(positions, dev),
        ptserve_prefix=PrefixContext(keys=kv[:, 0], values=kv[:, 1], mask=to_device(mask, dev), cache=record,
                                     slots=slice(0, b) if record is not None else None,
                                     compute_dtype=attention_dtype),
    )
    return out.last_hidden_state, getattr(out, "pooler_output", None)
