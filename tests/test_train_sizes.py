"""train.py --train-sizes (one image size per step) and eval.py --resize-to-train (the
resize baseline). Tiny runs on the CPU, as in test_train.py."""
import json
import signal
import subprocess

import pytest
import torch

import eval as ev
import train
from conftest import ENV, ROOT, launcher, max_diff, wait_for_checkpoint, weights

TINY = ["--task", "seg", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2",
        "--val-size", "5", "--workers", "0", "--seed", "3"]
SIZES = ["--train-sizes", "16,24,32"]  # seed 3 draws 16, 24, 16, 16, 16, 24, 32, 16 for steps 0..7


def command(out, *extra, nproc=1):
    return launcher(nproc) + ["train.py", *TINY, "--out", str(out), *extra]


def train_run(out, *extra, nproc=1):
    run = subprocess.run(command(out, *extra, nproc=nproc), cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def drawn(seed, sizes, steps):
    """The sizes train.py draws for steps 0..steps-1."""
    args = train.fill_defaults(train.get_args_parser().parse_args(
        ["--seed", str(seed), "--train-sizes", sizes, "--image-size", "64"]))
    return [train.step_size(args, s) for s in range(steps)]


@pytest.mark.slow
def test_two_processes_draw_the_same_size_per_step(tmp_path):
    # 24 samples, global batch 8: 3 steps, at 16, 24, 16 px. If the ranks drew sizes of their
    # own, their gradients (averaged by DDP) would differ from the one-process batch's.
    args = ["--epochs", "1", "--train-size", "24", "--batch-size", "8"]
    assert len(set(drawn(3, "16,24,32", 3))) > 1
    train_run(tmp_path / "one", *args, *SIZES)
    train_run(tmp_path / "two", *args, *SIZES, nproc=2)
    one = weights(tmp_path / "one")
    assert max_diff(one, weights(tmp_path / "two")) < 1e-5
    # ...and the comparison can fail: the same seed at one size (32 px) lands elsewhere.
    train_run(tmp_path / "fixed", *args)
    assert max_diff(one, weights(tmp_path / "fixed")) > 1e-4


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    # 4 epochs of 2 steps, a checkpoint every step; SIGKILL after the first, rerun the same command.
    args = ["--epochs", "4", "--train-size", "16", "--batch-size", "8", "--ckpt-every", "1", *SIZES]
    train_run(tmp_path / "full", *args)
    proc = subprocess.Popen(command(tmp_path / "cut", *args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, tmp_path / "cut" / "ckpt_last.pt")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert torch.load(tmp_path / "cut" / "ckpt_last.pt", weights_only=True)["step"] < 8, \
        "the run finished before it could be interrupted"
    assert "resuming" in train_run(tmp_path / "cut", *args).stdout
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "cut")) < 1e-6


def test_step_size_draws_every_size():
    counts = {s: 0 for s in (32, 48, 64, 96, 128)}
    for size in drawn(0, "128,32,96,48,64", 50):  # any order in, sorted and deduplicated
        counts[size] += 1
    assert all(counts.values()), counts
    assert drawn(0, "32,48,64,96,128", 50) != drawn(1, "32,48,64,96,128", 50)  # the seed matters


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--image-size", "32", "--dim", "16", "--train-sizes", "16,24,32,48"],
    ["--image-size", "32", "--dim", "16", "--train-sizes", "16,24,32,48", "--model", "unet"],
    ["--task", "det", "--image-size", "64", "--dim", "32", "--train-sizes", "48,64,80"],
    ["--task", "det", "--image-size", "64", "--dim", "32", "--train-sizes", "48,64,80", "--model", "cnn"],
    ["--task", "det", "--image-size", "64", "--dim", "32", "--train-sizes", "48,64,80", "--model", "resnet"],
], ids=["rat", "unet", "det_rat", "det_cnn", "det_resnet"])
def test_every_model_trains_on_the_drawn_size(tmp_path, monkeypatch, flags):
    # train.main in this process, its loss wrapped to record what each step really gets.
    seen = []

    def seg_loss(model, batch, device):
        levels, mask = batch
        assert mask.shape[-2:] == levels[0].shape[-2:]
        seen.append(levels[0].shape[-1])
        return real_seg(model, batch, device)

    def det_loss(model, batch, device):
        images, _ = batch
        assert {im.shape[-2:] for im in images} == {images[0].shape[-2:]}
        assert model.transform.min_size == (images[0].shape[-1],)  # the detector keeps the drawn size
        seen.append(images[0].shape[-1])
        return real_det(model, batch, device)

    real_seg, real_det = train.seg_loss, train.det_loss
    monkeypatch.setattr(train, "seg_loss", seg_loss)
    monkeypatch.setattr(train, "det_loss", det_loss)
    args = train.fill_defaults(train.get_args_parser().parse_args(
        [*flags, "--depth", "2", "--heads", "2", "--train-size", "8", "--val-size", "2", "--batch-size", "4",
         "--epochs", "1", "--workers", "0", "--seed", "3", "--out", str(tmp_path)]))
    sigterm = signal.getsignal(signal.SIGTERM)  # train.main installs its own
    try:
        train.main(args)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    expected = [train.step_size(args, s) for s in range(2)]
    assert seen == expected and len(set(expected)) == 2, (seen, expected)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert logged["val_images"] == 2  # validated, at --image-size


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0,32", "-8", "abc", "2"])
def test_bad_train_sizes_are_one_line_errors(tmp_path, value):
    # 2 px: its 0.5 pyramid level is 1 px, below the stem patch of 2 px
    run = subprocess.run(command(tmp_path / "run", "--train-sizes", value), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --train-sizes"), run.stderr
    assert not (tmp_path / "run").exists()  # checked before anything is written


@pytest.mark.slow
def test_resize_baseline_row_at_every_resolution(tmp_path):
    train_run(tmp_path / "run", "--epochs", "1", "--train-size", "16", "--batch-size", "8")
    out = tmp_path / "eval"
    args = ev.get_args_parser().parse_args(["--ckpt", str(tmp_path / "run" / "ckpt_best.pt"), "--out", str(out),
                                            "--resolutions", "16,32,64", "--resize-to-train", "--limit", "4",
                                            "--samples", "0", "--workers", "0"])
    ev.main(args)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["resolution"], r["input"]) for r in rows] == \
        [(r, how) for r in (16, 32, 64) for how in ("native", "resized to 32")]
    native, resized = rows[2], rows[3]  # 32 px, the training size
    # Antialiased bilinear resizing to the same size is exactly the identity on the CPU (checked
    # below), so at the training size the baseline is the model on the very same input.
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True), x)
    for k in ev.SEG_METRICS:
        assert resized[k] == native[k], k
    md = (out / "results.md").read_text()
    assert md.count("| resized to 32 |") == 3 and md.count("| native |") == 3
