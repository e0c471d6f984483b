"""Generation in bfloat16 (what ``dtype=auto`` serves on CPUs with AMX/AVX512-BF16 and on CUDA), on the tiny random
GPT-2 / Llama (GQA) / Qwen2: prefill and decode run in bf16 with a bf16 KV cache, logits come from a float32 LM
head and sampling runs in float32.

Batch independence in bf16 is a rounding contract, not bit equality (the key window of a decode step, and so the
order of SDPA's sums, depends on the other rows; a row's cached K/V carry that rounding into later steps): a
request's per-step logits in a mixed continuous batch agree with the same request alone within ``BF16_FACTOR`` x
what bf16 itself costs (PEFT's bf16 model vs PEFT's fp32 model on the same adapter and prompt: being in a batch
costs less than the dtype does), and its tokens (greedy, or seeded sampling with the request's own generator) are
the same until, if ever, a step where that rounding decides between near-equal choices. The random stream itself is the row's own (tests/server/generation/test_sequence.py feeds equal
logits alone and in a crowd). The float32 tests beside this file (and PEFT, in float32) carry exactness."""
from __future__ import annotations

import pytest
import torch

from ptserve.server.backbone import load_backbone
from ptserve.server.generation.forward import FloatLMHead
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, save_tiny_decoder
from tests.server.generation.test_engine import JOBS, PREFIX_LENGTHS, PROMPTS, _engine, _greedy_without_eos, _run

BF16_FACTOR = 2.0  # ptserve may differ by this many times HF's (or PEFT's) own bf16 difference
BF16_EPS = 2.0 ** -8  # bfloat16's unit roundoff: the floor of a bound, relative to the logits' scale
SAMPLED = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def decoders(request, tmp_path_factory):
    folder = save_tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))
    fp32 = load_backbone(str(folder), device="cpu", dtype="float32")
    bf16 = load_backbone(str(folder), device="cpu", dtype="bfloat16")
    adapters = [make_adapter(fp32.fingerprint, p, seed=p, task="generate") for p in PREFIX_LENGTHS]
    return fp32, bf16, adapters


class _Recorder:
    """The logits each sequence's tokens were chosen from, step by step (the real sampler still chooses)."""

    def __init__(self, monkeypatch):
        import ptserve.server.generation.engine as engine_module

        self.by_seq: dict[int, list[torch.Tensor]] = {}
        real = engine_module.sample_tokens

        def record(logits, seqs):
            for row, seq in zip(logits, seqs):
                self.by_seq.setdefault(seq.id, []).append(row.clone())
            return real(logits, seqs)

        monkeypatch.setattr(engine_module, "sample_tokens", record)

    def run(self, engine, adapters, jobs, params=None) -> list[tuple[list[int], torch.Tensor]]:
        before = set(self.by_seq)
        tokens = _run(engine, adapters, jobs, params)
        ids = sorted(set(self.by_seq) - before)  # sequence ids grow in creation order = job order
        return [(t, torch.stack(self.by_seq[i])) for t, i in zip(tokens, ids)]


def _peft_bf16_noise(fp32, bf16, adapters) -> float:
    """What bf16 itself costs: PEFT's bf16 model vs PEFT's fp32 model on the same adapter and prompt (prefill,
    last-position logits), relative to the logits' scale, worst over the adapters; floored at bf16's roundoff."""
    worst = BF16_EPS
    for adapter, prompt in zip(adapters, PROMPTS):
        ids = fp32.tokenizer(prompt)["input_ids"]
        ref = _peft_logits(fp32, adapter, ids)
        worst = max(worst, float((_peft_logits(bf16, adapter, ids) - ref).abs().max()) / max(1.0, float(ref.abs().max())))
    return worst


def _assert_same_until_a_near_tie(mixed, alone, bound: float, sampled: bool) -> None:
    """Per job: logits within ``bound`` (relative) at every step both runs took with the same history; tokens equal,
    or first different at a step whose choice that rounding can move (greedy: a top-2 margin within twice the
    step's logit difference; sampled: a draw over probabilities that moved)."""
    for job, ((tokens_m, logits_m), (tokens_a, logits_a)) in enumerate(zip(mixed, alone)):
        k = next((i for i, (x, y) in enumerate(zip(tokens_m, tokens_a)) if x != y), len(tokens_a))
        steps = min(k + 1, len(logits_a), len(logits_m))  # the logits of the first differing step are comparable
        for step in range(steps):
            a, m = logits_a[step], logits_m[step]
            diff = float((a - m).abs().max())
            assert diff <= bound * max(1.0, float(a.abs().max())), (job, step, diff, bound)
        if k == len(tokens_a):
            assert tokens_m == tokens_a
            continue
        a, m = logits_a[k], logits_m[k]
        if sampled:
            assert not torch.equal(a, m), f"job {job}: equal logits at step {k}, yet another token was drawn"
        else:
            top2 = a.topk(2).values
            assert float(top2[0] - top2[1]) <= 2 * float((a - m).abs().max()), f"job {job} flipped at step {k}"


