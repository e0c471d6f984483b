"""Generation on tiny random decoders (GPT-2, Llama with grouped-query attention, Qwen2) built from configs.

Greedy equivalence: each request's tokens in a mixed continuous batch (rows joining and leaving at different
steps, different adapters and prefix lengths) equal generating it alone, and equal PEFT's greedy tokens for the
same adapter, and every step's logits equal PEFT's logits (not only their argmax) — in process via PEFT's own
forward (PEFT's ``generate`` ignores the prefix on transformers 5.24), and out of process via PEFT ``generate`` on
transformers 4.57 (``PTSERVE_REF_PYTHON``) from ptserve's PEFT export. The tiny models are initialised so that
the prefix decides the output (asserted here), so equal tokens are evidence, not a coincidence of flat logits.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ptserve.adapters_store.peft_folder import write_peft_folder
from ptserve.server.backbone import load_backbone
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.scheduler import Fifo
from ptserve.server.generation.sequence import SamplingParams
from tests.factories import make_adapter, save_tiny_decoder

PROMPTS = ["hello world the fox", "the lazy dog", "prefix tuning adds virtual tokens to every layer", "many"]
# (adapter index, prompt index, max_new_tokens): 7 requests through 3 slots, so rows join as others leave
JOBS = [(0, 0, 6), (1, 1, 12), (2, 2, 3), (3, 3, 9), (1, 0, 5), (3, 2, 14), (0, 3, 2)]
PREFIX_LENGTHS = (1, 5, 12, 30)
LOGITS_ATOL = 5e-5  # fp32 logits of magnitude <= 7: measured max |ours - PEFT| 8.2e-6 (Llama, Qwen2), 4.1e-6 (GPT-2)


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def decoder(request, tmp_path_factory):
    folder = save_tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))
    bb = load_backbone(str(folder), device="cpu", dtype="float32")
    adapters = [make_adapter(bb.fingerprint, p, seed=p, task="generate") for p in PREFIX_LENGTHS]
    return bb, adapters


def _engine(bb, slots=3) -> GenerationEngine:
    return GenerationEngine(bb, GenerationLimits(max_running=slots, max_seq_tokens=128, prefix_cap=32))


def _run(engine: GenerationEngine, adapters, jobs, params=None) -> list[list[int]]:
    residents = [engine.make_resident(a, f"t/a{i}", 1) for i, a in enumerate(adapters)]
    seqs = []
    for a, p, n in jobs:
        sp = params or SamplingParams(max_new_tokens=n, temperature=0)
        seqs.append(engine.new_sequence(residents[a], PROMPTS[p], SamplingParams(**{**sp.__dict__, "max_new_tokens": n})))
        engine.add(seqs[-1])
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
        assert steps < 500
    return [s.output_ids for s in seqs]


def _greedy_without_eos(bb, adapters):
    """Greedy decoding must run to max_new_tokens for the comparison, so the tiny model's EOS is disabled."""
    engine = _engine(bb)
    engine.eos_ids = frozenset()
    return engine


def test_mixed_continuous_batch_equals_alone(decoder):
    bb, adapters = decoder
    mixed = _run(_greedy_without_eos(bb, adapters), adapters, JOBS)
    alone = [_run(_greedy_without_eos(bb, adapters), adapters, [job])[0] for job in JOBS]
    assert [len(t) for t in mixed] == [n for _, _, n in JOBS]
    assert mixed == alone


class _LogitsSpy:
    """Records the logits the engine samples each row's token from (the real ``sample_tokens`` still chooses)."""

    def __init__(self, monkeypatch):
        import ptserve.server.generation.engine as engine_module

        self.by_seq: dict[int, list[torch.Tensor]] = {}
        real = engine_module.sample_tokens

        def spy(logits, seqs):
            for row, seq in zip(logits, seqs):
                self.by_seq.setdefault(seq.id, []).append(row.clone())
            return real(logits, seqs)

        monkeypatch.setattr(engine_module, "sample_tokens", spy)


