"""Datasets: synthetic lesions, their twins variant and ISIC 2018 (segmentation), synthetic shapes and
COCO 2017 (detection).

Images are float tensors in [0, 1] (normalized inside the model), masks are float 0/1,
sizes are (H, W). The field of view of every image is 1.0, so the spacing of a level is
1 / its size and the model derives it from the level's shape. The synthetic scenes are
rendered by synthetic.py, at each pyramid level's own size.

`python data.py --baseline SIZE` scores the colour-threshold baseline on the synthetic val
split (how far colour alone goes).
"""
import contextlib
import functools
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from synthetic import AUGMENT_STREAM, SHAPE_CLASSES, as_hw, draw_lesion, lesion_scene, render_shapes

# Synthetic splits are consecutive blocks of scene indices: train, val, test.
N_TRAIN, N_VAL, N_TEST = 2000, 200, 200
_ISIC_SPLIT_SEED = 2018  # fixed, independent of --seed, so a carved test set never moves
_COCO_SPLIT_SEED = 2017  # the same for COCO's validation hold-out of train2017
COCO_VAL_SIZE = 5000     # images of train2017 held out for validation (train.py --coco-val-size)

SYNTHETIC_SOURCES = ("synthetic", "twins")  # rendered by synthetic.py at any size


def parse_scales(text):
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--scales: expected comma-separated numbers like 1,0.5,0.25, got {text!r}") from None
    if not all(0 < s <= 1 for s in scales):
        raise ValueError(f"--scales: every scale must be in (0, 1], got {text!r}")
    if scales[0] != 1:
        raise ValueError(f"--scales: the first (finest) scale must be 1, got {text!r}")
    if any(b >= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"--scales: scales must decrease (finest first), got {text!r}")
    return scales


def level_sizes(size, scales):
    h, w = as_hw(size)
    return [(max(1, round(h * s)), max(1, round(w * s))) for s in scales]


def check_size(size, scales, patch, flag):
    """RAT's stem needs at least one patch of real pixels on every pyramid level."""
    coarsest = min(level_sizes(size, scales)[-1])
    if coarsest < patch:
        raise ValueError(f"{flag}: {size} is too small for this model: its coarsest pyramid level would be {coarsest} px, "
                         f"below the stem patch of {patch} px")


def _scene_index(split, i):
    """Index of the synthetic scene behind sample i of a split."""
    if split == "train":  # a longer train set skips over the held-out block instead of leaking it
        return i if i < N_TRAIN else i + N_VAL + N_TEST
    return N_TRAIN + i if split == "val" else N_TRAIN + N_VAL + i


def _synthetic_length(split, length):
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    default = {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}[split]
    if length is not None and split != "train" and length > default:
        raise ValueError(f"synthetic {split} split has {default} samples; length={length} would overlap another split")
    return default if length is None else length


# ---------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------

