"""The pieces of ``benchmarks/bench_generate.py``, one module per concern: the workload (model, adapters,
prompts), how ptserve and PEFT run it, and the scenarios (correctness, throughput, latency, tenant fairness) with
their tables, plus the report around them."""
