"""The Resolution Aware Transformer (RAT), its heads, and the baselines.

    image pyramid [x_0 (finest), x_1, ...], each level with its spacing
    stem: shared conv, stride `patch`                      -> tokens per level
    for each block b:
        per level: SGA with stride strides[b]              (content-aware grouping)
        all levels: one transformer block over the concatenated tokens of every
                    level, RoSE at each token's physical coordinate
    seg head: unpool back through the stored assignments, then a light conv head
    det:      multi-stride feature maps for torchvision's FCOS

Everything works in 1, 2 or 3 spatial dims. Spacing is physical units per pixel;
by default the field of view is 1, so spacing = 1 / size (DESIGN.md section 1).
"""

import itertools
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead

from rose import RoSE, grid_centers, positions, rotate, sincos_embedding
from sga import MLP, SGA, resize_kernel

def default_strides(depth):
    """Group by 4, then by 2 twice, then keep the grid (stride 1), so that any depth
    works on small images. The first global attention then sees 1/256 of the
    pixels (with patch 4): at 512 px it is a small part of the cost, which stays
    near linear in pixels."""
    return ([4, 2, 2] + [1] * depth)[:depth]


def normalize(x):
    """Inputs come in [0, 1]; every model centres them alike."""
    return (x - 0.5) / 0.25


def pad_to_multiple(x, m):
    """Zero-pad the spatial dims of [B, C, *size] at the far end to multiples of m."""
    pad = []
    for n in reversed(x.shape[2:]):
        pad += [0, -n % m]
    return F.pad(x, pad)


