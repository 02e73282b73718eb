"""Smoke test of bench.py at tiny sizes (the full run takes ~10 minutes)."""

import os
import subprocess
import sys

import pytest
import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slope_recovers_the_exponent():
    x = [1e3, 1e4, 1e5]
    assert bench.slope(x, [2 * v ** 1.5 for v in x]) == pytest.approx(1.5)


def test_scale_worker_measures_time_memory_and_flops():
    torch.set_num_threads(1)
    r = bench.scale_worker(size=32, D=2, batch=1, dim=32, reps=1)
    assert r["fwd"] > 0 and r["train"] > 0 and r["mem"] >= 0 and r["flops"] > 0
    assert 0 <= r["attn"] <= r["flops"] and 0 <= r["attn_time"] <= 1


def test_cli_quick_writes_markdown(tmp_path):
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--only", "util,optim"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "# Benchmarks" in out.stdout and "## util" in out.stdout and "## optim" in out.stdout
    assert "GFLOP/s" in out.stdout
