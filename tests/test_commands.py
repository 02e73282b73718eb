"""The three commands users type, verbatim: torchrun ... train.py --task seg, bash ablate.sh,
python eval.py --resolutions 128,256,512."""
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ENV, ROOT

COMMANDS = ["torchrun --nproc_per_node=8 train.py --task seg", "bash ablate.sh",
            "python eval.py --resolutions 128,256,512"]


@pytest.mark.slow
def test_eval_without_ckpt_takes_the_newest_runs_best_checkpoint(tmp_path):
    tiny = ["--task", "seg", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2", "--epochs", "1",
            "--train-size", "8", "--val-size", "4", "--batch-size", "8", "--workers", "0"]
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *tiny, "--out", "runs/older"],
                           cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    shutil.copytree(tmp_path / "runs" / "older", tmp_path / "runs" / "newer")
    later = time.time() + 10
    os.utime(tmp_path / "runs" / "newer" / "ckpt_best.pt", (later, later))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--resolutions", "32,64", "--limit", "2",
                          "--samples", "0", "--workers", "0"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    first = run.stdout.splitlines()[0]
    assert first.startswith(f"evaluating {os.path.join('runs', 'newer', 'ckpt_best.pt')}"), first
    assert (tmp_path / "runs" / "newer" / "eval" / "results.json").exists()
    assert not (tmp_path / "runs" / "older" / "eval").exists()


@pytest.mark.slow
def test_eval_without_any_run_says_to_train_first(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--resolutions", "128,256,512"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "train first" in lines[0], run.stderr
    assert "python train.py --task seg" in lines[0]


def test_readme_first_screen_shows_the_three_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        first_screen = "".join(f.readlines()[:50])
    for command in COMMANDS:
        assert command in first_screen, command
