"""Spatial Grouping Attention (SGA): a content-aware downsampler.

Output tokens ("groups") are cluster centers. They start as a strided conv of
the input and then, for a few iterations, compete for the input tokens
(softmax over groups, slot-attention style) and move to the weighted mean of
the tokens they won:

    groups = strided_conv(x)
    k, v   = proj(norm(x))                      # k rotated at input coordinates
    repeat iters:
        q      = proj(norm(groups))             # rotated at group coordinates
        A      = softmax_j(k_i . q_j / sqrt(d)) # over the candidate groups j of i
        groups = groups + out(sum_i A_ij v_i / (sum_i A_ij + eps))
        groups = groups + mlp(norm(groups))

Modes: `local` (default) lets each input token choose among the (2r+1)^D groups
around its home group, so cost and memory are linear in the number of pixels;
`dense` lets every group compete for every token (O(N_in x N_out), an ablation
and a test oracle); `none` is the strided conv alone.

Layout used by `local`: the input grid is padded to a multiple of the stride S
and cut into blocks, one per group ("home" block): [B, n_groups, S^D, C]. The
candidates of every token of a block are the same K = (2r+1)^D groups, gathered
with K shifted slices of the padded group grid; the weighted sums go back to the
groups through the adjoint (K shifted adds). Nothing of size N_in x N_out exists.
"""

import functools
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rose import RoSE, positions, rotate, rotate_planes

SGA_CHOICES = ("local", "dense", "none")


def per_axis(v, D):
    """A stride or a size, one number for every axis or one per axis -> a D-tuple. On the physical
    grid an image whose aspect differs from training zooms differently per axis (model.RAT.zoom)."""
    return tuple(v) if isinstance(v, (tuple, list, torch.Size)) else (v,) * D


def out_grid(grid, stride):
    return tuple(math.ceil(g / s) for g, s in zip(grid, per_axis(stride, len(grid))))


def from_blocks(x, grid, stride):
    """Inverse of head_blocks with one head: [B, n_groups, prod(S), C] -> [B, N, C] on `grid` (padding cropped)."""
    B, _, _, C = x.shape
    D, S = len(grid), per_axis(stride, len(grid))
    go = out_grid(grid, S)
    x = x.reshape(B, *go, *S, C)
    perm = [0] + [v for d in range(D) for v in (1 + d, 1 + D + d)] + [2 * D + 1]
    x = x.permute(perm).reshape(B, *[o * s for o, s in zip(go, S)], C)
    x = x[(slice(None),) + tuple(slice(0, g) for g in grid)]
    return x.reshape(B, -1, C)


def neighbour_offsets(D, radius):
    return list(itertools.product(range(2 * radius + 1), repeat=D))


def _neighbour_index(grid, radius, device):
    """[M * K] long: for each group of `grid` (row-major), the flat indices of its K = (2r+1)^D
    neighbours, M (one past the last group) where a neighbour falls outside the grid."""
    M = math.prod(grid)
    padded = F.pad(torch.arange(M, device=device).reshape(grid), [radius, radius] * len(grid), value=M)
    return torch.stack([padded[tuple(slice(o, o + n) for o, n in zip(off, grid))].reshape(M)
                        for off in neighbour_offsets(len(grid), radius)], dim=1).reshape(-1)


@functools.lru_cache(maxsize=64)
def _cached_neighbour_index(grid, radius, device):
    with torch.inference_mode(False):   # cached: must stay usable by autograd later
        return _neighbour_index(grid, radius, device)


def neighbour_index(grid, radius, device):
    index = _neighbour_index if torch.compiler.is_compiling() else _cached_neighbour_index   # compile: traced
    return index(tuple(grid), radius, device)


