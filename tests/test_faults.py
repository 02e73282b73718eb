"""Fault tolerance and bad input, driven through the command line."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ENV, ROOT, max_diff, run
from tools.gpu_check import children  # child process ids from /proc, as the GPU check finds torchrun's workers
from data import atomic_open
from model import load_checkpoint

TINY = ["--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2", "--workers", "0", "--seed", "1"]


def assert_clean_error(result, *words):
    """Non-zero exit, a one-line 'error: ...' naming the culprit, no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-2000:]
    for w in words:
        assert w in last, (w, last)


# ---------------------------------------------------------------------------------------
# recovery
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_worker_recovers_under_max_restarts(tmp_path):
    args = ["train.py", "--task", "seg", *TINY, "--epochs", "3", "--train-size", "32", "--batch-size", "8",
            "--val-size", "4", "--ckpt-every", "1"]
    ref = run(*args, "--out", str(tmp_path / "ref"), nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           *args, "--out", str(tmp_path / "cut")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "cut" / "ckpt_last.pt"
    start = time.time()
    while not ckpt.exists():
        assert proc.poll() is None and time.time() - start < 120
        time.sleep(0.02)
    workers = children(proc.pid)      # the two ranks are the agent's child processes
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)                       # mid-epoch: 4 steps per epoch
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert killed_at < 12
    assert "resuming" in out                                  # the restarted group picked up the checkpoint
    a = torch.load(tmp_path / "ref" / "ckpt_last.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert b["step"] == a["step"] == 12
    assert max_diff(a["model"], b["model"]) < 1e-6


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd learning rate blows the weights up within a couple of steps.
    result = run("train.py", "--task", "seg", *TINY, "--epochs", "3", "--train-size", "32", "--batch-size", "8",
                 "--val-size", "4", "--ckpt-every", "1", "--lr", "1e30", "--out", str(tmp_path))
    assert_clean_error(result, "non-finite", "step")
    ckpt = load_checkpoint(str(tmp_path / "ckpt_last.pt"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt_last.pt")

    def save_atomic(obj, path):   # as train.py saves
        with atomic_open(path) as f:
            torch.save(obj, f)
    save_atomic({"w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_atomic({"w": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt_last.pt"]          # no temporary file left behind


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_checkpoint_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = Exploit()
    exploit.marker = marker
    bad = tmp_path / "ckpt_best.pt"
    with open(bad, "wb") as f:
        pickle.dump({"model": exploit, "args": {}}, f)
    result = run("eval.py", "--ckpt", str(bad), "--resolutions", "32")
    assert_clean_error(result, str(bad))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# bad input, each through the command line
# ---------------------------------------------------------------------------------------

def save_jpg(path, size, mode="RGB"):
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path, quality=90)


def save_mask(path, size, values=(0, 255)):
    m = np.full((size[1], size[0]), values[0], np.uint8)
    m[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = values[1]
    Image.fromarray(m).save(path)


def isic_tree(root, n=12):
    img_dir = root / "ISIC2018_Task1-2_Training_Input"
    gt_dir = root / "ISIC2018_Task1_Training_GroundTruth"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    for i in range(n):
        size = (60 + 7 * i, 48 + 5 * i)
        save_jpg(img_dir / f"ISIC_{i:07d}.jpg", size, mode="L" if i == 0 else "RGB")   # one grayscale
        save_mask(gt_dir / f"ISIC_{i:07d}_segmentation.png", size)
    return img_dir, gt_dir


def train_isic(root, out):
    return run("train.py", "--task", "seg", "--data", "isic", "--data-dir", str(root), *TINY, "--epochs", "1",
               "--batch-size", "4", "--out", str(out))


@pytest.mark.slow
def test_isic_grayscale_is_converted_and_trains(tmp_path):
    isic_tree(tmp_path / "isic")
    result = train_isic(tmp_path / "isic", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]


def corrupt_jpeg(img_dir, gt_dir):
    path = img_dir / "ISIC_0000003.jpg"
    path.write_bytes(path.read_bytes()[:200])
    return path


def truncated_png(img_dir, gt_dir):
    path = gt_dir / "ISIC_0000004_segmentation.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


def image_without_mask(img_dir, gt_dir):
    (gt_dir / "ISIC_0000005_segmentation.png").unlink()
    return img_dir / "ISIC_0000005.jpg"


def mask_without_image(img_dir, gt_dir):
    (img_dir / "ISIC_0000006.jpg").unlink()
    return gt_dir / "ISIC_0000006_segmentation.png"


def mask_size_differs(img_dir, gt_dir):
    path = gt_dir / "ISIC_0000007_segmentation.png"
    save_mask(path, (10, 10))
    return path


def mask_values(img_dir, gt_dir):
    path = gt_dir / "ISIC_0000008_segmentation.png"
    save_mask(path, (60 + 7 * 8, 48 + 5 * 8), values=(0, 128))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("damage,words", [
    (corrupt_jpeg, ["cannot read"]), (truncated_png, ["cannot read"]),
    (image_without_mask, ["no mask"]), (mask_without_image, ["without image"]),
    (mask_size_differs, ["mask is 10x10"]), (mask_values, ["0, 128"])])
def test_bad_isic_data(tmp_path, damage, words):
    culprit = damage(*isic_tree(tmp_path / "isic"))
    assert_clean_error(train_isic(tmp_path / "isic", tmp_path / "run"), str(culprit), *words)
    assert not (tmp_path / "run" / "ckpt_last.pt").exists()


@pytest.mark.slow
def test_missing_and_empty_data_folder(tmp_path):
    assert_clean_error(train_isic(tmp_path / "nowhere", tmp_path / "run"), str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert_clean_error(train_isic(tmp_path / "empty", tmp_path / "run"), str(tmp_path / "empty"))


def coco_tree(root, annotations):
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        for i in range(1, 5):
            save_jpg(root / split / f"{i:012d}.jpg", (64, 48))
    for split in ("train", "val"):
        with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(annotations, f)


def coco_annotations():
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in range(1, 5)]
    cats = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 0, "area": 400},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [10, 8, 30, 25], "iscrowd": 0, "area": 750},
            {"id": 3, "image_id": 2, "category_id": 9, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100},
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [4, 4, 0, 10], "iscrowd": 0, "area": 0},
            {"id": 5, "image_id": 3, "category_id": 3, "bbox": [70, 60, 10, 10], "iscrowd": 0, "area": 100}]
    return {"images": images, "categories": cats, "annotations": anns}


