"""bench_train_step (issue 14): every precision row is timed on the same batches, and the table's ratios are the
measured times' (speed-up over the trainer's own float32 step, prefix ÷ full FT under the same autocast)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.bench_train_step import CONFIGS, main, table


def test_the_table_divides_the_measured_times():
    ms = dict(zip(CONFIGS, [400.0, 300.0, 200.0, 800.0, 500.0]))
    rows = [line.split(" | ") for line in table(ms).splitlines()[2:]]
    assert [r[1] for r in rows] == ["float32", "bf16 autocast, bf16 attention", "bf16 autocast, float32 attention",
                                    "float32", "bf16 autocast"]
    assert [r[3] for r in rows] == ["", "1.33×", "2.00×", "", "1.60×"]
    assert [r[4].strip(" |") for r in rows] == ["0.50", "0.60", "0.40", "", ""]


@pytest.mark.slow
def test_a_short_run_times_every_row_on_real_batches(capsys):
    threads = torch.get_num_threads()
    try:
        main(["--task", "spam_subjects", "--batch", "4", "--steps", "1", "--warmup", "1", "--no-write"])
        assert torch.get_num_threads() == 1  # --threads 1 is the default: one step at a time per core
    finally:
        torch.set_num_threads(threads)  # the suite's other tests keep theirs
    out = capsys.readouterr().out
    assert "auto (what `ptserve train` picks here): cpu attention forward+backward" in out
    times = [float(m) for m in re.findall(r"^\| (?:prefix|full) \| [^|]+ \| (\d+) \|", out, re.M)]
    assert len(times) == len(CONFIGS) and all(t > 0 for t in times)