def gather_neighbours(g, grid, radius):
    """g: [B, M, C] on `grid` -> [B, M, K, C]: for each group, its K = (2r+1)^D
    neighbours (zeros outside the grid). One index_select from the groups and a zero row: a
    handful of ops at any grid (a loop over the K shifted slices cost 2 K ops per call, a
    third of the segmentation model's), and autograd's backward is one index_add."""
    B, M, C = g.shape
    index = neighbour_index(grid, radius, g.device)
    return torch.cat([g, g.new_zeros(B, 1, C)], dim=1).index_select(1, index).view(B, M, -1, C)


def scatter_neighbours(w, grid, radius):
    """Adjoint of gather_neighbours: w [B, M, K, C] -> [B, M, C], where entry
    (m, k) is added to the k-th neighbour of group m (entries outside the grid land on the
    extra row, dropped)."""
    B, M, K, C = w.shape
    index = neighbour_index(grid, radius, w.device)
    return w.new_zeros(B, M + 1, C).index_add_(1, index, w.reshape(B, M * K, C))[:, :M]


def head_blocks(t, grid, stride, heads):
    """[B, N, heads * d] on `grid` (may be a strided view) -> a view [B, heads,
    *out_grid, S_1, .., S_D, d] of the zero-padded tokens, blocked by home group: one
    copy (by whoever consumes the view) instead of pad, transpose and permute."""
    B, _, C = t.shape
    D, S = len(grid), per_axis(stride, len(grid))
    go = out_grid(grid, S)
    t = t.reshape(B, *grid, C)
    if any(o * s != g for g, o, s in zip(grid, go, S)):
        t = F.pad(t, [0, 0] + [p for g, o, s in zip(reversed(grid), reversed(go), reversed(S)) for p in (0, o * s - g)])
    t = t.reshape(B, *[v for o, s in zip(go, S) for v in (o, s)], heads, C // heads)   # [B, o1, S1, o2, S2, .., h, d]
    return t.permute([0, 2 * D + 1] + [1 + 2 * d for d in range(D)] + [2 + 2 * d for d in range(D)] + [2 * D + 2])


def _local_masks(grid, stride, radius, device):
    """invalid [M, K, 1]: candidate outside the group grid; real [*go, S_1, .., S_D, 1]
    (1 for tokens, 0 for padding) or None when the stride divides the grid."""
    go = out_grid(grid, stride)
    invalid = gather_neighbours(torch.ones(1, math.prod(go), 1, device=device), go, radius)[0] == 0
    real = None
    if any(o * s != g for g, o, s in zip(grid, go, per_axis(stride, len(grid)))):
        ones = torch.ones(1, math.prod(grid), 1, device=device)
        real = head_blocks(ones, grid, stride, 1)[0, 0].contiguous()
    return invalid, real


@functools.lru_cache(maxsize=64)
def _cached_local_masks(grid, stride, radius, device):
    with torch.inference_mode(False), torch.no_grad():   # cached: must stay usable by autograd later
        return _local_masks(grid, stride, radius, device)


def resize_kernel(w, size):
    """Conv weight [C_out, C_in, *S0] -> [C_out, C_in, *size] (size: one number, or one per axis)
    with the same response to a smooth input: area resampling, rescaled by the change in taps.
    For an integer factor up it is exactly "average-pool the input by that factor, then apply w";
    down, exactly "repeat each input token, then apply w"; per axis likewise."""
    S0, size = w.shape[2:], per_axis(size, w.dim() - 2)
    taps = math.prod(S0) / math.prod(size)
    return F.interpolate(w, size=size, mode="area") * taps


class MLP(nn.Sequential):
    def __init__(self, dim, ratio=4, dropout=0.0):
        super().__init__(nn.Linear(dim, dim * ratio), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(dim * ratio, dim), nn.Dropout(dropout))


class SGA(nn.Module):
    def __init__(self, dim, heads, stride, spatial_dims=2, mode="local", radius=1, iters=3,
                 pe="rose", rotary_ratio=0.5, mlp_ratio=4, dropout=0.0, eps=1e-6):
        super().__init__()
        self.heads, self.stride, self.mode = heads, stride, mode
        self.radius, self.iters, self.pe, self.eps = radius, iters, pe, eps
        self.init = getattr(nn, f"Conv{spatial_dims}d")(dim, dim, kernel_size=stride, stride=stride)
        if mode == "none":
            return
        self.norm_x, self.norm_g, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.rose = RoSE(dim // heads, heads, spatial_dims, pe, rotary_ratio) if pe in ("rose", "rope") else None
        if self.rose is not None:   # k's channels regrouped as [x1 | x2 | rest], each [heads, P]: see _local_forward
            d, P = dim // heads, self.rose.freqs.shape[1]
            part = [torch.arange(a, b) for a, b in ((0, P), (P, 2 * P), (2 * P, d))]
            order = torch.cat([(torch.arange(heads)[:, None] * d + p).flatten() for p in part])
            self.register_buffer("kv_order", torch.cat([order, torch.arange(dim, 2 * dim)]), persistent=False)

    def forward(self, x, grid, spacing, stride=None):
        """x: [B, N, C] on `grid` with `spacing` -> (groups [B, M, C], grid_out,
        spacing_out, A). A is the soft assignment averaged over heads:
        local [B, M, S^D, K], dense [B, N, M], none None. stride: another than the
        one the module was built with (the init kernel is resized to it), one number or one
        per axis (S^D above is then S_1 * .. * S_D)."""
        B, N, C = x.shape
        D = len(grid)
        S = per_axis(stride or self.stride, D)
        go, so = out_grid(grid, S), tuple(sp * s for sp, s in zip(spacing, S))
        # the strided conv (kernel = stride) as a linear map of each home block: no transpose to [B, C, *grid]
        w = self.init.weight if S == tuple(self.init.kernel_size) else resize_kernel(self.init.weight, S)
        w = w.permute(0, *range(2, 2 + D), 1).reshape(C, -1)                    # [C, S^D * C], as the blocks
        groups = F.linear(head_blocks(x, grid, S, 1).reshape(B, math.prod(go), -1), w, self.init.bias)  # [B, M, C]
        if self.mode == "none":
            return groups, go, so, None

        h, d = self.heads, C // self.heads
        if self.mode == "local":
            return self._local_forward(x, groups, grid, spacing, go, so, S)
        kv = self.to_kv(self.norm_x(x))                                          # [B, N, 2C]
        k, v = (t.reshape(B, N, h, d).transpose(1, 2) for t in kv.chunk(2, dim=-1))  # [B, h, N, d]
        if self.rose is not None:
            k = rotate(k, self.rose(positions(grid, spacing, self.pe).to(x.device)))
            cs_groups = self.rose(positions(go, so, self.pe).to(x.device))   # same every iteration
        for _ in range(self.iters):
            q = self.to_q(self.norm_g(groups)).reshape(B, -1, h, d).transpose(1, 2)  # [B, h, M, d]
            if self.rose is not None:
                q = rotate(q, cs_groups)
            A = torch.softmax(k @ q.transpose(-1, -2) / math.sqrt(d), dim=-1)    # [B, h, N, M]
            mass = A.sum(dim=2)[..., None]                                      # [B, h, M, 1]
            upd = (A.transpose(-1, -2) @ v) / (mass + self.eps)
            groups = groups + self.out(upd.transpose(1, 2).reshape(B, -1, C))
            groups = groups + self.mlp(self.norm_mlp(groups))
        return groups, go, so, A.mean(dim=1)

    def _local_forward(self, x, groups, grid, spacing, go, so, S):
        """Local grouping. Layout: heads folded into the batch, fine tokens in blocks of
        their home group: kb, vb [Bh, M, S^D, d]; logits and A [Bh, M, K, S^D] (softmax
        over K on a dim that is not the last: faster on CPU than over a last dim
        of 9). v carries an extra channel, 1 for real tokens and 0 for padding, so the
        mass sum_i A_ij comes out of the same matmul and scatter as the weighted sum,
        and padding gets no weight without masking A. RoSE turns k in the token
        layout with k's channels regrouped as [x1 | x2 | rest] (rows of heads * P
        contiguous floats, not P = 4: faster products); the one copy into the
        block layout puts every head's channels back in order."""
        B, N, C = x.shape
        M, n = groups.shape[1], math.prod(S)                                    # n: tokens per home block
        h, d, r = self.heads, C // self.heads, self.radius
        masks = _local_masks if torch.compiler.is_compiling() else _cached_local_masks   # compile: traced once
        invalid, real = masks(tuple(grid), S, r, x.device)
        if self.rose is None:
            k, v = self.to_kv(self.norm_x(x)).chunk(2, dim=-1)
            kb = head_blocks(k, grid, S, h).reshape(B * h, M, n, d)
        else:
            order = self.kv_order
            kv = F.linear(self.norm_x(x), self.to_kv.weight[order], self.to_kv.bias[order])
            hP = h * self.rose.freqs.shape[1]
            x1, x2, rest, v = kv.split([hP, hP, C - 2 * hP, C], dim=-1)          # [B, N, h * P], ..
            cs = self.rose(positions(grid, spacing, self.pe).to(x.device))          # [h, N, P] each
            cos, sin = (t.transpose(0, 1).reshape(N, hP) for t in cs)                # [N, h * P]
            del cs                               # at a large zoom each of these is a multiple of the image
            kb = torch.cat([head_blocks(t, grid, S, h) for t in (*rotate_planes(x1, x2, cos, sin), rest)], dim=-1)
            kb = kb.reshape(B * h, M, n, d)
            del x1, x2, rest, cos, sin, kv       # free each as soon as it is used
            cs_groups = self.rose(positions(go, so, self.pe).to(x.device))
        one = (torch.ones(1, device=x.device) if real is None else real).to(v.dtype)
        v = head_blocks(v, grid, S, h)                                           # view [B, h, *go, S.., d]
        vb = torch.cat([v, one.expand(*v.shape[:-1], 1)], dim=-1).reshape(B * h, M, n, d + 1)
        del v                                    # the last view of the projected tokens
        for _ in range(self.iters):
            q = self.to_q(self.norm_g(groups)).view(B, M, h, d).transpose(1, 2)   # [B, h, M, d]
            if self.rose is not None:
                q = rotate(q, cs_groups)
            q = q.reshape(B * h, M, d) * (1 / math.sqrt(d))
            qn = gather_neighbours(q, go, r)                                     # [Bh, M, K, d]
            logits = (qn @ kb.transpose(-1, -2)).masked_fill_(invalid, float("-inf"))   # [Bh, M, K, S^D]
            A = torch.softmax(logits, dim=-2)
            s = scatter_neighbours(A @ vb, go, r)                               # [Bh, M, d + 1]
            upd = s[..., :d] / (s[..., d:] + self.eps)
            groups = groups + self.out(upd.view(B, h, M, d).transpose(1, 2).reshape(B, M, C))
            groups = groups + self.mlp(self.norm_mlp(groups))
        A = A.view(B, h, M, -1, n).mean(dim=1).transpose(-1, -2)           # [B, M, S^D, K]
        if real is not None:
            A = A * real.reshape(1, M, n, 1)
        return groups, go, so, A

    def unpool(self, groups, A, grid_in, stride=None):
        """Inverse direction for the decoder: fine_i = sum_j A_ij group_j.
        groups: [B, M, C] on out_grid(grid_in, stride) -> [B, N, C] on grid_in."""
        S = per_axis(stride or self.stride, len(grid_in))
        go = out_grid(grid_in, S)
        if self.mode == "dense":
            return A @ groups
        if self.mode == "local":
            nb = gather_neighbours(groups, go, self.radius)                         # [B, M, K, C]
            return from_blocks(A @ nb, grid_in, S)                                  # A: [B, M, S^D, K]
        # none: every token takes its home group
        B, M, C = groups.shape
        rep = groups[:, :, None, :].expand(B, M, math.prod(S), C)
        return from_blocks(rep, grid_in, S)
