"""What several test files share: the repository's path, the environment of the processes the
tests start, and small helpers. pytest puts this folder on sys.path (it has no __init__.py),
so a test file imports them by name: `from conftest import ROOT, ENV`."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread per process the tests start: the CPU is shared


@pytest.fixture
def keep_sigterm():
    """Restore the SIGTERM handler that an in-process train.main installs."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def records(out):
    """A run folder's metrics.jsonl as a list of dicts."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def launcher(nproc=1):
    """The start of a command line running a script: python, or torchrun with `nproc` processes."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def run(*args, nproc=1, timeout=300):
    """`python *args` (torchrun with nproc > 1) in the repository, output captured."""
    return subprocess.run(launcher(nproc) + list(args), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "ckpt_last.pt"), weights_only=True)["model"]


def max_diff(a, b):
    """Largest absolute difference between two state dicts."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def wait_for_checkpoint(proc, path, timeout=120):
    """Until `path` exists; fails if the process `proc` (stderr piped) ends first or time runs out."""
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - start < timeout
        time.sleep(0.02)


def write_isic(root, stage, n, sizes=((40, 30), (36, 48), (50, 50)), first=0):
    """ISIC layout: stage is Training / Validation / Test. Image k has a dark ellipse = its mask."""
    image_dir = root / f"ISIC2018_Task1-2_{stage}_Input"
    mask_dir = root / f"ISIC2018_Task1_{stage}_GroundTruth"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    (image_dir / "LICENSE.txt").write_text("license")
    for k in range(first, first + n):
        w, h = sizes[k % len(sizes)]
        yy, xx = np.mgrid[:h, :w]
        inside = ((xx - w / 2) / (w / 4)) ** 2 + ((yy - h / 2) / (h / 4)) ** 2 < 1
        rgb = np.where(inside[..., None], [60, 30, 20], [230, 190, 170]).astype(np.uint8)
        image = Image.fromarray(rgb)
        if k % len(sizes) == 1:
            image = image.convert("L")  # a grayscale JPEG
        image.save(image_dir / f"ISIC_{k:07d}.jpg", quality=95)
        mask = inside.astype(np.uint8) * (1 if k % 2 else 255)  # both 0/1 and 0/255 masks occur
        Image.fromarray(mask).save(mask_dir / f"ISIC_{k:07d}_segmentation.png")
    return image_dir, mask_dir


# --------------------------------------------------------------------------------------- ISIC 2018, official
# The official layout with non-square originals of known shapes (test_official.py scores them with
# the challenge's scorer too), and a checkpoint whose model the tests replace

def ellipse(w, h, diameter):
    """bool [h, w]: a centred ellipse whose axes are `diameter` times each side (0: empty)."""
    yy, xx = np.mgrid[:h, :w] + 0.5
    return ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) < (diameter / 2) ** 2


# (width, height, dark lesion, ground truth): non-square originals of several sizes
GOOD = [(64, 48, 0.5, 0.5), (60, 40, 0.6, 0.55), (36, 48, 0.5, 0.5)]  # 4:3, 3:2, 3:4
TEST = [(64, 48, 0.5, 0.5),    # 4:3, a clean lesion
        (60, 40, 0.6, 0.55),   # 3:2, slightly over-segmented
        (36, 48, 0.3, 0.6),    # the truth is much larger than the dark part: IoU < 0.65
        (50, 50, 0.4, 0.0),    # empty truth, a dark decoy: false positives only
        (45, 30, 0.0, 0.0)]    # empty truth, nothing dark: both masks empty


def write_isic_stage(root, stage, specs, first):
    image_dir = root / f"ISIC2018_Task1-2_{stage}_Input"
    mask_dir = root / f"ISIC2018_Task1_{stage}_GroundTruth"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    for k, (w, h, dark, truth) in enumerate(specs, first):
        rgb = np.where(ellipse(w, h, dark)[..., None], [60, 30, 20], [230, 190, 170]).astype(np.uint8)
        Image.fromarray(rgb).save(image_dir / f"ISIC_{k:07d}.jpg", quality=95)
        # official ground truths are 0/255, the scorer's foreground is > 128
        Image.fromarray(ellipse(w, h, truth).astype(np.uint8) * 255).save(mask_dir / f"ISIC_{k:07d}_segmentation.png")
    return mask_dir


def write_isic_tree(root):
    write_isic_stage(root, "Training", GOOD * 2, 0)
    write_isic_stage(root, "Validation", GOOD, 100)
    return write_isic_stage(root, "Test", TEST, 200)


def fake_checkpoint(path, **args):
    """A checkpoint eval.py accepts; the tests replace the model it would build."""
    arch = dict(model="rat", scales=[1.0, 0.5], pe="rose", sga="local", depth=2, heads=2, strides=None,
                dropout=0.0, seed=0)
    torch.save({"model": {}, "args": {**arch, **args}}, path)
    return path


def darkness_model(levels, spacings=None):
    """Lesion = darker than mid-grey: logits [B,1,r,r] from the finest level."""
    return (0.5 - levels[0].mean(1, keepdim=True)) * 20


def run_eval(ckpt, out, *extra):
    """eval.py's main in this process on `ckpt` -> its results.json."""
    import eval as ev
    ev.main(ev.get_args_parser().parse_args(["--ckpt", str(ckpt), "--out", str(out), "--workers", "0", *extra]))
    return json.loads((out / "results.json").read_text())