def test_bf16_mixed_continuous_batch_equals_alone_within_rounding(decoders, monkeypatch):
    fp32, bb, adapters = decoders
    rec = _Recorder(monkeypatch)
    mixed = rec.run(_greedy_without_eos(bb, adapters), adapters, JOBS)
    alone = [rec.run(_greedy_without_eos(bb, adapters), adapters, [job])[0] for job in JOBS]
    assert [len(t) for t, _ in mixed] == [n for _, _, n in JOBS]
    _assert_same_until_a_near_tie(mixed, alone, BF16_FACTOR * _peft_bf16_noise(fp32, bb, adapters), sampled=False)


def test_bf16_seeded_sampling_is_independent_of_the_batch_within_rounding(decoders, monkeypatch):
    fp32, bb, adapters = decoders
    rec = _Recorder(monkeypatch)
    crowd_jobs = [(0, 2, 7), (1, 0, 10), (3, 1, 4), (2, 3, 12)]
    alone = [rec.run(_engine(bb), adapters, [job], SAMPLED)[0] for job in crowd_jobs]
    crowd = rec.run(_engine(bb), adapters, crowd_jobs, SAMPLED)
    _assert_same_until_a_near_tie(crowd, alone, BF16_FACTOR * _peft_bf16_noise(fp32, bb, adapters), sampled=True)
    again = rec.run(_engine(bb), adapters, crowd_jobs, SAMPLED)
    assert [t for t, _ in again] == [t for t, _ in crowd]  # the same batch, the same tokens: reproducible
    other = _run(_engine(bb), adapters, [(1, 0, 10)], SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=99))
    assert other[0] != alone[1][0]  # the seed is really used


def _peft_logits(bb, adapter, ids: list[int]) -> torch.Tensor:
    """PEFT's own CAUSAL_LM forward (correct on transformers 5), last-position logits, in the backbone's dtype."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bb.path, attn_implementation="eager", dtype=bb.dtype).eval()
    peft = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                   num_virtual_tokens=adapter.config.num_virtual_tokens)).eval()
    set_peft_model_state_dict(peft, {"prompt_embeddings": adapter.prompt_embeddings.to(bb.dtype)})
    with torch.inference_mode():
        return peft(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_bf16_prefill_and_decode_give_float32_logits_close_to_float32(decoders, monkeypatch):
    """ptserve bf16 vs ptserve fp32, per step, within BF16_FACTOR x what PEFT's own bf16 model differs from PEFT's
    fp32 model on the same adapter and tokens (the prefix's own rounding to bf16 included)."""
    fp32, bf16, adapters = decoders
    rec = _Recorder(monkeypatch)
    jobs = [(a, p, 2) for a, p in zip(range(len(adapters)), range(len(PROMPTS)))]
    ref = rec.run(_greedy_without_eos(fp32, adapters), adapters, jobs)
    got = rec.run(_greedy_without_eos(bf16, adapters), adapters, jobs)
    assert _engine(bf16).cache.k[0].dtype == torch.bfloat16  # the KV cache (prefix included) is bf16
    for (a, p, _), (ref_tokens, ref_logits), (tokens, logits) in zip(jobs, ref, got):
        assert logits.dtype == torch.float32
        assert not torch.equal(logits, logits.bfloat16().float())  # from the float32 head, not a bf16 one
        prompt = bf16.tokenizer(PROMPTS[p])["input_ids"]
        steps = 2 if tokens[0] == ref_tokens[0] else 1  # step 2 only from the same first token
        for step in range(steps):
            ids = prompt + ref_tokens[:step]
            peft_noise = float((_peft_logits(bf16, adapters[a], ids) - _peft_logits(fp32, adapters[a], ids)).abs().max())
            diff = float((logits[step] - ref_logits[step]).abs().max())
            assert diff <= BF16_FACTOR * peft_noise, (a, p, step, diff, peft_noise)


def test_float_lm_head_is_the_models_head_in_float32(decoders):
    fp32, bf16, _ = decoders
    head32, head16 = FloatLMHead(fp32), FloatLMHead(bf16)
    model_head = fp32.model.get_output_embeddings()
    assert head32.weight.data_ptr() == model_head.weight.data_ptr()  # float32 backbone: no copy
    assert head16.weight.dtype == torch.float32
    hidden = torch.randn(3, fp32.fingerprint.hidden_size)
    assert torch.allclose(head32(hidden), model_head(hidden), atol=1e-6)
    assert torch.equal(head16.weight, bf16.model.get_output_embeddings().weight.float())
