"""Datasets: synthetic lesions and ISIC 2018 (segmentation), synthetic shapes and COCO 2017 (detection).

Images are float tensors in [0, 1] (normalized inside the model), masks are float 0/1,
sizes are (H, W). The field of view of every image is 1.0, so the spacing of a level is
1 / its size and the model derives it from the level's shape.

The synthetic scenes are functions of continuous coordinates in the unit square, evaluated
at pixel centers (i + 0.5) / size. Every sinusoid is multiplied by the box-filter response
of one pixel (a sinc) and every edge is ramped over one pixel, so a 64 px render is close
to the area average of a 1024 px render of the same scene: a resolution sweep measures
real detail, not aliasing, and each pyramid level is rendered at its own size.

Render speed, one process on a shared 2-core CPU (`python data.py --bench`):
    lesions 96 px: 470 samples/s, 256 px: 110 samples/s (one pyramid level each)
    shapes  96 px: 760 samples/s, 256 px: 200 samples/s
Colour-threshold baseline on the synthetic val split (`python data.py --baseline 96`):
    Dice 0.46 at 96 px (0.45 at 64, 0.48 at 256), while a 0.4M-parameter U-Net trained
    3 minutes on that CPU at 64 px reached Dice 0.96: colour alone doesn't solve it, shape does.
"""
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# Synthetic splits are consecutive blocks of scene indices: train, val, test.
N_TRAIN, N_VAL, N_TEST = 2000, 200, 200
SHAPE_CLASSES = ("disk", "square", "triangle")

# Independent random streams per purpose, so adding a parameter to one never moves the other.
_LESION_STREAM, _SHAPES_STREAM, _AUGMENT_STREAM = 1, 2, 3
_ISIC_SPLIT_SEED = 2018  # fixed, independent of --seed, so a carved test set never moves


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
    h, w = _as_hw(size)
    return [(max(1, round(h * s)), max(1, round(w * s))) for s in scales]


def _as_hw(size):
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


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
    """(levels, mask): levels[l] is [3, h_l, w_l] for scale l (finest first), mask is [1, H, W]."""

    def __init__(self, source, split, image_size, scales=(1.0,), augment=False,
                 data_dir=None, seed=0, length=None, cache_dir=None):
        self.source, self.split, self.augment, self.seed = source, split, augment, seed
        self.size = _as_hw(image_size)
        self.sizes = level_sizes(self.size, scales)
        self.epoch = 0
        if source == "synthetic":
            self.length = _synthetic_length(split, length)
        elif source == "isic":
            if data_dir is None:
                raise ValueError("--data isic needs --data-dir (the folder holding ISIC2018_Task1-2_Training_Input)")
            # Decoding a 6000 px JPEG takes ~0.5 s: decode each once, keep a resized PNG copy.
            cache_dir = cache_dir or os.path.join(data_dir, ".cache", f"{self.size[0]}x{self.size[1]}")
            self.files = cache_isic_split(isic_split_files(data_dir, split), self.size, cache_dir)
            self.length = len(self.files) if length is None else min(length, len(self.files))
        else:
            raise ValueError(f"unknown segmentation data source {source!r} (expected synthetic or isic)")

    def set_epoch(self, epoch):
        # DataLoader workers hold a copy of the dataset: call this before iterating, and
        # don't combine it with persistent_workers.
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        aug = _augment_rng(self.seed, i, self.epoch) if self.augment else None
        if self.source == "synthetic":
            levels, mask = self._render(i, aug)
        else:
            levels, mask = self._load(i, aug)
        if aug is not None:
            levels = color_jitter(levels, aug)
        return levels, mask

    def _render(self, i, aug):
        scene = lesion_scene(self.seed, _scene_index(self.split, i))
        affine = random_affine(aug) if aug is not None else None
        levels = []
        for size in self.sizes:
            image, mask = draw_lesion(scene, size, affine, with_mask=size == self.size)
            levels.append(torch.from_numpy(image).permute(2, 0, 1))
            if size == self.size:
                mask_out = torch.from_numpy(mask)[None].float()
        return levels, mask_out

    def _load(self, i, aug):
        image_path, mask_path = self.files[i]
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255  # [3,H,W]
            mask = torch.from_numpy(np.asarray(mask) > 127)[None].float()  # [1,H,W]
        if aug is not None:
            image, mask = warp_pair(image, mask, random_affine(aug))
        levels = [image] + [resize(image, size) for size in self.sizes[1:]]
        return levels, mask


