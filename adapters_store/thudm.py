"""THUDM P-tuning-v2 checkpoints -> ptserve adapters (offline import; the server never sees these files).

THUDM's ``PrefixEncoder`` (github.com/THUDM/P-tuning-v2, ``model/prefix_encoder.py``) holds either
    ``prefix_encoder.embedding.weight``  [P, layers * 2 * hidden]            (``prefix_projection=False``), or
    ``prefix_encoder.embedding.weight``  [P, hidden] and the MLP ``prefix_encoder.trans.{0,2}.{weight,bias}``
                                          (Embedding -> Linear -> Tanh -> Linear to layers * 2 * hidden);
the model views the output as ``[B, P, layers * 2, heads, head_dim]``: slot 2l = key of layer l, 2l+1 = value,
which is PEFT's flat ``prompt_embeddings`` layout (DESIGN decision 3). The projected variant is materialised
once here (``prefix_from_encoder``), so served adapters are always plain K/V. The trainer's PrefixEncoder runs
the same function on its parameters, so THUDM's formula is written once.

``*PrefixForSequenceClassification`` put a linear ``classifier`` on the backbone's pooled output. For BERT
that is ptserve's ``pooler_linear`` head as is; RoBERTa's pooler is dense + tanh on the first token, so there
the THUDM head becomes ptserve's ``cls_mlp`` with ``dense`` = the backbone's pooler and ``out_proj`` = the
classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from ptserve.adapters_store.errors import BackboneMismatch, InvalidAdapter
from ptserve.adapters_store.fingerprint import BackboneFingerprint
from ptserve.adapters_store.format import PREFIX_KEY, Adapter, AdapterConfig
from ptserve.adapters_store.validation import check_finite

EMBEDDING = "prefix_encoder.embedding.weight"
TRANS = (
    "prefix_encoder.trans.0.weight",
    "prefix_encoder.trans.0.bias",
    "prefix_encoder.trans.2.weight",
    "prefix_encoder.trans.2.bias",
)
CLASSIFIER = ("classifier.weight", "classifier.bias")
POOLER = ("pooler.dense.weight", "pooler.dense.bias")
_WANTED_SUFFIXES = (EMBEDDING, *TRANS, *CLASSIFIER, *POOLER)


def prefix_from_encoder(
    embedding: torch.Tensor,  # [P, width] (plain) or [P, hidden] (projected)
    trans: Mapping[str, torch.Tensor] | None = None,  # the TRANS tensors when the encoder has a projection
) -> torch.Tensor:
    """THUDM ``PrefixEncoder.forward`` for all P tokens: flat K/V [P, layers * 2 * kv_heads * head_dim].

    Differentiable: the trainer calls it on its parameters every step; the importer once, to materialise.
    """
    if not trans:
        return embedding
    w0, b0, w2, b2 = (trans[k] for k in TRANS)
    return F.linear(torch.tanh(F.linear(embedding, w0, b0)), w2, b2)


def select_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors the import needs, keyed by their canonical names (module prefixes such as ``bert.``,
    ``roberta.``, ``module.`` or ``transformer.`` stripped); everything else (the frozen backbone) is
    ignored."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state.items():
        for suffix in _WANTED_SUFFIXES:
            if key == suffix or key.endswith("." + suffix):
                if suffix in found:
                    raise InvalidAdapter(
                        f"checkpoint has two tensors for {suffix!r}: {found[suffix][0]!r}, {key!r}"
                    )
                found[suffix] = (key, value)
    return {suffix: value for suffix, (_, value) in found.items()}


def thudm_to_adapter(
    state: Mapping[str, torch.Tensor],
    fp: BackboneFingerprint,
    head_kind: str | None,
    labels: list[str] | None = None,
    base_model_name_or_path: str = "",
    pooler: Mapping[str, torch.Tensor] | None = None,  # backbone pooler (POOLER names), for cls_mlp heads
) -> Adapter:
    """Build a ptserve adapter from a THUDM P-tuning-v2 state dict (a ``classify`` adapter when it carries a
    classifier, else a ``generate`` one). Raises ``InvalidAdapter`` / ``BackboneMismatch`` with the reason."""
    tensors = select_tensors(state)
    if EMBEDDING not in tensors:
        raise InvalidAdapter(f"checkpoint has no {EMBEDDING!r}: not a P-tuning-v2 prefix encoder")
    present = [k for k in TRANS if k in tensors]
    if present and len(present) != len(TRANS):
        raise InvalidAdapter(f"projected prefix encoder is incomplete: has {present}, needs {list(TRANS)}")
    with torch.no_grad():
        flat = prefix_from_encoder(
            tensors[EMBEDDING].float(), {k: tensors[k].float() for k in present} or None
        )
    if flat.dim() != 2 or flat.shape[1] != fp.prefix_width:
        raise BackboneMismatch(
            f"prefix width {list(flat.shape)[1:]} does not fit the backbone: it needs "
            "layers*2*kv_heads*head_dim = "
            f"{fp.num_layers}*2*{fp.num_kv_heads}*{fp.head_dim} = {fp.prefix_width}"
        )
    out = {PREFIX_KEY: flat.contiguous()}
    task, head = "generate", None
    if CLASSIFIER[0] in tensors:
        task, head = "classify", head_kind
        out.update(_head_tensors(tensors, head_kind, pooler))
        num_labels = out.get("classifier.weight", out.get("classifier.out_proj.weight")).shape[0]
        labels = list(labels) if labels else [f"LABEL_{i}" for i in range(num_labels)]
        if len(labels) != num_labels:
            raise InvalidAdapter(f"{len(labels)} labels given, the classifier has {num_labels} outputs")
    check_finite(out)
    config = AdapterConfig(
        task=task,
        num_virtual_tokens=int(flat.shape[0]),
        backbone=fp,
        labels=tuple(labels or ()) if task == "classify" else (),
        head=head,
        base_model_name_or_path=base_model_name_or_path,
    )
    return Adapter(config, out)


def _head_tensors(
    tensors: dict[str, torch.Tensor], head_kind: str | None, pooler: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    weight, bias = (tensors[k].float() for k in CLASSIFIER)
    if head_kind == "pooler_linear":
        return {"classifier.weight": weight, "classifier.bias": bias}
    if head_kind == "cls_mlp":  # classifier(tanh(pooler.dense(first))) == cls_mlp with dense = the pooler
        source = {k: tensors[k] for k in POOLER if k in tensors} or dict(pooler or {})
        if set(source) != set(POOLER):
            raise InvalidAdapter(
                "this backbone's head needs the pooler weights (pooler.dense.*): the checkpoint has none "
                "and the "
                "backbone provided none"
            )
        return {
            "classifier.dense.weight": source[POOLER[0]].float(),
            "classifier.dense.bias": source[POOLER[1]].float(),
            "classifier.out_proj.weight": weight,
            "classifier.out_proj.bias": bias,
        }
    raise InvalidAdapter(
        f"backbone serves no classification head for a THUDM classifier (head kind {head_kind!r})"
    )


# --- files --------------------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin")


def read_checkpoint(
    path: str | Path, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(the needed tensors, labels from ``config.json``'s id2label if any) of a THUDM checkpoint file or
    folder.

    safetensors is read lazily (only the prefix/head tensors). ``.bin``/``.pt`` files are pickles: read only
    when ``allow_pickle`` (with ``torch.load(weights_only=True)``, the restricted loader), on the user's own
    machine.
    """
    path = Path(path)
    labels = None
    if path.is_dir():
        labels = _labels_from_config(path / "config.json")
        candidates = [path / name for name in _WEIGHT_FILES if (path / name).exists()]
        if not candidates:
            raise InvalidAdapter(f"{path} holds none of {list(_WEIGHT_FILES)}")
        path = candidates[0]
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if _wanted(k)}, labels
    if not allow_pickle:
        raise InvalidAdapter(
            f"{path.name} is a pickle (torch.save) file; pass --allow-pickle to read it with "
            "torch.load(weights_only="
            "True) if you trust it, or convert it to safetensors first"
        )
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise InvalidAdapter(f"{path.name} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and _wanted(k)}, labels


def _wanted(key: str) -> bool:
    return any(key == s or key.endswith("." + s) for s in _WANTED_SUFFIXES)


def _labels_from_config(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    id2label = json.loads(path.read_text()).get("id2label") or {}
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)] or None
    except (ValueError, TypeError):
        return None