class SegDataset(torch.utils.data.Dataset):
    """(levels, mask): levels[l] is [3, h_l, w_l] for scale l (finest first), mask is [1, H, W].

    Real images of any aspect ratio are squashed to image_size (field of view 1 on each
    axis, so a level's spacing is 1 / its size on each axis, whatever the original shape).
    original_masks (ISIC, no augmentation): the mask is instead the original ground truth,
    bool [1, H0, W0] at the image's own size, read per sample, for scoring as the ISIC
    challenge does (metrics.score_logits resizes the prediction back to it).
    with_masks=False: the mask is instead the sample's index (a 0-d tensor), for a caller that
    reads the truth itself (original_mask): eval.py keeps masks of up to 24 MB out of the
    DataLoader workers' shared memory that way.

    ISIC is decoded once into resized PNG copies under cache_dir (default <data_dir>/.cache),
    at cache_size (default image_size; train.py: the largest --train-sizes), and each sample
    is resized from that copy to its size. Only the first `length` images are decoded.
    """

    def __init__(self, source, split, image_size, scales=(1.0,), augment=False, data_dir=None, seed=0,
                 length=None, cache_dir=None, cache_size=None, original_masks=False, with_masks=True):
        self.source, self.split, self.augment, self.seed = source, split, augment, seed
        if original_masks and (source != "isic" or augment):
            raise ValueError("original_masks: only for ISIC data without augmentation")
        self.original_masks, self.with_masks = original_masks, with_masks
        self.size, self.scales = as_hw(image_size), scales
        self.sizes = level_sizes(self.size, scales)
        self.epoch = 0
        if source in SYNTHETIC_SOURCES:
            self.length = _synthetic_length(split, length)
        elif source == "isic":
            if data_dir is None:
                raise ValueError("--data isic needs --data-dir (the folder holding ISIC2018_Task1-2_Training_Input)")
            # Decoding a 6000 px JPEG takes ~0.5 s: decode each once, keep a resized PNG copy.
            h, w = as_hw(cache_size or image_size)
            cache_dir = os.path.join(cache_dir or os.path.join(data_dir, ".cache"), f"{h}x{w}")
            self.originals = isic_split_files(data_dir, split)[:length]  # only these are ever read
            self.files = cache_isic_split(self.originals, (h, w), cache_dir)
            self.length = len(self.files)
        else:
            raise ValueError(f"unknown segmentation data source {source!r} (expected synthetic, twins or isic)")

    def set_epoch(self, epoch):
        # DataLoader workers hold a copy of the dataset: call this before iterating, and
        # don't combine it with persistent_workers.
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        # key: an index, or (index, size) when train.py's --train-sizes picks each batch's size
        i, size = key if isinstance(key, tuple) else (key, self.size)
        sizes = level_sizes(size, self.scales)
        aug = _augment_rng(self.seed, i, self.epoch) if self.augment else None
        if self.source in SYNTHETIC_SOURCES:
            levels, mask = self._render(i, aug, sizes)
        else:
            levels, mask = self._load(i, aug, sizes)
        if aug is not None:
            levels = color_jitter(levels, aug)
        if not self.with_masks:
            return levels, torch.tensor(i)
        return levels, self.original_mask(i) if self.original_masks else mask

    def _render(self, i, aug, sizes):
        scene = lesion_scene(self.seed, _scene_index(self.split, i), twin=self.source == "twins")
        affine = random_affine(aug) if aug is not None else None
        levels = []
        for size in sizes:
            image, mask = draw_lesion(scene, size, affine, with_mask=size == sizes[0])
            levels.append(torch.from_numpy(image).permute(2, 0, 1))
            if size == sizes[0]:
                mask_out = torch.from_numpy(mask)[None].float()
        return levels, mask_out

    def _load(self, i, aug, sizes):
        image_path, mask_path = self.files[i]
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255  # [3,H,W]
            mask = torch.from_numpy(np.asarray(mask) > 127)[None].float()  # [1,H,W]
        if aug is not None:
            image, mask = warp_pair(image, mask, random_affine(aug))
        if image.shape[1:] != sizes[0]:  # --train-sizes: resampled from the cached copy
            image, mask = resize(image, sizes[0]), (resize(mask, sizes[0]) > 0.5).float()
        levels = [image] + [resize(image, size) for size in sizes[1:]]
        return levels, mask

    def original_mask(self, i):
        """The ground truth of sample i at its original size, bool [1, H0, W0] (bool: a
        6000 x 4000 mask is 24 MB, not 96)."""
        path = self.originals[i][1]
        mask, _ = open_image(path)
        return torch.from_numpy(binary_mask(mask, path))[None]


class NativeSegDataset(torch.utils.data.Dataset):
    """ISIC images at their own size, no resize and no squash (eval.py --resolutions native):
    (levels, mask), levels[l] [3, h_l, w_l] at level_sizes((H, W), scales) of the original and
    mask its ground truth, bool [1, H, W]. The spacing the model derives, (1/H, 1/W), puts each
    image in the training frame (field of view 1 per axis). Sizes differ: one image per batch,
    read in the main process (a 24 MP image is 290 MB as floats, too much for the shared memory
    of a loader's workers)."""
    source, with_masks, size = "isic", True, None

    def __init__(self, split, scales, data_dir, length=None):
        if data_dir is None:
            raise ValueError("--data isic needs --data-dir (the folder holding ISIC2018_Task1-2_Training_Input)")
        self.scales = scales
        self.originals = isic_split_files(data_dir, split)[:length]

    def __len__(self):
        return len(self.originals)

    def __getitem__(self, i):
        image_path, mask_path = self.originals[i]
        image = image_tensor(open_rgb(image_path))                               # [3, H, W]
        mask = self.original_mask(i)
        if mask.shape[1:] != image.shape[1:]:
            raise ValueError(f"{mask_path}: mask is {mask.shape[2]}x{mask.shape[1]}, "
                             f"but its image is {image.shape[2]}x{image.shape[1]}")
        return native_levels(image, self.scales), mask

    original_mask = SegDataset.original_mask


