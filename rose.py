"""Rotary Spatial Embeddings (RoSE): rotary position encoding in physical space.

Every token sits at a physical coordinate (DESIGN.md section 1):

    center(i) = origin + (i + 0.5) * spacing        # per spatial dim

so a pyramid of the same image shares one frame. RoSE rotates each pair of
channels of q and k by a phase <x, w[h, p]> that is linear in the coordinate x;
q.k then depends only on x_q - x_k, in physical units, whatever the resolution.

The position-encoding variants of the component study live behind one switch,
`pe`:
    rose      rotate at physical coordinates (resolution aware)
    rope      the same rotation at grid indices of each level (standard RoPE:
              pyramid levels are not aligned and resolution is ignored)
    absolute  a fixed sin-cos embedding of the physical coordinate, added once
              after the stem (see sincos_embedding); no rotation
    none      nothing
"""

import math

import torch
import torch.nn as nn

PE_CHOICES = ("rose", "rope", "absolute", "none")

# Frequency magnitudes (radians per unit of coordinate), log-spaced between these.
# Convention: `rose` coordinates are in fields of view (the image spans [0, 1]),
# so wavelengths run from 2 fields of view (global layout) down to 1/128 of the
# field (about 2 pixels at 256 px). `rope` coordinates are token indices, so its
# wavelengths run from 128 tokens down to 2 tokens.
FREQ_RANGE = {"rose": (math.pi, 256 * math.pi), "rope": (math.pi / 64, math.pi)}


def grid_centers(grid, spacing, origin=None):
    """Physical centers of a grid's tokens, row-major. grid: (G_1..G_D) -> [N, D]."""
    axes = []
    for d, (g, s) in enumerate(zip(grid, spacing)):
        o = 0.0 if origin is None else origin[d]
        axes.append(o + (torch.arange(g, dtype=torch.float32) + 0.5) * s)
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def positions(grid, spacing, pe):
    """The coordinates a variant rotates by: physical for rose, indices for rope,
    None (no rotation) for absolute and none."""
    if pe == "rose":
        return grid_centers(grid, spacing)
    if pe == "rope":
        return grid_centers(grid, [1.0] * len(grid))
    return None


class RoSE(nn.Module):
    """Rotates the first `rotary_ratio` of each head's channels of q or k.

    Head h has P = rotated/2 planes; plane p turns by <x, w[h, p]>. Magnitudes are
    log-spaced over FREQ_RANGE[pe]; directions are random per head and plane
    ("mixed" frequencies, so diagonal offsets are resolved too); learnable.
    """

    def __init__(self, head_dim, heads, spatial_dims, pe="rose", rotary_ratio=0.5, learnable=True):
        super().__init__()
        planes = max(int(head_dim * rotary_ratio) // 2, 1)
        lo, hi = FREQ_RANGE[pe]
        mags = torch.logspace(math.log10(lo), math.log10(hi), planes)            # [P]
        dirs = torch.randn(heads, planes, spatial_dims)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)                            # [H, P, D]
        self.freqs = nn.Parameter(mags[None, :, None] * dirs, requires_grad=learnable)

    def forward(self, pos):
        """pos: [N, D] coordinates -> (cos, sin), each [H, N, P], for `rotate`.
        Computed once per set of coordinates and shared by q and k."""
        # Elementwise product + sum rather than a matmul, so that autocast keeps the
        # phases in float32: phases reach hundreds of radians, which bf16 cannot hold.
        phase = (pos.float()[None, :, None, :] * self.freqs.float()[:, None]).sum(-1)
        return phase.cos(), phase.sin()


def rotate(x, cos_sin):
    """x: [..., H, N, head_dim]. Turns channel pairs (p, P + p) by the phases; the
    channels past 2P pass through unchanged."""
    cos, sin = cos_sin
    P = cos.shape[-1]
    x1, x2, rest = x.split([P, P, x.shape[-1] - 2 * P], dim=-1)   # split: one gradient copy, not 3 zero-filled ones
    return torch.cat([*rotate_planes(x1, x2, cos, sin), rest], dim=-1)


def rotate_planes(x1, x2, cos, sin):
    """The rotation itself, on the two halves of the planes: (x1, x2) -> (x1', x2').
    Any layout whose shapes broadcast (sga.py calls it on [B, N, H * P] slices,
    where the elementwise products run over long contiguous rows)."""
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    return x1 * cos - x2 * sin, x1 * sin + x2 * cos


def sincos_embedding(pos, dim):
    """Fixed sin-cos embedding of physical coordinates (the `absolute` variant).
    pos: [N, D] in fields of view -> [N, dim]; uses the same wavelengths as RoSE."""
    n, D = pos.shape
    per_dim = dim // (2 * D)
    lo, hi = FREQ_RANGE["rose"]
    freqs = torch.logspace(math.log10(lo), math.log10(hi), per_dim, device=pos.device)
    phase = pos.float()[:, :, None] * freqs                                      # [N, D, F]
    emb = torch.cat([phase.sin(), phase.cos()], dim=-1).reshape(n, -1)           # [N, 2*D*F]
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
