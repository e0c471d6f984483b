"""How PEFT runs the same workload, one request at a time, adapters switched by ``set_peft_model_state_dict``:
(c) PEFT ``generate`` (on transformers 5.24 it ignores the prefix), (c′) PEFT's forward in a greedy loop
without a cache, (c″) PEFT's prefix handed to HF ``generate`` as a pre-filled cache (PEFT ``generate`` as it
runs on transformers 4.57: the fair baseline)."""
from __future__ import annotations

import torch
from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM

from benchmarks.generate.workload import VIRTUAL_TOKENS, Job
from ptserve.adapters_store.format import Adapter


def load_peft(path: str) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", local_files_only=True)
    config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=VIRTUAL_TOKENS)
    return get_peft_model(base, config).eval()


def peft_generate(model, adapter: Adapter, prompt: list[int], tokens: int) -> list[int]:
    """(c) PEFT ``generate`` (on transformers 5.24 its output ignores the prefix)."""
    set_peft_model_state_dict(model, {"prompt_embeddings": adapter.prompt_embeddings})
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                         min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def peft_forward_loop(model, adapter: Adapter, prompt: list[int], tokens: int) -> list[int]:
    """(c′) PEFT's forward, greedy, no cache (PEFT's forward replaces any past_key_values with the prefix)."""
    set_peft_model_state_dict(model, {"prompt_embeddings": adapter.prompt_embeddings})
    ids, out = torch.tensor([prompt]), []
    for _ in range(tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def peft_prefix_cache_generate(model, adapter: Adapter, prompt: list[int], tokens: int) -> list[int]:
    """(c″) PEFT's prefix as HF's pre-filled cache, then HF ``generate`` on the base model: PEFT's
    ``generate`` as it runs on transformers 4.57 (the prefix is injected once; the request's cache grows)."""
    set_peft_model_state_dict(model, {"prompt_embeddings": adapter.prompt_embeddings})
    dev = next(model.parameters()).device  # the model's device (the dtype section runs it on --device)
    ids = torch.tensor([prompt], device=dev)
    cache = model.get_prompt(batch_size=1)  # a DynamicCache holding the virtual tokens of every layer
    mask = torch.ones(1, VIRTUAL_TOKENS + ids.shape[1], dtype=torch.long, device=dev)
    out = model.get_base_model().generate(
        input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=tokens, min_new_tokens=tokens,
        do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def run_peft(fn, model, adapters: list[Adapter], jobs: list[Job], tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        return [fn(model, adapters[j.adapter], j.prompt, tokens) for j in jobs]
