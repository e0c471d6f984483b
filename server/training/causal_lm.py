"""Causal-LM training: a prefix on a frozen decoder, learning to continue prompts with their completions.

The loss is on the completion tokens only (and the EOS after them, so the served adapter learns to stop). The
forward is the server's prefill: ``ptserve.server.generation.forward.decoder_forward`` under the prefix's K/V, then
``lm_logits``. Prompts are tokenised as the server tokenises them (``tokenizer(prompt)``) and completions
separately, so training sees exactly the token boundary the server generates from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ptserve.adapters_store.format import PREFIX_KEY, Adapter, AdapterConfig
from ptserve.server.backbone import Backbone
from ptserve.server.generation.forward import decoder_forward, lm_logits
from ptserve.server.resident import prefix_kv
from ptserve.server.training.classify import TrainConfig
from ptserve.server.training.data import DataError, Pair
from ptserve.server.training.loop import Callbacks, Evaluation, FitConfig, FitResult, fit
from ptserve.server.training.prefix_encoder import PrefixEncoder


@dataclass(frozen=True)
class Tokenised:
    ids: tuple[int, ...]  # prompt + completion (+ EOS)
    prompt_len: int  # the loss covers ids[prompt_len:]


@dataclass
class LMEval:
    loss: float  # mean cross-entropy per completion token
    token_accuracy: float  # greedy next-token accuracy on completion tokens (teacher forcing)
    completions: list[str] | None = (
        None  # greedy completions of the evaluation prompts (final evaluation only)
    )
    completion_ids: list[list[int]] | None = None
    exact_match: float | None = None


@dataclass
class LMTrainResult:
    adapter: Adapter
    config: TrainConfig
    fit: FitResult
    eval: LMEval | None
    trainable_parameters: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict:
        from ptserve.server.training.outputs import history_record

        return {
            "task": "generate",
            "config": asdict(self.config),
            "backbone": self.adapter.config.backbone.to_dict(),
            "base_model_name_or_path": self.adapter.config.base_model_name_or_path,
            "trainable_parameters": self.trainable_parameters,
            **history_record(self.fit),
            "eval": None
            if self.eval is None
            else {
                "loss": self.eval.loss,
                "token_accuracy": self.eval.token_accuracy,
                "exact_match": self.eval.exact_match,
                "completions": self.eval.completions,
            },
        }


class PrefixLM(nn.Module):
    """A prefix over a frozen causal LM (not a submodule: nothing of it trains)."""

    def __init__(self, bb: Backbone, cfg: TrainConfig):
        super().__init__()
        if not bb.family.causal:
            raise ValueError(f"backbone {bb.name!r} ({bb.fingerprint.model_type}) is not a causal LM")
        self.bb, fp = bb, bb.fingerprint
        self.prefix = PrefixEncoder(
            cfg.virtual_tokens,
            fp.prefix_width,
            fp.hidden_size,
            cfg.projection_hidden if cfg.prefix_projection else None,
            cfg.init_std,
        )

    def hidden(self, token_ids: list[list[int]]) -> torch.Tensor:
        """[B, T_max, H] hidden states of right-padded rows, every row under this prefix."""
        bb, b = self.bb, len(token_ids)
        kv = prefix_kv(self.prefix(), bb.fingerprint).to(device=bb.device, dtype=bb.dtype)  # [L, 2, H, P, D]
        kv = kv.unsqueeze(2).expand(-1, -1, b, -1, -1, -1)  # [L, 2, B, H, P, D]
        return decoder_forward(bb, token_ids, kv, [kv.shape[4]] * b)

    def completion_logits(self, batch: list[Tokenised]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, vocab], targets [N]) for every completion token of the batch."""
        hidden = self.hidden([list(t.ids) for t in batch])
        rows, cols, targets = [], [], []
        for r, t in enumerate(batch):
            for pos in range(t.prompt_len, len(t.ids)):  # hidden at pos-1 predicts token pos
                rows.append(r)
                cols.append(pos - 1)
                targets.append(t.ids[pos])
        picked = hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]
        return lm_logits(self.bb, picked), torch.tensor(targets)

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: frozenset[int]) -> list[int]:
        """Greedy continuation by full recomputation (the trainer's own reference; the server caches K/V)."""
        ids, out = list(prompt_ids), []
        for _ in range(max_new_tokens):
            if len(ids) + self.prefix.embedding.num_embeddings >= self.bb.max_positions:
                break
            nxt = int(lm_logits(self.bb, self.hidden([ids])[:, -1]).argmax(-1))
            if nxt in eos_ids:
                break
            ids.append(nxt)
            out.append(nxt)
        return out

    def to_adapter(self) -> Adapter:
        tensors = {PREFIX_KEY: self.prefix.materialise()}
        config = AdapterConfig(
            task="generate",
            num_virtual_tokens=tensors[PREFIX_KEY].shape[0],
            backbone=self.bb.fingerprint,
            base_model_name_or_path=self.bb.name,
        )
        return Adapter(config, tensors)