def native_levels(image, scales):
    """[3, H, W] -> the pyramid at level_sizes((H, W), scales), as the datasets build it."""
    return [image] + [resize(image, size) for size in level_sizes(tuple(image.shape[1:]), scales)[1:]]


def read_original_masks(dataset, indices):
    """The original ground truths of these samples of a with_masks=False SegDataset, read in
    threads (PNG decoding releases the GIL)."""
    with ThreadPoolExecutor(len(indices)) as pool:
        return list(pool.map(dataset.original_mask, indices))


def seg_collate(batch):
    """-> (levels: one [B,3,h_l,w_l] per level, masks: [B,1,H,W], or a list of per-image
    masks when their sizes differ, as original-size ground truths do)."""
    levels, masks = zip(*batch)
    same = all(m.shape == masks[0].shape for m in masks)
    return [torch.stack(level) for level in zip(*levels)], torch.stack(masks) if same else list(masks)


def color_threshold_baseline(images):
    """A training-free colour baseline: [B,3,H,W] -> [B,1,H,W] bool.

    Per image, lesion = pixels darker than Otsu's threshold of the darkness map (1 - mean
    channel). On the synthetic val split this beat Otsu on a smoothed darkness map and on
    the distance from the image's median colour.
    """
    darkness = 1 - images.mean(1, keepdim=True)  # [B,1,H,W]
    threshold = otsu_threshold(darkness.flatten(1))  # [B]
    return darkness > threshold.view(-1, 1, 1, 1)


def otsu_threshold(values, bins=256):
    """[B, N] -> [B]: the threshold maximizing the between-class variance of each row."""
    lo, hi = values.min(1, keepdim=True).values, values.max(1, keepdim=True).values
    scaled = (values - lo) / (hi - lo).clamp_min(1e-8)
    index = (scaled * (bins - 1)).round().long()
    hist = torch.zeros(values.shape[0], bins).scatter_add_(1, index, torch.ones_like(scaled))
    p = hist / hist.sum(1, keepdim=True)
    centers = torch.linspace(0, 1, bins)
    w0, mu0 = p.cumsum(1), (p * centers).cumsum(1)  # weight and first moment of the dark class
    between = (mu0[:, -1:] * w0 - mu0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    cut = between.argmax(1)
    # split halfway between the last bin of the low class and the first of the high one
    return lo.squeeze(1) + (cut.float() + 0.5) / (bins - 1) * (hi - lo).squeeze(1)


# --------------------------- augmentation ---------------------------------------------

def _augment_rng(seed, index, epoch):
    # seeded by the sample, never by worker RNG state: reproducible for any number of workers
    return np.random.default_rng([seed, index, epoch, AUGMENT_STREAM])


def random_affine(rng):
    """Random flips, quarter turns and a crop of 80-100% of the area, as a synthetic.PixelGrid affine (A, t)."""
    flip = np.diag(rng.choice([-1.0, 1.0], 2))
    turn = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), rng.integers(4))
    scale = math.sqrt(rng.uniform(0.8, 1.0))
    return scale * turn @ flip, rng.uniform(-(1 - scale) / 2, (1 - scale) / 2, 2)