def seg_collate(batch):
    levels, masks = zip(*batch)
    return [torch.stack(level) for level in zip(*levels)], torch.stack(masks)


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
    return np.random.default_rng([seed, index, epoch, _AUGMENT_STREAM])


def random_affine(rng):
    """Random flips, quarter turns and a crop of 80-100% of the area, as a PixelGrid affine (A, t)."""
    flip = np.diag(rng.choice([-1.0, 1.0], 2))
    turn = np.linalg.matrix_power(np.array([[0.0, -1.0], [1.0, 0.0]]), rng.integers(4))
    scale = math.sqrt(rng.uniform(0.8, 1.0))
    return scale * turn @ flip, rng.uniform(-(1 - scale) / 2, (1 - scale) / 2, 2)


def warp_pair(image, mask, affine):
    """Apply a PixelGrid affine to image [3,H,W] and mask [1,H,W] by resampling (for stored data)."""
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


# --------------------------- synthetic lesions ------------------------------------------

def render_lesion(seed, index, size):
    """Scene (seed, index) at size (H, W): float32 image [H,W,3] in [0,1], bool mask [H,W]."""
    return draw_lesion(lesion_scene(seed, index), _as_hw(size))


def lesion_scene(seed, index):
    """Every random choice of one scene, in continuous [0,1]^2 coordinates (x right, y down)."""
    rng = np.random.default_rng([seed, index, _LESION_STREAM])
    skin = np.array([0.95, 0.78, 0.70]) * (1 - rng.uniform(0, 0.4)) + rng.normal(0, 0.025, 3)
    pigment = _pigment(rng)
    # Low contrast happens, but the lesion must stay visible to a human.
    contrast = max(rng.uniform(0.35, 0.95), 0.14 / np.linalg.norm(skin - pigment))
    radius = rng.uniform(0.05, 0.225)  # 10% to 45% of the field of view across
    center = rng.uniform(0.2, 0.8, 2)
    return _float32(dict(
        skin=skin,
        skin_shading=_waves(rng, 4, 0.5, 2.0, 0.05),   # smooth brightness changes
        redness=_waves(rng, 3, 0.5, 2.0, 0.04),        # smooth colour changes
        skin_texture=_waves(rng, 10, 12, 60, 0.008),    # fine texture, partly finer than a 64 px pixel
        lesion=dict(
            center=center, radius=radius, pigment=pigment, contrast=contrast,
            # radius(angle) = radius * (1 + sum_k a_k cos(k angle + phi_k)): blobby low harmonics
            # plus a few high ones for a ragged border that only high resolution resolves
            harmonics=np.concatenate([np.arange(2, 6), rng.choice(np.arange(7, 25), 4, replace=False)]),
            amplitudes=np.concatenate([rng.uniform(0, 0.12, 4) / np.sqrt([1, 1.5, 2, 2.5]),
                                       rng.uniform(0.01, 0.035, 4)]),
            phases=rng.uniform(0, 2 * np.pi, 8),
            blur=rng.uniform(0.002, 0.025),  # fuzzy vs sharp borders
            blotches=_waves(rng, 4, 3, 10, 0.12),
        ),
        decoys=[_decoy(rng, center, radius, pigment, contrast) for _ in range(rng.integers(1, 5))],
        hairs=[_hair(rng) for _ in range(rng.choice([0, 0, rng.integers(1, 4), rng.integers(4, 11)]))],
        vignette=_vignette(rng, center, radius),
    ))


def _pigment(rng):
    kind = rng.uniform()
    if kind < 0.7:  # brown, light to almost black
        return np.array([0.55, 0.34, 0.22]) * (1 - rng.uniform(0, 0.7)) + rng.normal(0, 0.02, 3)
    if kind < 0.85:  # blue-grey
        return np.array([0.38, 0.38, 0.46]) * rng.uniform(0.6, 1.0)
    return np.array([0.72, 0.32, 0.30]) * rng.uniform(0.7, 1.0)  # red


