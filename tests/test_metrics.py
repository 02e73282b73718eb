"""Metric tests: segmentation scores against hand-computed values, COCO AP against
the official pycocotools COCOeval (a test-only oracle) on randomized data."""

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from metrics import SEG_METRICS, coco_ap, coco_results_json, seg_scores

# -----------------------------------------------------------------------------
# segmentation


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)[None, None]  # [1,1,H,W]


def test_seg_scores_known_values():
    full = _mask([[1, 1], [1, 1]])
    empty = _mask([[0, 0], [0, 0]])
    # pred 3 px, target 2 px, overlap 2 px on a 3x3 image: TP=2 FP=1 FN=0 TN=6
    pred = _mask([[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    target = _mask([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    # pred 4 px, target 3 px, overlap 3 px: IoU 3/4 >= 0.65 kept
    pred2 = _mask([[1, 1, 1, 1], [0, 0, 0, 0]])
    target2 = _mask([[1, 1, 1, 0], [0, 0, 0, 0]])

    cases = [
        (full, full, [1, 1, 1, 1, 1]),  # perfect, no negatives -> specificity 1
        (empty, empty, [1, 1, 1, 1, 1]),  # both empty
        (empty, full, [0, 0, 0, 1, 0]),  # missed everything
        (full, empty, [0, 0, 1, 0, 0]),  # all false positives
        (pred, target, [4 / 5, 2 / 3, 1, 6 / 7, 2 / 3]),  # IoU 0.667 >= 0.65 -> kept
        (pred2, target2, [6 / 7, 3 / 4, 1, 4 / 5, 3 / 4]),
    ]
    for p, t, expected in cases:
        got = seg_scores(p, t)
        assert got.shape == (1, len(SEG_METRICS)) and got.dtype == torch.float64
        assert torch.allclose(got[0], torch.tensor(expected, dtype=torch.float64)), (got, expected)


def test_seg_scores_threshold_and_batch():
    # IoU 1/2 < 0.65 -> thresholded Jaccard 0; batched [B,H,W] input
    pred = torch.tensor([[[1, 1, 0, 0]], [[1, 1, 1, 0]]], dtype=torch.bool)  # [2,1,4]
    target = torch.tensor([[[1, 0, 0, 0]], [[1, 1, 1, 1]]], dtype=torch.bool)
    got = seg_scores(pred, target)
    assert got.shape == (2, 5)
    assert torch.allclose(got[0], torch.tensor([2 / 3, 1 / 2, 1, 2 / 3, 0], dtype=torch.float64))
    assert torch.allclose(got[1], torch.tensor([6 / 7, 3 / 4, 3 / 4, 1, 3 / 4], dtype=torch.float64))


# -----------------------------------------------------------------------------
# detection: randomized data compared with pycocotools

SIZE = 400.0
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _random_boxes(rng, n):
    # side lengths log-uniform over 4..300 px: areas land in small, medium and large
    wh = np.exp(rng.uniform(np.log(4), np.log(300), size=(n, 2)))
    xy = rng.uniform(0, SIZE - wh)
    return np.concatenate([xy, xy + wh], axis=1)


def _random_dataset(rng, n_images=40, n_classes=4, tied_scores=False):
    gts, dets = [], []
    for i in range(n_images):
        n = 0 if i % 7 == 0 else int(rng.integers(1, 15))  # some images without objects
        boxes = _random_boxes(rng, n)
        labels = rng.integers(1, n_classes + 1, size=n)
        crowd = rng.random(n) < 0.1
        if tied_scores and n >= 2:  # an exact duplicate gt: equal IoUs, COCO's tie rule decides
            boxes[1], labels[1], crowd[1] = boxes[0], labels[0], crowd[0]
        gts.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                    "iscrowd": torch.tensor(crowd.astype(np.int64))})

        if i % 11 == 5:  # some images without detections
            dets.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
            continue
        reps = rng.integers(0, 3, size=n)  # 0-2 jittered copies per gt
        copies, copy_labels = np.repeat(boxes, reps, axis=0), np.repeat(labels, reps)
        wh = copies[:, 2:] - copies[:, :2]
        copies = copies + rng.normal(0, 0.08, size=copies.shape) * np.tile(wh, 2)
        copies[:, 2:] = np.maximum(copies[:, 2:], copies[:, :2] + 1)
        flip = rng.random(len(copy_labels)) < 0.1
        copy_labels = np.where(flip, rng.integers(1, n_classes + 1, size=len(copy_labels)), copy_labels)
        # some images with > 100 dets of one class, so COCO's per-image-per-class cap bites
        heavy = i % 9 == 3
        n_fp = 130 if heavy else int(rng.integers(0, 8))
        fp_boxes = _random_boxes(rng, n_fp)
        fp_labels = np.full(n_fp, 1) if heavy else rng.integers(1, n_classes + 1, size=n_fp)
        if heavy:
            copy_labels = np.full(len(copy_labels), 1)
        boxes_d = np.concatenate([copies, fp_boxes])
        labels_d = np.concatenate([copy_labels, fp_labels])
        scores = rng.random(len(boxes_d))
        if tied_scores:
            scores = np.round(scores, 1)
        dets.append({"boxes": torch.tensor(boxes_d, dtype=torch.float32), "scores": torch.tensor(scores, dtype=torch.float32),
                     "labels": torch.tensor(labels_d)})
    return gts, dets


def _pycocotools_stats(gts, dets, n_classes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns = [], []
    for i, g in enumerate(gts):
        images.append({"id": i + 1, "width": int(SIZE), "height": int(SIZE)})
        crowd = g["iscrowd"].tolist() if "iscrowd" in g else [0] * len(g["labels"])
        for box, label, c in zip(np.asarray(g["boxes"], np.float64).tolist(), g["labels"].tolist(), crowd):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            # no segmentation here, so the area used for the area ranges is the box area
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label, "bbox": [x1, y1, w, h],
                         "area": w * h, "iscrowd": int(c)})
    cats = list(range(1, n_classes + 1))
    results = coco_results_json(dets, [i + 1 for i in range(len(dets))], cats)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in cats]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:6]


