"""The multi-GPU and cluster path, where a CPU can show it: collectives on the training
device, bf16 kept out of box decoding, resumes that never skip a validation, per-rank
random streams, no hang when a rank has nothing to validate, prompt exit on SIGTERM."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import train
from conftest import ENV, ROOT, launcher, max_diff, records, write_isic
from model import build_detector
from tools.gpu_check import children

TINY = ["--task", "seg", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2",
        "--val-size", "4", "--workers", "0", "--seed", "5"]


def torchrun(out, *extra, nproc=2, wait=True):
    cmd = launcher(nproc) + ["train.py", *TINY, "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def in_process(out, *extra):
    """train.main in this process (no torchrun), so that a test can patch its functions."""
    args = train.get_args_parser().parse_args([*TINY, "--out", str(out), *extra])
    train.main(train.fill_defaults(args))


# ------------------------------------------------------------------ collectives (item 1)

def test_collectives_live_on_the_training_device(monkeypatch):
    devices = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t: devices.append(t.device))
    train.all_sum(1.0, torch.device("meta"))
    assert devices == [torch.device("meta")]
    # ...and no other collective is started elsewhere in train.py
    # ...and no other collective is started elsewhere in train.py (gather_objects' object
    # collective picks the process group's own device: the current GPU for NCCL)
    source = open(os.path.join(ROOT, "train.py")).read()
    assert source.count("dist.all_reduce(") == 1 and source.count("dist.all_gather_object(") == 1
    for call in ("dist.barrier(", "dist.broadcast(", "dist.all_gather(", "dist.reduce(", "dist.gather("):
        assert call not in source, call


# ------------------------------------------------------------------ bf16 detection (item 2)

def test_detector_backbone_alone_runs_in_bf16_boxes_stay_float32():
    torch.manual_seed(0)
    det = build_detector("rat", num_classes=3, image_size=320, dim=32, depth=2, heads=2, patch=4,
                         strides=[2, 2]).eval()
    det.score_thresh = 0.0                      # keep boxes even from an untrained head
    det.backbone.amp_dtype = torch.bfloat16     # what train.py sets on CUDA
    dtypes = {}
    det.backbone.body.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.update(backbone=o.dtype))
    det.head.register_forward_hook(lambda m, i, o: dtypes.update(head=o["bbox_regression"].dtype))
    with torch.no_grad():
        boxes = det([torch.rand(3, 320, 320)])[0]["boxes"]
    assert dtypes == {"backbone": torch.bfloat16, "head": torch.float32}
    assert boxes.dtype == torch.float32 and len(boxes) > 0
    far = boxes[boxes > 256]                    # bf16 holds these only to 2 px
    assert len(far) and (far != far.bfloat16().float()).any()


# ------------------------------------------------------------------ padded detection input (item 4)

def test_detection_spacing_comes_from_the_image_not_the_padding():
    det = build_detector("rat", num_classes=3, image_size=100, scales=(1.0, 0.5), dim=32, depth=2, heads=2,
                         patch=4, strides=[2, 2]).eval()
    seen = []
    det.backbone.body.register_forward_pre_hook(lambda m, args: seen.append([tuple(x.shape[2:]) for x in args[0]]))
    with torch.no_grad():
        features = det.backbone(torch.zeros(1, 3, 128, 128))    # the detector pads 100 to 128
    assert seen == [[(100, 100), (50, 50)]]
    # the anchors are laid on the padded grid: 128 / stride cells, strides 4 to 32
    assert [tuple(f.shape[2:]) for f in features.values()] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    with torch.no_grad():
        det([torch.rand(3, 100, 100)])                          # end to end through FCOS


# ------------------------------------------------------------------ resume and validation (items 3, 8)

@pytest.mark.slow
def test_resume_runs_the_validation_that_a_crash_skipped(tmp_path, monkeypatch, keep_sigterm):
    # 2 steps per epoch and a checkpoint every 2 steps: the last one lands on the epoch's
    # last step, then validation dies. The rerun must still validate that epoch.
    args = ["--epochs", "1", "--train-size", "16", "--batch-size", "8", "--ckpt-every", "2"]

    def crash(*a, **k):
        raise RuntimeError("node lost during validation")
    monkeypatch.setattr(train, "evaluate", crash)
    with pytest.raises(RuntimeError):
        in_process(tmp_path, *args)
    monkeypatch.undo()
    in_process(tmp_path, *args)
    assert [r["epoch"] for r in records(tmp_path)] == [1]
    assert (tmp_path / "ckpt_best.pt").exists()


@pytest.mark.slow
def test_sigterm_during_validation_exits_at_once_and_loses_no_training(tmp_path, monkeypatch, keep_sigterm):
    args = ["--epochs", "1", "--train-size", "16", "--batch-size", "8"]
    real = train.evaluate

    def evaluate_then_sigterm(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(train, "evaluate", evaluate_then_sigterm)
    with pytest.raises(SystemExit) as stop:
        in_process(tmp_path, *args)
    assert stop.value.code == 143
    assert torch.load(tmp_path / "ckpt_last.pt", weights_only=True)["step"] == 2   # the epoch's training is kept
    assert not (tmp_path / "metrics.jsonl").exists()
    monkeypatch.undo()
    in_process(tmp_path, *args)
    assert [r["epoch"] for r in records(tmp_path)] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--epochs", "--image-size"])
def test_zero_is_rejected_not_replaced_by_the_default(tmp_path, flag):
    run = subprocess.run([sys.executable, "train.py", *TINY, "--out", str(tmp_path), flag, "0"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {flag} must be a positive integer")


# ------------------------------------------------------------------ ranks (items 5, 6; issue 15)

@pytest.mark.slow
def test_ranks_draw_different_streams_and_resume_each_its_own(tmp_path):
    # Dropout on, 2 ranks: each rank has its own random stream, all of them saved, each
    # restored on its own rank: a resumed run lands on the uninterrupted run's weights.
    args = ["--epochs", "2", "--train-size", "48", "--batch-size", "8", "--ckpt-every", "1", "--dropout", "0.2"]
    full = torchrun(tmp_path / "full", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    rng = torch.load(tmp_path / "full" / "ckpt_last.pt", weights_only=True)["rng"]
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])

    proc = torchrun(tmp_path / "cut", *args, wait=False)
    ckpt = tmp_path / "cut" / "ckpt_last.pt"
    start = time.time()
    while not ckpt.exists():
        assert proc.poll() is None and time.time() - start < 120, proc.stderr.read()[-3000:]
        time.sleep(0.01)
    os.kill(children(proc.pid)[1], signal.SIGTERM)    # one rank only: the ranks agree to stop together
    proc.communicate(timeout=120)
    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    assert stopped_at < 12, "the run finished before it could be interrupted"
    rerun = torchrun(tmp_path / "cut", *args)
    assert rerun.returncode == 0 and "resuming" in rerun.stdout, rerun.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "ckpt_last.pt", weights_only=True)["model"]
    b = torch.load(ckpt, weights_only=True)["model"]
    assert max_diff(a, b) < 1e-6


@pytest.mark.slow
def test_fewer_validation_images_than_ranks_does_not_hang(tmp_path):
    run = torchrun(tmp_path, "--epochs", "1", "--train-size", "8", "--batch-size", "4", "--val-size", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    assert records(tmp_path)[0]["val_images"] == 1
    # CPU threads are shared out between the processes of a node, never oversubscribed
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"2 process(es) on cpu ({threads} threads each)" in run.stdout


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="8 processes on this node but 1 GPU"):
        train.setup_distributed()


# ------------------------------------------------------------------ ISIC cache (item 7)

def isic_tree(root):
    write_isic(root, "Training", 8)
    write_isic(root, "Validation", 2, first=100)
    write_isic(root, "Test", 2, first=200)
    return sorted(str(p) for p in root.rglob("*"))


@pytest.mark.slow
def test_isic_cache_goes_to_cache_dir_decoded_by_one_process_per_node(tmp_path):
    before = isic_tree(tmp_path / "isic")
    run = torchrun(tmp_path / "run", "--data", "isic", "--data-dir", str(tmp_path / "isic"), "--cache-dir",
                   str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "4", "--val-size", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(str(p) for p in (tmp_path / "isic").rglob("*")) == before    # the dataset folder is untouched
    assert len(list((tmp_path / "cache" / "32x32").glob("*.png"))) == 2 * 10   # train + val, image and mask
    # one process decodes (a progress bar for train, one for val), the other waits and reads the cache
    starts = [line for line in run.stderr.replace("\r", "\n").splitlines() if "caching" in line and " 0%|" in line]
    assert len(starts) == 2, starts


@pytest.mark.slow
def test_unwritable_cache_is_a_clear_error(tmp_path):
    isic_tree(tmp_path / "isic")
    run = subprocess.run([sys.executable, "train.py", *TINY, "--data", "isic", "--data-dir", str(tmp_path / "isic"),
                          "--cache-dir", "/proc/rat-cache", "--out", str(tmp_path / "run")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: /proc/rat-cache") and "--cache-dir" in last, last


def test_several_nodes_sharing_torchruns_store_across_restarts_is_refused(monkeypatch):
    # Restart counts are kept per node: a restarted multi-node group that shared torchrun's
    # store would wait for itself forever. Refuse at once, saying what to set.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist, "rendezvous", lambda url: iter([(object(), 0, 2)]))
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", TORCHELASTIC_USE_AGENT_STORE="True",
               TORCHELASTIC_MAX_RESTARTS="1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        train.setup_distributed()
