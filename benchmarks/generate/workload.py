"""The workload every scenario shares: a random Llama (GQA) with a BPE tokenizer trained here, random CAUSAL_LM
prefixes, prompts of random words, and the jobs (prompt, adapter) that systems run. Nothing is downloaded."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ptserve.adapters_store.format import Adapter, AdapterConfig
from ptserve.server.backbone import Backbone

VIRTUAL_TOKENS = 16
LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048)
VOCAB = 2048


@dataclass(frozen=True)
class Job:
    prompt: list[int]
    adapter: int  # index into the adapters


@dataclass
class Setup:
    folder: Path
    bb: Backbone
    adapters: list[Adapter]
    prompts: list[list[int]]
    peft_model: torch.nn.Module


def words(seed: int = 0, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    return ["".join(rng.choice(letters[: rng.randint(8, 26)]) for _ in range(rng.randint(1, 9)))
            for _ in range(n)]


def save_llama(out: Path, seed: int = 0) -> Path:
    """A random Llama (GQA) with a byte-level BPE tokenizer trained on a generated corpus, as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng, vocab_words = random.Random(seed), words(seed)
    corpus = [" ".join(rng.choice(vocab_words) for _ in range(30)) for _ in range(2000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    eos = tok.eos_token_id
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, **LLAMA)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapter(fp, seed: int) -> Adapter:
    """A random CAUSAL_LM prefix (values ~ N(0, 1)) in PEFT's flat layout."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"prompt_embeddings": torch.randn(VIRTUAL_TOKENS, fp.prefix_width, generator=g)}
    return Adapter(AdapterConfig("generate", VIRTUAL_TOKENS, fp, (), head=None), tensors)


def make_prompts(tokenizer, n: int, seed: int = 1) -> list[list[int]]:
    """n prompts of 4-12 random words (about 5-35 tokens), as token ids."""
    rng, vocab_words = random.Random(seed), words()
    return [tokenizer(" ".join(rng.choice(vocab_words) for _ in range(rng.randint(4, 12))))["input_ids"]
            for _ in range(n)]