# --------------------------------------------------------------------------------------- COCO 2017

# val2017 (the test split): sizes and aspect ratios differ, one grayscale, one without annotations
VAL_IMAGES = [dict(id=7, file_name="a.jpg", width=200, height=150),   # 4:3
              dict(id=3, file_name="b.jpg", width=120, height=180),   # 2:3
              dict(id=12, file_name="c.jpg", width=160, height=160),  # grayscale
              dict(id=20, file_name="d.jpg", width=90, height=60),    # no annotation
              dict(id=5, file_name="e.jpg", width=250, height=100)]
# bbox xywh, COCO category id, annotated (mask) area, iscrowd
VAL_ANNS = {7: [([10, 10, 100, 100], 5, 8000, 0),      # box 10000: large, by its area medium
                ([120, 20, 30, 30], 2, 500, 0),        # small
                ([0, 100, 200, 50], 5, 6000, 1)],      # a crowd region
            3: [([5, 5, 40, 40], 2, 900, 0),           # box 1600: medium, by its area small
                ([50, 60, 60, 100], 5, 5000, 0)],      # medium, missed
            12: [([20, 20, 110, 110], 9, 12000, 0),    # large
                 ([140, 140, 15, 15], 2, 200, 0),      # small
                 ([3, 3, 0, 5], 2, 0, 0)],             # zero width: unmatchable, counts as COCOeval counts it
            5: [([0, 0, 80, 40], 9, 2000, 0),          # medium
                ([200, 50, 60, 60], 5, 2500, 0)]}      # overhangs the image: COCOeval uses it unclipped
CATEGORIES = [dict(id=9, name="kite"), dict(id=2, name="dog"), dict(id=5, name="cat")]


def write_coco_tree(root, n_train=12):
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
    for k, im in enumerate(VAL_IMAGES):  # flat grey levels: the fake detector reads which image it sees
        mode = "L" if im["id"] == 12 else "RGB"
        Image.new(mode, (im["width"], im["height"]), (level(k),) * (1 if mode == "L" else 3)).save(
            root / "val2017" / im["file_name"], quality=95)
    anns = [dict(image_id=i, bbox=b, category_id=c, area=a, iscrowd=z)
            for i, objects in VAL_ANNS.items() for b, c, a, z in objects]
    anns = [dict(id=j + 1, **a) for j, a in enumerate(anns)]
    ann_path = root / "annotations" / "instances_val2017.json"
    ann_path.write_text(json.dumps(dict(images=VAL_IMAGES, annotations=anns, categories=CATEGORIES)))
    train_images = [dict(id=100 + i, file_name=f"{i:012d}.jpg", width=48 + 4 * i, height=40) for i in range(n_train)]
    for im in train_images:
        Image.new("RGB", (im["width"], im["height"]), (90, 120, 150)).save(root / "train2017" / im["file_name"])
    train_anns = [dict(id=i, image_id=im["id"], bbox=[4, 4, 20, 16], category_id=2, area=300, iscrowd=0)
                  for i, im in enumerate(train_images)]
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps(dict(images=train_images, annotations=train_anns, categories=CATEGORIES)))
    return ann_path


def level(k):
    """The flat grey of val2017 image k in write_coco_tree (how a fake detector knows which it sees)."""
    return 30 + 40 * k
