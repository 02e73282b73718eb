"""gpu_check.sh, the unattended GPU check, tested where GPU time costs nothing: its dry run
runs every item on the CPU at tiny sizes (about 100 s on 2 shared cores)."""
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

pytestmark = pytest.mark.slow   # every test here runs gpu_check.sh

ITEMS = {"seg", "det", "channels_last", "eval", "ddp", "bench", "compile"}
# CUDA hidden: the checks' own CUDA probes must not matter here
ENV = {**ENV, "CUDA_VISIBLE_DEVICES": ""}


def gpu_check(*args, timeout=600):
    return subprocess.run(["bash", "gpu_check.sh", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def item_lines(stdout):
    """{item: line} of the PASS/FAIL lines; each item exactly once."""
    lines = [l for l in stdout.splitlines() if l.startswith(("PASS ", "FAIL "))]
    items = [l.split()[1] for l in lines]
    assert len(items) == len(set(items)), stdout
    return dict(zip(items, lines))


def test_dry_run_passes_every_item(tmp_path):
    result = gpu_check("--dry-run", "--out", str(tmp_path))
    out = result.stdout
    lines = item_lines(out)
    assert set(lines) == ITEMS, out
    failed = [l for l in lines.values() if not l.startswith("PASS ")]
    assert not failed, "\n".join(failed) + "\n" + result.stderr[-2000:]
    assert out.strip().splitlines()[-1] == f"{len(ITEMS)} passed, 0 failed", out
    assert result.returncode == 0
    # the header says when, with what, and that this was not a GPU run
    assert "torch " in out and "DRY RUN" in out, out
    # every other line is a header line ("# ...")
    assert all(l.startswith(("# ", "PASS ", "FAIL ")) for l in out.strip().splitlines()[:-1]), out
    # the ddp item really interrupted a run and resumed it
    assert "SIGTERM to rank 1" in lines["ddp"] and "resumed at step" in lines["ddp"], lines["ddp"]
    assert (tmp_path / "ddp" / "first.log").exists() and (tmp_path / "ddp" / "resume.log").exists()


def test_a_failed_item_is_reported_and_the_next_one_still_runs(tmp_path):
    # eval needs seg's and det's checkpoints, which an empty --out does not have
    result = gpu_check("--dry-run", "--out", str(tmp_path), "--only", "eval,bench", timeout=300)
    lines = item_lines(result.stdout)
    assert set(lines) == {"eval", "bench"}, result.stdout
    assert lines["eval"].startswith("FAIL eval no ") and "ckpt_best.pt" in lines["eval"], lines["eval"]
    assert lines["bench"].startswith("PASS bench "), lines["bench"]
    assert result.stdout.strip().splitlines()[-1] == "1 passed, 1 failed"
    assert result.returncode != 0


def test_budget_and_arguments(tmp_path):
    # a spent budget: the item is reported as not run, not silently dropped
    result = gpu_check("--dry-run", "--out", str(tmp_path), "--only", "seg", "--budget", "0", timeout=120)
    assert "FAIL seg not run" in result.stdout and result.returncode != 0, result.stdout
    result = gpu_check("--only", "nope", timeout=60)
    assert result.returncode == 2 and "unknown item nope" in result.stderr
    # without --dry-run on a machine without CUDA: a clear refusal, not hours of CPU training
    result = gpu_check("--out", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr, result.stderr


def test_a_hanging_item_is_timed_out_and_killed(tmp_path):
    # A stand-in python that hangs in train.py (as a stuck NCCL rank would) and runs the rest.
    pid_file = tmp_path / "hung.pid"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\ncase \"$*\" in *train.py*) echo $$ > {pid_file}; exec sleep 600 ;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    env = {**ENV, "PYTHON": str(fake)}
    result = subprocess.run(["bash", "gpu_check.sh", "--dry-run", "--out", str(tmp_path / "out"), "--only", "seg",
                             "--budget", "16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "FAIL seg timed out after 16 s" in result.stdout and result.returncode != 0, result.stdout
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
