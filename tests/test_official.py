"""Real-data numbers as the official tools compute them.

ISIC 2018: eval.py scores every prediction at its image's original size and writes the
masks in the challenge's submission format; the challenge's own scorer (the
isic-challenge-scoring package, a test-only oracle) must give the same five numbers on
those files. COCO 2017: the in-repo AP must equal pycocotools' COCOeval run on
detections_<r>.json and the annotation file. Splits: the reported split is never the one
that picked ckpt_best.pt. Small trees (written by conftest.py); the models are either a tiny
trained run or fakes whose outputs are known.
"""
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import eval as ev
import train
from conftest import (CATEGORIES, ENV, GOOD, ROOT, TEST, VAL_IMAGES, darkness_model, fake_checkpoint, run_eval,
                      write_coco_tree, write_isic_tree)
from metrics import SEG_METRICS, coco_ap

# the scorer calls a pandas API that pandas 3 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword:DeprecationWarning")
ISIC_OFFICIAL = {"dice": "dice", "iou": "jaccard", "sensitivity": "sensitivity", "specificity": "specificity",
                 "thresholded_jaccard": "threshold_jaccard"}  # ours -> isic-challenge-scoring's names


# ---------------------------------------------------------------------------------------
# ISIC 2018
# ---------------------------------------------------------------------------------------

def official_scores(truth_dir, prediction_dir):
    """The ISIC challenge's scorer on two folders -> {our metric name: value}."""
    from isic_challenge_scoring import SegmentationScore

    score = SegmentationScore.from_dir(pathlib.Path(truth_dir), pathlib.Path(prediction_dir))
    return {ours: float(score.macro_average[theirs]) for ours, theirs in ISIC_OFFICIAL.items()}


def check_masks(mask_dir, truth_dir):
    """Submission format: one 8-bit 0/255 PNG per ground truth, same name, same size."""
    truths = sorted(os.listdir(truth_dir))
    assert sorted(os.listdir(mask_dir)) == truths
    for name in truths:
        with Image.open(mask_dir / name) as mask, Image.open(truth_dir / name) as truth:
            assert mask.mode == "L" and mask.size == truth.size, name
            assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_isic_scores_equal_the_official_scorer(tmp_path, monkeypatch):
    truth_dir = write_isic_tree(tmp_path / "isic")
    ckpt = fake_checkpoint(tmp_path / "ckpt.pt", task="seg", image_size=32, dim=16, patch=2, num_classes=1,
                           data="isic", data_dir=str(tmp_path / "isic"))
    monkeypatch.setattr(ev, "build_eval_model", lambda *a: darkness_model)
    results = run_eval(ckpt, tmp_path / "out", "--resolutions", "40,24", "--batch-size", "2", "--samples", "2")
    for row in results["rows"]:
        r = row["resolution"]
        assert row["images"] == len(TEST)
        check_masks(tmp_path / "out" / f"masks_{r}", truth_dir)
        official = official_scores(truth_dir, tmp_path / "out" / f"masks_{r}")
        for k in SEG_METRICS:
            assert abs(row[k] - official[k]) < 1e-9, (r, k, row[k], official[k])
        # not a trivial agreement: one image fails the 0.65 threshold, the others don't
        assert 0 < row["thresholded_jaccard"] < row["iou"] < row["dice"] < 1
        assert row["specificity"] < 1
    assert results["split"] == "test" and "original size" in results["scored"]
    # the empty-truth rules are the scorer's (and DESIGN.md's): both empty scores 1, a decoy 0
    masks = tmp_path / "out" / "masks_40"
    assert not np.asarray(Image.open(masks / "ISIC_0000204_segmentation.png")).any()
    assert np.asarray(Image.open(masks / "ISIC_0000203_segmentation.png")).any()
    # results.csv and results.md carry the same numbers under the README's names
    csv_text = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert csv_text[0].startswith("resolution,input," + ",".join(SEG_METRICS))
    assert float(csv_text[1].split(",")[2]) == results["rows"][0]["dice"]
    assert f"{results['rows'][1]['thresholded_jaccard']:.4f}" in (tmp_path / "out" / "results.md").read_text()


def test_original_masks_are_loaded_per_sample_and_collated_as_a_list(tmp_path):
    write_isic_tree(tmp_path / "isic")
    ds = data.SegDataset("isic", "test", 32, scales=(1, 0.5), data_dir=str(tmp_path / "isic"), original_masks=True)
    levels, mask = ds[0]
    assert [tuple(x.shape) for x in levels] == [(3, 32, 32), (3, 16, 16)]  # the 4:3 image, squashed
    assert mask.dtype == torch.bool and mask.shape == (1, 48, 64)  # its original ground truth
    batch_levels, masks = data.seg_collate([ds[0], ds[1]])
    assert batch_levels[0].shape == (2, 3, 32, 32) and [tuple(m.shape) for m in masks] == [(1, 48, 64), (1, 40, 60)]
    with pytest.raises(ValueError, match="original_masks"):
        data.SegDataset("isic", "train", 32, data_dir=str(tmp_path / "isic"), augment=True, original_masks=True)


