"""Classification head kinds: which tensors an adapter's head carries, by backbone family.

A head is applied to the backbone's output after the prefixed forward pass (``server/heads.py`` runs them);
this module only names the tensors and their shapes, so validation can check an upload before it is loaded.
"""
from __future__ import annotations

# head kind -> tensor name -> shape, with C = number of labels and H = hidden size
HEAD_SHAPES: dict[str, dict[str, tuple[str, ...]]] = {
    # BERT / MiniLM (PEFT SEQ_CLS, THUDM): the backbone's frozen pooler (dense + tanh on [CLS]), then a linear layer.
    "pooler_linear": {"classifier.weight": ("C", "H"), "classifier.bias": ("C",)},
    # RoBERTa family: dense + tanh + out_proj on the first token, all trained (RobertaClassificationHead).
    "cls_mlp": {
        "classifier.dense.weight": ("H", "H"),
        "classifier.dense.bias": ("H",),
        "classifier.out_proj.weight": ("C", "H"),
        "classifier.out_proj.bias": ("C",),
    },
    # Any encoder: a linear layer on the mean of the last hidden states of the real tokens ([CLS] and [SEP]
    # included, prefix slots never), the pooling MiniLM / sentence-transformers models are trained for. PEFT has
    # no such head: a PEFT export of it is refused (ptserve.adapters_store.peft_folder).
    "mean_linear": {"classifier.weight": ("C", "H"), "classifier.bias": ("C",)},
}

MEAN_HEAD = "mean_linear"

HEAD_FOR_MODEL_TYPE: dict[str, str] = {
    "bert": "pooler_linear",
    "roberta": "cls_mlp",
    "xlm-roberta": "cls_mlp",
    "camembert": "cls_mlp",
}


def head_kind_for(model_type: str) -> str | None:
    return HEAD_FOR_MODEL_TYPE.get(model_type)


def served_heads(family_head: str | None) -> tuple[str, ...]:
    """The head kinds a backbone serves: its family's head (PEFT's), and the mean-pooled head; none without one."""
    return () if family_head is None else (family_head, MEAN_HEAD)


def head_shapes(kind: str, num_labels: int, hidden: int) -> dict[str, tuple[int, ...]]:
    dims = {"C": num_labels, "H": hidden}
    return {name: tuple(dims[d] for d in shape) for name, shape in HEAD_SHAPES[kind].items()}
