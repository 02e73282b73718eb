"""Segment, or detect objects in, your own images with a trained checkpoint, each image at its own resolution.

    python predict.py photos/ ISIC_0000001.jpg                      # the newest run's ckpt_best.pt
    python predict.py photos/ --ckpt runs/isic/ckpt_best.pt --out masks --overlay
    python predict.py photos/ --resize 2048                         # the longer side to 2048 px first
    python predict.py photos/ --resize-to-train                     # the baseline: squashed to the training size

Native by default: an image enters at its own pixel grid, no resize and no squash. Training
squashed every image to a square of field of view 1 per axis, so an H x W image has spacing
(1/H, 1/W), and the physical token grid zooms by H / ref and W / ref (DESIGN.md section 8): the
deep tokens see the training geometry, the layers that touch pixels every native pixel.

Writes under --out, per image: segmentation <stem>_mask.png (8-bit 0/255 at the image's own
width and height, EXIF orientation applied: ISIC's submission format); detection
<stem>_boxes.json (xyxy boxes in original pixels, scores, class names); with --overlay
<stem>_overlay.png (the contour, or the boxes, on the image). A file that cannot be read, or an
image too large for the memory, gets one line and the others still run; the exit status is 1 if
any failed. Every file is written to a temporary name and renamed.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import (atomic_open, boxes_to_original, check_size, image_tensor, native_levels, open_rgb, resize,
                  save_png_atomic)
from eval import (SCORE_THRESHOLD, build_eval_model, draw_box, largest_component, newest_checkpoint, resized_to_train,
                  with_flips)
from metrics import upsample_logits
from model import autocast, load_run, set_detector_size
from synthetic import SHAPE_CLASSES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
OUTPUTS = ("_mask.png", "_overlay.png")   # ours: not read as inputs when --out is an input folder
# Peak memory of one segmentation (CPU, inference), a little above `python bench.py --only predict`'s
# measurements (RESULTS.md, Cost; the ISIC recipe's model, dim 128). Per pixel the network sees: the
# larger of the head's phase at full resolution (HEAD_BYTES) and the first grouping's (a multiple of
# the stem tokens' channels: dim / patch^2 per pixel); per pixel of the original, its decoded copies
# and the mask; and a fixed part (the allocator, lazy buffers, the inference strips of model.by_rows).
# With the conv head inference runs by strips, so the first grouping sets the peak. Detection with
# --stem full: about 1.8 KB per pixel at 1 MP (the zoomed patch projection reads the stem's two
# 32-channel full-resolution maps; growth of the peak RSS of one 1024 px image, 128 px model).
HEAD_BYTES = {"conv": 270, "refine": 270, "linear": 270, "unet": 1000, "det": 1100}
PIXEL_BYTES, TOKEN_CHANNEL_BYTES, ORIGINAL_PIXEL_BYTES, FIXED_BYTES = 40, 30, 20, 350 * 2 ** 20


class TooLarge(Exception):
    pass


def get_args_parser():
    p = argparse.ArgumentParser(description="Segment, or detect objects in, your own images, each at its own size")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files (JPEG, PNG, TIFF, BMP) or folders of them")
    p.add_argument("--ckpt", default=None,
                   help="checkpoint written by train.py (default: ckpt_best.pt of the run under runs/ that trained last)")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--overlay", action="store_true",
                   help="also write <stem>_overlay.png: the mask's contour (seg) or the boxes (det) on the image")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--resize", type=int, default=None, metavar="N",
                      help="resize to N px on the longer side first, aspect kept (the mask and boxes come back at the "
                           "original size)")
    size.add_argument("--resize-to-train", action="store_true",
                      help="the baseline: squash each image to the training size, and the prediction back")
    p.add_argument("--tta", action="store_true", help="seg: the mean of the logits over the horizontal and vertical flips")
    p.add_argument("--largest-component", action="store_true",
                   help="seg: keep only the largest connected foreground region")
    p.add_argument("--score-threshold", type=float, default=SCORE_THRESHOLD,
                   help=f"det: keep the detections scoring above this (default {SCORE_THRESHOLD})")
    p.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="skip, with a message, images whose estimated peak memory is above this many GiB (default: "
                        "the memory available at the start)")
    return p


def image_files(paths):
    """-> (files, errors): the files named, then the images of each folder named, sorted."""
    files, errors = [], []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, name) for name in os.listdir(path)
                            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.endswith(OUTPUTS)
                            and not name.startswith("."))
        elif os.path.isfile(path):
            files.append(path)
        else:
            errors.append(f"{path}: no such file or folder")
    return files, errors


def memory_limit(args, device):
    """Bytes an image may take: --memory-limit, else what the machine has free now (None: unknown)."""
    if args.memory_limit is not None:
        return args.memory_limit * 2 ** 30
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def peak_bytes(net_size, original, train_args, tta):
    """Estimated peak memory of one image: the network at net_size (h, w), the original's copies."""
    head = "det" if train_args["task"] == "det" else "unet" if train_args["model"] == "unet" else train_args["head"]
    per_net_pixel = max(HEAD_BYTES.get(head, max(HEAD_BYTES.values())),
                        PIXEL_BYTES + TOKEN_CHANNEL_BYTES * train_args["dim"] / train_args["patch"] ** 2)
    if train_args["task"] == "det":
        per_net_pixel *= 2   # FCOS's padded batch and the head's maps at the finest stride
    per_net_pixel *= 1.1 if tta else 1   # the flipped copies of the pyramid and the running sum
    return FIXED_BYTES + math.prod(net_size) * per_net_pixel + math.prod(original) * ORIGINAL_PIXEL_BYTES


