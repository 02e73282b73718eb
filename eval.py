"""Resolution sweep: evaluate one checkpoint at several test resolutions.

    python eval.py --ckpt runs/seg/ckpt_best.pt --resolutions 64,128,256
    python eval.py --ckpt runs/seg/ckpt_best.pt --resolutions 64,128,256 --ignore-spacing
    python eval.py --task det --ckpt runs/det/ckpt_best.pt --resolutions 96,128,192
    python eval.py --ckpt runs/isic/ckpt_best.pt --resolutions 256,native --tta --largest-component

The architecture and the data source come from the checkpoint. At each resolution r
the split is rendered (synthetic) or resized from the originals (ISIC, COCO) at r, so
the spacing the model sees is 1 / size per pyramid level: the same field of view, finer
tokens (DESIGN.md section 1). --ignore-spacing feeds the training spacing to the position
encoding instead (the physical token grid still zooms with the real pixel size), so the
positions say every resolution is the training one: the gap between the two sweeps is
what physical positions buy. Writes, under --out: results.csv, results.md,
results.json (one row per resolution), samples_<r>.png and, for detection,
detections_<r>.json (COCO results format, in original pixels, for the official evaluator).
`native` (ISIC, COCO) evaluates every image at its own size, unsquashed: its spacing per axis,
(1/H, 1/W), puts it in the training frame, and the physical token grid zooms per axis.

Real data is scored as the official tools score it. ISIC: each prediction is resized
back to its image's original size and every metric is computed there, against the
original mask; the binary masks are also written to masks_<r>/ISIC_<id>_segmentation.png
(0/255, original size), the challenge's submission format, so that its scorer
(`isic-challenge-scoring segmentation <GroundTruth folder> masks_<r>`) gives the same
numbers. COCO: AP uses COCOeval's area ranges (annotated area, original pixels) and its
ground truth, so pycocotools on detections_<r>.json gives the same six numbers.
"""

import argparse
import csv
import glob
import io
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import (COCO_VAL_SIZE, SYNTHETIC_SOURCES, DetDataset, NativeSegDataset, SegDataset, atomic_open,
                  boxes_to_original, check_size, det_collate, level_sizes, read_original_masks, resize, seg_collate)
from metrics import (SEG_METRICS, coco_ap, coco_results_json, memory_growth_mib, memory_mark, score_logits, seg_scores,
                     timed)
from model import autocast, build_model, load_run, set_detector_size

DET_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SCORE_THRESHOLD = 0.3  # predicted boxes drawn in the samples
# how each data source is scored (results.json "scored", results.md header)
SCORED = {"synthetic": "at the test resolution (each resolution renders its own truth)",
          "isic": "at each image's original size (prediction resized back), as the ISIC 2018 challenge's scorer; "
                  "the masks are in masks_<r>/",
          "coco": "as COCOeval on detections_<r>.json: original pixels, annotated areas"}
SCORED["twins"] = SCORED["synthetic"]
MIN_DISPLAY = 256      # samples are upscaled (nearest) to at least this many pixels
NATIVE = "native"      # --resolutions: every image at its own size


