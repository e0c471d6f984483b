"""Generation in bfloat16 (what ``dtype=auto`` serves on CPUs with AMX/AVX512-BF16 and on CUDA), on the tiny random
GPT-2 / Llama (GQA) / Qwen2: prefill and decode run in bf16 with a bf16 KV cache, logits come from a float32 LM
head and sampling runs in float32, and a request's tokens (greedy or seeded sampling) are the same in a mixed
continuous batch as alone. The float32 tests beside this file (and PEFT, in float32) carry exactness."""
from __future__ import annotations

import pytest
import torch

from ptserve.server.backbone import load_backbone
from ptserve.server.generation.forward import FloatLMHead
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, save_tiny_decoder
from tests.server.generation.test_engine import JOBS, PREFIX_LENGTHS, PROMPTS, _engine, _greedy_without_eos, _run

BF16_FACTOR = 2.0  # ptserve's logits may differ from float32 by this many times HF's own bf16-vs-fp32 difference


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def decoders(request, tmp_path_factory):
    folder = save_tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))
    fp32 = load_backbone(str(folder), device="cpu", dtype="float32")
    bf16 = load_backbone(str(folder), device="cpu", dtype="bfloat16")
    adapters = [make_adapter(fp32.fingerprint, p, seed=p, task="generate") for p in PREFIX_LENGTHS]
    return fp32, bf16, adapters


def test_bf16_mixed_continuous_batch_equals_alone(decoders):
    _, bb, adapters = decoders
    mixed = _run(_greedy_without_eos(bb, adapters), adapters, JOBS)
    alone = [_run(_greedy_without_eos(bb, adapters), adapters, [job])[0] for job in JOBS]
    assert [len(t) for t in mixed] == [n for _, _, n in JOBS]
    assert mixed == alone


def test_bf16_seeded_sampling_is_reproducible_whatever_the_batch(decoders):
    _, bb, adapters = decoders
    sampled = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = _run(_engine(bb), adapters, [(1, 0, 10)], sampled)[0]
    crowd = _run(_engine(bb), adapters, [(0, 2, 7), (1, 0, 10), (3, 1, 4), (2, 3, 12)], sampled)
    assert crowd[1] == alone
    other = _run(_engine(bb), adapters, [(1, 0, 10)], SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=99))
    assert other[0] != alone  # the seed is really used


def _first_logits(engine, adapter, prompt: str) -> torch.Tensor:
    """Logits [vocab] of the prefill (the first token) and of one decode step, as the engine samples from."""
    resident = engine.make_resident(adapter, "t/a", 1)
    seq = engine.new_sequence(resident, prompt, SamplingParams(max_new_tokens=4, temperature=0))
    seen = []
    real = engine.lm_head.__call__
    engine.lm_head = lambda hidden: seen.append(real(hidden)) or seen[-1]  # record what sampling receives
    engine.add(seq)
    with torch.inference_mode():
        engine.step()  # prefill
        engine.step()  # one decode step
    return torch.cat(seen)  # [2, vocab]


def _hf_bf16_vs_fp32(fp32_bb, prompt: str) -> float:
    """HF's own difference between the bf16 and the fp32 model (no prefix, sdpa), last-token logits."""
    from transformers import AutoModelForCausalLM

    ids = fp32_bb.tokenizer([prompt], return_tensors="pt").input_ids
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(fp32_bb.path, attn_implementation="sdpa", dtype=dtype).eval()
        with torch.inference_mode():
            out.append(model(input_ids=ids).logits[0, -1].float())
    return float((out[0] - out[1]).abs().max())


def test_bf16_prefill_and_decode_give_float32_logits_close_to_float32(decoders):
    fp32, bf16, adapters = decoders
    eng32, eng16 = _engine(fp32), _engine(bf16)
    assert eng16.cache.k[0].dtype == torch.bfloat16  # the KV cache (prefix included) is bf16
    worst = 0.0
    for adapter, prompt in zip(adapters, PROMPTS):
        ref, got = _first_logits(eng32, adapter, prompt), _first_logits(eng16, adapter, prompt)
        assert got.dtype == torch.float32
        # from the float32 head: not every logit is a bf16 number, as a bf16 head's would be
        assert not torch.equal(got, got.bfloat16().float())
        worst = max(worst, float((got - ref).abs().max()))
    baseline = max(_hf_bf16_vs_fp32(fp32, p) for p in PROMPTS)
    assert worst <= BF16_FACTOR * baseline, f"bf16 logits off by {worst:.3g}; HF's own bf16 differs by {baseline:.3g}"


def test_float_lm_head_is_the_models_head_in_float32(decoders):
    fp32, bf16, _ = decoders
    head32, head16 = FloatLMHead(fp32), FloatLMHead(bf16)
    model_head = fp32.model.get_output_embeddings()
    assert head32.weight.data_ptr() == model_head.weight.data_ptr()  # float32 backbone: no copy
    assert head16.weight.dtype == torch.float32
    hidden = torch.randn(3, fp32.fingerprint.hidden_size)
    assert torch.allclose(head32(hidden), model_head(hidden), atol=1e-6)
    assert torch.equal(head16.weight, bf16.model.get_output_embeddings().weight.float())
