"""benchmarks/scale.py at a tiny shape, so that the benchmark behind docs/performance.md's selection
figures cannot rot: every phase runs, the ratios print, the planted influences are found."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_benchmark_runs_every_phase_and_finds_the_planted_influences():
    # a slice of half the training examples (the extrapolation path), and real shards for the driver rate;
    # 200 runs, so that each planted influence of 0.6 stands far above the noise of 3,000 candidates
    got = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--n-train", "3000", "--n-test", "400",
                          "--runs", "200", "--planted", "20", "--repeats", "1", "--slice", "1500", "--shards", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    text = got.stdout
    phases = ("GEMMs of the pass (halves)", "top-k + pairs + halves", "per-class (100 classes)", "GEMMs of per-class")
    for phase in phases:
        assert re.search(rf"{re.escape(phase)}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+", text), (phase, text)
    ratio = r"(\d+\.\d\d|n/a)"  # n/a: a phase too short for the kernel's user/system split (scale.ratio)
    for name in ("selection pass / its GEMMs", "per-class / its GEMMs"):
        assert re.search(rf"{name}\s+{ratio} wall, {ratio} CPU, {ratio} user CPU", text), (name, text)
    assert "planted influences recovered: 20 of 20" in text, text
    assert re.search(r"shards read \+ verified \+ folded: 4 in", text), text
