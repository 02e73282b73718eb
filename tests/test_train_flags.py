"""train.py's flags: numeric ranges checked before any work, defaults built for the flags given,
and a resume that refuses training flags other than the run's."""
import os
import signal
import subprocess
import sys

import pytest

from model import build_model
import torch

import train
from conftest import ENV, ROOT
TINY = ["--task", "seg", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2", "--val-size", "4",
        "--workers", "0", "--seed", "4"]


def fill(*flags):
    return train.fill_defaults(train.get_args_parser().parse_args(list(flags)))


@pytest.mark.parametrize("flag,value", [
    ("--batch-size", "0"), ("--dim", "0"), ("--heads", "0"), ("--depth", "0"), ("--depth", "-1"), ("--epochs", "0"),
    ("--image-size", "0"), ("--patch", "0"), ("--train-size", "0"), ("--val-size", "0"), ("--coco-val-size", "0"),
    ("--sync-every", "0"), ("--workers", "-1"), ("--ckpt-every", "-1"), ("--seed", "-1"), ("--seed", str(2 ** 64)),
    ("--lr", "0"), ("--lr", "-0.001"), ("--lr", "nan"), ("--lr", "inf"), ("--weight-decay", "-1"), ("--clip", "-1"),
    ("--clip", "nan"), ("--warmup", "2"), ("--warmup", "-0.1"), ("--dropout", "1"), ("--dropout", "-0.5"),
    ("--dist-timeout", "0")])
def test_numeric_flag_out_of_range_is_refused_by_name(flag, value):
    with pytest.raises(ValueError, match=f"^{flag} must be ") as error:
        fill("--task", "det", flag, value)   # det: its defaults are built from --depth
    assert ", got " in str(error.value) and "\n" not in str(error.value)


def test_range_edges_are_accepted():
    args = fill("--clip", "0", "--warmup", "0", "--weight-decay", "0", "--seed", "0", "--workers", "0",
                "--ckpt-every", "0", "--dropout", "0", "--depth", "1")
    assert (args.clip, args.warmup, args.depth) == (0, 0, 1)
    assert fill("--warmup", "1").warmup == 1


@pytest.mark.slow
def test_bad_flag_is_one_line_before_any_work(tmp_path):
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "train.py", *TINY, "--heads", "0", "--out", str(out)], cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip() == "error: --heads must be a positive integer, got 0", run.stderr[-2000:]
    assert not out.exists()                                  # nothing was set up


@pytest.mark.parametrize("depth,strides", [(1, [2]), (2, [2, 2]), (4, [2, 2, 1, 1])])
def test_default_detection_strides_follow_the_depth(depth, strides):
    args = fill("--task", "det", "--depth", str(depth), "--dim", "32", "--heads", "2", "--image-size", "64")
    assert args.strides == strides
    if depth == 1:
        args.num_classes = 3
        with torch.no_grad():
            assert len(build_model(vars(args)).eval()([torch.rand(3, 64, 64)])) == 1


# ------------------------------------------------------------------ resume with other training flags

RUN = ["--epochs", "1", "--train-size", "16", "--batch-size", "8"]


def in_process(out, *extra):
    handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    torch.set_num_threads(1)   # as OMP_NUM_THREADS=1 for a subprocess: 2 threads on 2 busy cores crawl
    try:
        train.main(train.fill_defaults(train.get_args_parser().parse_args([*TINY, "--out", str(out), *extra])))
    finally:
        signal.signal(signal.SIGTERM, handler)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    in_process(out, *RUN)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [
    ("--batch-size", "4"), ("--train-size", "8"), ("--epochs", "2"), ("--lr", "0.01"), ("--train-sizes", "32,48"),
    ("--seed", "9"), ("--val-size", "2"), ("--warmup", "0.5")])
def test_resume_with_other_training_flags_is_refused_by_name(finished_run, flag, value):
    before = (finished_run / "ckpt_last.pt").read_bytes()
    changed = dict(zip(RUN[::2], RUN[1::2])) | {flag: value}
    with pytest.raises(ValueError, match=f"other training flags: {flag} ") as error:
        in_process(finished_run, *[x for kv in changed.items() for x in kv])
    assert "\n" not in str(error.value) and "cosine schedule" in str(error.value)
    assert (finished_run / "ckpt_last.pt").read_bytes() == before