def _waves(rng, n, min_freq, max_freq, amplitude):
    """n plane waves: frequency vectors [n,2] in cycles per field of view, phases, amplitudes."""
    magnitude = np.exp(rng.uniform(np.log(min_freq), np.log(max_freq), n))
    angle = rng.uniform(0, 2 * np.pi, n)
    freqs = magnitude[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return freqs, rng.uniform(0, 2 * np.pi, n), rng.uniform(0.5, 1, n) * amplitude


def _decoy(rng, lesion_center, lesion_radius, pigment, contrast):
    """A look-alike of lesion colour whose shape (thin, ring-like, scattered) gives it away."""
    kind = rng.choice(["streak", "arc", "crescent", "dots"])
    for _ in range(20):  # keep the decoy's center off the lesion
        center = rng.uniform(0.1, 0.9, 2)
        if np.linalg.norm(center - lesion_center) > lesion_radius + 0.08:
            break
    d = dict(kind=kind, center=center,
             pigment=np.clip(pigment + rng.normal(0, 0.04, 3), 0, 1),
             contrast=np.clip(contrast * rng.uniform(0.85, 1.2), 0, 1), blur=rng.uniform(0.002, 0.01))
    if kind == "streak":  # elongated capsule
        d.update(angle=rng.uniform(0, np.pi), length=rng.uniform(0.25, 0.7), width=rng.uniform(0.012, 0.035))
    elif kind == "arc":  # part of a thin ring
        d.update(radius=rng.uniform(0.08, 0.22), width=rng.uniform(0.012, 0.03),
                 start=rng.uniform(0, 2 * np.pi), span=rng.uniform(np.pi, 2 * np.pi))
    elif kind == "crescent":  # a disc minus an offset disc
        r = rng.uniform(0.08, 0.2)
        offset_angle = rng.uniform(0, 2 * np.pi)
        d.update(radius=r, offset=r * rng.uniform(0.2, 0.35) * np.array([np.cos(offset_angle), np.sin(offset_angle)]))
    else:  # a cluster of small dots
        n = rng.integers(15, 45)
        d.update(dots=center + rng.normal(0, rng.uniform(0.05, 0.12), (n, 2)), dot_radius=rng.uniform(0.006, 0.016, n))
    return d


def _hair(rng):
    return dict(start=rng.uniform(-0.1, 1.1, 2), angle=rng.uniform(0, 2 * np.pi), length=rng.uniform(0.3, 1.0),
                width=rng.uniform(0.003, 0.008), bend=rng.uniform(-1.2, 1.2),
                wiggle=(rng.uniform(0, 0.02), rng.uniform(5, 20), rng.uniform(0, 2 * np.pi)),
                color=np.full(3, rng.uniform(0.03, 0.2)) + rng.uniform(0, 0.05, 3), opacity=rng.uniform(0.7, 1.0))


def _vignette(rng, lesion_center, lesion_radius):
    """The dark circular rim of a dermoscope (in 40% of images), kept clear of the lesion."""
    if rng.uniform() > 0.4:
        return None
    needed = np.linalg.norm(lesion_center - 0.5) + 1.4 * lesion_radius + 0.02
    return dict(radius=max(rng.uniform(0.5, 0.68), needed), softness=rng.uniform(0.01, 0.04),
                color=rng.uniform(0.02, 0.1) + rng.uniform(0, 0.03, 3))


class PixelGrid:
    """Pixel centers of an (H, W) image mapped into scene coordinates.

    `affine` = (A [2,2], t [2]) maps centered output coordinates u - 0.5 (u in [0,1]^2) to
    scene coordinates: x = A (u - 0.5) + 0.5 + t. Identity when None. Augmentation
    (flips, rotations, crops) is such a map, so it is exact at any resolution.
    """

    def __init__(self, size, affine=None):
        self.size = h, w = size
        self.A, self.t = affine if affine is not None else (np.eye(2), np.zeros(2))
        self.u = ((np.arange(w) + 0.5) / w - 0.5).astype(np.float32)  # [W]
        self.v = ((np.arange(h) + 0.5) / h - 0.5).astype(np.float32)  # [H]
        (a, b), (c, d) = self.A.astype(np.float32)
        tx, ty = (0.5 + self.t).astype(np.float32)
        self.x = a * self.u[None, :] + b * self.v[:, None] + tx  # [H,W]
        self.y = c * self.u[None, :] + d * self.v[:, None] + ty
        self.pixel = math.sqrt(abs(np.linalg.det(self.A)) / (h * w))  # pixel side in scene units
        self.step = self.A / np.array([w, h])  # columns: scene displacement of one pixel along u, v

    def waves(self, waves):
        """sum_k amp_k cos(2 pi f_k . x + phi_k) averaged over each pixel's footprint -> [H,W]."""
        freqs, phases, amps = waves
        cycles = freqs @ self.step  # [K,2] cycles per pixel along u and v
        amps = amps * np.sinc(cycles[:, 0]) * np.sinc(cycles[:, 1])  # box filter: fine waves fade, not alias
        # the phase is affine in (u, v): cos(a + b) = cos a cos b - sin a sin b makes it two matmuls
        along_u = 2 * np.pi * (freqs @ self.A[:, 0])[:, None] * self.u[None, :]  # [K,W]
        along_v = 2 * np.pi * ((freqs @ self.A[:, 1])[:, None] * self.v[None, :]
                               + (freqs @ (0.5 + self.t))[:, None]) + phases[:, None]  # [K,H]
        cos_v = (np.cos(along_v) * amps[:, None]).astype(np.float32)
        sin_v = (np.sin(along_v) * amps[:, None]).astype(np.float32)
        return cos_v.T @ np.cos(along_u).astype(np.float32) - sin_v.T @ np.sin(along_u).astype(np.float32)

    def window(self, lo, hi):
        """(rows, cols) slices covering every pixel whose center lies in the scene box [lo, hi]."""
        margin = 2 * self.pixel
        corners = np.array([[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], lo[1]], [hi[0], hi[1]]])
        corners = corners + margin * np.sign(corners - (np.asarray(lo) + hi) / 2)
        uv = (corners - 0.5 - self.t) @ np.linalg.inv(self.A).T + 0.5  # [4,2] output coordinates in [0,1]
        (u0, v0), (u1, v1) = uv.min(0) * self.size[::-1], uv.max(0) * self.size[::-1]
        h, w = self.size
        rows = slice(int(np.clip(math.floor(v0), 0, h)), int(np.clip(math.ceil(v1), 0, h)))
        return rows, slice(int(np.clip(math.floor(u0), 0, w)), int(np.clip(math.ceil(u1), 0, w)))

    def coverage(self, distance, blur=0.0):
        """Fraction of each pixel inside a shape, from its signed distance field (negative inside)."""
        return np.clip(0.5 - distance / max(self.pixel, blur), 0, 1)