def net_size(size, args, train_args):
    """(h, w) the network sees for an (H, W) image."""
    if args.resize_to_train:
        return (train_args["image_size"],) * 2
    if args.resize is None:
        return size
    scale = args.resize / max(size)
    return tuple(max(1, round(n * scale)) for n in size)


def check_fits(path, size, train_args, args, limit):
    """Raises TooLarge, naming the largest image that fits, when the estimate is over the limit."""
    need = peak_bytes(net_size(size, args, train_args), size, train_args, args.tta)
    if limit is None or need <= limit:
        return
    # The cost is linear in pixels: the largest image that fits at its own size, and the --resize at
    # which this one does (the network's part shrinks, its decoded original stays).
    pixels, original = math.prod(size), peak_bytes((0, 0), size, train_args, args.tta) - FIXED_BYTES
    per_pixel = (peak_bytes(size, (0, 0), train_args, args.tta) - FIXED_BYTES) / pixels
    fit = max(0.0, (limit - FIXED_BYTES) / (per_pixel + original / pixels))
    resized = max(0.0, (limit - FIXED_BYTES - original) / per_pixel)
    hint = f"this one with --resize {math.floor(max(size) * math.sqrt(resized / pixels))}" if resized >= 1 else \
        "this one not even resized"
    raise TooLarge(f"{path}: {size[1]}x{size[0]} ({pixels / 1e6:.1f} MP) needs about {need / 2 ** 30:.2f} GiB and "
                   f"{limit / 2 ** 30:.2f} GiB are available: images up to about {fit / 1e6:.2f} MP fit "
                   f"({math.floor(max(size) * math.sqrt(fit / pixels))} px on the longer side), {hint}")


# ---------------------------------------------------------------------------------------

def predictor(model, train_args, args):
    """What the images go through: the model; with flips (--tta); resized to the training size
    and back (--resize-to-train, eval.py's baseline)."""
    net = with_flips(model) if args.tta else model
    if args.resize_to_train:
        return resized_to_train(net, train_args)
    return net


@torch.inference_mode()
def segment(net, image, args, train_args, device):
    """RGB PIL image -> bool [H, W] mask at its own size."""
    x = image_tensor(image)                                                       # [3, H, W]
    size = tuple(x.shape[1:])
    if args.resize:
        x = resize(x, net_size(size, args, train_args))   # (--resize-to-train: inside net, as eval.py's baseline)
    levels = [level[None].to(device) for level in native_levels(x, train_args["scales"])]
    del x
    with autocast(device):
        logits = net(levels)                                                      # [1, 1, h, w]
    del levels
    mask = upsample_logits(logits[0], size)[0] > 0                                # [H, W]
    return largest_component(mask) if args.largest_component else mask


@torch.inference_mode()
def detect(model, net, image, args, train_args, device):
    """RGB PIL image -> (boxes [N, 4] xyxy in its pixels, scores [N], labels [N] in 1..K)."""
    x = image_tensor(image)
    size = tuple(x.shape[1:])
    if args.resize:
        x = resize(x, net_size(size, args, train_args))
    small = tuple(x.shape[1:])
    if not args.resize_to_train:
        set_detector_size(model, small)  # its own size: strides and anchors zoom per axis
    out = {k: v.cpu() for k, v in net([x.to(device)])[0].items()}   # boxes in pixels of x
    keep = (out["labels"] > 0) & (out["scores"] > args.score_threshold)  # label 0: FCOS's background
    return boxes_to_original(out["boxes"][keep], small, size).float(), out["scores"][keep], out["labels"][keep]


def contour_overlay(image, mask):
    """The image with the mask's outline in red, about 1/400 of the longer side wide (at least 1 px)."""
    m = mask[None, None].float().cpu()
    edge = m + F.max_pool2d(-m, 3, 1, 1)                    # foreground with a background neighbour
    width = max(1, round(max(mask.shape) / 400))
    if width > 1:
        edge = F.max_pool2d(edge, 2 * width - 1, 1, width - 1)
    pixels = np.array(image)
    pixels[edge[0, 0].numpy() > 0] = (255, 0, 0)
    return Image.fromarray(pixels)


