"""Everything that depends on the transformers version lives here (DESIGN: HF's APIs change often).

ptserve needs three things from transformers: an attention function hook (``AttentionInterface``), the matching
mask hook (``AttentionMaskInterface``; without it models pass ``attention_mask=None``), and ``from_pretrained``.
Supported: transformers 5.x (BERT-family models route attention through the interface from 5.0 on).
"""
from __future__ import annotations

from typing import Callable

import torch
import transformers
from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

TRANSFORMERS_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])
if TRANSFORMERS_VERSION < (5, 0):
    raise ImportError(f"ptserve needs transformers 5.x, found {transformers.__version__}")


def register_attention(name: str, fn: Callable) -> None:
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def load_config(path: str, local_only: bool) -> dict:
    return AutoConfig.from_pretrained(path, local_files_only=local_only).to_dict()


def load_model(
    path: str, attn_implementation: str, dtype: torch.dtype, local_only: bool, causal_lm: bool = False
) -> torch.nn.Module:
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    return auto.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=local_only)


def decoder_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base transformer returning hidden states, LM head) of an HF causal LM."""
    return model.base_model, model.get_output_embeddings()


def load_tokenizer(path: str, local_only: bool):
    return AutoTokenizer.from_pretrained(path, local_files_only=local_only)


def apply_chat_template(tokenizer, messages: list[dict], template: str | None) -> list[int]:
    """Token ids of ``messages`` rendered by ``template`` (None: the tokenizer's own), the assistant's turn
    opened (``add_generation_prompt``); tokenised without adding special tokens again, as transformers does."""
    return list(tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                              tokenize=True, return_dict=False))
