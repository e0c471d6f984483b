"""Classification training: a prefix and a head on the frozen backbone, through the serving forward.

The logits of a batch are computed exactly as the server computes them: the prefix's flat K/V go through
``ptserve.server.resident.prefix_kv`` and ``ptserve.server.engine.encoder_forward`` (the one prefixed forward), then the head
function ``ptserve.server.heads.HEADS[kind]``. Only the prefix (and its projection MLP) and the head get gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ptserve.adapters_store.format import PREFIX_KEY, Adapter, AdapterConfig
from ptserve.adapters_store.heads import MEAN_HEAD, head_shapes, served_heads
from ptserve.server.backbone import Backbone, trained_for_mean_pooling
from ptserve.server.engine import encoder_forward
from ptserve.server.hardware import pick_dtype
from ptserve.server.heads import HEADS
from ptserve.server.pooling import mean_states
from ptserve.server.resident import prefix_kv
from ptserve.server.training.attention_dtype import AttentionChoice, attention_dtype_for
from ptserve.server.training.data import Example, label_set
from ptserve.server.training.loop import Callbacks, Evaluation, FitConfig, FitResult, fit
from ptserve.server.training.prefix_encoder import PrefixEncoder
from ptserve.server.training.prefix_init import PREFIX_INITS, token_kv


@dataclass
class TrainConfig:
    """Hyper-parameters of ``ptserve train`` (defaults reach ~90% on examples/sentiment in well under a minute
    on 2 CPU cores; see benchmarks/RESULTS.md)."""

    virtual_tokens: int = 16
    prefix_projection: bool = False
    projection_hidden: int = 512
    lr: float | None = None  # the prefix; None = 1e-2 plain (P-Tuning v2 uses 5e-3 .. 1e-2), 1e-3 projected
    head_lr: float | None = None  # the head; None = lr
    epochs: int = 8  # at most; early stopping on the dev split usually ends sooner (issue 14)
    batch_size: int = 16
    seed: int = 0
    patience: int = 3
    warmup_ratio: float = 0.1  # linear warm-up over this share of all steps, then linear decay to 0
    weight_decay: float = 0.0  # AdamW's, on the prefix and the head
    dropout: float = 0.1  # on the head's input, training only (inference has none)
    prefix_dropout: float = 0.0  # on the prefix K/V while training (P-Tuning v2's prefix dropout); none served
    head: str | None = None  # head kind: None = the backbone's default (``default_head``), or "mean_linear"
    autocast: str = "auto"  # bf16 autocast of the forward: "auto" (where bf16 is fast: ``autocast_bf16``), on, off
    init_std: float = 1.0  # of the prefix embedding (PEFT and THUDM use nn.Embedding's default, 1.0)
    prefix_init: str = "random"  # "random" (N(0, init_std)) or "tokens": real tokens' K/V (``prefix_init``)
    probe_start: bool = False  # fit the head alone on the starting prefix's features first (LP-FT)
    max_length: int | None = None  # tokens per text incl. special tokens; None = what fits beside the prefix

    @property
    def prefix_lr(self) -> float:
        # The MLP multiplies the effective step on the K/V; 1e-2 through it diverges on small data.
        return self.lr if self.lr is not None else (1e-3 if self.prefix_projection else 1e-2)


@dataclass
class ClassifyEval:
    accuracy: float
    loss: float
    predictions: list[str]  # one label per evaluation example
    logits: torch.Tensor  # [N, C] float32


@dataclass
class TrainResult:
    adapter: Adapter  # materialised: plain prefix K/V + head, labels, backbone fingerprint
    labels: list[str]
    config: TrainConfig
    fit: FitResult
    eval: ClassifyEval | None  # of the returned adapter (the best epoch) on the evaluation data
    trainable_parameters: dict[str, int] = field(default_factory=dict)
    model: "PrefixClassifier | None" = None  # the trained module (best epoch), for scoring more data in process
    bf16: bool = False  # whether the forward ran under bf16 autocast
    attention: AttentionChoice | None = None  # the dtype attention ran in, and why (``attention_dtype``)

    def record(self) -> dict:
        """What ``training.json`` holds."""
        from ptserve.server.training.outputs import history_record

        return {
            "task": "classify",
            "config": asdict(self.config),
            "labels": self.labels,
            "backbone": self.adapter.config.backbone.to_dict(),
            "base_model_name_or_path": self.adapter.config.base_model_name_or_path,
            "trainable_parameters": self.trainable_parameters,
            "head": self.adapter.config.head,
            "autocast_bf16": self.bf16,
            "attention": self.attention.record() if self.attention else None,
            **history_record(self.fit),
            "eval": None
            if self.eval is None
            else {
                "accuracy": self.eval.accuracy,
                "loss": self.eval.loss,
                "predictions": self.eval.predictions,
            },
        }


class PrefixClassifier(nn.Module):
    """Prefix + head over a frozen backbone (not a submodule: it has no trainable state here)."""

    def __init__(self, bb: Backbone, num_labels: int, cfg: TrainConfig):
        super().__init__()
        if bb.family.head_kind is None:
            raise ValueError(
                f"backbone {bb.name!r} ({bb.fingerprint.model_type}) serves no classification head"
            )
        self.bb, self.kind = bb, cfg.head or default_head(bb)
        if cfg.prefix_init not in PREFIX_INITS:
            raise ValueError(f"prefix_init {cfg.prefix_init!r} is not one of {', '.join(PREFIX_INITS)}")
        if self.kind not in served_heads(bb.family.head_kind):
            raise ValueError(f"head {self.kind!r} does not fit backbone {bb.name!r}; it serves "
                             + ", ".join(map(repr, served_heads(bb.family.head_kind))))
        fp = bb.fingerprint
        self.prefix = PrefixEncoder(
            cfg.virtual_tokens,
            fp.prefix_width,
            fp.hidden_size,
            cfg.projection_hidden if cfg.prefix_projection else None,
            cfg.init_std,
        )
        self.head = nn.ParameterDict()
        for name, shape in head_shapes(self.kind, num_labels, fp.hidden_size).items():
            # HF's initialisation for classifier layers: N(0, 0.02) weights, zero biases.
            init = torch.randn(*shape) * 0.02 if name.endswith("weight") else torch.zeros(*shape)
            self.head[name.replace(".", "__")] = nn.Parameter(init)
        self.dropout = nn.Dropout(cfg.dropout)
        self.prefix_dropout = nn.Dropout(cfg.prefix_dropout)
        self.attention_dtype: torch.dtype | None = None  # None = the forward's own (``attention_dtype``)

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {name.replace("__", "."): p for name, p in self.head.items()}

    def forward(self, token_ids: list[tuple[int, ...]]) -> torch.Tensor:
        """Logits [B, C] float32 for B rows of token ids, every row under this prefix."""
        return self.apply_head(self.features(token_ids))

    def features(self, token_ids: list[tuple[int, ...]]) -> dict[str, torch.Tensor | None]:
        """What the head reads, float32 [B, H] each: ``first`` (first token's state), ``pooled`` (the backbone's
        pooler, if it has one), ``mean`` (mean of the real tokens' states; mean_linear heads only)."""
        bb, b = self.bb, len(token_ids)
        flat = self.prefix_dropout(self.prefix())  # [P, width]
        kv = prefix_kv(flat, bb.fingerprint).to(device=bb.device, dtype=bb.dtype)  # [L, 2, H, P, D]
        kv = kv.unsqueeze(2).expand(-1, -1, b, -1, -1, -1)  # [L, 2, B, H, P, D]
        hidden, pooled = encoder_forward(bb, token_ids, kv, [kv.shape[4]] * b, attention_dtype=self.attention_dtype)
        return {"first": hidden[:, 0].float(), "pooled": pooled.float() if pooled is not None else None,
                "mean": mean_states(hidden, [len(t) for t in token_ids]) if self.kind == MEAN_HEAD else None}

    def apply_head(self, features: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Logits [B, C] float32: dropout (training only) on the features, then the head."""
        x = {k: self.dropout(v) if v is not None else None for k, v in features.items()}
        head = {k: v.to(self.bb.device) for k, v in self.head_tensors().items()}
        return HEADS[self.kind](x["pooled"], x["first"], head, x["mean"]).float()

    def to_adapter(self, labels: list[str]) -> Adapter:
        fp = self.bb.fingerprint
        tensors = {PREFIX_KEY: self.prefix.materialise()}
        tensors.update({k: v.detach().float().cpu().contiguous() for k, v in self.head_tensors().items()})
        config = AdapterConfig(
            task="classify",
            num_virtual_tokens=tensors[PREFIX_KEY].shape[0],
            backbone=fp,
            labels=tuple(labels),
            head=self.kind,
            base_model_name_or_path=self.bb.name,
        )
        return Adapter(config, tensors)


# probe_start's stage: cheap (its epochs read cached features, no backbone pass); a linear probe's usual lr,
# whatever the prefix's (the bench's probe uses the same).
PROBE_EPOCHS, PROBE_PATIENCE, PROBE_LR = 50, 5, 1e-2


class _HeadOnly(nn.Module):
    """The head and its dropout, as one module for ``fit`` (the prefix stays as it is)."""

    def __init__(self, model: PrefixClassifier):
        super().__init__()
        self.head, self.dropout = model.head, model.dropout


def _fit_head_alone(
    model: PrefixClassifier,
    items: list[tuple[tuple[int, ...], int]],  # (token ids, label index) per training example
    held_out: tuple[list[tuple[int, ...]], list[int]] | None,
    cfg: TrainConfig,
    bf16: bool,
) -> FitResult:
    """LP-FT's first stage (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"): a linear probe on
    the features of the starting prefix, one frozen pass over the data, then many cheap epochs on those
    features with early stopping on the dev split. The prefix then starts training under a head that already
    reads its features, rather than under a random head whose first gradients push the prefix anywhere."""

    def features_of(ids: list[tuple[int, ...]]) -> dict[str, torch.Tensor | None]:
        model.eval()
        with torch.no_grad(), torch.autocast(model.bb.device.type, dtype=torch.bfloat16, enabled=bf16):
            parts = [model.features(ids[i : i + cfg.batch_size * 2]) for i in range(0, len(ids), cfg.batch_size * 2)]
        return {k: torch.cat([p[k] for p in parts]).float() if parts[0][k] is not None else None for k in parts[0]}

    x = features_of([ids for ids, _ in items])  # [N, H] each
    y = torch.tensor([label for _, label in items], device=model.bb.device)

    def pick(feats: dict[str, torch.Tensor | None], idx: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {k: v[idx] if v is not None else None for k, v in feats.items()}

    def batch_loss(batch: list[int]) -> torch.Tensor:
        idx = torch.tensor(batch, device=y.device)
        return F.cross_entropy(model.apply_head(pick(x, idx)), y[idx])

    run_eval = None
    if held_out is not None:
        x_dev, y_dev = features_of(held_out[0]), torch.tensor(held_out[1], device=y.device)

        def run_eval() -> Evaluation:
            logits = model.apply_head(x_dev)
            return Evaluation(float(F.cross_entropy(logits, y_dev)), float((logits.argmax(-1) == y_dev).float().mean()))

    head = _HeadOnly(model)
    return fit(head, [{"params": list(model.head.parameters()), "lr": PROBE_LR}],
               list(range(len(items))), batch_loss, run_eval,
               FitConfig(PROBE_EPOCHS, cfg.batch_size, cfg.seed, PROBE_PATIENCE, 0.0, cfg.weight_decay))


def autocast_bf16(setting: str, device: torch.device) -> bool:
    """Whether training runs its forward under bf16 autocast: "on", "off", or "auto" = where the serving rule
    (``ptserve.server.hardware.pick_dtype``) would pick bfloat16: GPUs with bf16, CPUs with AMX / AVX512-BF16.
    Elsewhere bf16 is emulated and slower than float32 (docs/design.md)."""
    if setting in ("on", "off"):
        return setting == "on"
    return pick_dtype("auto", device).dtype == "bfloat16"


def default_head(bb: Backbone) -> str:
    """The head ``ptserve train`` uses unless told: on a backbone trained for mean pooling (a sentence-transformers
    model such as MiniLM) the mean-pooled head, else the family's (PEFT's) head. Its pooler was never trained for
    MiniLM's task, the mean is what it was trained to produce (docs/design.md, issue 14)."""
    if bb.family.head_kind is not None and trained_for_mean_pooling(bb.path):
        return MEAN_HEAD
    return bb.family.head_kind


def tokenize(
    bb: Backbone, texts: list[str], num_virtual_tokens: int, max_length: int | None
) -> list[tuple[int, ...]]:
    """Token ids with special tokens, cut to what fits beside the prefix (the server's ``truncate=true``)."""
    room = bb.max_positions - num_virtual_tokens
    limit = min(room, max_length) if max_length else room
    ids = bb.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit)["input_ids"]
    return [tuple(r) for r in ids]


