"""The CUDA paths, on a real GPU (skipped without one; ``scripts/gpu_check.sh`` runs exactly these, ``-m gpu``, and
fails when torch sees no GPU): the equivalence contracts in float32 and bfloat16, agreement with the CPU,
adapters copied from pinned memory on a side stream without waiting for the engine's stream, and a decode step
that queues its work with no host sync before the sampled tokens are read."""
from __future__ import annotations

import threading

import pytest
import torch

from ptserve.server.backbone import load_backbone
from ptserve.server.engine import Engine, Row
from ptserve.server.generation.forward import decode_forward
from ptserve.server.generation.sampling import sample_tokens
from ptserve.server.generation.sequence import SamplingParams
from ptserve.server.transfer import to_device, upload
from tests.factories import make_adapter, save_tiny_decoder
from tests.server.generation.test_bfloat16 import BF16_FACTOR, _assert_same_until_a_near_tie, _peft_bf16_noise, _Recorder
from tests.server.generation.test_engine import JOBS, PREFIX_LENGTHS, _engine, _greedy_without_eos
from tests.server.test_equivalence import (  # sentiment_adapter: a fixture (a prefix trained on the reviews)
    _assert_rows_match_alone, _pairing_rows, assert_bf16_rows_match_alone, assert_labels_agree, sentiment_adapter,  # noqa: F401
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def cuda_fp32() -> Engine:
    return Engine(load_backbone("minilm", device="cuda", dtype="float32"))


@pytest.fixture(scope="module")
def cuda_bf16() -> Engine:
    bb = load_backbone("minilm", device="cuda", dtype="auto")
    assert bb.dtype == torch.bfloat16, bb.dtype_reason  # auto on a GPU with bf16
    return Engine(bb)


def test_cuda_float32_mixed_batch_equals_alone(cuda_fp32):
    _assert_rows_match_alone(cuda_fp32, _pairing_rows(cuda_fp32))


def test_cuda_float32_agrees_with_the_cpu(cuda_fp32, minilm_engine):
    gpu_rows, cpu_rows = _pairing_rows(cuda_fp32), _pairing_rows(minilm_engine)
    gpu, _ = cuda_fp32.classify(gpu_rows)
    cpu, _ = minilm_engine.classify(cpu_rows)
    assert max(float((a - b).abs().max()) for a, b in zip(gpu, cpu)) <= 1e-4


def test_cuda_bfloat16_mixed_batch_equals_alone_within_hf_own_rounding(cuda_bf16):
    assert_bf16_rows_match_alone(cuda_bf16)


def test_cuda_bfloat16_labels_agree_with_cpu_float32(minilm_engine, cuda_bf16, sentiment_adapter):
    assert_labels_agree(minilm_engine, cuda_bf16, sentiment_adapter)


def test_upload_copies_exactly_and_does_not_wait_for_the_engine_stream():
    src = torch.randn(6, 2, 4, 16, 32)
    torch.cuda._sleep(2_000_000_000)  # the "engine": a long kernel queued on the default stream
    got = upload(src, CUDA, torch.bfloat16)
    engine_busy = not torch.cuda.current_stream().query()  # read before anything waits for the default stream
    assert engine_busy, "upload waited for the engine's stream"
    torch.cuda.synchronize()
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert torch.equal(got.cpu(), src.to(torch.bfloat16))
    src.zero_()  # a copy, not a view of the host tensor
    assert got.float().abs().sum() > 0


def test_uploads_from_loader_threads_while_the_engine_runs(cuda_bf16):
    engine = cuda_bf16
    adapters = [make_adapter(engine.fp, 16, seed=i) for i in range(8)]
    out: list = [None] * len(adapters)

    def load(i):
        out[i] = engine.make_resident(adapters[i], f"t/a{i}", 1)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(adapters))]
    for t in threads:
        t.start()
    rows = [Row(engine.make_resident(adapters[0], "t/x", 1), engine.tokenize(["the food was cold"], 16)[0])] * 32
    for _ in range(5):
        engine.classify(rows)  # the engine keeps running while the loaders copy
    for t in threads:
        t.join()
    for adapter, resident in zip(adapters, out):
        flat = adapter.prompt_embeddings.to(torch.bfloat16)
        assert torch.equal(resident.kv.cpu().permute(3, 0, 1, 2, 4).reshape(flat.shape), flat)


def test_to_device_is_non_blocking():
    host = torch.arange(12).view(3, 4)
    torch.cuda._sleep(2_000_000_000)
    dev = to_device(host, CUDA)
    assert not torch.cuda.current_stream().query()  # queued behind the long kernel, the host did not wait
    assert torch.equal(dev.cpu(), host)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def cuda_decoder(request, tmp_path_factory):
    folder = save_tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))
    bb = load_backbone(str(folder), device="cuda", dtype="bfloat16")
    fp32 = load_backbone(str(folder), device="cuda", dtype="float32")
    adapters = [make_adapter(bb.fingerprint, p, seed=p, task="generate") for p in PREFIX_LENGTHS]
    return bb, adapters, fp32


def test_cuda_bf16_generation_is_batch_independent_within_rounding(cuda_decoder, monkeypatch):
    """The CPU's bf16 contract (tests/server/generation/test_bfloat16.py) on the GPU, greedy and seeded."""
    bb, adapters, fp32 = cuda_decoder
    bound = BF16_FACTOR * _peft_bf16_noise(fp32, bb, adapters)
    rec = _Recorder(monkeypatch)
    mixed = rec.run(_greedy_without_eos(bb, adapters), adapters, JOBS)
    alone = [rec.run(_greedy_without_eos(bb, adapters), adapters, [job])[0] for job in JOBS]
    _assert_same_until_a_near_tie(mixed, alone, bound, sampled=False)
    sampled = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    crowd_jobs = [(0, 2, 7), (1, 0, 10), (3, 1, 4), (2, 3, 12)]
    one = [rec.run(_engine(bb), adapters, [job], sampled)[0] for job in crowd_jobs]
    _assert_same_until_a_near_tie(rec.run(_engine(bb), adapters, crowd_jobs, sampled), one, bound, sampled=True)


def test_a_decode_step_has_no_host_sync_before_the_tokens(cuda_decoder):
    bb, adapters, _ = cuda_decoder
    engine = _engine(bb)
    residents = [engine.make_resident(a, f"t/a{i}", 1) for i, a in enumerate(adapters)]
    seqs = [engine.new_sequence(r, "hello world the fox", SamplingParams(max_new_tokens=8, temperature=t,
                                                                            top_k=20, top_p=0.9, seed=i))
            for i, (r, t) in enumerate(zip(residents, (0, 0.8, 1.0, 0.7)))]
    for seq in seqs:
        engine.add(seq)
    with torch.inference_mode():
        engine.step()  # prefill: the rows join
        running = list(engine.scheduler.running)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
        try:
            hidden = decode_forward(bb, engine.cache, [s.last_token for s in running], [s.cached for s in running],
                                    [s.prefix_len for s in running])
            tokens = sample_tokens(engine.lm_head(hidden), running)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tokens.device.type == "cuda" and len(tokens.tolist()) == len(running)