@pytest.fixture(scope="module")
def isic_run(tmp_path_factory):
    """A tiny RAT trained on the ISIC tree by two processes (validation split across them)."""
    root = tmp_path_factory.mktemp("isic_run")
    write_isic_tree(root / "isic")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", "--task", "seg", "--data", "isic", "--data-dir", str(root / "isic"),
                          "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2", "--epochs", "1",
                          "--batch-size", "2", "--workers", "0", "--out", str(root / "run")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return root


@pytest.mark.slow
def test_isic_end_to_end_non_square_train_and_eval_agree(isic_run, tmp_path):
    # train.py validated on the official Validation folder at each image's original size...
    logged = json.loads((isic_run / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["val_images"] == len(GOOD)  # 3 images over 2 ranks: each counted once
    # ...and eval.py, fed the same squashed 32 px inputs, scores the same checkpoint identically
    ckpt = isic_run / "run" / "ckpt_best.pt"
    run = subprocess.run([sys.executable, "eval.py", "--ckpt", str(ckpt), "--split", "val", "--resolutions", "32",
                          "--batch-size", "1", "--workers", "0", "--samples", "1", "--out", str(tmp_path / "val")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    [row] = json.loads((tmp_path / "val" / "results.json").read_text())["rows"]
    for k in SEG_METRICS:
        assert abs(row[k] - logged[k]) < 1e-12, (k, row[k], logged[k])
    check_masks(tmp_path / "val" / "masks_32", isic_run / "isic" / "ISIC2018_Task1_Validation_GroundTruth")
    # the test split, at two resolutions: the 4:3 image's mask comes back 64 x 48
    results = run_eval(ckpt, tmp_path / "test", "--resolutions", "24,48", "--samples", "0")
    truth_dir = isic_run / "isic" / "ISIC2018_Task1_Test_GroundTruth"
    for row in results["rows"]:
        masks = tmp_path / "test" / f"masks_{row['resolution']}"
        check_masks(masks, truth_dir)
        assert Image.open(masks / "ISIC_0000200_segmentation.png").size == (64, 48)
        official = official_scores(truth_dir, masks)
        for k in SEG_METRICS:
            assert abs(row[k] - official[k]) < 1e-9, (row["resolution"], k)


# ---------------------------------------------------------------------------------------
# COCO 2017
# ---------------------------------------------------------------------------------------

# detections in original pixels: bbox xywh, category id, score
DETS = {7: [([14, 12, 100, 98], 5, 0.9),   # IoU ~0.9 with the medium-by-area object
            ([126, 24, 30, 30], 2, 0.6),   # IoU ~0.5 with the small one
            ([40, 110, 50, 30], 5, 0.8),   # inside the crowd region: ignored
            ([150, 60, 40, 40], 2, 0.95)],  # a false positive
        3: [([7, 6, 40, 40], 2, 0.7)],     # the small-by-area object
        12: [([25, 22, 110, 110], 9, 0.85),  # large, IoU ~0.88
             ([20, 20, 110, 110], 2, 0.9),   # right place, wrong class
             ([141, 139, 15, 15], 2, 0.75),  # small
             ([40, 40, 120, 110], 9, 0.99)],  # a large false positive
        20: [([10, 10, 30, 30], 9, 0.5)],
        5: [([2, 0, 80, 40], 9, 0.65),
            ([198, 48, 60, 62], 5, 0.55),
            ([100, 10, 110, 80], 9, 0.4)]}


def fake_detector(images):
    """Knows the val2017 images by their grey level; returns DETS on the r x r input."""
    label = {c["id"]: k + 1 for k, c in enumerate(sorted(CATEGORIES, key=lambda c: c["id"]))}
    out = []
    for image in images:
        k = round((image.mean().item() * 255 - 30) / 40)
        im = VAL_IMAGES[k]
        sx, sy = image.shape[-1] / im["width"], image.shape[-2] / im["height"]
        dets = DETS.get(im["id"], [])
        boxes = [[x * sx, y * sy, (x + w) * sx, (y + h) * sy] for (x, y, w, h), _, _ in dets]
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor([s for _, _, s in dets]),
                    "labels": torch.tensor([label[c] for _, c, _ in dets], dtype=torch.int64)})
    return out


def cocoeval_stats(ann_path, results_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        evaluator = COCOeval(gt, gt.loadRes(str(results_path)), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:6]


def det_checkpoint(path, root, **extra):
    return fake_checkpoint(path, task="det", image_size=64, dim=32, patch=4, strides=[2, 2], num_classes=3,
                           data="coco", data_dir=str(root), **extra)


def test_coco_ap_equals_cocoeval_on_the_written_detections(tmp_path, monkeypatch):
    ann_path = write_coco_tree(tmp_path / "coco")
    ckpt = det_checkpoint(tmp_path / "ckpt.pt", tmp_path / "coco", coco_val_size=3)
    monkeypatch.setattr(ev, "build_eval_model", lambda *a: fake_detector)
    results = run_eval(ckpt, tmp_path / "out", "--resolutions", "96,64", "--batch-size", "2", "--samples", "1")
    assert results["split"] == "test"
    for row in results["rows"]:
        r = row["resolution"]
        assert row["images"] == len(VAL_IMAGES)  # --split test is val2017
        detections = tmp_path / "out" / f"detections_{r}.json"
        assert {d["image_id"] for d in json.loads(detections.read_text())} == set(DETS)
        stats = cocoeval_stats(ann_path, detections)
        for k, ref in zip(ev.DET_METRICS, stats):
            assert 0 < ref < 1, (r, k, ref)  # nothing trivially -1 or 0
            assert abs(row[k] - ref) < 1e-9, (r, k, row[k], ref)


def test_coco_size_classes_use_the_annotated_area(tmp_path):
    # The same images and detections, scored with box areas instead: the size classes change.
    write_coco_tree(tmp_path / "coco")
    ds = data.DetDataset("coco", "test", 64, data_dir=str(tmp_path / "coco"))
    targets = [ds[i][1] for i in range(len(ds))]
    dets = ev.to_original(fake_detector([ds[i][0] for i in range(len(ds))]), targets, 64)
    gts = [t["eval_gt"] for t in targets]
    official = coco_ap(gts, dets, num_classes=3)
    by_box = coco_ap([{k: g[k] for k in ("bbox", "labels", "iscrowd")} for g in gts], dets, num_classes=3)
    assert official["AP"] == by_box["AP"]  # the "all" range is the same...
    assert official["APs"] != by_box["APs"] and official["APm"] != by_box["APm"]  # ...its parts are not
    # the overhanging box is evaluated as annotated (clipped only for training)
    e = next(t for t in targets if t["image_id"] == 5)
    assert e["eval_gt"]["bbox"][1].tolist() == [200, 50, 60, 60] and e["boxes"][1, 2].item() == pytest.approx(64)


def test_coco_validation_is_a_fixed_hold_out_of_train2017(tmp_path, capsys):
    write_coco_tree(tmp_path / "coco", n_train=12)
    root = str(tmp_path / "coco")
    ids = {split: [r["id"] for r in data.load_coco(root, split, val_size=3)[0]] for split in ("train", "val", "test")}
    assert len(ids["val"]) == 3 and len(ids["train"]) == 9 and not set(ids["val"]) & set(ids["train"])
    assert sorted(ids["val"] + ids["train"]) == list(range(100, 112))
    assert sorted(ids["test"]) == sorted(im["id"] for im in VAL_IMAGES)  # val2017 is only ever the test split
    # seeded independently of --seed; a smaller hold-out is part of a larger one
    assert [r["id"] for r in data.DetDataset("coco", "val", 32, data_dir=root, seed=7, coco_val_size=3).records] \
        == ids["val"]
    assert set(r["id"] for r in data.load_coco(root, "val", val_size=2)[0]) < set(ids["val"])
    # a subset of COCO smaller than the hold-out keeps most images for training, and says so
    assert len(data.load_coco(root, "val", val_size=5000)[0]) == 1
    assert "holding out 1 for validation" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--coco-val-size 0"):
        data.load_coco(root, "val", val_size=0)
    # train.py passes --coco-val-size through (default 5000), and eval.py --split val finds the same images
    train_set, val = train.build_datasets(Namespace(
        task="det", data="coco", data_dir=root, image_size=32, seed=0, train_size=None, val_size=None,
        coco_val_size=3))
    assert [r["id"] for r in val.records] == ids["val"] and len(train_set) == 9
    assert train.get_args_parser().parse_args([]).coco_val_size == data.COCO_VAL_SIZE == 5000
    ckpt = det_checkpoint(tmp_path / "ckpt.pt", tmp_path / "coco", coco_val_size=3)
    seen = []
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}

    def recorder(*a):
        return lambda images: [dict(empty) for _ in images]

    build_dataset = ev.build_eval_dataset

    def recording_dataset(*a):
        ds = build_dataset(*a)
        seen.extend(r["id"] for r in ds.records)
        return ds

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ev, "build_eval_model", recorder)
        m.setattr(ev, "build_eval_dataset", recording_dataset)
        results = run_eval(ckpt, tmp_path / "out", "--split", "val", "--resolutions", "64", "--samples", "0")
    assert seen == ids["val"] and results["rows"][0]["images"] == 3