def get_args_parser():
    p = argparse.ArgumentParser(description="Evaluate a checkpoint at several test resolutions")
    p.add_argument("--ckpt", default=None,
                   help="checkpoint written by train.py (default: ckpt_best.pt of the run under runs/ that "
                        "trained last, of --task when given)")
    p.add_argument("--resolutions", required=True,
                   help="comma-separated image sizes, e.g. 128,256,512; 'native' (ISIC, COCO): every image at its "
                        "own size, e.g. 256,native")
    p.add_argument("--task", default=None, choices=["seg", "det"], help="optional: must match the checkpoint")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/eval)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="test by default: ckpt_best.pt was selected on val; train (no augmentation) "
                        "against test measures the generalization gap")
    p.add_argument("--token-grid", default=None, choices=["physical", "pixel"],
                   help="RAT: override the checkpoint's token grid (train.py --token-grid), e.g. to see what "
                        "the physical grid buys on the same weights")
    p.add_argument("--resize-to-train", action="store_true",
                   help="add the baseline row at each resolution: the image resized to the training size, the "
                        "prediction resized back")
    p.add_argument("--ignore-spacing", action="store_true",
                   help="tell the position encoding the training spacing at every resolution; the token grid "
                        "still zooms with the real pixel size (seg; no effect on unet or --pe rope/none)")
    p.add_argument("--tta", action="store_true",
                   help="seg: the mean of the logits over the horizontal and vertical flips (4 forwards)")
    p.add_argument("--largest-component", action="store_true",
                   help="seg: keep only the largest connected foreground region of each predicted mask")
    p.add_argument("--samples", type=int, default=4, help="images drawn in samples_<r>.png (0: none)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="dataset root (default: the one used for training)")
    p.add_argument("--cache-dir", default=None,
                   help="where ISIC's decoded, resized copies go (default: the training run's --cache-dir, else "
                        "<data-dir>/.cache; use this when the dataset folder is read-only)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    return p


def newest_checkpoint(task=None, root="runs"):
    """-> (ckpt_best.pt, its task) of the run under `root` that trained last (of `task` when
    given). Judged by the run's newest training file: ckpt_best.pt alone dates the last
    improvement, and an older run may have improved after a newer one's last."""
    def last_activity(best):
        run = os.path.dirname(best)
        return max(os.path.getmtime(p) for p in (best, os.path.join(run, "ckpt_last.pt"),
                                                 os.path.join(run, "metrics.jsonl")) if os.path.exists(p))

    found = glob.glob(os.path.join(root, "**", "ckpt_best.pt"), recursive=True)
    for path in sorted(found, key=last_activity, reverse=True):
        found_task = load_run(path, None)[0]["task"]
        if task in (None, found_task):
            return path, found_task
    of_task = f" of --task {task}" if task else ""
    raise ValueError(f"--ckpt not given and no {root}/*/ckpt_best.pt{of_task} here: train first "
                     f"(python train.py --task {task or 'seg'}), or pass --ckpt RUN/ckpt_best.pt")


def parse_resolutions(text):
    """'256,native,128' -> [128, 256, 'native']: increasing, native last (the originals are
    usually the largest), so the CPU peak-RSS reading (monotonic) stays meaningful."""
    values, native = [], False
    for v in text.split(","):
        if v == NATIVE:
            native = True
            continue
        try:
            values.append(int(v))
        except ValueError:
            raise ValueError(f"--resolutions: {v!r} is not an integer or 'native' (expected sizes like 128,256,512, "
                             f"got {text!r})") from None
        if values[-1] <= 0:
            raise ValueError(f"--resolutions: every resolution must be positive, got {values[-1]}")
    return sorted(set(values)) + [NATIVE] * native


def check_resolution(r, train_args):
    if r == NATIVE and train_args.get("data", "synthetic") in SYNTHETIC_SOURCES:
        raise ValueError("--resolutions native: needs a real dataset (ISIC or COCO), whose images have a size of "
                         "their own; the built-in data is rendered at whatever size --resolutions gives")
    if r != NATIVE and train_args["model"] == "rat":  # the baselines pad their input: any size runs
        check_size(r, train_args["scales"], train_args["patch"], "--resolutions")


def training_spacings(train_args):
    """Per level (dy, dx) as the model derived it during training: 1 / level size at the
    training resolution (level_sizes rounds like the datasets do, so this is exact)."""
    return [(1.0 / h, 1.0 / w) for h, w in level_sizes(train_args["image_size"], train_args["scales"])]


def build_eval_model(train_args, state, r, device, path):
    model = build_model(train_args)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the architecture in its args ({str(e).splitlines()[0]})") from None
    if train_args["task"] == "det":
        set_detector_size(model, r)  # the detector resizes its input to its size: keep the test resolution
        if device.type == "cuda":
            model.backbone.amp_dtype = torch.bfloat16  # as in training: boxes and NMS stay float32
    return model.to(device).eval()


def native_detector(model):
    """A detector that keeps every image at its own size: set_detector_size per image (on the
    physical grid its strides and anchors zoom with each axis), one image at a time."""
    def det(images):
        out = []
        for image in images:
            set_detector_size(model, tuple(image.shape[-2:]))
            out += model([image])
        return out
    return det


def with_flips(model):
    """Test-time augmentation (--tta): the mean of the logits over the horizontal and vertical
    flips of the input (identity, h, v, both), each prediction flipped back. 4 forwards, one at a
    time (one prediction's memory, plus the running sum)."""
    def seg(levels, spacings=None):
        total = None
        for dims in ((), (-1,), (-2,), (-2, -1)):
            out = model([x.flip(dims) for x in levels] if dims else levels, spacings).float()
            out = out.flip(dims) if dims else out
            total = out if total is None else total + out   # not in place: out may be the model's input
        return total / 4
    return seg


def largest_component(mask):
    """bool [H, W] (numpy or torch) -> the same with only its largest 8-connected foreground
    region (ties: the first in raster order), as ISIC leaderboard entries post-process. Runs of
    foreground pixels per row, joined where they touch the next row's, then union-find over
    the runs, vectorized: time in runs, not pixels."""
    m = mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    H, W = m.shape
    edges = np.diff(np.pad(m.astype(np.int8), ((0, 0), (1, 1))), axis=1)      # [H, W + 1]
    row, start = np.nonzero(edges == 1)                                         # run r: row, [start, end)
    end = np.nonzero(edges == -1)[1]
    if len(row) < 2:
        return mask
    # run b in the next row touches run a (8-connected) if start_b <= end_a and end_b >= start_a
    key = lambda r, c: r.astype(np.int64) * (W + 2) + c
    lo = np.searchsorted(key(row, end), key(row + 1, start), side="left")
    hi = np.searchsorted(key(row, start), key(row + 1, end), side="right")
    count = np.maximum(hi - lo, 0)
    a = np.repeat(np.arange(len(row)), count)
    b = np.repeat(lo, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    parent = np.arange(len(row))
    while True:
        pa, pb = parent[a], parent[b]
        join = pa != pb
        if not join.any():
            break
        np.minimum.at(parent, np.maximum(pa, pb)[join], np.minimum(pa, pb)[join])   # hook the larger root
        while (parent != parent[parent]).any():                                     # compress to the roots
            parent = parent[parent]
    sizes = np.bincount(parent, weights=end - start)
    keep = parent == sizes.argmax()
    out = np.zeros((H, W + 1), np.int32)
    np.add.at(out, (row[keep], start[keep]), 1)
    np.add.at(out, (row[keep], end[keep]), -1)
    out = out.cumsum(1)[:, :W] > 0
    return torch.from_numpy(out).to(mask.device) if torch.is_tensor(mask) else out


def resized_to_train(model, train_args):
    """The baseline of every sweep: the test image resized to the training size, the
    prediction resized back to the test image (seg: the logits; det: the boxes). A
    resolution-aware model fed the native image should beat it: it has the extra detail."""
    t = train_args["image_size"]
    if train_args["task"] == "seg":
        sizes = level_sizes(t, train_args["scales"])

        def seg(levels, spacings=None):
            small = [F.interpolate(x, size=s, mode="bilinear", antialias=True, align_corners=False)
                     for x, s in zip(levels, sizes)]
            return F.interpolate(model(small).float(), size=levels[0].shape[2:], mode="bilinear", align_corners=False)
        return seg

    def det(images):
        small = [resize(im, (t, t)) for im in images]
        out = model(small)
        for o, im in zip(out, images):
            h, w = im.shape[-2:]
            o["boxes"] = o["boxes"] * o["boxes"].new_tensor([w / t, h / t, w / t, h / t])
        return out
    return det


def build_eval_dataset(train_args, args, r):
    common = dict(source=train_args.get("data", "synthetic"), split=args.split, image_size=None if r == NATIVE else r,
                  data_dir=args.data_dir or train_args.get("data_dir"), seed=train_args.get("seed", 0),
                  length=args.limit)
    if train_args["task"] == "seg" and r == NATIVE:
        return NativeSegDataset(args.split, train_args["scales"], common["data_dir"], args.limit)
    if train_args["task"] == "seg":
        # Same pyramid as training. ISIC is scored on the original masks, which eval_seg reads
        # itself: up to 24 MB each, a loader's batches in flight would overflow the workers'
        # shared memory (Docker's default /dev/shm is 64 MB). The loader carries indices.
        return SegDataset(scales=train_args["scales"], with_masks=common["source"] != "isic",
                          cache_dir=args.cache_dir or train_args.get("cache_dir"), **common)
    # the same train2017 hold-out as training, should --split val be asked for
    return DetDataset(coco_val_size=train_args.get("coco_val_size", COCO_VAL_SIZE), **common)


# ---------------------------------------------------------------------------------------
# one resolution
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def eval_seg(model, loader, spacings, device, n_samples, desc, mask_dir=None, largest=False, display=None):
    """-> (mean metrics, seconds of forward, samples [(image [3,r,r], truth, pred)]).

    Every prediction is scored against its truth at the truth's size (ISIC: the original
    mask, read here, the prediction resized back to it). mask_dir: also write each binary
    prediction there, named like its ground-truth file (ISIC_<id>_segmentation.png, 0/255,
    the truth's size), the ISIC challenge's submission format. largest: keep each mask's
    largest connected region before scoring. display: the samples' size (native images
    differ), else the network's input size.
    """
    dataset = loader.dataset
    names = [os.path.basename(mask) for _, mask in dataset.originals] if mask_dir else None
    scores, seconds, samples, done = [], 0.0, [], 0
    for k, (levels, masks) in enumerate(tqdm(loader, desc=desc, leave=False)):
        if not dataset.with_masks:  # the loader carries indices (build_eval_dataset says why)
            masks = read_original_masks(dataset, masks.tolist())
        levels = [x.to(device) for x in levels]
        if k == 0:
            with autocast(device):
                timed(lambda: model(levels, spacings), device)  # warm-up: lazy allocations, kernel selection
        with autocast(device):
            logits, dt = timed(lambda: model(levels, spacings), device)  # [B, 1, r, r]
        batch_scores, preds = score_logits(logits, masks)  # [B, 5]
        if largest:
            preds = [largest_component(p[0])[None] for p in preds]
            batch_scores = torch.cat([seg_scores(p[None], m.to(p.device)[None] > 0.5) for p, m in zip(preds, masks)])
        scores.append(batch_scores.cpu())
        seconds += dt
        if mask_dir:
            for pred in preds:
                mask = Image.fromarray(pred[0].cpu().numpy().astype(np.uint8) * 255)  # mode L, 0/255
                write_atomic(os.path.join(mask_dir, names[done]), png_bytes(mask))
                done += 1
        take = max(0, n_samples - len(samples))
        # shown at the network's resolution, next to its input
        for x, t, p in zip(levels[0][:take], masks, preds):
            size = display or x.shape[-2:]
            shown = x if display is None else F.interpolate(x[None].float(), size=size, mode="bilinear",
                                                            antialias=True, align_corners=False)[0]
            samples.append((shown.cpu(), at_size(t, size), at_size(p, size)))
    means = torch.cat(scores).mean(0).tolist()
    return dict(zip(SEG_METRICS, means)), seconds, samples


def at_size(mask, size):
    """[1,H,W] mask -> [1,h,w] bool (nearest), on the CPU: for display only."""
    mask = mask.cpu().float()
    return F.interpolate(mask[None], size=tuple(size), mode="nearest")[0] > 0.5


@torch.no_grad()
def eval_det(model, loader, device, n_samples, desc):
    """-> (COCO AP dict, seconds of forward, dets, targets, samples [(image, target, det)])."""
    dets, targets, seconds, samples = [], [], 0.0, []
    for k, (images, batch_targets) in enumerate(tqdm(loader, desc=desc, leave=False)):
        images = [im.to(device) for im in images]
        if k == 0:
            timed(lambda: model(images), device)  # warm-up (no autocast: the backbone autocasts alone)
        out, dt = timed(lambda: model(images), device)  # boxes in pixels of the input (r x r)
        out = [{key: v.float().cpu() if v.is_floating_point() else v.cpu() for key, v in o.items()} for o in out]
        take = max(0, n_samples - len(samples))
        samples += [(im.cpu(), t, d) for im, t, d in zip(images[:take], batch_targets, out)]
        dets, targets, seconds = dets + out, targets + batch_targets, seconds + dt
    # scored as COCOeval scores detections_<r>.json: the same boxes in original pixels, against
    # the annotations as they are (own area, unclipped; crowd regions ignored, not missed)
    gts, scaled = [t["eval_gt"] for t in targets], to_original(dets, targets, loader.dataset.size)
    return coco_ap(gts, scaled, num_classes=loader.dataset.num_classes), seconds, dets, targets, samples


def to_original(dets, targets, r):
    """Detections on the r x r input (native, None: the original itself) -> boxes in pixels of
    each original image (float64)."""
    return [{**d, "boxes": boxes_to_original(d["boxes"], t["orig_size"] if r in (None, NATIVE) else (r, r),
                                             t["orig_size"])} for d, t in zip(dets, targets)]


def detections_json(dets, targets, dataset, r):
    """COCO results: boxes back in original pixels; synthetic data uses the index in the
    split as image id and 1..K as category ids."""
    coco = dataset.source == "coco"
    image_ids = [t["image_id"] for t in targets] if coco else list(range(len(dets)))
    cat_ids = dataset.cat_ids if coco else list(range(1, dataset.num_classes + 1))
    return coco_results_json(to_original(dets, targets, r), image_ids, cat_ids)


# ---------------------------------------------------------------------------------------
# samples (PIL only)
# ---------------------------------------------------------------------------------------

def to_pil(x, scale):
    """[3,H,W] image in [0,1] or [1,H,W] mask -> RGB, upscaled `scale` times (nearest: shows the pixels)."""
    x = x.float().expand(3, *x.shape[1:])
    image = Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def stack(rows, gap=4):
    """rows of equally sized tiles -> one image, tiles side by side, rows top to bottom."""
    w, h = rows[0][0].size
    canvas = Image.new("RGB", (len(rows[0]) * (w + gap) - gap, len(rows) * (h + gap) - gap), "white")
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas.paste(tile, (j * (w + gap), i * (h + gap)))
    return canvas


def seg_samples_png(samples, r):
    scale = -(-MIN_DISPLAY // r)
    return stack([[to_pil(image, scale), to_pil(truth, scale), to_pil(pred, scale)] for image, truth, pred in samples])


def det_samples_png(samples, r, class_names):
    """Per image: true boxes in green (label at the top), predictions scoring above
    SCORE_THRESHOLD in red (label and score at the bottom)."""
    scale, rows = -(-MIN_DISPLAY // r), []
    for image, target, det in samples:
        tile = to_pil(image, scale)
        draw = ImageDraw.Draw(tile)
        keep = (det["scores"] > SCORE_THRESHOLD) & (det["labels"] > 0)  # label 0: FCOS's background
        boxes = [(b, class_names[c - 1], (0, 160, 0), True) for b, c in zip(target["boxes"].tolist(), target["labels"].tolist())]
        boxes += [(b, f"{class_names[c - 1]} {s:.2f}", (220, 0, 0), False) for b, c, s in
                  zip(det["boxes"][keep].tolist(), det["labels"][keep].tolist(), det["scores"][keep].tolist())]
        for box, text, color, top in boxes:
            draw_box(draw, [v * scale for v in box], text, color, top)
        rows.append([tile])
    return stack(rows)


def draw_box(draw, box, text, color, top, width=2):
    """A labelled box on a PIL ImageDraw: the label inside a filled strip at its top or bottom."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1, y1], outline=color, width=width)
    left, t, right, b = draw.textbbox((x0, y0 if top else y1), text, anchor="lt" if top else "lb")
    draw.rectangle([left - 1, t - 1, right + 1, b + 1], fill=color)  # readable on any background
    draw.text((x0, y0 if top else y1), text, fill="white", anchor="lt" if top else "lb")


# ---------------------------------------------------------------------------------------
# output files
# ---------------------------------------------------------------------------------------

def write_atomic(path, data):
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def markdown(rows, meta):
    spacing = "training spacing at every resolution (--ignore-spacing)" if meta["ignore_spacing"] else "spacing 1/size"
    post = "".join([", the mean over 4 flips (--tta)" if meta.get("tta") else "",
                    ", largest connected region only (--largest-component)" if meta.get("largest_component") else ""])
    header = (f"Resolution sweep of `{meta['checkpoint']}`: {meta['model']} {meta['task']}, {meta['data']} "
              f"{meta['split']} split ({rows[0]['images']} images), trained at {meta['train_image_size']} px, "
              f"scales {meta['scales']}, {meta['token_grid']} token grid, {spacing}{post}, {meta['device']}; "
              f"memory: {meta['memory']}; "
              f"scored {meta.get('scored', '')}")
    cols = list(rows[0])
    fmt = lambda k, v: str(v) if isinstance(v, (int, str)) else f"{v:.1f}" if k in ("ms_per_image", "peak_mem_mb") else f"{v:.4f}"
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(fmt(k, row[k]) for k in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out, rows, meta):
    """results.csv / .md / .json, rewritten after every resolution (a long sweep that dies
    keeps the rows it finished)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(os.path.join(out, "results.csv"), buf.getvalue())
    write_atomic(os.path.join(out, "results.md"), markdown(rows, meta))
    write_atomic(os.path.join(out, "results.json"), json.dumps({**meta, "rows": rows}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------

def main(args):
    # Everything that can be wrong with the command is checked before anything is written.
    resolutions = parse_resolutions(args.resolutions)
    if args.ckpt is None:
        args.ckpt, found_task = newest_checkpoint(args.task)
        print(f"evaluating {args.ckpt}: the {found_task} run {os.path.dirname(args.ckpt)}, "
              f"the last to train under runs/")
    if args.batch_size < 1 or args.samples < 0 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size and --limit must be positive, --samples non-negative")
    train_args, state = load_run(args.ckpt, args.task)
    if args.token_grid:
        train_args["token_grid"] = args.token_grid
    task = train_args["task"]
    if args.ignore_spacing and task != "seg":
        raise ValueError("--ignore-spacing: only for --task seg (the detector builds its own pyramid)")
    for flag, on in (("--tta", args.tta), ("--largest-component", args.largest_component)):
        if on and task != "seg":
            raise ValueError(f"{flag}: only for --task seg")
    for r in resolutions:
        check_resolution(r, train_args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                   "eval_ignore_spacing" if args.ignore_spacing else "eval")
    os.makedirs(out, exist_ok=True)
    meta = dict(checkpoint=args.ckpt, task=task, model=train_args["model"], data=train_args.get("data", "synthetic"),
                token_grid=train_args["token_grid"],
                split=args.split, ignore_spacing=args.ignore_spacing, train_image_size=train_args["image_size"],
                scales=",".join(f"{s:g}" for s in train_args["scales"]), device=str(device),
                tta=args.tta, largest_component=args.largest_component,
                memory="peak allocated (CUDA)" if device.type == "cuda" else "growth of the process peak RSS (CPU)")
    meta["scored"] = SCORED[meta["data"]]
    spacings = training_spacings(train_args) if args.ignore_spacing else None  # None: the model derives 1/size
    model = build_eval_model(train_args, state, train_args["image_size"], device, args.ckpt) if task == "seg" else None
    baseline = None
    if args.resize_to_train:
        at_train = model if task == "seg" else build_eval_model(train_args, state, train_args["image_size"], device,
                                                                 args.ckpt)
        baseline = resized_to_train(with_flips(at_train) if args.tta else at_train, train_args)
    if args.tta:
        model = with_flips(model)
    rows = []
    for r in resolutions:
        native = r == NATIVE
        dataset = build_eval_dataset(train_args, args, r)
        if len(dataset) == 0:
            raise ValueError(f"--split {args.split}: no images in {meta['data']} {args.split}")
        # native seg: one image per batch (their sizes differ), decoded in this process (NativeSegDataset)
        loader = DataLoader(dataset, batch_size=1 if native and task == "seg" else args.batch_size,
                            num_workers=0 if native and task == "seg" else args.workers,
                            collate_fn=seg_collate if task == "seg" else det_collate)
        # ISIC: the challenge's submission format, one folder per resolution
        mask_dir = os.path.join(out, f"masks_{r}") if meta["data"] == "isic" else None
        if mask_dir:
            os.makedirs(mask_dir, exist_ok=True)
        if task == "det":
            model = None  # free the previous detector before measuring memory
            model = build_eval_model(train_args, state, train_args["image_size"] if native else r, device, args.ckpt)
            model = native_detector(model) if native else model
        inputs = [("native", model)] + ([(f"resized to {train_args['image_size']}", baseline)] if baseline else [])
        at = "native size" if native else f"{r} px"
        for how, net in inputs:
            try:
                mem = memory_mark(device)
                if task == "seg":
                    display = (train_args["image_size"],) * 2 if native else None  # one size for the sample grid
                    metrics, seconds, samples = eval_seg(net, loader, spacings, device, args.samples, f"{at} {how}",
                                                         mask_dir if how == "native" else None, args.largest_component,
                                                         display)
                else:
                    # native: no sample grid (its tiles would differ in size); detections_native.json has them all
                    metrics, seconds, dets, targets, samples = eval_det(net, loader, device, 0 if native else args.samples,
                                                                        f"{at} {how}")
                peak = memory_growth_mib(device, mem)
            except RuntimeError as e:  # out of memory, or a shape this model cannot take
                done = f"; results for smaller resolutions are in {out}" if rows else ""
                raise ValueError(f"--resolutions: evaluation at {at} failed: {str(e).splitlines()[0][:300]}{done}") from None
            rows.append(dict(resolution=r, input=how, **metrics, ms_per_image=1000 * seconds / len(dataset),
                             peak_mem_mb=peak, images=len(dataset)))
            if how != "native":
                continue  # the files below are the model's own
            if samples:
                shown = train_args["image_size"] if native else r
                png = seg_samples_png(samples, shown) if task == "seg" else det_samples_png(samples, r, dataset.class_names)
                write_atomic(os.path.join(out, f"samples_{r}.png"), png_bytes(png))
            if task == "det":
                write_atomic(os.path.join(out, f"detections_{r}.json"),
                             json.dumps(detections_json(dets, targets, dataset, r)))
        write_results(out, rows, meta)
    print(markdown(rows, meta))
    print(f"wrote {out}/results.{{csv,md,json}}")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