class Attention(nn.Module):
    def __init__(self, dim, heads, spatial_dims, pe, rotary_ratio, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rose = RoSE(dim // heads, heads, spatial_dims, pe, rotary_ratio) if pe in ("rose", "rope") else None

    def forward(self, x, pos):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, N, d]
        if self.rose is not None:
            cs = self.rose(pos)
            q, k = rotate(q, cs), rotate(k, cs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block over the tokens of all pyramid levels."""

    def __init__(self, dim, heads, spatial_dims, pe, rotary_ratio, mlp_ratio, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, spatial_dims, pe, rotary_ratio, dropout)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x, pos):
        x = x + self.attn(self.norm1(x), pos)
        return x + self.mlp(self.norm2(x))


class PixelStem(nn.Sequential):
    """3x3 convolutions at the input's own pixels before the patch projection: with them a
    vision transformer learns much faster than from a linear patchify alone (Xiao et al. 2021,
    "Early convolutions help transformers see better"). On the physical grid, at f times the
    training resolution, every kernel is dilated by round(f), so that it spans the physical
    extent it learned: exact for integer f (the dilated convolution of an image upsampled f
    times is the upsampled convolution, and GroupNorm's statistics do not change)."""

    def __init__(self, in_chans, width, convs, spatial_dims):
        conv = getattr(nn, f"Conv{spatial_dims}d")
        layers = []
        for i in range(convs):
            layers += [conv(in_chans if i == 0 else width, width, 3, padding=1), nn.GroupNorm(4, width), nn.GELU()]
        super().__init__(*layers)

    def forward(self, x, zoom=1.0):
        d = max(1, round(zoom))
        for layer in self:
            if isinstance(layer, nn.modules.conv._ConvNd) and d > 1:
                x = getattr(F, f"conv{x.dim() - 2}d")(x, layer.weight, layer.bias, padding=d, dilation=d)
            else:
                x = layer(x)
        return x                                                    # [B, width, *size]


class RAT(nn.Module):
    def __init__(self, in_chans=3, dim=64, depth=4, heads=4, spatial_dims=2, patch=4, strides=None,
                 pe="rose", sga="local", mlp_ratio=4, dropout=0.0, rotary_ratio=0.5, sga_iters=3, radius=1,
                 ref_size=None, stem="patch"):
        super().__init__()
        strides = strides or default_strides(depth)
        self.dim, self.patch, self.pe, self.spatial_dims = dim, patch, pe, spatial_dims
        self.ref_size = ref_size  # see zoom()
        # stem "conv": two 32-channel 3x3 convs at full resolution first; "patch": the patch projection alone
        self.pixel_stem = PixelStem(in_chans, 32, 2, spatial_dims) if stem == "conv" else None
        stem_in = self.pixel_stem[0].out_channels if self.pixel_stem else in_chans
        # Overlapping patches, centered on their cell: kernel P + 2 * (P // 2), so
        # that token j sits at (j + 0.5) * P pixels, as the coordinates say.
        conv = getattr(nn, f"Conv{spatial_dims}d")
        self.stem = conv(stem_in, dim, patch + 2 * (patch // 2), stride=patch, padding=patch // 2)
        self.stem_norm = nn.LayerNorm(dim)
        self.sgas = nn.ModuleList(SGA(dim, heads, s, spatial_dims, sga, radius, sga_iters, pe, rotary_ratio,
                                      mlp_ratio, dropout) for s in strides)
        self.blocks = nn.ModuleList(Block(dim, heads, spatial_dims, pe, rotary_ratio, mlp_ratio, dropout)
                                    for _ in strides)
        self.norm = nn.LayerNorm(dim)
        self.apply(init_weights)

    def forward(self, levels, spacings=None):
        """levels: list of [B, in_chans, *size_l], finest first. spacings: per level,
        the physical size of a pixel per dim (default 1 / size_l): where the position
        encoding places the tokens, nothing else. The physical grid zooms with the pixel
        size of levels[0] itself (zoom), so that eval.py --ignore-spacing changes what the
        positions say and not the token grid.
        Returns `stages`, the stem then one per block, each a list over levels of
        (tokens [B, N, dim], grid, spacing, assignment or None)."""
        if spacings is None:
            spacings = [tuple(1.0 / n for n in x.shape[2:]) for x in levels]
        size = levels[0].shape[2:]
        f = self.zoom(size)
        stage = []
        for x, sp in zip(levels, spacings):
            x = normalize(x)
            if self.pixel_stem is not None:
                x = self.pixel_stem(x, f)                                # [B, 32, *size_l]
            t = self.stem_tokens(x, f)                                  # [B, dim, *grid]
            grid, sp = tuple(t.shape[2:]), tuple(s * self.patch for s in sp)
            t = self.stem_norm(t.flatten(2).transpose(1, 2))            # [B, N, dim]
            if self.pe == "absolute":
                t = t + sincos_embedding(grid_centers(grid, sp), self.dim).to(t)
            stage.append((t, grid, sp, None))
        stages = [stage]
        for sga, block, stride in zip(self.sgas, self.blocks, self.block_strides(size)):
            stage = [sga(t, grid, sp, stride) for t, grid, sp, _ in stage]  # per level: downsample
            x = torch.cat([t for t, *_ in stage], dim=1)                # [B, sum N_l, dim]
            pos = [positions(grid, sp, self.pe) for _, grid, sp, _ in stage]
            pos = None if pos[0] is None else torch.cat(pos).to(x.device)
            x = block(x, pos).split([t.shape[1] for t, *_ in stage], dim=1)
            stage = [(t, grid, sp, A) for t, (_, grid, sp, A) in zip(x, stage)]
            stages.append(stage)
        last = [(self.norm(t), grid, sp, A) for t, grid, sp, A in stages[-1]]
        return stages[:-1] + [last]


    # With ref_size (the training image size), the network works in physical units: for an
    # input f times finer than in training, the stem kernel covers f times more pixels (the
    # same part of the scene; still one token per `patch` pixels) and the first grouping
    # stride is f times larger, so that every later block sees the token grid and spacing
    # of training while SGA and the decoder use every native pixel (DESIGN.md section 8).
    # Kernels are resampled by area (sga.resize_kernel): exact for integer f. At the
    # training size nothing changes.

    def zoom(self, size):
        """Input pixels per training pixel, f, from the finest level's size in pixels (its
        first dim; every level of a pyramid is zoomed alike)."""
        return size[0] / self.ref_size if self.ref_size else 1

    def stem_tokens(self, x, f):
        """[B, C, *size] -> [B, dim, *size / patch], the kernel zoomed f times."""
        x = pad_to_multiple(x, self.patch)
        K0, P = self.stem.kernel_size[0], self.patch
        K = max(1, round(K0 * f))
        if K == K0:
            return self.stem(x)
        D = x.dim() - 2
        lo = (K - P) // 2                   # centred on its cell, as the trained kernel
        x = F.pad(x, [lo, K - P - lo] * D)
        conv = getattr(F, f"conv{D}d")
        # a fractional zoom (2.5 too, though K0 * 2.5 may be whole): the resampled kernel itself
        if abs(f - round(f)) > 1e-6 or f < 2:
            return conv(x, resize_kernel(self.stem.weight, K), self.stem.bias, stride=P)
        f = round(f)
        # integer zoom: the same numbers, as a box filter of f pixels and then the trained kernel
        # dilated by f: cost linear in pixels (the zoomed kernel would cost f^D more per token)
        box = getattr(F, f"avg_pool{D}d")
        return conv(box(x, f, stride=1), self.stem.weight, self.stem.bias, stride=P, dilation=f)

    def block_strides(self, size):
        """Every block's grouping stride for a finest level of `size` pixels."""
        strides = [sga.stride for sga in self.sgas]
        strides[0] = max(1, round(strides[0] * self.zoom(size)))
        return strides


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


class RATSeg(nn.Module):
    """RAT with a "native" upsampling head: walk back from the last block to the
    stem grid of the finest level, unpooling with each block's assignment
    (fine_i = sum_j A_ij group_j) plus a skip from that stage, then a light head
    to full resolution. Returns logits [B, num_classes, *size_0]."""

    def __init__(self, num_classes=1, in_chans=3, head="refine", **rat):
        super().__init__()
        self.backbone = RAT(in_chans=in_chans, **rat)
        dim, D, P = self.backbone.dim, self.backbone.spatial_dims, self.backbone.patch
        self.fuse = nn.ModuleList(nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), nn.GELU(),
                                                nn.Linear(dim, dim)) for _ in self.backbone.sgas)
        # No layer runs at full resolution with many channels (that would dominate
        # the cost at large sizes): each stem token predicts its P^D pixels
        # (pixel shuffle). The `refine` head then corrects those coarse logits with two
        # 16-channel 3x3 convs at full resolution that see the image and the coarse
        # probability: boundaries snap to the edges of the native pixels, where a finer
        # input has real extra detail (the old `linear` head: one 3x3 conv on the image).
        self.norm = nn.LayerNorm(dim)
        self.num_classes, self.head = num_classes, head
        self.to_pixels = nn.Linear(dim, num_classes * P ** D)
        conv = getattr(nn, f"Conv{D}d")
        if head == "linear":
            self.pixels = conv(in_chans, num_classes, 3, padding=1)
        else:
            self.pixels = nn.Sequential(conv(in_chans + num_classes, 16, 3, padding=1), nn.GELU(),
                                        conv(16, 16, 3, padding=1), nn.GELU(), conv(16, num_classes, 1))
            nn.init.zeros_(self.pixels[-1].weight)   # starts as the coarse prediction alone
            nn.init.zeros_(self.pixels[-1].bias)
        self.fuse.apply(init_weights)

    def forward(self, levels, spacings=None):
        stages = self.backbone(levels, spacings)
        y = stages[-1][0][0]                                            # finest level, last block
        for b in reversed(range(len(self.backbone.sgas))):
            skip, grid, _, _ = stages[b][0]
            stride = round(stages[b + 1][0][2][0] / stages[b][0][2][0])       # the one this input used
            y = self.backbone.sgas[b].unpool(y, stages[b + 1][0][3], grid, stride)
            y = y + self.fuse[b](torch.cat([y, skip], dim=-1))         # [B, N_b, dim]
        x = levels[0]
        B, D, P, K = x.shape[0], len(grid), self.backbone.patch, self.num_classes
        y = self.to_pixels(self.norm(y)).reshape(B, *grid, K, *[P] * D)           # [B, *grid, K, *P]
        y = cells_to_pixels(y.movedim(1 + D, 1), P, self.backbone.zoom(x.shape[2:]))   # [B, K, *grid*P]
        y = y[(...,) + tuple(slice(0, n) for n in x.shape[2:])]
        x = normalize(x)
        if self.head == "linear":
            return y + self.pixels(x)
        return y + self.pixels(torch.cat([x, y.sigmoid()], dim=1))                 # [B, K, *size_0]


def cells_to_pixels(y, P, zoom):
    """[B, K, *grid, *[P]*D] -> [B, K, *grid*P]: each stem token predicts its cell of P^D
    pixels. Those patterns were learned at the training resolution, where a cell is P
    training pixels wide; at a zoom f > 1 (DESIGN.md section 8) the same physical extent
    is Q = round(P f) pixels, so each token lays its pattern out over the Q^D pixels around
    its cell (nearest-upsampled) and overlapping patterns are averaged: the pattern keeps
    its physical size instead of shrinking f times into the cell. f <= 1: the plain pixel
    shuffle of training."""
    D = (y.dim() - 2) // 2
    grid, Q = y.shape[2:2 + D], max(P, round(P * zoom))
    total, count = overlap_add(y, P, Q), overlap_add(torch.ones_like(y[:1, :1]), P, Q)
    lo = (Q - P) // 2                                         # the patch is centred on its cell
    keep = (..., *[slice(lo, lo + g * P) for g in grid])
    return total[keep] / count[keep]


def overlap_add(y, P, Q):
    """Sum of every token's pattern nearest-upsampled to Q^D pixels, patches P pixels apart:
    [B, K, *grid, *[P]*D] -> [B, K, *(grid + S - 1) * P], S = ceil(Q / P). Pixel r + P c
    (sub-position r, cell c) gets the pixel at offset r + P s of the patch of token c - s:
    one shifted token map per offset, then a pixel shuffle (no scatter into the output)."""
    D = (y.dim() - 2) // 2
    B, K, grid, S = y.shape[0], y.shape[1], y.shape[2:2 + D], -(-Q // P)
    subs, sums = [], {}
    for r in itertools.product(range(P), repeat=D):
        # (pattern pixel, shift) of each offset; sub-positions with the same list share one sum
        # (at an integer zoom that is a multiple of P, all of them do)
        terms = tuple((tuple((rd + P * sd) * P // Q for rd, sd in zip(r, s)), s)
                      for s in itertools.product(*[range(-(-(Q - rd) // P)) for rd in r]))
        if terms not in sums:
            sums[terms] = sum(F.pad(y[(..., *pixel)], [v for sd in reversed(s) for v in (sd, S - 1 - sd)])
                              for pixel, s in terms)                                        # [B, K, *grid + S - 1]
        subs.append(sums[terms])
    z = torch.stack(subs, 2).reshape(B, K, *[P] * D, *[g + S - 1 for g in grid])
    perm = [0, 1] + [v for d in range(D) for v in (2 + D + d, 2 + d)]               # cell, then sub-position
    return z.permute(perm).reshape(B, K, *[(g + S - 1) * P for g in grid])


class RATBackbone(nn.Module):
    """Multi-stride feature maps of RAT's finest level for torchvision detectors:
    an OrderedDict of [B, dim, H/s, W/s] at increasing strides s (the last block at
    each stride). The pyramid is built here from `scales`, so the detector passes
    one image tensor. Set the detector's image_mean 0 and image_std 1: RAT
    normalizes its own input.

    On the physical grid (ref_size) the strides zoom with the input as RAT's first grouping
    stride does, and set_detector_size zooms the anchors with them.
    The detector pads its batch to a multiple of 32 (and of every stride); the images themselves are
    `image_size` square (min_size = max_size = image_size), so the pyramid and the
    spacing come from that crop, not from the padding, and the feature maps are
    zero-padded back to the padded grid the detector's anchors expect."""

    def __init__(self, scales=(1.0,), image_size=None, ref_size=None, **rat):
        super().__init__()
        self.body = RAT(ref_size=ref_size, **rat)
        self.scales, self.image_size, self.out_channels = tuple(scales), image_size, self.body.dim
        self.amp_dtype = None  # e.g. torch.bfloat16: the backbone alone runs under autocast
        strides = self.block_strides(ref_size or 1)   # at the training size: no zoom
        # index of the last block at each distinct stride
        self.taps = [i for i in range(len(strides)) if i + 1 == len(strides) or strides[i + 1] != strides[i]]
        self.strides = [strides[i] for i in self.taps]   # at the training size

    def block_strides(self, size):
        """Pixel stride of every block's tokens for a `size` px input (the physical grid
        zooms the first grouping stride with the input, RAT.zoom)."""
        strides, s = [], self.body.patch
        for st in self.body.block_strides((size, size)):
            s *= st
            strides.append(s)
        return strides

    def forward(self, x):
        padded = x.shape[2:]
        if self.image_size:
            x = x[..., :self.image_size, :self.image_size]
        with backbone_autocast(x, self.amp_dtype):
            levels = [x] + [F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True, align_corners=False)
                            for s in self.scales[1:]]
            stages = self.body(levels)
        out, strides = OrderedDict(), self.block_strides(x.shape[-1])
        for i in self.taps:
            t, grid, stride = *stages[i + 1][0][:2], strides[i]
            t = t.float().transpose(1, 2).reshape(t.shape[0], -1, *grid)             # [B, dim, *grid]
            pad = [(-(-n // stride)) - g for n, g in zip(padded, grid)]
            out[str(i)] = F.pad(t, [0, pad[1], 0, pad[0]])                          # [B, dim, *padded/stride]
        return out


def autocast(device):
    """bf16 on GPUs; on a CPU float32 (bf16 matmuls are slow on most CPUs)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def backbone_autocast(x, dtype):
    # Only the backbone: torchvision's box coder works in the head's dtype, and bf16 rounds
    # the coordinates of a 256-512 px image to 2 px.
    return torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class ConvFPN(BackboneWithFPN):
    amp_dtype = None  # as RATBackbone's

    def forward(self, x):
        with backbone_autocast(x, self.amp_dtype):
            out = super().forward(x)
        return OrderedDict((k, v.float()) for k, v in out.items())


def set_detector_size(detector, size):
    """Have the detector keep inputs of `size` px square: its transform resizes every image
    to min_size, and RATBackbone reads the real image out of the padded batch."""
    detector.transform.min_size, detector.transform.max_size = (size,), size
    if isinstance(detector.backbone, RATBackbone):
        backbone = detector.backbone
        backbone.image_size = size
        # FCOS regresses box sides in units of the anchor size: on the physical grid the
        # anchors grow with the zoom, so that a learned offset keeps its physical length.
        f = backbone.body.zoom((size, size))
        detector.anchor_generator = anchor_generator([s * f for s in backbone.strides])
        # The anchor generator infers each map's stride as padded size // map size: the
        # padding must be a multiple of every stride (a 1.5x zoom gives strides 12 and 24).
        strides = backbone.block_strides(size)
        detector.transform.size_divisible = math.lcm(32, *[strides[i] for i in backbone.taps])


def conv_block(conv, cin, cout):
    # GroupNorm, not BatchNorm: statistics must not depend on how the batch is split across ranks.
    return nn.Sequential(conv(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.GELU(),
                         conv(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.GELU())


class UNet(nn.Module):
    """U-Net baseline: the finest level only, same input convention and output as RATSeg."""

    def __init__(self, num_classes=1, in_chans=3, width=32, levels=4, spatial_dims=2):
        super().__init__()
        conv, convt = getattr(nn, f"Conv{spatial_dims}d"), getattr(nn, f"ConvTranspose{spatial_dims}d")
        ws = [width * 2 ** i for i in range(levels + 1)]
        self.down = nn.ModuleList([conv_block(conv, in_chans, ws[0])] +
                                  [conv_block(conv, ws[i], ws[i + 1]) for i in range(levels)])
        self.pool = getattr(nn, f"MaxPool{spatial_dims}d")(2)
        self.up = nn.ModuleList(convt(ws[i + 1], ws[i], 2, stride=2) for i in range(levels))
        self.dec = nn.ModuleList(conv_block(conv, 2 * ws[i], ws[i]) for i in range(levels))
        self.head = conv(ws[0], num_classes, 1)

    def forward(self, levels, spacings=None):
        x0 = levels[0]
        x = pad_to_multiple(normalize(x0), 2 ** len(self.up))
        skips = []
        for i, down in enumerate(self.down):
            x = down(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.head(x)[(...,) + tuple(slice(0, n) for n in x0.shape[2:])]


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def build_seg_model(model="rat", num_classes=1, ref_size=None, head="refine", **rat):
    """RATSeg, or a U-Net whose width makes its parameter count closest to the RAT's.
    ref_size: the training size, for RAT's physical token grid (RAT.zoom)."""
    net = RATSeg(num_classes, head=head, ref_size=ref_size, **rat)
    if model == "rat":
        return net
    target, D = num_params(net), rat.get("spatial_dims", 2)
    with torch.device("meta"):  # counting only: no memory, no initialisation
        width = min(range(4, 129, 4), key=lambda w: abs(num_params(UNet(num_classes, width=w, spatial_dims=D)) - target))
    return UNet(num_classes, width=width, spatial_dims=D)


def small_cnn(width):
    """A plain conv body for the `cnn` detector baseline: a stride-2 stem, then four stages
    that halve the resolution (strides 4, 8, 16, 32 as ResNet's), GroupNorm as everywhere."""
    ws = [width * 2 ** i for i in range(4)]
    body = nn.Sequential(OrderedDict(
        [("stem", nn.Sequential(nn.Conv2d(3, ws[0], 3, stride=2, padding=1), nn.GroupNorm(4, ws[0]), nn.GELU()))] +
        [(f"layer{i + 1}", nn.Sequential(nn.Conv2d(ws[max(i - 1, 0)], ws[i], 3, stride=2, padding=1),
                                         conv_block(nn.Conv2d, ws[i], ws[i]))) for i in range(4)]))
    return body, ws


def build_detector(model="rat", num_classes=3, image_size=128, scales=(1.0,), head_convs=2, **rat):
    """torchvision FCOS on RAT's feature maps, or a conv baseline trained from scratch:
    `cnn`, a plain CNN + FPN whose width makes its parameter count closest to the RAT
    detector's (as the U-Net is for segmentation), or `resnet`, a ResNet-18 + FPN (a
    reference with many more parameters). Labels are 1..num_classes; min_size = max_size =
    image_size, so the detector's internal resize keeps our resolution."""
    if model == "cnn":
        with torch.device("meta"):  # counting only: no memory, no initialisation
            target = num_params(build_detector("rat", num_classes, image_size, scales, head_convs, **rat))
            width = min(range(4, 65, 4), key=lambda w: abs(num_params(
                cnn_detector(w, num_classes, image_size, head_convs, rat.get("dim", 64))) - target))
        return cnn_detector(width, num_classes, image_size, head_convs, rat.get("dim", 64))
    if model == "rat":
        backbone = RATBackbone(scales, image_size, **rat)
        strides, mean, std = backbone.strides, [0.0] * 3, [1.0] * 3            # RAT normalizes its input
    else:
        resnet = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(8, c))
        layers = {f"layer{i}": str(i - 1) for i in range(1, 5)}
        backbone = ConvFPN(resnet, layers, [64, 128, 256, 512], rat.get("dim", 64))
        strides, mean, std = [4, 8, 16, 32, 64], [0.5] * 3, [0.25] * 3          # FPN adds a max-pooled level
    return fcos(backbone, strides, mean, std, num_classes, image_size, head_convs)


def cnn_detector(width, num_classes, image_size, head_convs, dim):
    body, ws = small_cnn(width)
    backbone = ConvFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, ws, dim)
    return fcos(backbone, [4, 8, 16, 32, 64], [0.5] * 3, [0.25] * 3, num_classes, image_size, head_convs)


def anchor_generator(sizes):
    return AnchorGenerator(tuple((s,) for s in sizes), ((1.0,),) * len(sizes))


def fcos(backbone, strides, mean, std, num_classes, image_size, head_convs):
    anchors = anchor_generator(strides)
    head = FCOSHead(backbone.out_channels, 1, num_classes + 1, num_convs=head_convs)
    return FCOS(backbone, num_classes + 1, min_size=image_size, max_size=image_size, image_mean=mean,
                image_std=std, anchor_generator=anchors, head=head)


# ---------------------------------------------------------------------------------------
# a model from its arguments, and checkpoints
# ---------------------------------------------------------------------------------------

# Architecture arguments: train.py stores them in every checkpoint (with the other
# flags), so that eval.py rebuilds the same model from the checkpoint alone.
ARCH = ("task", "model", "image_size", "scales", "pe", "sga", "depth", "dim", "heads", "patch", "strides",
        "dropout", "num_classes", "token_grid", "head", "stem")
# What checkpoints from before an argument existed were trained with (--head is seg RAT's only).
LEGACY_ARCH = {"token_grid": "pixel", "head": "linear", "stem": "patch"}


def build_model(arch):
    """The model that a dict of ARCH arguments (train.py's flags) describes."""
    rat = dict(dim=arch["dim"], depth=arch["depth"], heads=arch["heads"], patch=arch["patch"],
               strides=arch["strides"], pe=arch["pe"], sga=arch["sga"], dropout=arch["dropout"],
               ref_size=arch["image_size"] if arch["token_grid"] == "physical" else None, stem=arch["stem"])
    if arch["task"] == "seg":
        return build_seg_model(arch["model"], num_classes=1, head=arch["head"], **rat)
    return build_detector(arch["model"], num_classes=arch["num_classes"], image_size=arch["image_size"],
                          scales=arch["scales"], **rat)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickled code, not a checkpoint at all
        raise ValueError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_run(path, task=None):
    """A train.py checkpoint -> (its arguments, filled for older checkpoints, and the state dict),
    checked against `task` when given."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise ValueError(f"{path}: not a train.py checkpoint (no 'model' and 'args' entries)")
    args = {**LEGACY_ARCH, **ckpt["args"]}
    missing = [k for k in ARCH if k not in args]
    if missing:
        raise ValueError(f"{path}: checkpoint args lack {', '.join(missing)}")
    if task is not None and task != args["task"]:
        raise ValueError(f"--task {task}: checkpoint is for task {args['task']} ({path})")
    return args, ckpt["model"]