def warp_pair(image, mask, affine):
    """Apply a synthetic.PixelGrid affine to image [3,H,W] and mask [1,H,W] by resampling (for stored data)."""
    A, t = affine
    # affine_grid works in [-1, 1] coordinates of pixel centers (align_corners=False), twice our units
    theta = torch.tensor(np.concatenate([A, 2 * t[:, None]], 1), dtype=torch.float32)[None]  # [1,2,3]
    grid = F.affine_grid(theta, [1, 1, *image.shape[1:]], align_corners=False)
    warp = lambda x: F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    return warp(image), (warp(mask) > 0.5).float()


def color_jitter(levels, rng):
    """Small brightness, contrast and saturation changes, identical on every level."""
    brightness, contrast, saturation = rng.uniform(0.9, 1.1, 3)
    mean = levels[-1].mean() * brightness  # one grey level for all scales
    out = []
    for x in levels:
        x = (x * brightness - mean) * contrast + mean
        grey = x.mean(0, keepdim=True)
        out.append(((x - grey) * saturation + grey).clamp(0, 1))
    return out


def resize(image, size):
    """[C,H,W] -> [C,h,w], antialiased."""
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


# --------------------------- ISIC 2018 Task 1 ------------------------------------------

ISIC_FOLDERS = {
    "train": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "val": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}


def isic_split_files(root, split):
    """[(image.jpg, mask.png)] of a split: the official folder when present; a held-out split
    without one is a fixed 10% of Training (same permutation whatever --seed is)."""
    if not os.path.isdir(root):
        raise ValueError(f"{root}: ISIC data folder not found")
    if split not in ISIC_FOLDERS:
        raise ValueError(f"split must be train, val or test, got {split!r}")
    official = {name: os.path.isdir(os.path.join(root, ISIC_FOLDERS[name][0])) for name in ISIC_FOLDERS}
    if split != "train" and official[split]:
        return isic_pairs(root, *ISIC_FOLDERS[split])
    pairs = isic_pairs(root, *ISIC_FOLDERS["train"])
    order = np.random.default_rng(_ISIC_SPLIT_SEED).permutation(len(pairs))
    held = round(0.1 * len(pairs))
    blocks, start = {}, 0
    for name in ("val", "test"):
        if not official[name]:
            blocks[name], start = order[start:start + held], start + held
    blocks["train"] = order[start:]
    return [pairs[k] for k in sorted(blocks[split])]


def isic_pairs(root, image_folder, mask_folder):
    image_dir, mask_dir = os.path.join(root, image_folder), os.path.join(root, mask_folder)
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder}: folder not found")
    # the official folders also hold LICENSE / ATTRIBUTION files: look only at image and mask names
    images = {name.rsplit(".", 1)[0]: name for name in os.listdir(image_dir)
              if name.startswith("ISIC_") and name.lower().endswith((".jpg", ".jpeg"))}
    masks = {name[:-len("_segmentation.png")] for name in os.listdir(mask_dir) if name.endswith("_segmentation.png")}
    if not images:
        raise ValueError(f"{image_dir}: no ISIC_*.jpg images")
    for stem in sorted(images.keys() - masks):
        image = os.path.join(image_dir, images[stem])
        raise ValueError(f"{image}: no mask {stem}_segmentation.png in {mask_dir}")
    for stem in sorted(masks - images.keys()):
        mask = os.path.join(mask_dir, stem + "_segmentation.png")
        raise ValueError(f"{mask}: mask without image {stem}.jpg in {image_dir}")
    return [(os.path.join(image_dir, images[stem]), os.path.join(mask_dir, stem + "_segmentation.png"))
            for stem in sorted(images)]


def cache_isic_split(pairs, size, cache_dir):
    """Resized PNG copies of every (image, mask) pair, made once; decoding runs in threads (PIL releases the GIL)."""
    todo = sum(not os.path.exists(_cache_paths(img, cache_dir)[1]) for img, _ in pairs)
    if todo:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=cache_dir):
                pass
        except OSError as e:  # a read-only dataset mount, say
            raise ValueError(f"{cache_dir}: cannot write the decoded-image cache ({e.strerror}); "
                             f"pass --cache-dir DIR on a writable disk") from None
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        jobs = pool.map(lambda pair: cache_isic_pair(*pair, size, cache_dir), pairs)
        return list(tqdm(jobs, total=len(pairs), desc=f"caching {cache_dir}", disable=todo == 0))


