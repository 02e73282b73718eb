"""Smoke test of bench.py and tools/bench_peers.py at tiny sizes."""

import subprocess
import sys

import pytest
import torch

import bench
from conftest import ENV, ROOT


def test_slope_recovers_the_exponent():
    x = [1e3, 1e4, 1e5]
    assert bench.slope(x, [2 * v ** 1.5 for v in x]) == pytest.approx(1.5)


def test_scale_worker_measures_time_memory_and_flops():
    torch.set_num_threads(1)
    r = bench.scale_worker(size=32, D=2, batch=1, dim=32, reps=1)
    assert r["fwd"] > 0 and r["train"] > 0 and r["mem"] >= 0 and r["flops"] > 0
    assert 0 <= r["attn"] <= r["flops"] and 0 <= r["attn_time"] <= 1


@pytest.mark.slow
def test_cli_quick_writes_markdown(tmp_path):
    out = subprocess.run([sys.executable, "bench.py", "--quick", "--only", "util"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "# Benchmarks" in out.stdout and "## util" in out.stdout and "## targets" not in out.stdout
    assert "GFLOP/s" in out.stdout


@pytest.mark.slow
def test_peer_sections_run_from_their_own_script_and_bench_does_not_know_them(tmp_path):
    # from another folder: tools/bench_peers.py finds bench.py; its workers run in its own fresh processes
    out = subprocess.run([sys.executable, f"{ROOT}/tools/bench_peers.py", "--only", "gpu"], cwd=tmp_path,
                         env={**ENV, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Command: `python tools/bench_peers.py --only gpu`" in out.stdout and "## gpu" in out.stdout
    assert "No CUDA device was available" in out.stdout
    out = subprocess.run([sys.executable, "bench.py", "--only", "gpu"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "unknown sections ['gpu']" in out.stderr


# ------------------------------------------------------------------------ peers and gpu (tools/bench_peers.py)
import argparse  # noqa: E402

from tools import bench_peers  # noqa: E402


def in_process(spec, a, timeout=900, env=None, nproc=0, script=None):
    """bench.run_worker without the fresh process (and without the peers' memory cap, which would stay on
    the test process), for tests."""
    spec = dict(spec, **({"cap_gib": 0} if spec["kind"] == "peer" else {}))
    return bench_peers.WORKERS[spec.pop("kind")](**spec)


def test_write_with_only_replaces_just_those_sections():
    old = "# Benchmarks\n\nCommand: x\n\n## targets\n\nT\n\n## scaling\n\nS\n\n## optim\n\nO\n"
    new = bench.merge_sections(old, {"scaling": "S2", "gpu": "G"})
    assert new == "# Benchmarks\n\nCommand: x\n\n## targets\n\nT\n\n## scaling\n\nS2\n\n## optim\n\nO\n\n## gpu\n\nG\n"


def test_run_worker_keeps_what_a_timed_out_worker_printed(monkeypatch):
    def timeout(*args, **kw):
        raise subprocess.TimeoutExpired("cmd", 1, output=b'log\nRESULT {"32": {"s": 1.0}}\n')
    monkeypatch.setattr(bench.subprocess, "run", timeout)
    r = bench.run_worker({"kind": "gpu"}, argparse.Namespace(threads=1), timeout=1)
    assert r == {"32": {"s": 1.0}, "partial": "timed out after 1 s"}


def test_peers_without_the_extras_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bench_peers, "extras_missing", lambda: ["timm"])
    md, _ = bench_peers.sec_peers(argparse.Namespace(quick=True, reps=1))
    assert md.startswith("Skipped") and "requirements-bench.txt" in md


def test_behind_names_where_rat_is_slower_or_steeper():
    res = {(m, n): {"s": s * n, "mem": 1.0 * n} for m, s in (("rat", 2.0), ("swin", 1.0), ("vit", 3.0))
           for n in (256, 512)}
    fits = {"rat": {"s": 1.2, "mem": 1.0}, "swin": {"s": 1.0, "mem": 1.0}, "vit": {"s": 1.5, "mem": 1.0}}
    text = bench_peers.behind(res, [256, 512], fits)
    assert "Against swin: RAT is behind in time at 256, 512 px (RAT / swin 2.00, 2.00); time exponent (1.20" in text
    assert "Against vit: RAT is not behind" in text


def test_gpu_section_without_cuda_says_none_was_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    md, _ = bench_peers.sec_gpu(argparse.Namespace(gpu_dry_run=False, gpu_budget=270))
    assert md.startswith("No CUDA device was available")


@pytest.mark.slow
def test_gpu_dry_run_measures_eager_compiled_and_largest(monkeypatch):
    """The gpu section's code path on the CPU: a tiny RAT and U-Net, one size, compile backend "eager"."""
    from model import RATSeg, UNet
    torch.set_num_threads(1)
    # build_seg_model's width search for the U-Net takes a second or more per call; the logic here does not need it
    monkeypatch.setattr(bench, "seg", lambda kind: RATSeg(dim=32, depth=1, heads=4) if kind == "rat" else UNet(width=8))
    monkeypatch.setattr(bench, "run_worker", in_process)
    monkeypatch.setattr(bench_peers, "gpu_plan", lambda a: ((32,), (32, 48), "eager", 1))
    md, m = bench_peers.sec_gpu(argparse.Namespace(gpu_dry_run=True, gpu_budget=120, reps=1))
    assert "DRY RUN on the CPU" in md
    for model in ("rat", "unet"):
        assert set(m["gpu"][(model, "eager")]["32"]) == {"s", "mem", "first"}
        assert m["gpu"][(model, "compiled")]["32"]["s"] > 0
        assert set(m["gpu"][(model, "largest")]) == {"32", "48"}
    assert "- RAT: **48 px**" in md and "images/s" in md


def test_reference_sizes_are_computed_from_its_code():
    pytest.importorskip("resolution_aware_transformer")
    pytest.importorskip("timm")
    shape, gib = bench_peers.ref_assignment(256)
    assert shape == (1, 8, 7396, 65536) and gib == pytest.approx(14.44, abs=0.01)   # "two 15 GB tensors"
    assert "6 x [1, 8, 7396, 65536]" in bench_peers.why_not(256, train=True)


@pytest.mark.slow
def test_peers_run_side_by_side_and_the_reference_training_failure_is_reported(monkeypatch):
    pytest.importorskip("resolution_aware_transformer")
    pytest.importorskip("timm")
    from model import num_params
    torch.set_num_threads(1)
    monkeypatch.setattr(bench, "run_worker", in_process)
    a = argparse.Namespace(reps=1)
    target = num_params(bench_peers.build("rat", 64))
    for name in ("swin", "vit"):
        assert abs(num_params(bench_peers.build(name, 64)) / target - 1) < 0.25
    r = bench_peers.run_peers(a, ["rat", "swin", "vit"], 64, 1, train=True)
    assert all(r[m]["s"] > 0 and r[m]["mem"] >= 0 and r[m]["params"] > 0 for m in r)
    r = bench_peers.run_peers(a, ["reference", "rat-p1"], 32, 1, train=False)
    assert r["reference"]["s"] > 0 and r["rat-p1"]["s"] > 0
    # with one image, a single-token stage (32 px: grids 11, 4, 2, 1) breaks its autograd; RAT still trains
    r = bench_peers.run_peers(a, ["reference", "rat-p1"], 32, 1, train=True)
    assert "inplace" in r["reference"]["error"] and r["rat-p1"]["s"] > 0


def test_step_ab_times_the_model_the_default_run_trains():
    """tools/step_ab.py's 64 px case is `python train.py --task seg`'s model (it once built RAT's
    own default strides, 4,2,2,1, where the default run groups by 2,2,2,1)."""
    import model
    import train
    from tools import step_ab

    args = train.fill_defaults(train.get_args_parser().parse_args(["--task", "seg"]))
    size, batch, build = step_ab.CASES[0]
    timed, trained = build(model), model.build_model(vars(args))
    assert (size, batch) == (args.image_size, args.batch_size)
    assert [s.stride for s in timed.backbone.sgas] == [s.stride for s in trained.backbone.sgas]
    assert model.num_params(timed) == model.num_params(trained)