def evaluate(
    model: PrefixClassifier,
    token_ids: list[tuple[int, ...]],
    targets: list[int],
    labels: list[str],
    batch_size: int,
) -> ClassifyEval:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(token_ids[i : i + batch_size]).cpu() for i in range(0, len(token_ids), batch_size)]
        )
    model.train(was_training)
    y = torch.tensor(targets)
    pred = logits.argmax(-1)
    return ClassifyEval(
        accuracy=float((pred == y).float().mean()),
        loss=float(F.cross_entropy(logits, y)),
        predictions=[labels[i] for i in pred.tolist()],
        logits=logits,
    )


def train_classifier(
    bb: Backbone,
    train: list[Example],
    held_out: list[Example] | None = None,
    cfg: TrainConfig = TrainConfig(),
    callbacks: Callbacks | None = None,
    deadline: float | None = None,  # time.perf_counter() after which no further epoch starts (--search trials)
) -> TrainResult:
    """Train a prefix + head on ``train``, early-stopping on ``held_out``; the best epoch's adapter."""
    labels = label_set(train, held_out)
    index = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(cfg.seed)
    model = PrefixClassifier(bb, len(labels), cfg).to(bb.device)  # trainable state next to the backbone
    p = cfg.virtual_tokens
    train_ids = tokenize(bb, [e.text for e in train], p, cfg.max_length)
    if cfg.prefix_init == "tokens":
        model.prefix.start_from(token_kv(bb, train_ids, p, cfg.seed))
    items = list(zip(train_ids, [index[e.label] for e in train]))
    eval_ids = tokenize(bb, [e.text for e in held_out], p, cfg.max_length) if held_out else []
    eval_y = [index[e.label] for e in held_out or []]

    bf16 = autocast_bf16(cfg.autocast, bb.device)
    attention = attention_dtype_for(bb.fingerprint, bb.device, bf16, cfg.batch_size, max(map(len, train_ids)), p)
    model.attention_dtype = attention.dtype

    def batch_loss(batch: list[tuple[tuple[int, ...], int]]) -> torch.Tensor:
        ids, y = zip(*batch)
        with torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(list(ids))
        return F.cross_entropy(logits.float(), torch.tensor(y, device=bb.device))

    def run_eval() -> Evaluation:
        ev = evaluate(model, eval_ids, eval_y, labels, cfg.batch_size * 2)
        return Evaluation(loss=ev.loss, score=ev.accuracy, metrics={"eval_accuracy": ev.accuracy})

    if cfg.probe_start:
        _fit_head_alone(model, items, (eval_ids, eval_y) if held_out else None, cfg, bf16)
    groups = [
        {"params": list(model.prefix.parameters()), "lr": cfg.prefix_lr},
        {"params": list(model.head.parameters()), "lr": cfg.head_lr or cfg.prefix_lr},
    ]
    result = fit(
        model,
        groups,
        items,
        batch_loss,
        run_eval if held_out else None,
        # After a probe start the starting point is a trained model: it competes with the epochs on dev.
        FitConfig(cfg.epochs, cfg.batch_size, cfg.seed, cfg.patience, cfg.warmup_ratio, cfg.weight_decay,
                  deadline=deadline, evaluate_start=cfg.probe_start),
        callbacks,
    )
    counts = {
        "prefix": sum(t.numel() for t in model.prefix.parameters()),
        "head": sum(t.numel() for t in model.head.parameters()),
    }
    counts["total"] = counts["prefix"] + counts["head"]
    counts["served_prefix"] = p * bb.fingerprint.prefix_width  # after materialising a projection
    final = evaluate(model, eval_ids, eval_y, labels, cfg.batch_size * 2) if held_out else None
    return TrainResult(model.to_adapter(labels), labels, cfg, result, final, counts, model, bf16, attention)
