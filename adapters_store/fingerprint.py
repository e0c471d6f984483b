"""Backbone fingerprint: the geometry a prefix was trained for, and a hash of the architecture config.

An adapter records the fingerprint of its backbone; the server refuses an adapter whose fingerprint differs
from the loaded backbone and names the fields that differ (DESIGN decision 4).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

# Config keys that do not change what a prefix means (bookkeeping, labels, dtype, dropout).
_VOLATILE_KEYS = {
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype", "id2label", "label2id",
    "num_labels", "problem_type", "finetuning_task", "use_cache", "attn_implementation", "_attn_implementation",
    "gradient_checkpointing", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attention_dropout",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "tie_word_embeddings", "pruned_heads",
    "chunk_size_feed_forward", "tokenizer_class", "task_specific_params", "_commit_hash", "model_type",
}


@dataclass(frozen=True)
class BackboneFingerprint:
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int
    config_hash: str

    @property
    def token_dim(self) -> int:
        """Width of one layer's key (or value) for one token: kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def prefix_width(self) -> int:
        """Width of one virtual token in PEFT's flat layout: layers * 2 * kv_heads * head_dim."""
        return self.num_layers * 2 * self.token_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> "BackboneFingerprint":
        """From ``to_dict``'s output (read from an upload: every field's type is checked; ValueError if wrong)."""
        if not isinstance(data, dict):
            raise ValueError(f"fingerprint must be an object, got {type(data).__name__}")
        types = {f.name: f.type for f in fields(cls)}
        missing = set(types) - set(data)
        if missing:
            raise ValueError(f"fingerprint lacks {sorted(missing)}")
        for name, kind in types.items():
            value = data[name]
            if kind == "str" and not isinstance(value, str):
                raise ValueError(f"fingerprint field {name!r} must be a string")
            if kind == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"fingerprint field {name!r} must be an integer >= 0")
        return cls(**{k: data[k] for k in types})

    def differences(self, other: "BackboneFingerprint") -> list[str]:
        """Human-readable list of fields where ``other`` (an adapter's) differs from ``self`` (the server's)."""
        return [
            f"{f.name}: adapter has {getattr(other, f.name)!r}, server has {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def geometry_differences(self, num_layers: int, token_dim: int, num_heads: int) -> list[str]:
        """For PEFT folders, which carry geometry but no fingerprint."""
        wanted = {"num_layers": self.num_layers, "token_dim": self.token_dim, "num_attention_heads": self.num_kv_heads}
        got = {"num_layers": num_layers, "token_dim": token_dim, "num_attention_heads": num_heads}
        return [f"{k}: adapter has {got[k]}, server has {wanted[k]}" for k in wanted if got[k] != wanted[k]]


def fingerprint_from_config(config: dict) -> BackboneFingerprint:
    """Fingerprint of an HF model config (as a dict, e.g. ``PretrainedConfig.to_dict()``)."""
    heads = config.get("num_attention_heads") or config.get("n_head") or config.get("n_heads")
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("dim")
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("n_layers")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    max_pos = config.get("max_position_embeddings") or config.get("n_positions") or 0
    relevant = {k: v for k, v in sorted(config.items()) if k not in _VOLATILE_KEYS}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return BackboneFingerprint(
        model_type=str(config.get("model_type", "")),
        num_layers=int(layers),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        max_positions=int(max_pos),
        config_hash=digest,
    )
