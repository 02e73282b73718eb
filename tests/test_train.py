"""train.py end to end: DDP equivalence, resume, preemption. Tiny runs on the CPU."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, launcher, max_diff, wait_for_checkpoint, weights

pytestmark = pytest.mark.slow   # every test here trains

TINY = ["--task", "seg", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2",
        "--val-size", "5", "--workers", "0", "--seed", "3"]


def train(out, *extra, nproc=1, wait=True):
    cmd = launcher(nproc) + ["train.py", *TINY, "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_two_processes_equal_one_process(tmp_path):
    # 24 samples, global batch 8: 3 optimizer steps, split 4 + 4 across two ranks.
    args = ["--epochs", "1", "--train-size", "24", "--batch-size", "8"]
    train(tmp_path / "one", *args)
    train(tmp_path / "two", *args, nproc=2)
    # 5 validation images split across 2 ranks: each counted once (no padding)
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text())["val_images"] == 5
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert torch.load(tmp_path / "two" / "ckpt_last.pt", weights_only=True)["step"] == 3
    assert max_diff(one, two) < 1e-5
    # ...and the comparison can fail: a different seed lands elsewhere.
    train(tmp_path / "other", *args, "--seed", "4")
    assert max_diff(one, weights(tmp_path / "other")) > 1e-3


@pytest.mark.parametrize("flags", [["--channels-last"], ["--compile", "aot_eager"]])
def test_gpu_options_run_on_cpu_and_train_the_same_weights(tmp_path, flags):
    # --channels-last and --compile are for GPUs, but must work here and must not change
    # the arithmetic beyond rounding. aot_eager runs torch.compile's graph capture and
    # autograd tracing without inductor's C++ code generation (minutes on this CPU).
    args = ["--epochs", "1", "--train-size", "16", "--batch-size", "8"]
    train(tmp_path / "eager", *args)
    train(tmp_path / "option", *args, *flags)
    assert max_diff(weights(tmp_path / "eager"), weights(tmp_path / "option")) < 1e-4


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, how):
    # 4 epochs of 2 steps; a checkpoint every step. Interrupt after the first one
    # (SIGKILL: nothing more is saved; SIGTERM: the run saves and exits), then
    # rerun the same command.
    args = ["--epochs", "4", "--train-size", "16", "--batch-size", "8", "--ckpt-every", "1"]
    train(tmp_path / "full", *args)
    proc = train(tmp_path / "cut", *args, wait=False)
    wait_for_checkpoint(proc, tmp_path / "cut" / "ckpt_last.pt")
    proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
    proc.wait(timeout=60)
    saved = torch.load(tmp_path / "cut" / "ckpt_last.pt", weights_only=True)
    assert saved["step"] < 8, "the run finished before it could be interrupted"
    if how == "sigterm":
        assert proc.returncode == 143, proc.stderr.read()[-2000:]
    rerun = train(tmp_path / "cut", *args)
    assert "resuming" in rerun.stdout
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "cut")) < 1e-6


def test_detection_under_torchrun_counts_every_validation_image_once(tmp_path):
    # 5 validation images over 2 ranks: a padding sampler would count one twice.
    from argparse import Namespace

    from torch.utils.data import DataLoader

    from data import DetDataset, det_collate
    from model import build_model
    from train import evaluate

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--task", "det", "--image-size", "64", "--dim", "32", "--depth", "2",
                          "--heads", "2", "--train-size", "8", "--val-size", "5", "--batch-size", "4",
                          "--epochs", "1", "--workers", "0", "--out", str(tmp_path)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    ckpt = torch.load(tmp_path / "ckpt_last.pt", weights_only=True)
    args = Namespace(**ckpt["args"])
    model = build_model(vars(args))
    model.load_state_dict(ckpt["model"])
    val = DetDataset("synthetic", "val", 64, length=5, seed=args.seed)
    expected = evaluate(model, DataLoader(val, batch_size=5, collate_fn=det_collate), args, torch.device("cpu"))
    assert logged["val_images"] == expected["val_images"] == 5
    for k in ("AP", "AP50", "APs", "APm", "APl"):
        assert logged[k] == pytest.approx(expected[k], abs=1e-6), k