def draw_lesion(scene, size, affine=None, with_mask=True):
    """Paint skin, decoys, lesion, hairs and vignette, back to front -> (image [H,W,3], mask [H,W])."""
    grid = PixelGrid(size, affine)
    skin = _skin(grid, scene)
    image = skin.copy()
    for decoy in scene["decoys"]:
        win = grid.window(*_decoy_box(decoy))
        color = skin[win] + decoy["contrast"] * (decoy["pigment"] - skin[win])
        _paint(image[win], grid.coverage(_decoy_distance(grid.x[win], grid.y[win], decoy), decoy["blur"]), color)
    lesion = scene["lesion"]
    reach = lesion["radius"] * (1 + lesion["amplitudes"].sum()) + lesion["blur"]
    win = grid.window(lesion["center"] - reach, lesion["center"] + reach)
    distance, rho = _lesion_distance(grid.x[win], grid.y[win], lesion)
    # darker core, uneven pigment
    strength = np.clip(0.8 + 0.25 * (1 - rho / lesion["radius"]) + grid.waves(lesion["blotches"])[win], 0.3, 1.0)
    color = skin[win] + lesion["contrast"] * strength[..., None] * (lesion["pigment"] - skin[win])
    _paint(image[win], grid.coverage(distance, lesion["blur"]), color)
    for hair in scene["hairs"]:  # occluders: over skin and lesion, never in the mask
        _paint(image, hair["opacity"] * _hair_coverage(grid, hair), hair["color"])
    if scene["vignette"] is not None:
        v = scene["vignette"]
        rim = np.hypot(grid.x - 0.5, grid.y - 0.5) - v["radius"]  # > 0 outside the dermoscope's field
        _paint(image, grid.coverage(-rim, v["softness"]), v["color"])
    mask = None
    if with_mask:
        mask = np.zeros(size, bool)
        mask[win] = distance < 0
    return np.clip(image, 0, 1), mask


def _skin(grid, scene):
    shade = 1 + grid.waves(scene["skin_shading"]) + grid.waves(scene["skin_texture"])  # [H,W]
    red = grid.waves(scene["redness"])[..., None] * np.array([1.0, -0.4, -0.4], np.float32)
    return shade[..., None] * scene["skin"] + red  # [H,W,3]