def _cache_paths(image_path, cache_dir):
    stem = os.path.splitext(os.path.basename(image_path))[0]
    return os.path.join(cache_dir, stem + ".png"), os.path.join(cache_dir, stem + "_segmentation.png")


def cache_isic_pair(image_path, mask_path, size, cache_dir):
    cached_image, cached_mask = _cache_paths(image_path, cache_dir)
    if os.path.exists(cached_image) and os.path.exists(cached_mask):
        return cached_image, cached_mask
    h, w = size
    image, image_size = open_image(image_path, draft=(w, h))
    mask, mask_size = open_image(mask_path)
    if mask_size != image_size:
        raise ValueError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]}, "
                         f"but its image is {image_size[0]}x{image_size[1]}")
    mask = Image.fromarray(binary_mask(mask, mask_path).astype(np.uint8) * 255)
    os.makedirs(cache_dir, exist_ok=True)
    # resize the mask as grey levels and threshold at half: smoother borders than NEAREST
    mask = Image.fromarray((np.asarray(mask.resize((w, h), Image.BILINEAR)) >= 128).astype(np.uint8) * 255)
    save_png_atomic(mask, cached_mask)
    save_png_atomic(to_rgb(image, image_path).resize((w, h), Image.BILINEAR), cached_image)
    return cached_image, cached_mask


def open_image(path, draft=None):
    """Decode an image fully (so corruption shows here) -> (PIL image, original (W, H))."""
    try:
        with Image.open(path) as image:
            size = image.size
            if draft is not None:  # JPEG only: decode at a reduced scale >= draft, much faster
                image.draft("RGB", draft)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    return image, size


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # PIL's modes of 16-bit (and 32-bit integer) images


def to_rgb(image, path):
    """Any PIL image -> 8-bit RGB, as every image of training and evaluation is read: PIL's
    convert("RGB") (grayscale repeated, alpha dropped, CMYK and palettes converted), and a
    16-bit image scaled from its full range first (convert would clip it at 255)."""
    try:
        if image.mode in SIXTEEN_BIT:
            values = np.asarray(image).astype(np.float32) / 257                  # 65535 -> 255
            image = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8))
        return image if image.mode == "RGB" else image.convert("RGB")
    except (OSError, ValueError) as e:  # a mode PIL cannot convert
        raise ValueError(f"{path}: cannot convert {image.mode} image to RGB ({e})") from None


def open_rgb(path, exif=False, draft=None):
    """An image file -> 8-bit RGB PIL image (to_rgb). exif: turned upright as its EXIF orientation
    says, as a viewer shows a camera's photo (predict.py; the ISIC and COCO annotations are in
    the stored orientation, so the datasets leave it)."""
    image, _ = open_image(path, draft)
    if exif:
        try:
            image = ImageOps.exif_transpose(image)
        except (OSError, ValueError, SyntaxError) as e:  # a malformed EXIF block
            raise ValueError(f"{path}: cannot read its EXIF orientation ({e})") from None
    return to_rgb(image, path)


