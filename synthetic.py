"""Synthetic data, rendered analytically: skin lesions (segmentation) and shapes (detection).

A scene is every random choice of one sample, drawn from (seed, index) alone; rendering
evaluates it at any size, so the same sample exists at 64 and at 1024 pixels. Scenes are
functions of continuous coordinates in the unit square (x right, y down), evaluated at
pixel centers (i + 0.5) / size. Every sinusoid is multiplied by the box-filter response
of one pixel (a sinc) and every edge is ramped over one pixel, so a 64 px render is close
to the area average of a 1024 px render of the same scene: a resolution sweep measures
real detail, not aliasing, and each pyramid level is rendered at its own size.
"""
import math

import numpy as np

SHAPE_CLASSES = ("disk", "square", "triangle")

# Independent random streams per purpose (scenes here, augmentation in data.py), so adding
# a parameter to one never moves the other.
LESION_STREAM, SHAPES_STREAM, AUGMENT_STREAM, TWIN_STREAM = 1, 2, 3, 4


def as_hw(size):
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# --------------------------- skin lesions -----------------------------------------------

def render_lesion(seed, index, size, twin=False):
    """Scene (seed, index) at size (H, W): float32 image [H,W,3] in [0,1], bool mask [H,W]."""
    return draw_lesion(lesion_scene(seed, index, twin), as_hw(size))


def lesion_scene(seed, index, twin=False):
    """Every random choice of one scene, in continuous [0,1]^2 coordinates (x right, y down).

    twin: the same scene plus a smaller look-alike of the lesion elsewhere in the image, not in
    the mask (the data `--data twins`). Which blob is the lesion, the larger, can only be told
    by seeing both: the task needs the whole image's context as well as the ragged border's
    detail, where the plain scenes can be segmented from local evidence alone.
    """
    rng = np.random.default_rng([seed, index, LESION_STREAM])
    skin = np.array([0.95, 0.78, 0.70]) * (1 - rng.uniform(0, 0.4)) + rng.normal(0, 0.025, 3)
    pigment = _pigment(rng)
    # Low contrast happens, but the lesion must stay visible to a human.
    contrast = max(rng.uniform(0.35, 0.95), 0.14 / np.linalg.norm(skin - pigment))
    radius = rng.uniform(0.05, 0.225)  # 10% to 45% of the field of view across
    center = rng.uniform(0.2, 0.8, 2)
    scene = dict(
        skin=skin,
        skin_shading=_waves(rng, 4, 0.5, 2.0, 0.05),   # smooth brightness changes
        redness=_waves(rng, 3, 0.5, 2.0, 0.04),        # smooth colour changes
        skin_texture=_waves(rng, 10, 12, 60, 0.008),    # fine texture, partly finer than a 64 px pixel
        lesion=dict(center=center, radius=radius, pigment=pigment, contrast=contrast, **_lesion_shape(rng)),
        decoys=[_decoy(rng, center, radius, pigment, contrast) for _ in range(rng.integers(1, 5))],
        hairs=[_hair(rng) for _ in range(rng.choice([0, 0, rng.integers(1, 4), rng.integers(4, 11)]))],
        vignette=_vignette(rng, center, radius),
    )
    if twin:  # its own stream: the rest of the scene is the plain scene's
        scene["twin"] = _twin(np.random.default_rng([seed, index, TWIN_STREAM]), scene["lesion"], scene["vignette"])
    return _float32(scene)


def _lesion_shape(rng):
    # radius(angle) = radius * (1 + sum_k a_k cos(k angle + phi_k)): blobby low harmonics
    # plus a few high ones for a ragged border that only high resolution resolves
    return dict(harmonics=np.concatenate([np.arange(2, 6), rng.choice(np.arange(7, 25), 4, replace=False)]),
                amplitudes=np.concatenate([rng.uniform(0, 0.12, 4) / np.sqrt([1, 1.5, 2, 2.5]),
                                           rng.uniform(0.01, 0.035, 4)]),
                phases=rng.uniform(0, 2 * np.pi, 8),
                blur=rng.uniform(0.002, 0.025),  # fuzzy vs sharp borders
                blotches=_waves(rng, 4, 3, 10, 0.12))


def _lesion_reach(lesion):
    return lesion["radius"] * (1 + lesion["amplitudes"].sum()) + lesion["blur"]


def _twin(rng, lesion, vignette):
    """A look-alike of the lesion at 50-75% of its radius (same pigment, its own border), inside
    the image and the dermoscope's field, clear of the lesion; shrunk where there is no room."""
    twin = dict(lesion, radius=lesion["radius"] * rng.uniform(0.5, 0.75), **_lesion_shape(rng),
                pigment=np.clip(lesion["pigment"] + rng.normal(0, 0.03, 3), 0, 1))
    for attempt in range(200):
        if attempt % 20 == 19:
            twin["radius"] *= 0.85
        margin = _lesion_reach(twin)
        twin["center"] = rng.uniform(margin, 1 - margin, 2)
        in_field = vignette is None or np.linalg.norm(twin["center"] - 0.5) + margin < vignette["radius"]
        if in_field and np.linalg.norm(twin["center"] - lesion["center"]) > _lesion_reach(lesion) + margin + 0.03:
            break
    return twin


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
    if "twin" in scene:
        _paint_lesion(image, skin, grid, scene["twin"])
    win, distance = _paint_lesion(image, skin, grid, scene["lesion"])
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


def _paint_lesion(image, skin, grid, lesion):
    """-> the window it was painted in, the signed distance to its border there"""
    reach = _lesion_reach(lesion)
    win = grid.window(lesion["center"] - reach, lesion["center"] + reach)
    distance, rho = _lesion_distance(grid.x[win], grid.y[win], lesion)
    # darker core, uneven pigment
    strength = np.clip(0.8 + 0.25 * (1 - rho / lesion["radius"]) + grid.waves(lesion["blotches"])[win], 0.3, 1.0)
    color = skin[win] + lesion["contrast"] * strength[..., None] * (lesion["pigment"] - skin[win])
    _paint(image[win], grid.coverage(distance, lesion["blur"]), color)
    return win, distance


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


# --------------------------- shapes ----------------------------------------------------

def render_shapes(seed, index, size):
    """Scene (seed, index) at size (H, W) (or S): float32 image [H,W,3] and
    {'boxes': float32 [N,4] xyxy pixels, 'labels': int64 [N] in 1..len(SHAPE_CLASSES)}."""
    h, w = as_hw(size)
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
    rng = np.random.default_rng([seed, index, SHAPES_STREAM])
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
