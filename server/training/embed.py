"""Embedding training: a prefix alone (no head), trained contrastively through the serving forward.

A batch's embeddings are computed exactly as the server computes them: the prefix's flat K/V go through
``ptserve.server.resident.prefix_kv`` and ``ptserve.server.engine.encoder_forward``, then the server's pooling
(``ptserve.server.pooling.mean_pool``: mean over real tokens, L2-normalised). The loss is in-batch negatives
(MultipleNegativesRankingLoss, the standard for MiniLM sentence embeddings): each query is scored against every
candidate of the batch (all positives and hard negatives, each distinct text once) by cosine / temperature, and
cross-entropy pulls it to its own positive. From labelled texts, a query's positive is another text of its label,
drawn anew each time, and candidates of its own label other than that positive are left out (they are not
negatives).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ptserve.adapters_store.format import PREFIX_KEY, Adapter, AdapterConfig
from ptserve.server.backbone import Backbone
from ptserve.server.engine import EMBEDDING, Engine, Row, encoder_forward
from ptserve.server.pooling import mean_pool
from ptserve.server.resident import prefix_kv
from ptserve.server.training.classify import tokenize
from ptserve.server.training.data import DataError, Example, TextPair
from ptserve.server.training.loop import Callbacks, Evaluation, FitConfig, FitResult, fit
from ptserve.server.training.prefix_encoder import PrefixEncoder
from ptserve.server.training.retrieval import RetrievalEval, evaluate_retrieval, retrieval_set


@dataclass
class EmbedConfig:
    """Hyper-parameters of ``ptserve train --task embed`` (defaults: benchmarks/RESULTS.md, help-desk data)."""

    virtual_tokens: int = 16
    prefix_projection: bool = False
    projection_hidden: int = 512
    lr: float | None = None  # None = 1e-2 plain, 1e-3 projected (as for classification)
    epochs: int = 15
    batch_size: int = 16  # queries per step (each sees the batch's other positives as negatives)
    seed: int = 0
    patience: int = 4
    warmup_ratio: float = 0.1
    temperature: float = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scale 20
    # As for classification (PEFT, THUDM). Measured on the help-desk data: an untrained N(0, 1) prefix retrieves
    # as well as the bare backbone (MRR 0.838 vs 0.839), a near-zero one worse (0.812: it dilutes attention).
    init_std: float = 1.0
    max_length: int | None = None

    @property
    def prefix_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.prefix_projection else 1e-2)


@dataclass
class EmbedTrainResult:
    adapter: Adapter  # task embed: the materialised prefix K/V, no head
    config: EmbedConfig
    fit: FitResult
    eval: RetrievalEval | None  # of the returned adapter (the best epoch) on the evaluation data
    baseline: RetrievalEval | None  # the bare backbone on the same evaluation data
    trainable_parameters: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict:
        """What ``training.json`` holds."""
        from ptserve.server.training.outputs import history_record

        return {
            "task": "embed",
            "config": asdict(self.config),
            "backbone": self.adapter.config.backbone.to_dict(),
            "base_model_name_or_path": self.adapter.config.base_model_name_or_path,
            "trainable_parameters": self.trainable_parameters,
            **history_record(self.fit),
            "eval": None if self.eval is None else asdict(self.eval),
            "baseline_eval": None if self.baseline is None else asdict(self.baseline),
        }


class PrefixEmbedder(nn.Module):
    """A prefix over a frozen encoder (not a submodule: it has no trainable state here); rows -> embeddings."""

    def __init__(self, bb: Backbone, cfg: EmbedConfig):
        super().__init__()
        if bb.family.causal:
            raise ValueError(f"backbone {bb.name!r} ({bb.fingerprint.model_type}) is a decoder: embeddings need an encoder")
        self.bb, fp = bb, bb.fingerprint
        projection = cfg.projection_hidden if cfg.prefix_projection else None
        self.prefix = PrefixEncoder(cfg.virtual_tokens, fp.prefix_width, fp.hidden_size, projection, cfg.init_std)

    def forward(self, token_ids: list[tuple[int, ...]]) -> torch.Tensor:
        """Embeddings [B, H] float32 of unit norm, every row under this prefix (as served)."""
        bb, b = self.bb, len(token_ids)
        kv = prefix_kv(self.prefix(), bb.fingerprint).to(device=bb.device, dtype=bb.dtype)  # [L, 2, H, P, D]
        kv = kv.unsqueeze(2).expand(-1, -1, b, -1, -1, -1)  # [L, 2, B, H, P, D]
        hidden, _ = encoder_forward(bb, token_ids, kv, [kv.shape[4]] * b)
        return mean_pool(hidden, [len(t) for t in token_ids])

    def to_adapter(self) -> Adapter:
        prefix = self.prefix.materialise()
        config = AdapterConfig(task="embed", num_virtual_tokens=prefix.shape[0], backbone=self.bb.fingerprint,
                               base_model_name_or_path=self.bb.name)
        return Adapter(config, {PREFIX_KEY: prefix})


def contrastive_loss(
    queries: torch.Tensor,  # [B, H] unit vectors
    candidates: torch.Tensor,  # [C, H] unit vectors
    targets: torch.Tensor,  # [B] index of each query's positive among the candidates
    exclude: torch.Tensor | None,  # [B, C] bool: candidates that are neither the positive nor a negative
    temperature: float,
) -> torch.Tensor:
    scores = queries @ candidates.T / temperature  # [B, C]
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(scores, targets)


@dataclass(frozen=True)
class ContrastiveBatch:
    queries: list[str]
    candidates: list[str]  # distinct texts
    targets: list[int]
    exclude: list[list[bool]] | None


def pairs_batch(pairs: list[TextPair]) -> ContrastiveBatch:
    """Candidates: every distinct positive and negative text of the batch (a text repeated is one candidate)."""
    candidates = list(dict.fromkeys([p.positive for p in pairs] + [p.negative for p in pairs if p.negative]))
    index = {text: i for i, text in enumerate(candidates)}
    return ContrastiveBatch([p.query for p in pairs], candidates, [index[p.positive] for p in pairs], None)


def labelled_batch(anchors: list[Example], by_label: dict[str, list[Example]], rng: random.Random) -> ContrastiveBatch:
    """Each anchor's positive: another text of its label; same-label candidates besides it are excluded."""
    positives = [rng.choice([e for e in by_label[a.label] if e is not a]) for a in anchors]
    candidates = list(dict.fromkeys(p.text for p in positives))
    label_of = {p.text: p.label for p in positives}
    index = {text: i for i, text in enumerate(candidates)}
    targets = [index[p.text] for p in positives]
    exclude = [[label_of[c] == a.label and j != t for j, c in enumerate(candidates)] for a, t in zip(anchors, targets)]
    return ContrastiveBatch([a.text for a in anchors], candidates, targets, exclude)


