"""Evaluation metrics.

Segmentation: per-image Dice, IoU, sensitivity, specificity and the ISIC 2018
thresholded Jaccard (seg_scores); average the rows over the dataset. On real data the
truth is each image's original mask and the prediction is resized back to it first
(score_logits), which is how the ISIC 2018 challenge's scorer (the isic-challenge-scoring
package) scores: same definitions, same empty-mask rules, same 0.65 threshold.

Detection: COCO bbox AP (coco_ap), a numpy re-implementation of the official
COCOeval (iouType='bbox') that reproduces its numbers, including its tie-breaking
and ignore rules and its area ranges (a ground truth's annotated `area`, a detection's
box area, both in original pixels), so results are comparable with published COCO
figures without depending on pycocotools. coco_results_json exports detections for the official tool.
"""

import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# segmentation

SEG_METRICS = ("dice", "iou", "sensitivity", "specificity", "thresholded_jaccard")
ISIC_JACCARD_THRESHOLD = 0.65


def seg_scores(pred, target):
    """pred, target: bool [B,1,H,W] or [B,H,W]. Returns float64 [B,5], columns in SEG_METRICS order.

    A ratio whose denominator is 0 (e.g. both masks empty for Dice/IoU, no positive
    pixels in the target for sensitivity) scores 1: there was nothing to get wrong.
    """
    pred = pred.reshape(pred.shape[0], -1).bool()
    target = target.reshape(target.shape[0], -1).bool()
    tp = (pred & target).sum(1).double()  # [B]
    fp = (pred & ~target).sum(1).double()
    fn = (~pred & target).sum(1).double()
    tn = (~pred & ~target).sum(1).double()

    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    iou = _ratio(tp, tp + fp + fn)
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    # ISIC 2018 challenge score: a segmentation below 0.65 IoU counts as a failure
    thresholded = torch.where(iou >= ISIC_JACCARD_THRESHOLD, iou, torch.zeros_like(iou))
    return torch.stack([dice, iou, sensitivity, specificity, thresholded], dim=1)


def _ratio(num, den):
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(num))


def score_logits(logits, masks):
    """Per-image scores of logits [B,1,h,w] against the truth at its own size.

    masks: a [B,1,H,W] tensor, or one [1,H_i,W_i] tensor per image (its original size).
    A prediction of another size is resized there first (bilinear on the logits, then
    > 0), so every pixel of the original mask is scored, as the ISIC challenge scores.
    Returns (scores float64 [B,5], the binary predictions at the truth's size, per image).
    """
    if torch.is_tensor(masks) and masks.shape[-2:] == logits.shape[-2:]:
        pred = logits > 0
        return seg_scores(pred, masks.to(logits.device) > 0.5), pred
    preds = [upsample_logits(x, m.shape[-2:]) > 0 for x, m in zip(logits, masks)]
    scores = [seg_scores(p[None], m.to(p.device)[None] > 0.5) for p, m in zip(preds, masks)]
    return torch.cat(scores), preds


