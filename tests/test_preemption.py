"""Preemption and crashes at the worst moments: SIGTERM to the whole process group (as torchrun
and scancel send it), a crash between the writes that end an epoch, a slow first caching under
torchrun, and the per-step checks folded into one collective every --sync-every steps."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import ENV, ROOT, launcher, records

TINY = ["--task", "seg", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2", "--val-size", "4",
        "--workers", "0", "--seed", "7"]


def in_process(out, *extra):
    """train.main in this process, so that a test can patch its functions."""
    args = train.get_args_parser().parse_args([*TINY, "--out", str(out), *extra])
    train.main(train.fill_defaults(args))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # as OMP_NUM_THREADS=1 does for the subprocesses: 2 threads on 2 busy cores make a step seconds long
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ SIGTERM to the process group

@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_resumes_to_the_same_weights(tmp_path):
    # DataLoader workers share the main process's group: the signal reaches them too. 2 epochs
    # of 32 steps; the signal comes a few steps into the first.
    cmd = [sys.executable, "train.py", "--image-size", "32", "--dim", "16", "--heads", "2", "--depth", "2",
           "--train-size", "128", "--val-size", "8", "--epochs", "2", "--batch-size", "4", "--workers", "2"]
    full = subprocess.run(cmd + ["--out", str(tmp_path / "full")], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    log = tmp_path / "cut.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "cut")], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)
    try:
        start = time.time()
        while not re.search(r"epoch 1/2: .*\b([3-9]|[12][0-9])/32 \[", log.read_text()):   # tqdm: step 3 or later
            assert proc.poll() is None and time.time() - start < 120, log.read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, log.read_text()[-3000:]
    saved = torch.load(tmp_path / "cut" / "ckpt_last.pt", weights_only=True)["step"]
    assert f"at step {saved};" in out and saved in (10, 20, 30, 32)   # epoch 1's checks: every 10 steps, its end
    # the workers, which ignore SIGTERM, end with their parent: nothing of the group is left
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("loader workers outlived the run")

    rerun = subprocess.run(cmd + ["--out", str(tmp_path / "cut")], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"ckpt_last.pt at step {saved}/64" in rerun.stdout
    assert same_weights(model(tmp_path / "full" / "ckpt_last.pt"), model(tmp_path / "cut" / "ckpt_last.pt"))


# ------------------------------------------------------------------ the writes that end an epoch

RUN = ["--epochs", "2", "--train-size", "16", "--batch-size", "8"]       # 2 epochs of 2 steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        in_process(out, *RUN)
    finally:
        signal.signal(signal.SIGTERM, handler)
    return out


def crash_at_write_after_validation(monkeypatch, n):
    """The n-th checkpoint write after the first validation fails, as a node lost there would."""
    real_evaluate, real_save = train.evaluate, train.save
    validations, writes = [], []

    def evaluate(*a, **k):
        validations.append(1)
        return real_evaluate(*a, **k)

    def save(path, *a):
        if validations:
            writes.append(path)
            if len(writes) == n:
                raise OSError(f"node lost while writing {path}")
        real_save(path, *a)
    monkeypatch.setattr(train, "evaluate", evaluate)
    monkeypatch.setattr(train, "save", save)


def assert_like_uninterrupted(out, uninterrupted):
    assert same_weights(model(out / "ckpt_best.pt"), model(uninterrupted / "ckpt_best.pt"))
    assert same_weights(model(out / "ckpt_last.pt"), model(uninterrupted / "ckpt_last.pt"))
    got, expected = records(out), records(uninterrupted)
    assert [r["epoch"] for r in got] == [1, 2]                         # one line per epoch, none twice
    for a, b in zip(got, expected):
        assert a["dice"] == b["dice"] and a["step"] == b["step"]
    assert got[1]["train_loss"] == expected[1]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_a_crash_between_the_epoch_end_writes_is_repaired_by_the_rerun(tmp_path, monkeypatch, keep_sigterm,
                                                                      uninterrupted, n):
    crash_at_write_after_validation(monkeypatch, n)
    with pytest.raises(OSError, match="node lost"):
        in_process(tmp_path, *RUN)
    monkeypatch.undo()
    in_process(tmp_path, *RUN)
    assert_like_uninterrupted(tmp_path, uninterrupted)


@pytest.mark.slow
def test_a_run_folder_of_the_old_write_order_gets_its_lost_best_and_metrics_line(tmp_path, monkeypatch,
                                                                                keep_sigterm, uninterrupted):
    # Earlier versions wrote ckpt_last (validated, with the new best) first; a crash right after
    # it lost ckpt_best and the epoch's line. Made here from a crash at the first write.
    crash_at_write_after_validation(monkeypatch, 1)
    with pytest.raises(OSError):
        in_process(tmp_path, *RUN)
    monkeypatch.undo()
    assert not (tmp_path / "ckpt_best.pt").exists() and not (tmp_path / "metrics.jsonl").exists()
    ckpt = torch.load(tmp_path / "ckpt_last.pt", weights_only=True)
    ckpt.update(validated=1, best=records(uninterrupted)[0]["dice"])
    torch.save(ckpt, tmp_path / "ckpt_last.pt")
    in_process(tmp_path, *RUN)
    assert_like_uninterrupted(tmp_path, uninterrupted)


# ------------------------------------------------------------------ checks every --sync-every steps

@pytest.mark.slow
def test_the_training_loop_syncs_with_the_host_once_per_check_not_per_step(tmp_path, monkeypatch, keep_sigterm):
    # What 20 more steps cost (--sync-every 10, the default): the loop used to start 2 collectives
    # and read 4 values back per step; now one collective and 2 reads per check
    counts = {"collectives": 0, "host reads": 0}

    def counted(fn, what):
        def wrapper(*a, **k):
            counts[what] += sys._getframe(1).f_globals is vars(train)   # train.py's own calls (not the data's)
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(train, "all_sum", counted(train.all_sum, "collectives"))
    monkeypatch.setattr(torch.Tensor, "item", counted(torch.Tensor.item, "host reads"))
    monkeypatch.setattr(torch.Tensor, "tolist", counted(torch.Tensor.tolist, "host reads"))
    per_run = []
    for steps in (20, 40):
        counts.update({k: 0 for k in counts})
        in_process(tmp_path / str(steps), "--epochs", "1", "--train-size", str(8 * steps), "--batch-size", "8")
        per_run.append(dict(counts))
    assert per_run[1]["collectives"] - per_run[0]["collectives"] == 2, per_run
    assert per_run[1]["host reads"] - per_run[0]["host reads"] == 4, per_run


@pytest.mark.slow
def test_non_finite_loss_names_the_steps_since_the_last_check(tmp_path, monkeypatch, keep_sigterm):
    real, calls = train.seg_loss, []

    def loss_nan_at_step_5(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 5 else 1.0)
    monkeypatch.setattr(train, "seg_loss", loss_nan_at_step_5)
    with pytest.raises(FloatingPointError, match=r"non-finite loss in steps 4-6 \(epoch 1\)"):
        in_process(tmp_path, "--epochs", "1", "--train-size", "64", "--batch-size", "8", "--sync-every", "3",
                   "--ckpt-every", "3")
    ckpt = torch.load(tmp_path / "ckpt_last.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_sigterm_is_saved_at_the_next_check(tmp_path, monkeypatch, keep_sigterm):
    real, calls = train.seg_loss, []

    def sigterm_in_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(train, "seg_loss", sigterm_in_step_5)
    with pytest.raises(SystemExit) as stop:
        in_process(tmp_path, "--epochs", "1", "--train-size", "128", "--batch-size", "8", "--sync-every", "4")
    assert stop.value.code == 143
    assert torch.load(tmp_path / "ckpt_last.pt", weights_only=True)["step"] == 8


# ------------------------------------------------------------------ a slow first caching under torchrun

SLOW_CACHING = """
import os, sys, time
sys.path.insert(0, {root!r})
import train
build = train.build_datasets
def slow_build(args):  # local rank 0 caches the data while the other ranks wait in a collective
    if os.environ["LOCAL_RANK"] == "0":
        time.sleep({seconds})
    return build(args)
train.build_datasets = slow_build
train.main(train.fill_defaults(train.get_args_parser().parse_args()))
"""


@pytest.mark.slow
def test_dist_timeout_covers_a_slow_first_caching(tmp_path):
    script = tmp_path / "slow_caching.py"
    script.write_text(SLOW_CACHING.format(root=ROOT, seconds=8))

    def torchrun(minutes, out):
        return subprocess.run([*launcher(2), str(script), *TINY, "--epochs", "1", "--train-size", "8", "--batch-size",
                               "4", "--dist-timeout", str(minutes), "--out", str(tmp_path / out)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    # 8 s of caching: past a 3 s timeout the waiting rank gives up...
    short = torchrun(0.05, "short")
    assert short.returncode != 0 and "Timed out waiting 3000ms" in short.stderr, short.stderr[-3000:]
    # ...and inside a 1 min one the job goes on
    ok = torchrun(1, "long")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert [r["epoch"] for r in records(tmp_path / "long")] == [1]