def _paint(image, alpha, color):
    """Alpha-blend colour ([3] or [H,W,3]) over image [H,W,3] in place."""
    image += alpha[..., None] * (color - image)


def _lesion_distance(x, y, lesion):
    """Signed distance to the lesion border (exact sign, approximate magnitude), and radius from its center."""
    dx, dy = x - lesion["center"][0], y - lesion["center"][1]
    rho, angle = np.hypot(dx, dy), np.arctan2(dy, dx)
    harmonics = zip(lesion["harmonics"], lesion["amplitudes"], lesion["phases"])
    wobble = sum(a * np.cos(k * angle + p) for k, a, p in harmonics)
    return rho - lesion["radius"] * (1 + wobble), rho


def _decoy_box(d):
    """Scene-space bounding box (lo, hi) of a decoy."""
    if d["kind"] == "dots":
        reach = d["dot_radius"].max()
        return d["dots"].min(0) - reach, d["dots"].max(0) + reach
    reach = {"streak": d.get("length", 0) / 2 + d.get("width", 0), "arc": d.get("radius", 0) + d.get("width", 0),
             "crescent": d.get("radius", 0)}[d["kind"]]
    return d["center"] - reach - d["blur"], d["center"] + reach + d["blur"]


def _decoy_distance(x, y, d):
    dx, dy = x - d["center"][0], y - d["center"][1]
    if d["kind"] == "streak":  # capsule
        along = dx * math.cos(d["angle"]) + dy * math.sin(d["angle"])
        across = -dx * math.sin(d["angle"]) + dy * math.cos(d["angle"])
        return np.hypot(np.maximum(np.abs(along) - d["length"] / 2, 0), across) - d["width"] / 2
    if d["kind"] == "arc":
        band = np.abs(np.hypot(dx, dy) - d["radius"]) - d["width"] / 2
        angle = np.mod(np.arctan2(dy, dx) - d["start"], 2 * np.pi)
        gap = np.where(angle < d["span"], 0, np.minimum(angle - d["span"], 2 * np.pi - angle) * d["radius"])
        return np.where(gap > 0, np.hypot(np.maximum(band, 0), gap), band)
    if d["kind"] == "crescent":
        inside_first = np.hypot(dx, dy) - d["radius"]
        inside_second = np.hypot(dx - d["offset"][0], dy - d["offset"][1]) - d["radius"]
        return np.maximum(inside_first, -inside_second)
    # dots: distance to the nearest dot, [N,h,w] reduced over N
    dots = d["dots"]
    return (np.hypot(x[None] - dots[:, 0, None, None], y[None] - dots[:, 1, None, None])
            - d["dot_radius"][:, None, None]).min(0)


def _hair_coverage(grid, hair):
    """A thin curve: in the hair's frame (s along, n across), n = bend s^2 + a sin(w s + phi)."""
    dx, dy = grid.x - hair["start"][0], grid.y - hair["start"][1]
    c, s = math.cos(hair["angle"]), math.sin(hair["angle"])
    along, across = dx * c + dy * s, -dx * s + dy * c
    a, w, phi = hair["wiggle"]
    offset = hair["bend"] * along ** 2 + a * np.sin(w * along + phi)
    slope = 2 * hair["bend"] * along + a * w * np.cos(w * along + phi)
    beyond = np.maximum(np.maximum(-along, along - hair["length"]), 0)
    distance = np.hypot(np.abs(across - offset) / np.sqrt(1 + slope ** 2), beyond)
    # a hair thinner than a pixel is drawn one pixel wide and proportionally faint, keeping its ink
    width = max(hair["width"], grid.pixel)
    return hair["width"] / width * grid.coverage(distance - width / 2)


def _float32(tree):
    """Scene parameters as float32 arrays and Python floats, so rendering stays in float32."""
    if isinstance(tree, dict):
        return {k: _float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_float32(v) for v in tree)
    if isinstance(tree, np.ndarray) and tree.dtype == np.float64:
        return tree.astype(np.float32)
    if isinstance(tree, np.floating):
        return float(tree)
    return tree


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
    save_png_atomic(image.convert("RGB").resize((w, h), Image.BILINEAR), cached_image)
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