def train_embedder(
    bb: Backbone,
    train: list[TextPair] | list[Example],
    held_out: list[TextPair] | list[Example] | None = None,
    cfg: EmbedConfig = EmbedConfig(),
    callbacks: Callbacks | None = None,
) -> EmbedTrainResult:
    """Train an embedding prefix on pairs or labelled texts, early-stopping on held-out MRR."""
    torch.manual_seed(cfg.seed)
    model = PrefixEmbedder(bb, cfg).to(bb.device)
    make_batch, items = _batches(train, cfg.seed)
    p = cfg.virtual_tokens
    rs = retrieval_set(held_out) if held_out else None

    def embed(texts: list[str]) -> torch.Tensor:
        ids, n = tokenize(bb, texts, p, cfg.max_length), cfg.batch_size * 2
        return torch.cat([model(ids[i:i + n]).cpu() for i in range(0, len(ids), n)])

    def batch_loss(batch: list) -> torch.Tensor:
        b = make_batch(batch)
        vectors = model(tokenize(bb, b.queries + b.candidates, p, cfg.max_length))
        q, c = vectors[: len(b.queries)], vectors[len(b.queries):]
        exclude = torch.tensor(b.exclude, device=q.device) if b.exclude is not None else None
        return contrastive_loss(q, c, torch.tensor(b.targets, device=q.device), exclude, cfg.temperature)

    def run_eval() -> Evaluation:
        ev = evaluate_retrieval(embed, rs, cfg.temperature)
        return Evaluation(loss=ev.loss, score=ev.mrr, metrics={"eval_recall_at_1": ev.recall_at_1, "eval_mrr": ev.mrr})

    result = fit(model, [{"params": list(model.prefix.parameters()), "lr": cfg.prefix_lr}], items, batch_loss,
                 run_eval if rs else None,
                 FitConfig(cfg.epochs, cfg.batch_size, cfg.seed, cfg.patience, cfg.warmup_ratio), callbacks)
    with torch.no_grad():
        final = evaluate_retrieval(embed, rs, cfg.temperature) if rs else None
        baseline = evaluate_retrieval(_served_bare(bb, cfg), rs, cfg.temperature) if rs else None
    counts = {"prefix": sum(t.numel() for t in model.prefix.parameters()),
              "served_prefix": p * bb.fingerprint.prefix_width}
    return EmbedTrainResult(model.to_adapter(), cfg, result, final, baseline, counts)


def _batches(train: list[TextPair] | list[Example], seed: int):
    """(items -> ContrastiveBatch, the training items)."""
    if not train:
        raise DataError("no training data")
    if isinstance(train[0], TextPair):
        return pairs_batch, train
    by_label: dict[str, list[Example]] = {}
    for e in train:
        by_label.setdefault(e.label, []).append(e)
    anchors = [e for e in train if len(by_label[e.label]) > 1]  # a text alone in its label has no positive
    if len({e.label for e in anchors}) < 2:
        raise DataError("labelled training data needs at least 2 labels with 2+ texts each (same label = positive)")
    rng = random.Random(seed)
    return (lambda batch: labelled_batch(batch, by_label, rng)), anchors


def _served_bare(bb: Backbone, cfg: EmbedConfig):
    """texts -> the bare backbone's embeddings as the server answers them (``Engine.bare``), for the baseline."""
    engine, n = Engine(bb), cfg.batch_size * 2

    def embed(texts: list[str]) -> torch.Tensor:
        rows = [Row(engine.bare, ids, EMBEDDING) for ids in tokenize(bb, texts, 0, cfg.max_length)]
        return torch.cat([torch.stack(engine.run(rows[i:i + n])[0]) for i in range(0, len(rows), n)])

    return embed