def boxes_overlay(image, boxes, scores, names):
    image = image.copy()
    draw, width = ImageDraw.Draw(image), max(2, round(max(image.size) / 400))
    for box, score, name in zip(boxes.tolist(), scores.tolist(), names):
        draw_box(draw, box, f"{name} {score:.2f}", (220, 0, 0), False, width)
    return image


def class_names(train_args):
    """The detector's class names: from the checkpoint, the built-in shapes, or numbered."""
    if train_args.get("class_names"):
        return list(train_args["class_names"])
    if train_args.get("data", "synthetic") == "synthetic":
        return list(SHAPE_CLASSES)
    return [f"class {k}" for k in range(1, train_args["num_classes"] + 1)]


def predict_file(path, model, net, train_args, args, device, limit):
    """Reads one image, predicts, writes its files -> their paths. ValueError: the file cannot be
    read or the image is too small for the model; TooLarge: it would not fit in memory."""
    image = open_rgb(path, exif=True)
    size = image.size[::-1]                                                       # (H, W), upright
    if train_args["model"] == "rat":
        check_size(net_size(size, args, train_args), train_args["scales"], train_args["patch"], path)
    check_fits(path, size, train_args, args, limit)
    stem = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0])
    written = []
    if train_args["task"] == "seg":
        mask = segment(net, image, args, train_args, device).cpu()
        save_png_atomic(Image.fromarray(mask.numpy().astype(np.uint8) * 255), stem + "_mask.png")
        written.append(stem + "_mask.png")
        overlay = contour_overlay(image, mask) if args.overlay else None
    else:
        boxes, scores, labels = detect(model, net, image, args, train_args, device)
        names = [class_names(train_args)[k - 1] for k in labels.tolist()]
        found = [dict(box=[round(v, 2) for v in b], score=round(s, 4), label=n)
                 for b, s, n in zip(boxes.tolist(), scores.tolist(), names)]
        with atomic_open(stem + "_boxes.json", "w") as f:
            json.dump(dict(image=path, width=size[1], height=size[0], detections=found), f, indent=1)
        written.append(stem + "_boxes.json")
        overlay = boxes_overlay(image, boxes, scores, names) if args.overlay else None
    if overlay is not None:
        save_png_atomic(overlay, stem + "_overlay.png")
        written.append(stem + "_overlay.png")
    return written


def failure(path, e):
    """One line for an image whose prediction raised: out of memory (then how large may fit), or else."""
    text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    if isinstance(e, MemoryError) or "memory" in text.lower():
        with Image.open(path) as image:
            longer = max(image.size)
        return (f"{path}: ran out of memory ({text}); an image of half its pixels may fit "
                f"(--resize {math.floor(longer / math.sqrt(2))})")
    return f"{path}: prediction failed ({type(e).__name__}: {text})"


def main(args):
    if args.resize is not None and args.resize < 1:
        raise ValueError(f"--resize: must be a positive number of pixels, got {args.resize}")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise ValueError(f"--memory-limit: must be a positive number of GiB, got {args.memory_limit}")
    if args.ckpt is None:
        args.ckpt, task = newest_checkpoint()
        print(f"predicting with {args.ckpt}: the {task} run {os.path.dirname(args.ckpt)}, the last to train under runs/")
    train_args, state = load_run(args.ckpt)
    if train_args["task"] != "seg" and (args.tta or args.largest_component):
        raise ValueError("--tta and --largest-component: only for segmentation checkpoints")
    files, errors = image_files(args.paths)
    for line in errors:
        print(line, file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_eval_model(train_args, state, train_args["image_size"], device, args.ckpt)
    net = predictor(model, train_args, args)
    os.makedirs(args.out, exist_ok=True)
    limit, failed, seen = memory_limit(args, device), 0, {}
    for path in tqdm(files, desc="predict", unit="image"):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            if name in seen:
                raise ValueError(f"{path}: same name as {seen[name]}, whose outputs it would overwrite: rename one")
            seen[name] = path
            predict_file(path, model, net, train_args, args, device, limit)
        except (ValueError, TooLarge) as e:
            tqdm.write(str(e), file=sys.stderr)
            failed += 1
        except OSError as e:  # writing: a full disk, a read-only --out (atomic_open leaves nothing half-written)
            tqdm.write(f"{path}: cannot write its outputs to {args.out} ({e.strerror or e})", file=sys.stderr)
            failed += 1
        except (MemoryError, RuntimeError) as e:  # out of memory after all, or a shape the model cannot take
            tqdm.write(failure(path, e), file=sys.stderr)
            failed += 1
    print(f"{len(files) - failed} of {len(files)} images predicted, written to {args.out}"
          + (f"; {failed} failed" if failed else "") + (f"; {len(errors)} paths not found" if errors else ""))
    return 1 if failed or errors else 0


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        sys.exit(main(args))
    except ValueError as e:
        sys.exit(f"error: {e}")
