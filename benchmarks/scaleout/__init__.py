"""The pieces of ``benchmarks/bench_scaleout.py``: the load it sends through the topology (``load``) and the
tables, chart and RESULTS.md text it makes of the measurements (``report``)."""