def binary_mask(mask, path):
    mask = np.asarray(mask if mask.mode in ("L", "1") else mask.convert("L")).astype(np.uint8)
    values = np.unique(mask)
    if not (set(values) <= {0, 255} or set(values) <= {0, 1}):
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise ValueError(f"{path}: mask values must be 0/255 or 0/1, found {shown}")
    return mask > 0


def save_png_atomic(image, path):
    # another worker or rank may read the cache meanwhile: never expose a half-written file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------

class DetDataset(torch.utils.data.Dataset):
    """(image [3,S,S], target): boxes [N,4] xyxy in pixels of the returned image, labels [N] in 1..K,
    iscrowd [N], area [N] (COCO's annotation area in returned pixels), image_id, orig_size (h, w)."""

    def __init__(self, source, split, image_size, augment=False, data_dir=None, seed=0, length=None):
        self.source, self.split, self.size, self.augment, self.seed = source, split, image_size, augment, seed
        self.epoch = 0
        if source == "synthetic":
            self.length = _synthetic_length(split, length)
            self.class_names = SHAPE_CLASSES
        elif source == "coco":
            if data_dir is None:
                raise ValueError("--data coco needs --data-dir (the folder holding annotations/ and train2017/)")
            self.records, self.cat_ids, self.class_names = load_coco(data_dir, split)
            self.length = len(self.records) if length is None else min(length, len(self.records))
        else:
            raise ValueError(f"unknown detection data source {source!r} (expected synthetic or coco)")
        self.num_classes = len(self.class_names)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if self.source == "synthetic":
            index = _scene_index(self.split, i)
            image, target = render_shapes(self.seed, index, self.size)
            image = torch.from_numpy(image).permute(2, 0, 1)
            boxes = target["boxes"]
            target = dict(boxes=torch.from_numpy(boxes), labels=torch.from_numpy(target["labels"]),
                          iscrowd=torch.zeros(len(boxes), dtype=torch.int64),
                          area=torch.from_numpy((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])),
                          image_id=index, orig_size=(self.size, self.size))
        else:
            image, target = self._load_coco(i)
        if self.augment:  # horizontal flip and colour jitter: vertical flips are unnatural for COCO
            rng = _augment_rng(self.seed, i, self.epoch)
            if rng.uniform() < 0.5:
                image, boxes = image.flip(-1), target["boxes"].clone()
                boxes[:, [0, 2]] = self.size - target["boxes"][:, [2, 0]]
                target = {**target, "boxes": boxes}
            image = color_jitter([image], rng)[0]
        return image, target

    def _load_coco(self, i):
        r = self.records[i]
        image, (w, h) = open_image(r["path"], draft=(self.size, self.size))
        if (h, w) != r["size"]:
            raise ValueError(f"{r['path']}: image is {w}x{h} but its annotation says {r['size'][1]}x{r['size'][0]}")
        # a plain square resize; boxes follow with their own x and y scales
        image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        sx, sy = self.size / w, self.size / h
        target = dict(boxes=torch.from_numpy(r["boxes"] * np.array([sx, sy, sx, sy], np.float32)),
                      labels=torch.from_numpy(r["labels"]), iscrowd=torch.from_numpy(r["iscrowd"]),
                      area=torch.from_numpy(r["area"] * np.float32(sx * sy)), image_id=r["id"], orig_size=(h, w))
        return image, target


