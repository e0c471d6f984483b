"""Small builders shared by the tests: random adapters for a backbone, tiny backbones from configs, servers."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from ptserve.adapters_store.fingerprint import BackboneFingerprint
from ptserve.adapters_store.format import Adapter, AdapterConfig, encode_blob
from ptserve.adapters_store.heads import head_shapes

MINILM_LABELS = ("negative", "neutral", "positive")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def make_adapter(
    fp: BackboneFingerprint, num_virtual_tokens: int, seed: int = 0, labels=MINILM_LABELS,
    head: str | None = "pooler_linear", task: str = "classify", scale: float = 1.0,
) -> Adapter:
    """A random adapter with the geometry of ``fp`` (prefix values ~ N(0, scale))."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"prompt_embeddings": torch.randn(num_virtual_tokens, fp.prefix_width, generator=g) * scale}
    if task == "classify":
        for name, shape in head_shapes(head, len(labels), fp.hidden_size).items():
            tensors[name] = torch.randn(*shape, generator=g) * 0.2
    else:
        labels, head = (), None
    cfg = AdapterConfig(task=task, num_virtual_tokens=num_virtual_tokens, backbone=fp, labels=tuple(labels), head=head)
    return Adapter(cfg, tensors)


def make_blob(fp: BackboneFingerprint, num_virtual_tokens: int, seed: int = 0, **kw) -> bytes:
    return encode_blob(make_adapter(fp, num_virtual_tokens, seed, **kw))