def eos_ids(bb: Backbone) -> frozenset[int]:
    """The ids that end a generation, as the server's generation engine collects them."""
    eos = getattr(getattr(bb.model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, list) else [eos]
    return frozenset(x for x in [*eos, bb.tokenizer.eos_token_id] if x is not None)


def tokenise_pairs(
    bb: Backbone, pairs: list[Pair], num_virtual_tokens: int, max_length: int | None
) -> list[Tokenised]:
    tok, room = bb.tokenizer, bb.max_positions - num_virtual_tokens
    room = min(room, max_length) if max_length else room
    eos = tok.eos_token_id
    out = []
    for i, pair in enumerate(pairs):
        prompt = tok(pair.prompt)["input_ids"]
        completion = tok(pair.completion, add_special_tokens=False)["input_ids"] + (
            [eos] if eos is not None else []
        )
        if len(prompt) + 1 > room:
            raise DataError(
                f"example {i}: the prompt has {len(prompt)} tokens; at most {room - 1} fit beside "
                f"{num_virtual_tokens} virtual tokens"
            )
        ids = (prompt + completion)[:room]
        out.append(Tokenised(tuple(ids), len(prompt)))
    return out


def evaluate_lm(model: PrefixLM, data: list[Tokenised], batch_size: int) -> LMEval:
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            logits, targets = model.completion_logits(data[i : i + batch_size])
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += len(targets)
    return LMEval(loss=total / count, token_accuracy=correct / count)


def train_causal_lm(
    bb: Backbone,
    train: list[Pair],
    held_out: list[Pair] | None = None,
    cfg: TrainConfig = TrainConfig(),
    callbacks: Callbacks | None = None,
) -> LMTrainResult:
    """Train a prefix so the frozen decoder continues prompts with their completions (stops on eval loss)."""
    torch.manual_seed(cfg.seed)
    model = PrefixLM(bb, cfg).to(bb.device)  # trainable state next to the backbone
    items = tokenise_pairs(bb, train, cfg.virtual_tokens, cfg.max_length)
    eval_items = tokenise_pairs(bb, held_out, cfg.virtual_tokens, cfg.max_length) if held_out else []

    def batch_loss(batch: list[Tokenised]) -> torch.Tensor:
        logits, targets = model.completion_logits(batch)
        return F.cross_entropy(logits, targets)

    def run_eval() -> Evaluation:
        ev = evaluate_lm(model, eval_items, cfg.batch_size * 2)
        return Evaluation(loss=ev.loss, score=-ev.loss, metrics={"eval_token_accuracy": ev.token_accuracy})

    result = fit(
        model,
        [{"params": list(model.prefix.parameters()), "lr": cfg.prefix_lr}],
        items,
        batch_loss,
        run_eval if held_out else None,
        FitConfig(cfg.epochs, cfg.batch_size, cfg.seed, cfg.patience, cfg.warmup_ratio),
        callbacks,
    )
    final = None
    if held_out:
        final = evaluate_lm(model, eval_items, cfg.batch_size * 2)
        stop = eos_ids(bb)
        final.completion_ids = [
            model.greedy(list(t.ids[: t.prompt_len]), len(t.ids) - t.prompt_len, stop) for t in eval_items
        ]
        final.completions = [bb.tokenizer.decode(ids) for ids in final.completion_ids]
        final.exact_match = sum(c == p.completion for c, p in zip(final.completions, held_out)) / len(
            held_out
        )
    counts = {"prefix": sum(t.numel() for t in model.prefix.parameters()), "head": 0}
    counts["total"] = counts["prefix"]
    counts["served_prefix"] = cfg.virtual_tokens * bb.fingerprint.prefix_width
    return LMTrainResult(model.to_adapter(), cfg, result, final, counts)