def det_collate(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


# --------------------------- synthetic shapes -------------------------------------------

def render_shapes(seed, index, size):
    """Scene (seed, index) at size (H, W) (or S): float32 image [H,W,3] and
    {'boxes': float32 [N,4] xyxy pixels, 'labels': int64 [N] in 1..len(SHAPE_CLASSES)}."""
    h, w = _as_hw(size)
    scene = shapes_scene(seed, index)
    grid = PixelGrid((h, w))
    image = _background(grid, scene)
    for stroke in scene["strokes"]:  # strokes are streaks, like the lesion decoys
        _paint(image, stroke["opacity"] * grid.coverage(_decoy_distance(grid.x, grid.y, stroke)), stroke["color"])
    for obj in scene["objects"]:  # later objects occlude earlier ones; boxes stay the full (amodal) box
        win = grid.window(obj["box"][:2], obj["box"][2:])
        x, y = grid.x[win], grid.y[win]
        shading = 1 + obj["shading"] * (y - obj["box"][1]) / (obj["box"][3] - obj["box"][1]) - obj["shading"] / 2
        _paint(image[win], grid.coverage(_shape_distance(x, y, obj)), shading[..., None] * obj["color"])
    boxes = np.array([o["box"] for o in scene["objects"]], np.float32).reshape(-1, 4)
    boxes *= np.array([w, h, w, h], np.float32)  # continuous box -> pixels of this render
    labels = np.array([SHAPE_CLASSES.index(o["kind"]) + 1 for o in scene["objects"]], np.int64)
    return np.clip(image, 0, 1), dict(boxes=boxes, labels=labels)


def shapes_scene(seed, index):
    rng = np.random.default_rng([seed, index, _SHAPES_STREAM])
    grey = rng.uniform(0.25, 0.75)
    background = [grey + rng.uniform(-0.12, 0.12, 3) for _ in range(2)]  # muted, so objects stand out
    gradient = rng.uniform(0, 2 * np.pi)
    n_objects = 0 if rng.uniform() < 0.05 else rng.integers(1, 7)
    return _float32(dict(
        background=background, gradient=np.array([np.cos(gradient), np.sin(gradient)]),
        shading=_waves(rng, 3, 0.5, 2, 0.05), texture=_waves(rng, 6, 8, 40, 0.02),
        strokes=[_stroke(rng) for _ in range(rng.integers(0, 6))],
        objects=_place_objects(rng, n_objects, (background[0] + background[1]) / 2),
    ))


def _stroke(rng):
    """Background clutter: a thin line of random colour, too thin to pass for an object."""
    return dict(kind="streak", center=rng.uniform(0, 1, 2), angle=rng.uniform(0, np.pi), length=rng.uniform(0.1, 0.5),
                width=rng.uniform(0.004, 0.012), color=rng.uniform(0, 1, 3), opacity=rng.uniform(0.4, 0.8))


def _place_objects(rng, n, background):
    """n objects of COCO small / medium / large size (at 128 and 160 px), largest first so that
    smaller ones occlude parts of them; an object overlapping too much is dropped."""
    # side as a fraction of the image: < 0.19 is small (< 32 px) and > 0.78 is large (> 96 px at 128,
    # > 125 at 160); medium in between at both sizes
    ranges = [(0.07, 0.19), (0.27, 0.55), (0.78, 0.95)]
    sides = [np.exp(rng.uniform(*np.log(ranges[rng.choice(3, p=[0.4, 0.45, 0.15])]))) for _ in range(n)]
    objects = []
    for side in sorted(sides, reverse=True):
        aspect = np.exp(rng.uniform(-0.25, 0.25))
        bw, bh = min(side * aspect, 0.96), min(side / aspect, 0.96)
        for _ in range(20):
            x0, y0 = rng.uniform(0.02, 0.98 - bw), rng.uniform(0.02, 0.98 - bh)
            box = np.array([x0, y0, x0 + bw, y0 + bh])
            if all(_overlap_ok(box, o["box"]) for o in objects):
                objects.append(dict(kind=SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))], box=box,
                                    color=_object_color(rng, background), shading=rng.uniform(0, 0.3)))
                break
    return objects


def _overlap_ok(box, earlier):
    """IoU at most 0.3 and at least half of the earlier (larger) object left uncovered by this box."""
    iw = max(0.0, min(box[2], earlier[2]) - max(box[0], earlier[0]))
    ih = max(0.0, min(box[3], earlier[3]) - max(box[1], earlier[1]))
    inter, area = iw * ih, lambda b: (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area(box) + area(earlier) - inter) <= 0.3 and inter <= 0.5 * area(earlier)


def _object_color(rng, background):
    """Uniform RGB for every class (shape, not colour, tells classes apart), far from the background."""
    for _ in range(50):
        color = rng.uniform(0, 1, 3)
        if np.linalg.norm(color - background) > 0.4:
            return color
    return 1 - background


def _background(grid, scene):
    c0, c1 = scene["background"]
    ramp = np.clip((grid.x - 0.5) * scene["gradient"][0] + (grid.y - 0.5) * scene["gradient"][1] + 0.5, 0, 1)
    base = c0 + ramp[..., None] * (c1 - c0)  # [H,W,3]
    return base * (1 + grid.waves(scene["shading"]) + grid.waves(scene["texture"]))[..., None]


