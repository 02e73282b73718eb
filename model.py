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

import functools
import math
import os
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
from sga import MLP, SGA, per_axis

# Back CPU tensors of 2 MB and more with transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE,
# read at the first such allocation; Linux only): without them a large image's full-resolution
# maps spend much of their time in page faults (BENCHMARKS.md, Huge pages). An explicit
# THP_MEM_ALLOC_ENABLE=0 keeps the default allocator.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


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


# Without gradients (eval.py, predict.py) the full-resolution layers run a strip of rows at a
# time (by_rows): at 24 megapixels one 16-channel float map is 1.5 GB, and a layer's input,
# norm and GELU would hold several at once. Strips of about this many output pixels.
STRIP_PIXELS = 2 ** 19


def strip_rows(rows, row_pixels, step=1):
    """Rows per strip for an output of `rows` rows, each worth `row_pixels` pixels of a 16-channel
    map, a multiple of `step`; None for one pass (with gradients, or a small output)."""
    n = max(step, STRIP_PIXELS // max(1, row_pixels) // step * step)
    return None if torch.is_grad_enabled() or n >= rows else n


def by_rows(layer, rows, row_pixels, step=1, dim=2):
    """layer(lo, hi) computes rows [lo, hi) (along `dim`) of an output of `rows` rows: one call, or
    strips of strip_rows(...) rows written into one preallocated output."""
    n = strip_rows(rows, row_pixels, step)
    if n is None:
        return layer(0, rows)
    first = layer(0, n)
    out = first.new_empty(first.shape[:dim] + (rows,) + first.shape[dim + 1:])
    out.narrow(dim, 0, n).copy_(first)
    for lo in range(n, rows, n):
        hi = min(rows, lo + n)
        out.narrow(dim, lo, hi - lo).copy_(layer(lo, hi))
    return out


def map_rows(x):
    """(rows, pixels per row) of a map [B, C, *size]: what by_rows strips it by."""
    return x.shape[2], math.prod(x.shape[3:])


def with_halo(fn, x, lo, hi, halo):
    """Rows [lo, hi) of fn(x), fn a stack of 'same'-padded layers that reads `halo` rows either
    side: fn on rows [lo - halo, hi + halo) of x (clipped at the border, where fn's own zero
    padding is the right one), cropped."""
    a, b = max(0, lo - halo), min(x.shape[2], hi + halo)
    return fn(x[:, :, a:b])[:, :, lo - a:hi - a]


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


def dilation(zoom, D):
    """The dilation of the conv stem's and head's 3x3 kernels at `zoom`, per axis: floor(f), at
    least 1. Between integer zooms the kernel then never spans more than the extent it learned;
    rounding up (round(1.5) = 2) lost far more than staying short (RESULTS.md, Default runs)."""
    return tuple(max(1, math.floor(z)) for z in per_axis(zoom, D))


def conv_gelu(conv, x, zoom, stride=1, groups=None, up=None):
    """`conv` (3x3, no padding of its own), then a norm and GELU: LayerNorm over each pixel's
    channels, or GroupNorm with `groups` groups. x: a map [B, C, *size]. `up` = (y, s): a map
    [B, c, *size / s] whose nearest upsampling by s (an integer per axis) takes the conv's first c
    input channels, before x's (a U-Net stage's upsampled map beside its skip). It is convolved
    at its own resolution, as a transposed conv of stride s (upsampled_kernel): the same numbers
    as the conv of the concatenation, forward and backward, without the upsampled map and at a
    fraction of the cost (RESULTS.md, "Exact speed-ups", times both). Maps go channels-last (2D
    and 3D), so that the per-pixel LayerNorm reads each pixel's channels contiguously instead of
    copying the map. On the physical grid, at f times the training resolution, the kernel is
    dilated by about f per axis (`dilation`), so that it spans the physical extent it learned:
    exact for integer f (the dilated conv of an image upsampled f times is the upsampled conv;
    a stride-2 one keeps the training outputs at every f-th position). The LayerNorm has no
    spatial statistics, so it stays exact after a stride-2 layer, where GroupNorm would see the
    f times denser grid; GroupNorm is exact on layers of stride 1 from the image on (an
    upsampled map has the statistics of the map)."""
    D = x.dim() - 2
    d, layout = dilation(zoom, D), {2: torch.channels_last, 3: torch.channels_last_3d}.get(D, torch.contiguous_format)
    weight = conv.weight
    if up is not None:
        y, s = up
        w_up, weight = weight.split([y.shape[1], x.shape[1]], dim=1)
        y = getattr(F, f"conv_transpose{D}d")(y.contiguous(memory_format=layout), upsampled_kernel(w_up, s, d),
                                              stride=s, padding=d)                # [B, C_out, *size]
    x = getattr(F, f"conv{D}d")(x.contiguous(memory_format=layout), weight, conv.bias, stride=stride, padding=d,
                                dilation=d)
    if up is not None:
        x = x.add_(y)                   # in place: neither conv keeps its output for backward
    if groups:
        return F.gelu(F.group_norm(x, groups))
    return F.gelu(F.layer_norm(x.movedim(1, -1), x.shape[1:2]).movedim(-1, 1))


def upsampled_kernel(weight, s, d):
    """The transposed-conv kernel (stride s, padding d) whose output is `weight`'s 3x3 conv,
    dilated d, of the input's nearest upsampling by s. That conv's output pixel i reads tap k
    (k = -1, 0, 1) from input pixel (i + d k) // s, and a transposed conv's reads input m through
    its tap t = i + d - s m, so per axis tap t is the sum of the taps k with
    0 <= t - d + d k < s. For d < s several taps land on one input pixel: s^D outputs share
    about 2^D input pixels instead of reading 3^D each. weight [C_out, C_in, 3, ...] ->
    [C_in, C_out, s + 2 d, ...]."""
    for s_a, d_a in zip(s, d):                                      # contracts axis 2, appends axis t
        t = (torch.arange(s_a + 2 * d_a, device=weight.device)[:, None] - d_a
             + d_a * torch.arange(-1, 2, device=weight.device))
        weight = torch.tensordot(weight, ((t >= 0) & (t < s_a)).to(weight.dtype), dims=([2], [1]))
    return weight.transpose(0, 1)


class ConvStem(nn.Module):
    """Early convolutions before the patch projection (Xiao et al. 2021, "Early convolutions
    help transformers see better"): a 3x3 conv at full resolution, then a stride-2 and a 3x3
    conv at half resolution, where the patch projection takes over (stride patch / 2). The
    segmentation decoder takes both maps back as skips, as a U-Net's decoder does."""

    def __init__(self, in_chans, widths, spatial_dims):
        super().__init__()
        conv = getattr(nn, f"Conv{spatial_dims}d")
        (w1, w2), self.widths = widths, widths
        self.at_full, self.down, self.at_half = conv(in_chans, w1, 3), conv(w1, w2, 3), conv(w2, w2, 3)

    def forward(self, x, zoom):
        full = by_rows(lambda lo, hi: self.full_rows(x, zoom, lo, hi), *map_rows(x))     # [B, w1, *size]
        return full, conv_gelu(self.at_half, conv_gelu(self.down, full, zoom, stride=2), zoom)   # [B, w2, *size / 2]

    def full_rows(self, x, zoom, lo, hi):
        """Rows [lo, hi) of the full-resolution map, from the rows of x its dilated kernel reaches."""
        d = dilation(zoom, x.dim() - 2)[0]
        return with_halo(lambda s: conv_gelu(self.at_full, s, zoom), x, lo, hi, d)


class FullResStem(nn.Module):
    """Detection's early convolutions (`--stem full`): two 3x3 convs at full resolution, each with
    GroupNorm (8 groups) and GELU, then the patch projection (stride patch). On the detection
    data they gave FCOS far more than ConvStem (RESULTS.md, closing the gap to the CNN): with no
    stride they can use GroupNorm, whose per-image statistics ConvStem's stride-2 layer rules out."""

    def __init__(self, in_chans, width, spatial_dims):
        super().__init__()
        conv = getattr(nn, f"Conv{spatial_dims}d")
        self.widths = (width, width)
        self.first, self.second = conv(in_chans, width, 3), conv(width, width, 3)

    def forward(self, x, zoom):
        first = conv_gelu(self.first, x, zoom, groups=8)                                  # [B, width, *size]
        return first, conv_gelu(self.second, first, zoom, groups=8)


class RAT(nn.Module):
    def __init__(self, in_chans=3, dim=64, depth=4, heads=4, spatial_dims=2, patch=4, strides=None,
                 pe="rose", sga="local", mlp_ratio=4, dropout=0.0, rotary_ratio=0.5, sga_iters=3, radius=1,
                 ref_size=None, stem="patch"):
        super().__init__()
        strides = strides or default_strides(depth)
        self.dim, self.patch, self.pe, self.spatial_dims = dim, patch, pe, spatial_dims
        self.ref_size = ref_size  # see zoom()
        # stem "conv": ConvStem (16 channels at full resolution, 32 at half), then the patch
        # projection on the half-resolution map; "full": FullResStem (32 channels), then the patch
        # projection; "patch": the patch projection on the image alone
        self.conv_stem = (ConvStem(in_chans, (16, 32), spatial_dims) if stem == "conv" else
                          FullResStem(in_chans, 32, spatial_dims) if stem == "full" else None)
        stem_in = self.conv_stem.widths[1] if self.conv_stem else in_chans
        # Overlapping patches, centered on their cell: kernel P + 2 * (P // 2), so
        # that token j sits at (j + 0.5) * P pixels of the map it reads, as the coordinates say.
        conv = getattr(nn, f"Conv{spatial_dims}d")
        P = self.projection_stride = patch // 2 if stem == "conv" else patch
        self.stem = conv(stem_in, dim, P + 2 * (P // 2), stride=P, padding=P // 2)
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
        (tokens [B, N, dim], grid, spacing, what the decoder needs to go back to the stage's
        input): a block's assignment; the stem's maps (full, half) with the conv stem on the finest
        level, else None."""
        if spacings is None:
            spacings = [tuple(1.0 / n for n in x.shape[2:]) for x in levels]
        size = levels[0].shape[2:]
        f = self.zoom(size)                                             # one factor per axis
        stage = []
        for x, sp in zip(levels, spacings):
            x, maps = normalize(x), None
            if self.conv_stem is not None:
                x = pad_to_multiple(x, self.patch)
                full, half = self.conv_stem(x, f)                       # half: [B, w2, *padded size_l / 2] (full: / 1)
                # In strips (by_rows) the decoder computes the full-resolution map's rows again from
                # the stem's input (ConvStem.full_rows): 3 channels kept, not 16 (24 MP: 0.3 GB, not 1.5)
                maps, x = (full if strip_rows(*map_rows(x)) is None else x, half), half
            t = self.stem_tokens(x, f)                                  # [B, dim, *grid]
            grid, sp = tuple(t.shape[2:]), tuple(s * self.patch for s in sp)
            t = self.stem_norm(t.flatten(2).transpose(1, 2))            # [B, N, dim]
            if self.pe == "absolute":
                t = t + sincos_embedding(grid_centers(grid, sp), self.dim).to(t)
            stage.append((t, grid, sp, None if stage else maps))        # the decoder reads the finest level's only
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
    # training size nothing changes. All of it per axis: an image of another aspect than the
    # (square) training images, or a volume of anisotropic voxels, zooms by a different f on
    # each axis.

    def zoom(self, size):
        """Input pixels per training pixel on each axis, (f_1, .., f_D), from the finest level's
        size in pixels: training squashed every image to ref_size per axis (field of view 1 on
        each), so a native H x W image zooms by (H / ref, W / ref). Every level of a pyramid is
        zoomed alike."""
        if not self.ref_size:
            return (1.0,) * len(size)
        return tuple(n / r for n, r in zip(size, per_axis(self.ref_size, len(size))))

    def stem_tokens(self, x, f):
        """[B, C, *size] -> [B, dim, *size / P], P the projection stride (patch, or patch / 2 on the
        conv stem's half-resolution map), the kernel zoomed f times (per axis)."""
        x = pad_to_multiple(x, self.projection_stride)
        D, P, K0 = x.dim() - 2, self.projection_stride, tuple(self.stem.kernel_size)
        f = per_axis(f, D)
        K = tuple(max(1, round(k * z)) for k, z in zip(K0, f))
        if K == K0:
            return self.stem(x)
        lo = [(k - P) // 2 for k in K]      # centred on its cell, as the trained kernel
        x = F.pad(x, [v for k, l in zip(reversed(K), reversed(lo)) for v in (l, k - P - l)])
        conv, z = getattr(F, f"conv{D}d"), tuple(round(v) for v in f)
        if K == tuple(k * v for k, v in zip(K0, z)):
            # Integer zoom: the resampled kernel repeats each trained tap z times, divided by z, so
            # it is a z-box mean and then the trained kernel dilated by z: the same numbers, far
            # fewer operations than the general path below.
            def tokens(x):
                mean = getattr(F, f"avg_pool{D}d")(x, z, stride=1)
                return conv(mean, self.stem.weight, self.stem.bias, stride=P, dilation=z)
        else:
            # The zoomed kernel is the trained one area-resampled to K taps (sga.resize_kernel), but
            # applied as such it would cost prod(f) times more per token (a 4000 x 6000 photo on a
            # 256 px model: 125 x 188 taps). The same numbers: per axis, for every trained tap, the
            # area-weighted sum of the pixels it covers at this zoom (area_taps), then the trained
            # kernel as a 1x1 conv over those sums; linear in pixels at any zoom.
            w = self.stem.weight * (math.prod(K0) / math.prod(K))   # resize_kernel's change in taps
            w = w.reshape(w.shape[0], -1, *[1] * D)

            def tokens(x):
                for d in range(D):
                    x = area_taps(x, 2 + d, K0[d], K[d], P)      # [B, C * K0_1 * .. * K0_d, ..., tokens on axis d, ...]
                return conv(x, w, self.stem.bias)
        # strips of token rows, each reading K[0] - P rows more; area_taps holds float64 sums of
        # every trained tap, prod(K0) copies of the strip: its size counts them
        rows = (x.shape[2] - K[0]) // P + 1
        return by_rows(lambda a, b: tokens(x[:, :, a * P:(b - 1) * P + K[0]]), rows,
                       P * math.prod(x.shape[3:]) * math.prod(K0))

    def block_strides(self, size):
        """Every block's grouping stride for a finest level of `size` pixels; the first one
        per axis (a tuple), zoomed."""
        strides = [sga.stride for sga in self.sgas]
        strides[0] = tuple(max(1, round(strides[0] * z)) for z in self.zoom(size))
        return strides


def area_taps(x, axis, K0, K, P):
    """For each of K0 trained taps i along `axis`, sum_k A[k, i] x[.., t P + k, ..] over the K zoomed
    taps k, A the area resampling of K0 taps to K (sga.resize_kernel's, unscaled): [B, C, .., L, ..]
    -> [B, C * K0, .., n, ..], n = (L - K) // P + 1 tokens. A column of A is a few runs of equal
    weights (K > K0: 1 inside, 1/2 where a zoomed tap straddles two trained ones), so each sum is
    a few differences of the running sum c along the axis: at most 4 strided reads of c per tap
    whatever the zoom. c in float64: it grows along the axis, its differences must not lose digits."""
    A = F.interpolate(torch.eye(K0, dtype=torch.float64)[:, None], size=K, mode="area")[:, 0]   # [K0, K]
    edges = F.pad(A, [1, 1])
    coef = (edges[:, :-1] - edges[:, 1:]).tolist()          # [K0, K + 1]: sum_k A[k, i] x[k] = sum_j coef[i][j] c[j]
    n = (x.shape[axis] - K) // P + 1
    c = torch.cumsum(x, axis, dtype=torch.float64)                        # c[j - 1] = sum of x[:j]
    first = [0, 0] * (x.dim() - 1 - axis) + [1, 0]

    def at(j):  # sum of x[:t P + j] for every token t
        if j == 0:  # t = 0 sums nothing
            return F.pad(c[(slice(None),) * axis + (slice(P - 1, (n - 1) * P, P),)], first)
        return c[(slice(None),) * axis + (slice(j - 1, j + (n - 1) * P, P),)]

    out = x.new_empty(*x.shape[:2], K0, *[n if a == axis else s for a, s in enumerate(x.shape) if a >= 2])
    for i, row in enumerate(coef):
        terms = [(j, v) for j, v in enumerate(row) if v]
        acc = at(terms[0][0]) * terms[0][1]
        for j, v in terms[1:]:
            acc.add_(at(j), alpha=v)
        out[:, :, i] = acc
    return out.flatten(1, 2)


def init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


class RATSeg(nn.Module):
    """RAT for segmentation: walk back from the last block to the stem grid of the finest
    level, unpooling with each block's assignment (fine_i = sum_j A_ij group_j) plus a skip
    from that stage, then a head to full resolution. Returns logits [B, num_classes, *size_0].

    Heads: `conv` (the default) is a U-Net's last two decoder stages on the conv stem's maps:
    the tokens, upsampled to half resolution beside the stem's half-resolution map, a 3x3 conv;
    upsampled again beside its full-resolution map, a 3x3 conv; a 1x1 conv to logits. On the
    physical grid they zoom as the stem does (conv_gelu). `refine` and `linear` (checkpoints from
    before the conv stem): each stem token predicts its P^D pixels (cells_to_pixels), which
    `refine` corrects with two 16-channel 3x3 convs on the image and the coarse probability and
    `linear` with one 3x3 conv on the image.

    Each SGA groups in one round (sga_iters) where the detector keeps RAT's three: further rounds
    bought the default run no Dice and cost time (RESULTS.md, closing the gap to the U-Net)."""

    def __init__(self, num_classes=1, in_chans=3, head="conv", stem="conv", sga_iters=1, **rat):
        super().__init__()
        self.backbone = RAT(in_chans=in_chans, stem=stem, sga_iters=sga_iters, **rat)
        dim, D, P = self.backbone.dim, self.backbone.spatial_dims, self.backbone.patch
        if head == "conv" and stem != "conv":
            raise ValueError("--head conv decodes onto the conv stem's maps: it needs --stem conv")
        self.fuse = nn.ModuleList(nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), nn.GELU(),
                                                nn.Linear(dim, dim)) for _ in self.backbone.sgas)
        self.norm = nn.LayerNorm(dim)
        self.num_classes, self.head = num_classes, head
        conv = getattr(nn, f"Conv{D}d")
        if head == "conv":
            w1, w2 = self.backbone.conv_stem.widths
            self.to_half = nn.Linear(dim, w2)
            self.up_half, self.up_full = conv(2 * w2, w2, 3), conv(w2 + w1, w1, 3)
            self.pixels = conv(w1, num_classes, 1)
        else:
            self.to_pixels = nn.Linear(dim, num_classes * P ** D)
        if head == "linear":
            self.pixels = conv(in_chans, num_classes, 3, padding=1)
        elif head == "refine":
            self.pixels = nn.Sequential(conv(in_chans + num_classes, 16, 3, padding=1), nn.GELU(),
                                        conv(16, 16, 3, padding=1), nn.GELU(), conv(16, num_classes, 1))
            nn.init.zeros_(self.pixels[-1].weight)   # starts as the coarse prediction alone
            nn.init.zeros_(self.pixels[-1].bias)
        self.fuse.apply(init_weights)

    def forward(self, levels, spacings=None):
        size, f = levels[0].shape[2:], self.backbone.zoom(levels[0].shape[2:])
        if min(f) < 1:
            # Coarser than training: there is no detail to keep, and a kernel cannot shrink below
            # a pixel, so every level is upsampled to the training pitch and the logits come back
            # down: the physical extent of every layer is exactly training's.
            mode = ("linear", "bilinear", "trilinear")[len(size) - 1]
            up = [F.interpolate(x, size=[max(n, round(n / z)) for n, z in zip(x.shape[2:], f)], mode=mode)
                  for x in levels]
            return F.interpolate(self(up), size=size, mode=mode)
        stages = self.backbone(levels, spacings)
        y = stages[-1][0][0]                                            # finest level, last block
        B, D, P, K = y.shape[0], len(size), self.backbone.patch, self.num_classes
        for b in reversed(range(len(self.backbone.sgas))):
            skip, grid, _, _ = stages[b][0]
            stride = tuple(round(a / c) for a, c in zip(stages[b + 1][0][2], stages[b][0][2]))  # the one this input used
            y = self.backbone.sgas[b].unpool(y, stages[b + 1][0][3], grid, stride)
            # [B, N_b, dim], by strips of tokens: one of 2 dim channels is worth dim / 8 pixels of 16
            y = by_rows(lambda lo, hi: y[:, lo:hi] + self.fuse[b](torch.cat([y[:, lo:hi], skip[:, lo:hi]], dim=-1)),
                        y.shape[1], y.shape[2] // 8, dim=1)
        crop = (...,) + tuple(slice(0, n) for n in size)
        if self.head == "conv":
            full, half = stages[0][0][3]            # in strips `full` is the stem's input (RAT.forward)
            full_rows = ((lambda a, b: full[:, :, a:b]) if strip_rows(*map_rows(full)) is None else
                         functools.partial(self.backbone.conv_stem.full_rows, full, f))
            y = self.to_half(self.norm(y)).transpose(1, 2).reshape(B, -1, *grid)     # [B, w2, *grid]
            y = up_and_conv(self.up_half, y, lambda a, b: half[:, :, a:b], half.shape[2:], f)   # [B, w2, *padded / 2]
            return up_and_conv(self.up_full, y, full_rows, full.shape[2:], f, then=self.pixels)[crop]  # [B, K, *size_0]
        y = self.to_pixels(self.norm(y)).reshape(B, *grid, K, *[P] * D)           # [B, *grid, K, *P]
        y = cells_to_pixels(y.movedim(1 + D, 1), P, f)[crop]                      # [B, K, *size_0]
        x = normalize(levels[0])
        if self.head == "linear":
            return y + self.pixels(x)
        return y + self.pixels(torch.cat([x, y.sigmoid()], dim=1))


def up_and_conv(conv, y, skip_rows, size, zoom, then=None):
    """A U-Net decoder stage: y [B, c, *low] upsampled (nearest) to the skip's size (an integer
    factor s per axis), beside the skip, whose rows [a, b) are skip_rows(a, b), conv_gelu (which
    convolves y at its own resolution), then `then` if given. Without gradients by strips of
    rows that start on a row of y, so that the stage's output (at 24 megapixels 1.5 GB before its
    norm and GELU) never exists whole."""
    s = [h // n for h, n in zip(size, y.shape[2:])]
    halo = -(-dilation(zoom, len(s))[0] // s[0]) * s[0]      # the conv's reach along rows, in whole rows of y
    then = then or (lambda t: t)

    def rows(lo, hi):               # lo, hi multiples of s[0]
        a, b = max(0, lo - halo), min(size[0], hi + halo)
        out = conv_gelu(conv, skip_rows(a, b), zoom, up=(y[:, :, a // s[0]:b // s[0]], s))
        return then(out[:, :, lo - a:hi - a])

    return by_rows(rows, size[0], math.prod(size[1:]), step=s[0])


def cells_to_pixels(y, P, zoom):
    """[B, K, *grid, *[P]*D] -> [B, K, *grid*P]: each stem token predicts its cell of P^D
    pixels. Those patterns were learned at the training resolution, where a cell is P
    training pixels wide; at a zoom f > 1 (DESIGN.md section 8) the same physical extent
    is Q = round(P f) pixels, so each token lays its pattern out over the Q^D pixels around
    its cell (nearest-upsampled) and overlapping patterns are averaged: the pattern keeps
    its physical size instead of shrinking f times into the cell. f <= 1: the plain pixel
    shuffle of training. zoom: one number, or one per axis (Q_1 x .. x Q_D pixels)."""
    D = (y.dim() - 2) // 2
    grid = y.shape[2:2 + D]
    Q = tuple(max(P, round(P * z)) for z in per_axis(zoom, D))
    if Q == (P,) * D:                                         # no overlap: every pixel has one pattern
        return pixel_shuffle(y)
    total = overlap_add(y, P, Q)
    lo = [(q - P) // 2 for q in Q]                            # the patch is centred on its cell
    keep = (..., *[slice(l, l + g * P) for l, g in zip(lo, grid)])
    # how many patterns cover a pixel: the product of the counts along each axis
    count = 1
    for d, (g, q, l) in enumerate(zip(grid, Q, lo)):
        along = overlap_add_axis(y.new_ones(1, g, P), 1, 2, P, q).reshape(-1)[l:l + g * P]
        count = count * along.reshape([-1 if e == d else 1 for e in range(D)])
    return total[keep] / count


def overlap_add(y, P, Q):
    """Sum of every token's pattern nearest-upsampled to Q_1 x .. x Q_D pixels, patches P pixels
    apart: [B, K, *grid, *[P]*D] -> [B, K, *(grid + S - 1) * P], S = ceil(Q / P) per axis.
    Nearest upsampling and the shifted sums are both separable, so one axis at a time: about
    sum(Q) shifted adds instead of prod(Q)."""
    D = (y.dim() - 2) // 2
    Q = per_axis(Q, D)
    for d in range(D):
        y = overlap_add_axis(y, 2 + d, 2 + D + d, P, Q[d])    # pattern axis d -> sub-position, cells grow
    return pixel_shuffle(y)


def pixel_shuffle(y):
    """[B, K, *grid, *P] -> [B, K, *grid * P]: sub-position p of cell c is pixel c P + p."""
    D = (y.dim() - 2) // 2
    perm = [0, 1] + [v for d in range(D) for v in (2 + d, 2 + D + d)]               # cell, then sub-position
    return y.permute(perm).reshape(*y.shape[:2], *[g * p for g, p in zip(y.shape[2:2 + D], y.shape[2 + D:])])


def overlap_add_axis(y, cell, pattern, P, Q):
    """overlap_add along one axis: y [.., g at `cell`, .., P at `pattern`, ..] -> [.., g + S - 1, .., P, ..],
    S = ceil(Q / P), the pattern axis becoming the sub-position. Sub-position r of cell c gets
    pixel (r + P s) P // Q of the pattern of token c - s, for every s with r + P s < Q: one
    shifted add per (r, s), no scatter. Sub-positions with the same terms share one sum (at a
    zoom that is a multiple of P, all of them do)."""
    g, S = y.shape[cell], -(-Q // P)
    shape = list(y.shape)
    shape[cell] += S - 1
    del shape[pattern]
    subs, sums = [], {}
    for r in range(P):
        terms = tuple(((r + P * s) * P // Q, s) for s in range(-(-(Q - r) // P)))
        if terms not in sums:
            acc = y.new_zeros(shape)
            for j, s in terms:
                acc.narrow(cell, s, g).add_(y.select(pattern, j))
            sums[terms] = acc
        subs.append(sums[terms])
    return torch.stack(subs, pattern)


class RATBackbone(nn.Module):
    """A feature pyramid on RAT's finest level for torchvision detectors: an OrderedDict of
    [B, dim, H/s, W/s] at increasing strides s, for the default flags 4, 8, 16, 32 and 64 px, the
    strides of the conv baselines' FPN: the stem tokens (at half the first block's stride), the
    last block at each distinct stride (8 and 16), and up to two max-pools over 2x2 of the last map
    for large objects. No FPN between them: every block already attends across the whole image
    and every pyramid level, and a top-down FPN cost AP50 in a probe (RESULTS.md). The
    image pyramid is built here from `scales`, so the detector passes one image tensor. Set the
    detector's image_mean 0 and image_std 1: RAT normalizes its own input.

    On the physical grid (ref_size) the strides zoom with the input as RAT's first grouping
    stride does, per axis; the stem tokens, one per `patch` pixels at any zoom, are averaged
    (area) onto the fine level's grid, and set_detector_size zooms the anchors with the strides.
    The detector pads its batch to a multiple of every stride; the images themselves are
    `image_size` (an int: square, or (h, w); set_detector_size), so the pyramid and the
    spacing come from that crop, not from the padding, and the feature maps are
    zero-padded back to the padded grid the detector's anchors expect."""

    def __init__(self, scales=(1.0,), image_size=None, ref_size=None, **rat):
        super().__init__()
        self.body = RAT(ref_size=ref_size, **rat)
        self.scales, self.image_size, self.out_channels = tuple(scales), image_size, self.body.dim
        self.amp_dtype = None  # e.g. torch.bfloat16: the backbone alone runs under autocast
        strides = [s for s, _ in self.block_strides(ref_size or 1)][1:]   # the blocks', at the training size
        # index of the last block at each distinct stride
        self.taps = [i for i in range(len(strides)) if i + 1 == len(strides) or strides[i + 1] != strides[i]]
        # the pooled levels (2x and 4x the last map's stride) that leave at least 2 x 2 cells at the
        # training size: FCOS's GroupNorm has no statistics on a single cell
        top, side = strides[-1], min(per_axis(ref_size or image_size or 2 ** 30, 2))
        self.pools = [k for k in (2, 4) if side >= 2 * k * top]
        self.strides = [s[0] for s in self.level_strides(ref_size or 1)]   # at the (square) training size

    def block_strides(self, size):
        """Pixel strides (sy, sx) of the stem tokens, then of every block's tokens, for a `size` input,
        an int (square) or (h, w) (the physical grid zooms the first grouping stride with the
        input, per axis, RAT.zoom)."""
        strides = [(self.body.patch,) * 2]
        for st in self.body.block_strides(per_axis(size, 2)):
            strides.append(tuple(a * b for a, b in zip(strides[-1], per_axis(st, 2))))
        return strides

    def level_strides(self, size):
        """Pixel strides (sy, sx) of the maps forward returns, finest first."""
        blocks = self.block_strides(size)
        taps = [blocks[i + 1] for i in self.taps]
        return [tuple(s // 2 for s in taps[0])] + taps + [tuple(s * k for s in taps[-1]) for k in self.pools]

    def forward(self, x):
        padded = x.shape[2:]
        if self.image_size:
            h, w = per_axis(self.image_size, 2)
            x = x[..., :h, :w]
        with backbone_autocast(x, self.amp_dtype):
            levels = [x] + [F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True, align_corners=False)
                            for s in self.scales[1:]]
            stages = self.body(levels)
        strides = self.level_strides(tuple(x.shape[2:]))

        def as_map(t, grid):            # tokens [B, N, dim] -> [B, dim, *grid]
            return t.float().transpose(1, 2).reshape(t.shape[0], -1, *grid)

        def padded_to(m, stride):       # [B, dim, *grid] -> zero-padded to [B, dim, *padded / stride]
            return F.pad(m, [0, -(-padded[1] // stride[1]) - m.shape[3], 0, -(-padded[0] // stride[0]) - m.shape[2]])

        maps = [padded_to(as_map(*stages[i + 1][0][:2]), s) for i, s in zip(self.taps, strides[1:])]
        # the stem tokens averaged onto twice the first map's grid: per axis, the first grouping
        # stride of them per first-map token, padded as SGA pads them
        t, grid = stages[0][0][:2]
        first, S = stages[self.taps[0] + 1][0][1], per_axis(self.body.block_strides(tuple(x.shape[2:]))[0], 2)
        t = F.pad(as_map(t, grid), [0, S[1] * first[1] - grid[1], 0, S[0] * first[0] - grid[0]])   # [B, dim, *S * first]
        fine = padded_to(F.interpolate(t, size=[2 * n for n in first], mode="area"), strides[0])
        out = OrderedDict((str(i), m) for i, m in enumerate([fine] + maps))
        top = out[next(reversed(out))]
        for k in self.pools:
            top = out[f"pool{k}"] = F.max_pool2d(top, 2, ceil_mode=True)
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
    """Have the detector keep inputs of `size` px, an int (square) or (h, w): its transform
    resizes every image to fit min_size and max_size (here the image's own sides), and
    RATBackbone reads the real image out of the padded batch. On RAT's physical grid the
    transform resamples the image, per axis, to the nearest integer zoom of at least 1: only
    there are the strides and the stem's dilation exact (DESIGN.md section 8). Between them the
    first grouping stride rounds and boxes were found but mislocated (RESULTS.md, Resolution
    sweep); below 1 a kernel cannot shrink below a pixel, so the image goes up to the training
    pitch, as in RATSeg. The transform maps the boxes back to the image."""
    h, w = per_axis(size, 2)
    transform, backbone = detector.transform, detector.backbone
    transform.min_size, transform.max_size, transform.fixed_size = (min(h, w),), max(h, w), None
    if isinstance(backbone, RATBackbone):
        ref = per_axis(backbone.body.ref_size or (h, w), 2)
        exact = tuple(max(1, math.floor(z + 0.5)) * r for z, r in zip(backbone.body.zoom((h, w)), ref))
        if exact != (h, w):
            h, w = exact
            transform.fixed_size = (w, h)
        backbone.image_size = (h, w)
        # FCOS regresses box sides in units of the anchor's width and height: on the physical
        # grid the anchors grow with the zoom of each axis, so that a learned offset keeps its
        # physical length (a 4:3 image on a square-trained model: anchors 4:3 too).
        fy, fx = backbone.body.zoom((h, w))
        detector.anchor_generator = anchor_generator([(s * fy, s * fx) for s in backbone.strides])
        # The anchor generator infers each map's stride as padded size // map size: the
        # padding must be a multiple of every stride (a 1.5x zoom gives strides 6 to 96).
        transform.size_divisible = math.lcm(*[s for st in backbone.level_strides((h, w)) for s in st])


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


def build_seg_model(model="rat", num_classes=1, ref_size=None, head="conv", **rat):
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
    """One anchor per feature map, sizes[i] px square or (height, width) px: torchvision's
    anchors are a size and an aspect ratio height / width."""
    hw = [per_axis(s, 2) for s in sizes]
    return AnchorGenerator(tuple((h if h == w else math.sqrt(h * w),) for h, w in hw),
                           tuple((h / w,) for h, w in hw))


def fcos(backbone, strides, mean, std, num_classes, image_size, head_convs):
    anchors = anchor_generator(strides)
    head = FCOSHead(backbone.out_channels, 1, num_classes + 1, num_convs=head_convs)
    return FCOS(backbone, num_classes + 1, min_size=image_size, max_size=image_size, image_mean=mean,
                image_std=std, anchor_generator=anchors, head=head, size_divisible=math.lcm(*strides))


# ---------------------------------------------------------------------------------------
# a model from its arguments, and checkpoints
# ---------------------------------------------------------------------------------------

# Architecture arguments: train.py stores them in every checkpoint (with the other
# flags), so that eval.py rebuilds the same model from the checkpoint alone.
ARCH = ("task", "model", "image_size", "scales", "pe", "sga", "depth", "dim", "heads", "patch", "strides",
        "dropout", "num_classes", "token_grid", "head", "stem", "sga_iters")
# What checkpoints from before an argument existed were trained with (--head is seg RAT's only).
LEGACY_ARCH = {"token_grid": "pixel", "head": "linear", "stem": "patch", "sga_iters": 3}


def build_model(arch):
    """The model that a dict of ARCH arguments (train.py's flags) describes."""
    rat = dict(dim=arch["dim"], depth=arch["depth"], heads=arch["heads"], patch=arch["patch"],
               strides=arch["strides"], pe=arch["pe"], sga=arch["sga"], dropout=arch["dropout"],
               ref_size=arch["image_size"] if arch["token_grid"] == "physical" else None, stem=arch["stem"],
               sga_iters=arch["sga_iters"])
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