def _run_recorded(engine, adapters, jobs, monkeypatch) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Tokens per job and the per-step logits [steps, vocab] the engine chose them from."""
    spy = _LogitsSpy(monkeypatch)
    before = set(spy.by_seq)
    tokens = _run(engine, adapters, jobs)
    ids = sorted(set(spy.by_seq) - before)  # sequence ids grow in creation order = job order
    return tokens, [torch.stack(spy.by_seq[i]) for i in ids]


def test_the_prefix_decides_the_output(decoder):
    """The tiny models are initialised so that the prefix matters (tests/factories.py): no job repeats one token,
    and each job's tokens change under a near-zero prefix and under another adapter of the same length."""
    bb, adapters = decoder
    near_zero = [make_adapter(bb.fingerprint, p, seed=p, task="generate", scale=1e-3) for p in PREFIX_LENGTHS]
    other = [make_adapter(bb.fingerprint, p, seed=p + 100, task="generate") for p in PREFIX_LENGTHS]
    ours = _run(_greedy_without_eos(bb, adapters), adapters, JOBS)
    assert all(len(set(tokens)) > 1 for tokens, (_, _, n) in zip(ours, JOBS) if n >= 3)
    for alt in (near_zero, other):
        theirs = _run(_greedy_without_eos(bb, alt), alt, JOBS)
        assert [a != b for a, b in zip(ours, theirs)] == [True] * len(JOBS)