def _assert_matches_oracle(gts, dets, n_classes, num_classes=None):
    ours = coco_ap(gts, dets, num_classes=num_classes)
    theirs = _pycocotools_stats(gts, dets, n_classes)
    assert list(ours) == list(KEYS)
    for key, ref in zip(KEYS, theirs):
        assert abs(ours[key] - ref) < 1e-4, (key, ours[key], ref)
    return ours


@pytest.mark.parametrize("seed", range(5))
def test_coco_ap_matches_pycocotools(seed):
    rng = np.random.default_rng(seed)
    gts, dets = _random_dataset(rng)
    ours = _assert_matches_oracle(gts, dets, n_classes=4)
    assert all(0 < ours[k] < 1 for k in KEYS)  # every area range is exercised
    assert any(len(d["scores"]) > 100 for d in dets)


@pytest.mark.parametrize("seed", range(2))
def test_coco_ap_tied_scores_and_duplicate_gts(seed):
    rng = np.random.default_rng(100 + seed)
    gts, dets = _random_dataset(rng, tied_scores=True)
    _assert_matches_oracle(gts, dets, n_classes=4)


def test_coco_ap_equal_iou_tie_goes_to_last_gt():
    # det 1 overlaps gts A and B with exactly equal IoU 9/11; COCOeval keeps the last
    # (B), so det 2 (a copy of B) can only take A, at IoU 2/3
    gts = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10]]), "labels": torch.tensor([1, 1])}]
    dets = [{"boxes": torch.tensor([[1.0, 0, 11, 10], [2, 0, 12, 10]]), "scores": torch.tensor([0.9, 0.8]),
             "labels": torch.tensor([1, 1])}]
    ours = _assert_matches_oracle(gts, dets, n_classes=1)
    # t <= .65: both TP -> 1; t in .7-.8: TP then FP -> 1 up to recall .5 (51 of 101 points);
    # t >= .85: det 1 misses, det 2 takes B -> precision .5 up to recall .5
    assert ours["AP"] == pytest.approx((4 + 3 * 51 / 101 + 3 * 25.5 / 101) / 10)
    assert ours["AP50"] == pytest.approx(1.0) and ours["APm"] == -1.0


def test_coco_ap_category_without_gts():
    # class 5 only ever appears as a (false) detection: -1 for it, left out of the means
    rng = np.random.default_rng(7)
    gts, dets = _random_dataset(rng, n_images=20)
    dets[1]["labels"][:3] = 5
    _assert_matches_oracle(gts, dets, n_classes=5, num_classes=5)
    _assert_matches_oracle(gts, dets, n_classes=5)


def test_coco_ap_perfect_and_empty():
    rng = np.random.default_rng(0)
    gts = []
    for i in range(6):
        boxes = torch.tensor(_random_boxes(rng, 5), dtype=torch.float32)
        gts.append({"boxes": boxes, "labels": torch.tensor([1, 2, 3, 1, 2])})
    dets = [{"boxes": g["boxes"].clone(), "scores": torch.rand(5), "labels": g["labels"].clone()} for g in gts]
    ours = coco_ap(gts, dets)
    for key in KEYS:
        assert ours[key] == pytest.approx(1.0) or ours[key] == -1.0
    assert ours["AP"] == pytest.approx(1.0) and ours["AP50"] == pytest.approx(1.0)

    # no ground truth anywhere: every mean is over nothing -> -1, as COCOeval
    no_gt = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    assert coco_ap(no_gt, dets[:1]) == {k: -1.0 for k in KEYS}


def test_coco_ap_speed():
    import time

    rng = np.random.default_rng(1)
    gts, dets = [], []
    for _ in range(500):
        boxes = _random_boxes(rng, 10)
        labels = rng.integers(1, 6, size=10)
        gts.append({"boxes": boxes, "labels": labels})
        db = np.concatenate([boxes + rng.normal(0, 3, size=boxes.shape), _random_boxes(rng, 90)])
        dets.append({"boxes": db, "scores": rng.random(100), "labels": np.concatenate([labels, rng.integers(1, 6, size=90)])})
    start = time.perf_counter()
    ours = coco_ap(gts, dets)
    assert time.perf_counter() - start < 10  # generous: shared CPUs
    assert 0 < ours["AP"] < 1


def test_coco_results_json_round_trip():
    dets = [
        {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.9, 0.25]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": np.array([[1.5, 2.5, 3.5, 8.5]]), "scores": np.array([0.5]), "labels": np.array([2])},
    ]
    out = coco_results_json(dets, image_ids=[42, 7, 9], cat_ids=[1, 18, 90])
    assert out == [
        {"image_id": 42, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 90, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.25},
        {"image_id": 9, "category_id": 18, "bbox": [1.5, 2.5, 2.0, 6.0], "score": 0.5},
    ]
    import json

    assert json.loads(json.dumps(out))[0]["bbox"] == [10.0, 20.0, 30.0, 40.0]
    assert not math.isnan(out[0]["score"])