def upsample_logits(logits, size):
    """[C,h,w] -> [C,H,W] float32, bilinear (antialiased when shrinking)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits.float()
    return F.interpolate(logits[None].float(), size=tuple(size), mode="bilinear", antialias=True,
                         align_corners=False)[0]


# -----------------------------------------------------------------------------
# detection: COCO bbox AP

# the same grids COCOeval builds (linspace, so e.g. 0.75 compares equal to its entry)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # T = 10
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # R = 101
AREA_RANGES = np.array([[0, 1e10], [0, 32**2], [32**2, 96**2], [96**2, 1e10]])  # all/small/medium/large
MAX_DETS = 100  # per image per category


def coco_ap(gts, dets, num_classes=None):
    """COCO bbox AP over a dataset; gts[i] / dets[i] describe the same image i.

    gts[i]:  {'boxes': [N,4] xyxy or 'bbox': [N,4] COCO xywh, 'labels': [N],
              'iscrowd': [N] (optional), 'area': [N] (optional: COCO's annotated area,
              which picks the size class; default the box area)}
    dets[i]: {'boxes': [M,4] xyxy, 'scores': [M], 'labels': [M]}; the size class of
              an unmatched detection is its box area, as COCOeval's loadRes sets it.
    Categories are the label values seen in gts (or 1..num_classes); a category
    without (non-ignored) ground truth in an area range is left out of that mean,
    and a mean over nothing is -1, as in COCOeval.
    Returns {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} (COCOeval stats[0:6]).
    """
    images = [_image_arrays(g, d) for g, d in zip(gts, dets)]
    if num_classes is None:
        cats = np.unique(np.concatenate([im["gt_labels"] for im in images] + [np.zeros(0, np.int64)]))
    else:
        cats = np.arange(1, num_classes + 1)

    # precision[k, a, t, r]: -1 where undefined (no positives), as COCOeval
    precision = -np.ones((len(cats), len(AREA_RANGES), len(IOU_THRESHOLDS), len(RECALL_POINTS)))
    for k, c in enumerate(cats):
        per_image = []
        for im in images:
            g, d = im["gt_labels"] == c, im["det_labels"] == c
            if g.any() or d.any():
                per_image.append(_match_image(im["gt_xywh"][g], im["gt_area"][g], im["gt_crowd"][g],
                                              im["det_xywh"][d], im["det_scores"][d]))
        if per_image:
            precision[k] = _precision(per_image)

    def mean_valid(p):  # p: [K, T, R] for one area range
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0

    t50, t75 = np.flatnonzero(IOU_THRESHOLDS == 0.5), np.flatnonzero(IOU_THRESHOLDS == 0.75)
    return {
        "AP": mean_valid(precision[:, 0]),
        "AP50": mean_valid(precision[:, 0, t50]),
        "AP75": mean_valid(precision[:, 0, t75]),
        "APs": mean_valid(precision[:, 1]),
        "APm": mean_valid(precision[:, 2]),
        "APl": mean_valid(precision[:, 3]),
    }


def _numpy(x, dtype):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def xyxy_to_xywh(boxes):
    """[N,4] float64 xyxy -> xywh. COCO works in xywh and so do we, so that IoUs and
    areas come out bit-identical to the official evaluator's."""
    boxes = _numpy(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _image_arrays(gt, det):
    n = len(_numpy(gt["labels"], np.int64))
    crowd = gt.get("iscrowd")
    # a COCO bbox is used as is: xywh -> xyxy -> xywh would not round-trip exactly
    gt_xywh = _numpy(gt["bbox"], np.float64).reshape(-1, 4) if "bbox" in gt else xyxy_to_xywh(gt["boxes"])
    area = gt.get("area")
    return {
        "gt_xywh": gt_xywh,
        "gt_area": gt_xywh[:, 2] * gt_xywh[:, 3] if area is None else _numpy(area, np.float64).reshape(-1),
        "gt_labels": _numpy(gt["labels"], np.int64).reshape(-1),
        "gt_crowd": np.zeros(n, bool) if crowd is None else _numpy(crowd, np.int64).reshape(-1) > 0,
        "det_xywh": xyxy_to_xywh(det["boxes"]),
        "det_scores": _numpy(det["scores"], np.float64).reshape(-1),
        "det_labels": _numpy(det["labels"], np.int64).reshape(-1),
    }


def box_iou_xywh(dt, gt, gt_crowd):
    """IoU matrix [D,G] between xywh boxes, computed as COCO's bbIou does; for a crowd
    gt the union is the detection's area alone (a det inside a crowd region is fine)."""
    d_area, g_area = dt[:, 2] * dt[:, 3], gt[:, 2] * gt[:, 3]
    w = np.minimum(dt[:, None, 0] + dt[:, None, 2], gt[None, :, 0] + gt[None, :, 2]) - np.maximum(dt[:, None, 0], gt[None, :, 0])
    h = np.minimum(dt[:, None, 1] + dt[:, None, 3], gt[None, :, 1] + gt[None, :, 3]) - np.maximum(dt[:, None, 1], gt[None, :, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    union = np.where(gt_crowd[None, :], d_area[:, None], d_area[:, None] + g_area[None, :] - inter)
    return np.where(inter > 0, inter / np.where(inter > 0, union, 1.0), 0.0)


def _match_image(gt, g_area, gt_crowd, dt, scores):
    """Greedy COCO matching for one image and one category, for every area range and
    IoU threshold at once (rows = A*T); g_area puts each gt in its area ranges. Returns
    the image's kept det scores [D], and matched / ignored flags [A,T,D] plus the
    number of non-ignored gts [A]."""
    A, T = len(AREA_RANGES), len(IOU_THRESHOLDS)
    order = np.argsort(-scores, kind="mergesort")[:MAX_DETS]  # stable, like COCOeval
    dt, scores = dt[order], scores[order]
    D, G = len(dt), len(gt)

    lo, hi = AREA_RANGES[:, :1], AREA_RANGES[:, 1:]  # [A,1]
    d_area = dt[:, 2] * dt[:, 3]
    gt_ignore = gt_crowd[None, :] | (g_area[None, :] < lo) | (g_area[None, :] > hi)  # [A,G]
    rows_ignore = np.repeat(gt_ignore, T, axis=0)  # [A*T, G]
    thr = np.tile(IOU_THRESHOLDS, A)[:, None]  # [A*T, 1]

    matched = np.zeros((A * T, D), bool)
    det_ignore = np.zeros((A * T, D), bool)
    taken = np.zeros((A * T, G), bool)
    ious = box_iou_xywh(dt, gt, gt_crowd)  # [D,G]
    for d in range(D if G else 0):
        iou = ious[d]
        if iou.max() < thr[0, 0]:
            continue  # matches nothing at any threshold
        # crowd gts can absorb any number of dets; other gts only one
        ok = (iou >= thr) & ~(taken & ~gt_crowd)  # [A*T, G]
        # COCOeval puts ignored gts last and stops at them once it has a regular match,
        # so an ignored gt is only used when no regular gt qualifies
        regular = ok & ~rows_ignore
        ok = np.where(regular.any(1, keepdims=True), regular, ok & rows_ignore)
        val = np.where(ok, iou, -1.0)
        best = val.max(1, keepdims=True)
        # its "if iou < best: continue" keeps the *last* gt among equal IoUs
        m = G - 1 - np.argmax((val == best)[:, ::-1], axis=1)  # [A*T]
        r = np.flatnonzero(best[:, 0] >= 0)
        taken[r, m[r]] = True
        matched[r, d] = True
        det_ignore[r, d] = rows_ignore[r, m[r]]

    # unmatched dets outside the area range neither help nor hurt
    d_out = np.repeat((d_area[None, :] < lo) | (d_area[None, :] > hi), T, axis=0)  # [A*T, D]
    det_ignore |= ~matched & d_out
    return scores, matched.reshape(A, T, D), det_ignore.reshape(A, T, D), (~gt_ignore).sum(1)


def _precision(per_image):
    """Interpolated precision [A,T,R] for one category from its per-image matches
    (in image order), as COCOeval.accumulate: pool, re-sort stably by score,
    precision made monotone from the right, read at 101 recall points."""
    scores = np.concatenate([p[0] for p in per_image])  # [N]
    matched = np.concatenate([p[1] for p in per_image], axis=2)  # [A,T,N]
    ignored = np.concatenate([p[2] for p in per_image], axis=2)
    n_pos = np.sum([p[3] for p in per_image], axis=0)  # [A]
    order = np.argsort(-scores, kind="mergesort")
    matched, ignored = matched[..., order], ignored[..., order]

    A, T, N = matched.shape
    out = -np.ones((A, T, len(RECALL_POINTS)))
    tp = np.cumsum(matched & ~ignored, axis=2).astype(np.float64)
    fp = np.cumsum(~matched & ~ignored, axis=2).astype(np.float64)
    for a in range(A):
        if n_pos[a] == 0:
            continue  # undefined: stays -1 and is left out of the mean
        recall = tp[a] / n_pos[a]  # [T,N]
        prec = tp[a] / (fp[a] + tp[a] + np.spacing(1))
        prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
        prec = np.concatenate([prec, np.zeros((T, 1))], axis=1)  # recall never reached -> 0
        for t in range(T):
            idx = np.searchsorted(recall[t], RECALL_POINTS, side="left")  # <= N
            out[a, t] = prec[t, idx]
    return out


def coco_results_json(dets, image_ids, cat_ids):
    """Detections (per image, labels 1..K) as COCO result entries for the official
    evaluator: {'image_id', 'category_id': cat_ids[label-1], 'bbox': [x,y,w,h], 'score'}.
    Label 0 is FCOS's background class (it is built with K + 1): not a category, left out
    as coco_ap leaves it out (cat_ids[-1] would make it the last category)."""
    results = []
    for det, image_id in zip(dets, image_ids):
        boxes = xyxy_to_xywh(det["boxes"]).tolist()
        scores = _numpy(det["scores"], np.float64).reshape(-1).tolist()
        labels = _numpy(det["labels"], np.int64).reshape(-1).tolist()
        for box, score, label in zip(boxes, scores, labels):
            if label > 0:
                results.append({"image_id": int(image_id), "category_id": int(cat_ids[label - 1]), "bbox": box,
                                "score": score})
    return results


# ---------------------------------------------------------------------------------------
# cost: time and memory (eval.py's sweep, bench.py)
# ---------------------------------------------------------------------------------------

def timed(fn, device):
    """(fn(), seconds), synchronized so that queued GPU work is counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def memory_mark(device):
    """Start a peak-memory reading: CUDA resets its peak; a CPU notes the process peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    return _peak_rss_mib()


def memory_growth_mib(device, mark):
    """CUDA: peak allocated since memory_mark. CPU: growth of the process peak RSS, which is
    monotonic (the peak so far): it shows only memory beyond every earlier peak, so measure
    the larger configurations last, or each in a fresh process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _peak_rss_mib() - mark


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 1024)