def test_greedy_tokens_and_per_step_logits_equal_peft(decoder, monkeypatch):
    """In process, PEFT's own CAUSAL_LM forward on transformers 5 (its generate() ignores the prefix there: see
    the module docstring): each step's logits, computed by ptserve inside the mixed continuous batch, equal
    PEFT's logits for the same adapter, prompt and tokens so far; so do the greedy tokens."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    bb, adapters = decoder
    mixed, mixed_logits = _run_recorded(_greedy_without_eos(bb, adapters), adapters, JOBS, monkeypatch)
    base = AutoModelForCausalLM.from_pretrained(bb.path, attn_implementation="eager").eval()
    for (a, p, n), ours, our_logits in zip(JOBS, mixed, mixed_logits):
        peft = get_peft_model(base, PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=adapters[a].config.num_virtual_tokens)).eval()
        set_peft_model_state_dict(peft, {"prompt_embeddings": adapters[a].prompt_embeddings})
        ids, reference, ref_logits = bb.tokenizer([PROMPTS[p]], return_tensors="pt").input_ids, [], []
        with torch.no_grad():
            for _ in range(n):  # PEFT's forward is right on 5.24; its generate() is not (see module docstring)
                step = peft(input_ids=ids).logits[0, -1]
                ref_logits.append(step)
                reference.append(int(step.argmax()))
                ids = torch.cat([ids, torch.tensor([[reference[-1]]])], dim=1)
        assert ours == reference, f"job {(a, p, n)}"
        torch.testing.assert_close(our_logits, torch.stack(ref_logits), rtol=0, atol=LOGITS_ATOL,
                                   msg=lambda m: f"job {(a, p, n)}: {m}")
        base = peft.base_model


@pytest.mark.peft_ref
@pytest.mark.skipif(not os.environ.get("PTSERVE_REF_PYTHON"), reason="PTSERVE_REF_PYTHON not set")
def test_greedy_tokens_and_per_step_logits_equal_peft_generate_on_its_working_transformers(
    decoder, tmp_path, monkeypatch
):
    bb, adapters = decoder
    mixed, mixed_logits = _run_recorded(_greedy_without_eos(bb, adapters), adapters, JOBS, monkeypatch)
    for a, adapter in enumerate(adapters):
        jobs = [(i, job) for i, job in enumerate(JOBS) if job[0] == a]
        if not jobs:
            continue
        folder = write_peft_folder(adapter, tmp_path / f"a{a}")
        max_new = max(n for _, (_, _, n) in jobs)
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps([bb.tokenizer(PROMPTS[p])["input_ids"] for _, (_, p, _) in jobs]))
        result = tmp_path / "tokens.json"
        proc = subprocess.run(
            [os.environ["PTSERVE_REF_PYTHON"], "scripts/peft_reference.py", "generate", "--model", bb.path,
             "--adapter", str(folder), "--prompts", str(prompts), "--max-new", str(max_new), "--result", str(result)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[3], timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        answer = json.loads(result.read_text())
        for (i, (_, _, n)), ref, ref_logits in zip(jobs, answer["tokens"], answer["logits"]):
            assert mixed[i] == ref[:n], f"job {JOBS[i]}"
            torch.testing.assert_close(mixed_logits[i], torch.tensor(ref_logits[:n]), rtol=0, atol=LOGITS_ATOL,
                                       msg=lambda m: f"job {JOBS[i]}: {m}")


def test_seeded_sampling_is_reproducible_whatever_the_batch(decoder):
    bb, adapters = decoder
    sampled = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    alone = _run(_engine(bb), adapters, [(1, 0, 10)], sampled)[0]
    crowd = _run(_engine(bb), adapters, [(0, 2, 7), (1, 0, 10), (3, 1, 4), (2, 3, 12)], sampled)
    assert crowd[1] == alone
    other_seed = _run(_engine(bb), adapters, [(1, 0, 10)], SamplingParams(temperature=0.9, top_k=50, top_p=0.95,
                                                                          seed=99))[0]
    assert other_seed != alone  # the seed is really used (10 tokens from ~400 make a collision implausible)


def test_prompt_too_long_for_prefix_and_max_new_tokens(decoder):
    from ptserve.adapters_store.errors import InputTooLong

    bb, adapters = decoder
    engine = _engine(bb)
    resident = engine.make_resident(adapters[3], "t/a3", 1)
    with pytest.raises(InputTooLong, match="virtual tokens"):
        engine.new_sequence(resident, "hello " * 50, SamplingParams(max_new_tokens=100))


def test_a_tenant_behind_another_tenants_backlog_joins_at_the_first_free_slot(decoder):
    bb, adapters = decoder
    engine = _greedy_without_eos(bb, adapters)  # 3 slots
    noisy = engine.make_resident(adapters[0], "noisy/a", 1)
    quiet = engine.make_resident(adapters[1], "quiet/a", 1)
    backlog = [engine.new_sequence(noisy, PROMPTS[0], SamplingParams(max_new_tokens=4, temperature=0))
               for _ in range(6)]
    late = engine.new_sequence(quiet, PROMPTS[1], SamplingParams(max_new_tokens=4, temperature=0))
    for seq in backlog + [late]:  # the quiet tenant's request arrives behind the whole backlog
        engine.add(seq)
    engine.step()
    assert engine.scheduler.running == [backlog[0], late, backlog[1]]  # least-served tenant first, then age
    while engine.has_work:
        engine.step()
    assert late.output_ids == _run(_greedy_without_eos(bb, adapters), adapters, [(1, 1, 4)])[0]


def test_an_admission_policy_given_to_the_engine_decides_who_joins(decoder):
    """The same arrivals under FIFO admission: the backlog takes every slot and the quiet tenant's request joins
    only when slots free after it, with the same tokens as alone."""
    bb, adapters = decoder
    engine = GenerationEngine(bb, GenerationLimits(max_running=3, max_seq_tokens=128, prefix_cap=32),
                              admission=Fifo())
    engine.eos_ids = frozenset()
    noisy = engine.make_resident(adapters[0], "noisy/a", 1)
    quiet = engine.make_resident(adapters[1], "quiet/a", 1)
    backlog = [engine.new_sequence(noisy, PROMPTS[0], SamplingParams(max_new_tokens=4, temperature=0))
               for _ in range(3)]
    late = engine.new_sequence(quiet, PROMPTS[1], SamplingParams(max_new_tokens=4, temperature=0))
    for seq in backlog + [late]:
        engine.add(seq)
    engine.step()
    assert engine.scheduler.running == backlog and list(engine.scheduler.waiting) == [late]
    while late not in engine.scheduler.running:
        engine.step()
    assert all(len(seq.output_ids) == 4 for seq in backlog)  # it joined once the backlog had finished
    while engine.has_work:
        engine.step()
    assert late.output_ids == _run(_greedy_without_eos(bb, adapters), adapters, [(1, 1, 4)])[0]