def save_tiny_encoder(model_type: str, out: Path, tokenizer_from: str, seed: int = 0) -> Path:
    """A tiny random BERT or RoBERTa saved as an HF folder (tokenizer copied from ``tokenizer_from``)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    tok = AutoTokenizer.from_pretrained(tokenizer_from, local_files_only=True)
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    if model_type == "bert":
        model = BertModel(BertConfig(**common))
    elif model_type == "roberta":
        model = RobertaModel(RobertaConfig(**{**common, "max_position_embeddings": 130}, pad_token_id=tok.pad_token_id))
    else:
        raise ValueError(model_type)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Test servers compute in float32 with a fixed planner, so their answers can be compared with float32 references
# to 1e-5 and their passes do not depend on a start-up measurement; the defaults (dtype and pass cost chosen at
# start-up) are tested on their own (tests/server/test_hardware_defaults.py). A test's env overrides these.
FIXED_SERVER_SETTINGS = {"PTSERVE_THREADS": "2", "PTSERVE_DTYPE": "float32", "PTSERVE_BATCH_OVERHEAD_TOKENS": "64",
                         "PTSERVE_API_WORKERS": "0"}
# How the suites that run against both servers (the ``server_modes`` fixture, tests/conftest.py) start this one:
# empty = in process; else an engine core process and API workers. Applied after the fixed settings, before a
# test's own env.
SERVER_MODE: dict[str, str] = {}


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path  # the server's stdout and stderr (JSON log lines)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()


@contextmanager
def server_process(env: dict[str, str], timeout: float = 120.0):
    """``ptserve serve`` in a subprocess on a free loopback port; yields a ``ServerProcess`` once /readyz is 200
    (the test may signal ``proc`` itself; whatever still runs at the end is terminated)."""
    port = free_port()
    full_env = {**os.environ, "PTSERVE_HOST": "127.0.0.1", "PTSERVE_PORT": str(port), **FIXED_SERVER_SETTINGS,
                **SERVER_MODE, **env}
    exe = shutil.which("ptserve", path=str(Path(sys.executable).parent)) or "ptserve"
    log_file = tempfile.NamedTemporaryFile(prefix="ptserve-", suffix=".log", delete=False)
    log_path = Path(log_file.name)
    proc = subprocess.Popen([exe, "serve"], env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log_path.read_text(errors='replace')}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become ready")
            time.sleep(0.2)
        yield ServerProcess(url, proc, log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_path.unlink(missing_ok=True)


@contextmanager
def running_server(env: dict[str, str], timeout: float = 120.0):
    """``ptserve serve`` in a subprocess on a free loopback port; yields its base URL once /readyz is 200."""
    with server_process(env, timeout) as server:
        yield server.url


DECODER_CORPUS = [
    "the quick brown fox jumps over the lazy dog", "hello world this is a tiny corpus for a tiny tokenizer",
    "prefix tuning adds virtual tokens to every layer", "many tenants share one frozen backbone",
    "continuous batching lets requests join and leave at token boundaries",
]


CHAT_TEMPLATE = (  # a small chat template of the kind hub models carry (ChatML-like, plain text markers)
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def save_tiny_decoder(kind: str, out: Path, seed: int = 0, initializer_range: float = 0.2,
                      max_positions: int = 256, chat_template: str | None = None) -> Path:
    """A tiny random GPT-2, Llama (grouped-query attention) or Qwen2 with a byte-level BPE tokenizer trained here
    (with ``chat_template`` set on the tokenizer when given).

    Weights are drawn with std ``initializer_range`` = 0.2, not HF's 0.02: with 0.02 the random model's logits are
    nearly flat, greedy output repeats one token and barely depends on the prefix (GPT-2: 6 of 7 test jobs
    repeated one token, 4 of 7 gave the same tokens under a near-zero prefix), so tests comparing tokens proved
    little. With 0.2 no job of the generation tests repeats one token or matches another prefix's output
    (``test_engine.py`` asserts it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              Qwen2Config, Qwen2ForCausalLM)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(DECODER_CORPUS * 10, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    if chat_template is not None:
        tok.chat_template = chat_template
    eos, vocab = tok.eos_token_id, len(tok)
    special = dict(eos_token_id=eos, bos_token_id=eos, pad_token_id=eos, initializer_range=initializer_range)
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4,
                                           n_positions=max_positions, **special))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=max_positions, **special))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=max_positions, **special))
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def never_ending(folder: Path) -> Path:
    """Make EOS an id past the model's vocabulary: the model can never choose it, so a generation runs until its
    max_new_tokens or until its client leaves."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"eos_token": "<|never|>"})
    tok.save_pretrained(folder)
    for config in (AutoConfig.from_pretrained(folder), GenerationConfig.from_pretrained(folder)):
        config.eos_token_id = tok.eos_token_id
        config.save_pretrained(folder)
    return folder


def real_texts() -> list[str]:
    """The project's own review sentences (360), then sentences of Python's own documentation as the interpreter
    ships it (``pydoc_data``: written by people, far from the reviews' domain), when the stdlib has it."""
    from ptserve.server.training.data import load_examples

    texts = [e.text for e in load_examples(EXAMPLES / "sentiment" / "reviews.csv")]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the reviews alone are still a few hundred
        return texts
    prose = " ".join(topics[k] for k in sorted(topics))
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+", prose))
    return texts + sorted({s for s in sentences if 40 <= len(s) <= 200 and "\n" not in s and s[0].isupper()})


def peft_prefix_lm(model_path: str, adapter: Adapter):
    """PEFT's own CAUSAL_LM prefix-tuning model for ``adapter`` (eager attention, eval): the numerical reference
    for generation. Its forward is right on transformers 5.x; its ``generate`` is not (docs/design.md)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    peft = get_peft_model(base, PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapter.config.num_virtual_tokens)).eval()
    set_peft_model_state_dict(peft, {"prompt_embeddings": adapter.prompt_embeddings})
    return peft


def peft_greedy(peft, ids: list[int], max_new: int, eos_ids=()) -> list[int]:
    """Greedy tokens by a loop over PEFT's forward (stops after an EOS, which it does not return)."""
    out, x = [], torch.tensor([ids])
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(peft(input_ids=x).logits[0, -1].argmax())
            if nxt in eos_ids:
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out
