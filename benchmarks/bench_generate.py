"""Generation throughput and latency on CPU (issue 4): ptserve's continuous batching vs PEFT prefix tuning.

One process; a small random Llama built here from a config (GQA: 8 heads, 4 kv heads; a byte-level BPE
tokenizer trained here; nothing is downloaded); S adapters of 16 virtual tokens; greedy decoding with EOS
disabled, so every request generates exactly N tokens. Timed with a warm-up and interleaved repeats:
  (a)  ptserve: S streams over S adapters (one request per adapter), all submitted at once to one
       ``GenerationEngine``, stepped until done;
  (b)  ptserve: the same S streams, all on one adapter;
  (c)  PEFT ``generate``, one request at a time, adapters switched by ``set_peft_model_state_dict``. On
       transformers 5.24 PEFT 0.21.2's ``generate`` ignores the prefix (its tokens are not those of PEFT's own
       forward): timed as PEFT's cost path, not as a correct result;
  (c′) PEFT's forward in a greedy loop, one request at a time: correct on 5.24, but PEFT's forward replaces
       any ``past_key_values`` with the prefix, so every step recomputes the whole sequence (quadratic);
  (c″) PEFT's prefix (``get_prompt``) handed to HF ``generate`` as a pre-filled cache, one request at a time:
       what PEFT's ``generate`` does on transformers 4.57, where it works. The fair baseline.
Before anything is timed, (a)'s tokens are checked against each request generated alone (abort on a mismatch)
and against (c″). Then latency under the (a) load through ``GenerationRunner`` (engine thread + asyncio): a
burst of S requests at once, and Poisson arrivals at a rate near the measured capacity. Last, tenant fairness:
one tenant's backlog of 3× the slots, and a second tenant's requests arriving behind it, under ptserve's
tenant-fair admission and under FIFO admission (the policy before commit 9de53a4), each given to the engine as
its admission policy. The pieces live in ``benchmarks/generate/``.

    python -m benchmarks.bench_generate [--tokens 128] [--streams 16] [--threads 2] [--repeats 3] [--out DIR]
                                        [--dtypes float32 bfloat16] [--device cpu] [--only-dtypes]
                                        [--only-streamed]

Then the hardware section (issue 13, ``benchmarks/generate/dtypes.py``): (a) and (c″) in float32 and bfloat16 on
``--device``, the bf16 ÷ fp32 ratio of (a)'s tokens/s; its own section of ``RESULTS.md`` per device.

Last, streamed generation over HTTP (issue 12, ``benchmarks/generate/streamed.py``): tokens/s of S concurrent SSE
streams against ptserve in one process and against an engine core behind one API worker.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers

from benchmarks._report import machine_info, write_section
from benchmarks.generate.correctness import check_correctness
from benchmarks.generate.dtypes import dtypes_md, measure_dtypes
from benchmarks.generate.fairness import fairness_md, measure_fairness
from benchmarks.generate.latency import latency_md, measure_latency
from benchmarks.generate.peft_runs import load_peft
from benchmarks.generate.ptserve_runs import new_engine, residents_of
from benchmarks.generate.report import summary, write_chart
from benchmarks.generate.streamed import measure_streamed, streamed_md
from benchmarks.generate.throughput import SYSTEMS, measure_throughput, table, targets, targets_md
from benchmarks.generate.workload import VIRTUAL_TOKENS, Job, Setup, make_adapter, make_prompts, save_llama
from ptserve.server.backbone import load_backbone

SECTION = "## Generation throughput (issue 4)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="new tokens per request (greedy, EOS disabled)")
    p.add_argument("--streams", type=int, default=16, help="concurrent requests = adapters")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per system after one warm-up")
    p.add_argument("--peft-requests", type=int, default=4,
                   help="requests the one-at-a-time PEFT systems generate per round (one at a time, their "
                        "tokens/s does not depend on how many; fewer keeps the run short)")
    p.add_argument("--arrivals", type=int, default=64, help="requests in the Poisson latency run")
    p.add_argument("--load", type=float, default=0.8, help="Poisson rate as a fraction of (a)'s capacity")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                   help="where RESULTS.md and generate.png go")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the PNG alone")
    # issue 13: (a) and (c″) in each dtype, on a device
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"],
                   help="dtypes of the hardware section (none: skip it)")
    p.add_argument("--device", default="cpu", help="device of the hardware section (cpu, cuda)")
    p.add_argument("--only-dtypes", action="store_true", help="run the hardware section only")
    p.add_argument("--only-streamed", action="store_true",
                   help="run the streamed-over-HTTP section only (in process vs engine core + 1 API worker)")
    return p.parse_args(argv)


def build_setup(args) -> Setup:
    folder = save_llama(Path(tempfile.mkdtemp(prefix="bench-generate-")))
    bb = load_backbone(str(folder), device="cpu", dtype="float32")
    adapters = [make_adapter(bb.fingerprint, seed=i) for i in range(args.streams)]
    return Setup(folder, bb, adapters, make_prompts(bb.tokenizer, args.streams), load_peft(str(folder)))


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # read when tokenizers first runs in parallel
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    s = build_setup(args)
    if args.only_streamed:
        return streamed_section(s, args, argv)
    if not args.only_dtypes:
        issue4_sections(s, args, argv, started, load_before)
    if args.dtypes:
        hardware_section(s, args, argv)
    if not args.only_dtypes:
        streamed_section(s, args, argv)


def streamed_section(s: Setup, args, argv) -> None:
    load_before = os.getloadavg()[0]
    rounds = measure_streamed(s, args)
    info = machine_info()
    command = "python -m benchmarks.bench_generate " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        f"- date: {info['date']}; cpu: {info['cpu']}; {info['versions']}; torch threads {args.threads}",
        f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}",
        f"- command: `{command.strip()}`", "", streamed_md(rounds, args),
    ]) + "\n"
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        write_section(args.out / "RESULTS.md", "bench_generate_streamed",
                      "## Streamed generation over HTTP: in process vs engine core + API worker (issue 12)", report)


def hardware_section(s: Setup, args, argv) -> None:
    load_before = os.getloadavg()[0]
    runs = measure_dtypes(s, args)
    info = machine_info(transformers=transformers.__version__, peft=peft.__version__)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else info["cpu"]
    command = "python -m benchmarks.bench_generate " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        f"- date: {info['date']}; device: {device}; {info['versions']}; torch threads {args.threads}",
        f"- load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}",
        f"- command: `{command.strip()}`",
        f"- workload: as above ({args.streams} streams × {args.tokens} greedy tokens; (c″) "
        f"{min(args.peft_requests, args.streams)} requests per round), per dtype on {args.device}; one warm-up, "
        f"{args.repeats} rotating rounds, median",
        "", dtypes_md(runs),
    ]) + "\n"
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        write_section(args.out / "RESULTS.md", f"bench_generate_dtypes_{args.device.split(':')[0]}",
                      f"## Generation in float32 and bfloat16 ({args.device}; issue 13)", report)


def issue4_sections(s: Setup, args, argv, started: float, load_before) -> None:
    engine = new_engine(s.bb, max(32, args.streams))
    residents = residents_of(engine, s.adapters)
    peft_jobs = [Job(p, i) for i, p in enumerate(s.prompts)][: args.peft_requests]

    correctness = check_correctness(s, engine, residents, args.streams, peft_jobs, args.tokens)
    res = measure_throughput(s, engine, residents, peft_jobs, args)
    latencies = measure_latency(s, res["mixed"].tps, args)
    fairness = measure_fairness(s, args)

    load = (load_before[0], os.getloadavg()[0])
    results = [res[k] for k in SYSTEMS]
    report = (f"{summary(s, args, argv, correctness, load, time.perf_counter() - started)}\n\n"
              f"{table(results, res['mixed'])}\n\n{targets_md(targets(res))}\n\n{latency_md(latencies)}\n\n"
              f"{fairness_md(fairness)}\n")
    print(report)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        title = (f"random Llama 4L/256h GQA, {args.streams} streams × {args.tokens} tokens, "
                 f"P={VIRTUAL_TOKENS}, CPU {args.threads} threads")
        write_chart(results, latencies, args.out / "generate.png", title, args.streams)
        write_section(args.out / "RESULTS.md", "bench_generate", SECTION,
                      f"{report}\n![generation throughput](generate.png)\n")
        print(f"wrote {args.out / 'RESULTS.md'} and {args.out / 'generate.png'}")


if __name__ == "__main__":
    main()