def image_tensor(image):
    """RGB PIL image -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def binary_mask(mask, path):
    mask = np.asarray(mask if mask.mode in ("L", "1") else mask.convert("L")).astype(np.uint8)
    values = np.unique(mask)
    if not (set(values) <= {0, 255} or set(values) <= {0, 1}):
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise ValueError(f"{path}: mask values must be 0/255 or 0/1, found {shown}")
    return mask > 0


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Write `path` through a temporary file beside it, renamed into place once complete: a
    crash mid-write, or a reader meanwhile (another worker, rank or node), never sees a
    half-written file in place of the last good one. The project's one file writer."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)                        # mkstemp's 0600 would hide results from a group
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png_atomic(image, path):
    with atomic_open(path) as f:
        image.save(f, format="PNG")


# ---------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------

class DetDataset(torch.utils.data.Dataset):
    """(image [3,S,S], target): boxes [N,4] xyxy in pixels of the returned image, labels [N] in 1..K,
    iscrowd [N], area [N] (COCO's annotation area in returned pixels), image_id, orig_size (h, w),
    and eval_gt: the ground truth as COCOeval sees it, in original pixels (COCO: every annotation
    of a known category with its own bbox and area, unclipped, including the boxes dropped from
    training), for metrics.coco_ap against detections mapped back by boxes_to_original.

    COCO splits: test is val2017; val is a fixed, seeded hold-out of coco_val_size train2017
    images (independent of --seed) and train the rest of train2017, so the split that
    picks ckpt_best.pt is never the one reported. Images of any aspect ratio are squashed
    to S x S; boxes follow with their own x and y scales. image_size None (COCO only): every
    image at its own size, boxes in its own pixels (eval.py --resolutions native)."""

    def __init__(self, source, split, image_size, augment=False, data_dir=None, seed=0, length=None,
                 coco_val_size=COCO_VAL_SIZE):
        self.source, self.split, self.size, self.augment, self.seed = source, split, image_size, augment, seed
        self.epoch = 0
        if source == "synthetic":
            self.length = _synthetic_length(split, length)
            self.class_names = SHAPE_CLASSES
        elif source == "coco":
            if data_dir is None:
                raise ValueError("--data coco needs --data-dir (the folder holding annotations/ and train2017/)")
            self.records, self.cat_ids, self.class_names = load_coco(data_dir, split, coco_val_size)
            self.length = len(self.records) if length is None else min(length, len(self.records))
        else:
            raise ValueError(f"unknown detection data source {source!r} (expected synthetic or coco)")
        self.num_classes = len(self.class_names)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        # key: an index, or (index, size) when train.py's --train-sizes picks each batch's size
        i, size = key if isinstance(key, tuple) else (key, self.size)
        if self.source == "synthetic":
            index = _scene_index(self.split, i)
            image, target = render_shapes(self.seed, index, size)
            image = torch.from_numpy(image).permute(2, 0, 1)
            boxes = target["boxes"]
            target = dict(boxes=torch.from_numpy(boxes), labels=torch.from_numpy(target["labels"]),
                          iscrowd=torch.zeros(len(boxes), dtype=torch.int64),
                          area=torch.from_numpy((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])),
                          image_id=index, orig_size=(size, size))
            # rendered at this size: the original pixels are the returned ones
            target["eval_gt"] = {k: target[k] for k in ("boxes", "labels", "iscrowd")}
        else:
            image, target = self._load_coco(i, size)
        if self.augment:  # horizontal flip and colour jitter: vertical flips are unnatural for COCO
            rng = _augment_rng(self.seed, i, self.epoch)
            if rng.uniform() < 0.5:
                image, boxes = image.flip(-1), target["boxes"].clone()
                boxes[:, [0, 2]] = size - target["boxes"][:, [2, 0]]
                target = {**target, "boxes": boxes}
            image = color_jitter([image], rng)[0]
        return image, target

    def _load_coco(self, i, size):
        r = self.records[i]
        image, (w, h) = open_image(r["path"], draft=None if size is None else (size, size))
        if (h, w) != r["size"]:
            raise ValueError(f"{r['path']}: image is {w}x{h} but its annotation says {r['size'][1]}x{r['size'][0]}")
        image = to_rgb(image, r["path"])
        if size is not None:  # a plain square resize; boxes follow with their own x and y scales
            image = image.resize((size, size), Image.BILINEAR)
        image = image_tensor(image)
        sx, sy = (1.0, 1.0) if size is None else (size / w, size / h)
        target = dict(boxes=torch.from_numpy(r["boxes"] * np.array([sx, sy, sx, sy], np.float32)),
                      labels=torch.from_numpy(r["labels"]), iscrowd=torch.from_numpy(r["iscrowd"]),
                      area=torch.from_numpy(r["area"] * np.float32(sx * sy)), image_id=r["id"], orig_size=(h, w),
                      eval_gt={k: torch.from_numpy(v) for k, v in r["eval_gt"].items()})
        return image, target


def boxes_to_original(boxes, size, orig_size):
    """xyxy boxes in pixels of the (h, w) network input -> pixels of the original (H, W)
    image, float64: where COCO results and COCOeval's area ranges live."""
    (h, w), (H, W) = size, orig_size
    return boxes.double() * torch.tensor([W / w, H / h, W / w, H / h], dtype=torch.float64)


def det_collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


# --------------------------- COCO 2017 ------------------------------------------------

def load_coco(root, split, val_size=COCO_VAL_SIZE):
    """-> (records, cat_ids, class_names). Each record: id, path, size (h, w), its training
    annotations in original pixels (boxes xyxy clipped to the image, labels 1..K in sorted
    category-id order, iscrowd, area) and eval_gt (every annotation of a known category as
    COCOeval sees it: bbox xywh, labels, iscrowd, area). Splits: test = val2017 (COCO's own
    test set has no public labels), val = a fixed hold-out of val_size train2017 images,
    train = the rest of train2017."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    name = "val2017" if split == "test" else "train2017"
    ann_path = os.path.join(root, "annotations", f"instances_{name}.json")
    image_dir = os.path.join(root, name)
    if not os.path.isfile(ann_path):
        raise ValueError(f"{ann_path}: annotation file not found")
    if not os.path.isdir(image_dir):
        raise ValueError(f"{image_dir}: image folder not found")
    stat = os.stat(ann_path)
    records, cat_ids, class_names = parse_coco(ann_path, image_dir, stat.st_mtime_ns, stat.st_size)
    if split != "test":
        held = set(coco_holdout(len(records), val_size, ann_path).tolist())
        records = [r for k, r in enumerate(records) if (k in held) == (split == "val")]
    return records, cat_ids, class_names


@functools.lru_cache(maxsize=1)
def parse_coco(ann_path, image_dir, mtime_ns, size):
    """load_coco's records of every image of one annotation file, sorted by id, with cat_ids
    and class_names. Parsed once per process: train and val both come from
    instances_train2017.json (448 MB, several GB once parsed), and eval.py reads its split
    at every resolution. The file's mtime and size are part of the key, so a rewritten file
    is read again. The records are shared: read only."""
    try:
        with open(ann_path) as f:
            coco = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{ann_path}: cannot read JSON ({e})") from None

    def get(obj, key, where):
        if not isinstance(obj, dict) or key not in obj:
            raise ValueError(f"{ann_path}: missing key {key!r} in {where}")
        return obj[key]

    categories = sorted(get(coco, "categories", "the top level"), key=lambda c: get(c, "id", "a category"))
    cat_ids = [c["id"] for c in categories]
    label_of = {cid: k + 1 for k, cid in enumerate(cat_ids)}
    class_names = tuple(get(c, "name", "a category") for c in categories)
    records = {}
    for im in get(coco, "images", "the top level"):
        records[get(im, "id", "an image")] = dict(
            id=im["id"], path=os.path.join(image_dir, get(im, "file_name", "an image")),
            size=(get(im, "height", "an image"), get(im, "width", "an image")), anns=[], gts=[])
    dropped = dict(unknown_category=0, unknown_image=0, zero_area=0, outside_image=0)
    for ann in get(coco, "annotations", "the top level"):
        x, y, bw, bh = get(ann, "bbox", "an annotation")
        image_id, cat = get(ann, "image_id", "an annotation"), get(ann, "category_id", "an annotation")
        if cat not in label_of:
            dropped["unknown_category"] += 1  # COCOeval evaluates only the listed categories
        elif image_id not in records:
            dropped["unknown_image"] += 1
        else:
            area = ann.get("area", bw * bh)  # COCO's area ranges use the mask area, not the box's
            # evaluation sees every annotation, unclipped, as COCOeval does
            records[image_id]["gts"].append(([x, y, bw, bh], label_of[cat], ann.get("iscrowd", 0), area))
            h, w = records[image_id]["size"]
            box = [max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)]  # clip the slight overhangs COCO has
            if bw <= 0 or bh <= 0:
                dropped["zero_area"] += 1
            elif box[2] <= box[0] or box[3] <= box[1]:
                dropped["outside_image"] += 1
            else:
                records[image_id]["anns"].append((box, label_of[cat], ann.get("iscrowd", 0), area))
    if sum(dropped.values()):
        kept = dropped["zero_area"] + dropped["outside_image"]
        print(f"{ann_path}: dropped {sum(dropped.values())} annotations from training: "
              + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items() if n)
              + (f"; the {kept} zero-area or outside-image ones still count in evaluation, as in COCOeval"
                 if kept else ""))
    out = []
    for r in sorted(records.values(), key=lambda r: r["id"]):  # images without annotations stay
        anns, gts = r.pop("anns"), r.pop("gts")
        r["boxes"] = np.array([a[0] for a in anns], np.float32).reshape(-1, 4)
        r["labels"] = np.array([a[1] for a in anns], np.int64)
        r["iscrowd"] = np.array([a[2] for a in anns], np.int64)
        r["area"] = np.array([a[3] for a in anns], np.float32)
        r["eval_gt"] = dict(bbox=np.array([g[0] for g in gts], np.float64).reshape(-1, 4),
                            labels=np.array([g[1] for g in gts], np.int64),
                            iscrowd=np.array([g[2] for g in gts], np.int64),
                            area=np.array([g[3] for g in gts], np.float64))
        out.append(r)
    return out, cat_ids, class_names


def coco_holdout(n, val_size, ann_path):
    """Indices (into the images sorted by id) of the validation hold-out: the first val_size
    of a fixed permutation, whatever --seed is (so a smaller hold-out is a subset of a larger)."""
    if val_size < 1:
        raise ValueError(f"--coco-val-size {val_size}: must be at least 1")
    if val_size >= n:  # a small subset of COCO: keep most of it for training
        print(f"{ann_path}: {n} images, not more than --coco-val-size {val_size}: "
              f"holding out {max(1, n // 10)} for validation instead")
        val_size = max(1, n // 10)
    return np.random.default_rng(_COCO_SPLIT_SEED).permutation(n)[:val_size]


# ---------------------------------------------------------------------------------------

def main():
    """Measure the colour-threshold baseline (--baseline SIZE) and the resize ceiling
    (--resize-ceiling SIZE)."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--baseline", type=int, metavar="SIZE")
    parser.add_argument("--resize-ceiling", type=int, metavar="SIZE",
                        help="Dice at 2x and 4x SIZE of a perfect SIZE px prediction (each pixel's lesion "
                             "coverage) upsampled as eval.py --resize-to-train upsamples its output: about the most "
                             "the resize baseline of a SIZE px model can score there")
    args = parser.parse_args()
    for flag in ("baseline", "resize_ceiling"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive image size, got {getattr(args, flag)}")
    from metrics import seg_scores  # per-image Dice as eval.py scores it (both empty: 1)

    def whole(split, size):  # -> (levels, masks) of a synthetic split, one batch
        ds = SegDataset("synthetic", split, size)
        return seg_collate([ds[i] for i in range(len(ds))])

    if args.baseline:
        levels, masks = whole("val", args.baseline)
        dice = seg_scores(color_threshold_baseline(levels[0]), masks)[:, 0]
        print(f"colour-threshold baseline, synthetic val, {args.baseline} px: Dice {dice.mean():.3f}")
    if args.resize_ceiling:
        def test_masks(size, pool=1):  # [B, 1, size / pool, ...] area-averaged, one image at a time
            test = SegDataset("synthetic", "test", size)   # (the 8x renders' images would not fit whole)
            return torch.stack([F.avg_pool2d(test[i][1], pool) for i in range(len(test))])

        size = args.resize_ceiling
        # Not the SIZE px binary mask: a perfect model's probability is each pixel's lesion
        # coverage, which places the boundary inside the pixel (here from an 8x finer render).
        coverage = test_masks(8 * size, 8)                                                     # [B, 1, H, W]
        for f in (2, 4):
            truth = test_masks(f * size)
            up = F.interpolate(coverage, scale_factor=f, mode="bilinear", align_corners=False) > 0.5  # [B, 1, fH, fW]
            dice = seg_scores(up, truth)[:, 0]
            print(f"perfect {size} px prediction (lesion coverage) upsampled to {f * size} px, synthetic test: "
                  f"Dice {dice.mean():.3f}")

if __name__ == "__main__":
    main()