def _shape_distance(x, y, obj):
    x0, y0, x1, y1 = obj["box"]
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if obj["kind"] == "disk":  # an ellipse filling the box; distance scaled by its shorter semi-axis
        return (np.hypot((x - cx) / hw, (y - cy) / hh) - 1) * min(hw, hh)
    if obj["kind"] == "square":
        return np.maximum(np.abs(x - cx) - hw, np.abs(y - cy) - hh)
    # triangle, apex at the top center: the largest of the distances to its three edge lines
    norm = math.hypot(y1 - y0, hw)
    left = (-(y1 - y0) * (x - x0) - hw * (y - y1)) / norm
    right = ((y1 - y0) * (x - x1) - hw * (y - y1)) / norm
    return np.maximum(np.maximum(left, right), y - y1)


# --------------------------- COCO 2017 ------------------------------------------------

def load_coco(root, split):
    """-> (records, cat_ids, class_names). Each record: id, path, size (h, w) and its annotations
    in original pixels (boxes xyxy, labels 1..K in sorted category-id order, iscrowd, area)."""
    name = "train2017" if split == "train" else "val2017"  # COCO's test set has no public labels
    ann_path = os.path.join(root, "annotations", f"instances_{name}.json")
    image_dir = os.path.join(root, name)
    if not os.path.isfile(ann_path):
        raise ValueError(f"{ann_path}: annotation file not found")
    if not os.path.isdir(image_dir):
        raise ValueError(f"{image_dir}: image folder not found")
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
            size=(get(im, "height", "an image"), get(im, "width", "an image")), anns=[])
    dropped = dict(unknown_category=0, unknown_image=0, zero_area=0, outside_image=0)
    for ann in get(coco, "annotations", "the top level"):
        x, y, bw, bh = get(ann, "bbox", "an annotation")
        image_id, cat = get(ann, "image_id", "an annotation"), get(ann, "category_id", "an annotation")
        if cat not in label_of:
            dropped["unknown_category"] += 1
        elif image_id not in records:
            dropped["unknown_image"] += 1
        elif bw <= 0 or bh <= 0:
            dropped["zero_area"] += 1
        else:
            h, w = records[image_id]["size"]
            box = [max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)]  # clip the slight overhangs COCO has
            if box[2] <= box[0] or box[3] <= box[1]:
                dropped["outside_image"] += 1
            else:
                area = ann.get("area", bw * bh)  # COCO's area ranges use the mask area, not the box's
                records[image_id]["anns"].append((box, label_of[cat], ann.get("iscrowd", 0), area))
    if sum(dropped.values()):
        print(f"{ann_path}: dropped {sum(dropped.values())} annotations: "
              + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items() if n))
    out = []
    for r in sorted(records.values(), key=lambda r: r["id"]):  # images without annotations stay
        anns = r.pop("anns")
        r["boxes"] = np.array([a[0] for a in anns], np.float32).reshape(-1, 4)
        r["labels"] = np.array([a[1] for a in anns], np.int64)
        r["iscrowd"] = np.array([a[2] for a in anns], np.int64)
        r["area"] = np.array([a[3] for a in anns], np.float32)
        out.append(r)
    return out, cat_ids, class_names


# ---------------------------------------------------------------------------------------

def main():
    """Measure render speed (--bench) and the colour-threshold baseline (--baseline SIZE)."""
    import argparse
    import time
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--baseline", type=int, metavar="SIZE")
    args = parser.parse_args()
    if args.bench:
        for name, render in [("lesions", render_lesion), ("shapes", render_shapes)]:
            for size in (96, 256):
                n, start = 600 * 96 ** 2 // size ** 2, time.perf_counter()
                for i in range(n):
                    render(0, i, (size, size))
                print(f"{name} {size} px: {n / (time.perf_counter() - start):.0f} samples/s")
    if args.baseline:
        val = SegDataset("synthetic", "val", args.baseline)
        levels, masks = seg_collate([val[i] for i in range(len(val))])
        pred, masks = color_threshold_baseline(levels[0]).flatten(1).float(), masks.flatten(1)
        both = pred.sum(1) + masks.sum(1)
        dice = torch.where(both > 0, 2 * (pred * masks).sum(1) / both.clamp_min(1), torch.ones_like(both))
        print(f"colour-threshold baseline, synthetic val, {args.baseline} px: Dice {dice.mean():.3f}")


if __name__ == "__main__":
    main()