def train_coco(root, out):
    return run("train.py", "--task", "det", "--data", "coco", "--data-dir", str(root), "--image-size", "64",
               "--dim", "32", "--depth", "2", "--heads", "2", "--workers", "0", "--epochs", "1",
               "--batch-size", "2", "--out", str(out))


@pytest.mark.slow
def test_coco_bad_boxes_are_dropped_with_a_count(tmp_path):
    coco_tree(tmp_path / "coco", coco_annotations())
    result = train_coco(tmp_path / "coco", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped 3 annotations" in result.stdout + result.stderr


@pytest.mark.slow
def test_coco_missing_key(tmp_path):
    ann = coco_annotations()
    del ann["annotations"][1]["bbox"]
    coco_tree(tmp_path / "coco", ann)
    assert_clean_error(train_coco(tmp_path / "coco", tmp_path / "run"), "instances_train2017.json", "bbox")


@pytest.mark.slow
@pytest.mark.parametrize("scales", ["1,abc", "1,-0.5", "1,0", "0.5,1", ""])
def test_bad_scales(tmp_path, scales):
    assert_clean_error(run("train.py", *TINY, "--scales", scales, "--out", str(tmp_path)), "--scales")


@pytest.mark.slow
def test_unknown_compile_backend(tmp_path):
    assert_clean_error(run("train.py", *TINY, "--compile", "nope", "--out", str(tmp_path)), "--compile nope")


@pytest.mark.slow
def test_batch_not_divisible_by_processes(tmp_path):
    result = run("train.py", *TINY, "--batch-size", "7", "--out", str(tmp_path), nproc=2)
    # torchrun itself reports a failed child with its own traceback; ours must not appear in it
    assert result.returncode != 0 and "train.py\", line" not in result.stderr, result.stderr[-3000:]
    assert "error: --batch-size 7 is not divisible by the 2 processes" in result.stderr


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    result = run("train.py", "--task", "seg", *TINY, "--epochs", "1", "--train-size", "8", "--val-size", "4",
                 "--batch-size", "4", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_checkpoint_of_another_architecture_or_task(seg_run):
    result = run("train.py", "--task", "seg", *TINY, "--dim", "32", "--epochs", "2", "--train-size", "8",
                 "--val-size", "4", "--batch-size", "4", "--out", str(seg_run))
    assert_clean_error(result, str(seg_run / "ckpt_last.pt"), "dim")
    result = run("eval.py", "--task", "det", "--ckpt", str(seg_run / "ckpt_best.pt"), "--resolutions", "32")
    assert_clean_error(result, "seg")


@pytest.mark.slow
def test_truncated_checkpoint(seg_run, tmp_path):
    bad = tmp_path / "ckpt_best.pt"
    bad.write_bytes((seg_run / "ckpt_best.pt").read_bytes()[:1000])
    assert_clean_error(run("eval.py", "--ckpt", str(bad), "--resolutions", "32"), str(bad))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt_last.pt").write_bytes(bad.read_bytes())
    result = run("train.py", "--task", "seg", *TINY, "--epochs", "1", "--train-size", "8", "--val-size", "4",
                 "--batch-size", "4", "--out", str(run_dir))
    assert_clean_error(result, str(run_dir / "ckpt_last.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("res", ["abc", "0", "-64", "128,,256", ""])
def test_bad_resolutions(seg_run, res):
    assert_clean_error(run("eval.py", "--ckpt", str(seg_run / "ckpt_best.pt"), "--resolutions", res), "--resolutions")
