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

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from rose import RoSE, positions, rotate

SGA_CHOICES = ("local", "dense", "none")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def out_grid(grid, stride):
    return tuple(math.ceil(g / stride) for g in grid)


def to_blocks(x, grid, stride):
    """[B, N, C] on `grid` -> [B, n_groups, S^D, C], zero-padded to a multiple of S."""
    B, _, C = x.shape
    D, S = len(grid), stride
    go = out_grid(grid, S)
    x = x.reshape(B, *grid, C)
    pad = []
    for g, o in zip(reversed(grid), reversed(go)):
        pad += [0, o * S - g]
    x = F.pad(x, [0, 0] + pad)                                   # [B, *go*S, C]
    x = x.reshape(B, *[v for o in go for v in (o, S)], C)        # [B, o1, S, o2, S, .., C]
    perm = [0] + [1 + 2 * d for d in range(D)] + [2 + 2 * d for d in range(D)] + [2 * D + 1]
    return x.permute(perm).reshape(B, math.prod(go), S ** D, C)


def from_blocks(x, grid, stride):
    """Inverse of to_blocks: [B, n_groups, S^D, C] -> [B, N, C] on `grid` (padding cropped)."""
    B, _, _, C = x.shape
    D, S = len(grid), stride
    go = out_grid(grid, S)
    x = x.reshape(B, *go, *[S] * D, C)
    perm = [0] + [v for d in range(D) for v in (1 + d, 1 + D + d)] + [2 * D + 1]
    x = x.permute(perm).reshape(B, *[o * S for o in go], C)
    x = x[(slice(None),) + tuple(slice(0, g) for g in grid)]
    return x.reshape(B, -1, C)


def neighbour_offsets(D, radius):
    return list(itertools.product(range(2 * radius + 1), repeat=D))


def gather_neighbours(g, grid, radius):
    """g: [B, M, C] on `grid` -> [B, M, K, C]: for each group, its K = (2r+1)^D
    neighbours (zeros outside the grid)."""
    B, _, C = g.shape
    gp = F.pad(g.reshape(B, *grid, C), [0, 0] + [radius, radius] * len(grid))
    slabs = [gp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(off, grid))]
             for off in neighbour_offsets(len(grid), radius)]
    return torch.stack(slabs, dim=-2).reshape(B, -1, len(slabs), C)


def scatter_neighbours(w, grid, radius):
    """Adjoint of gather_neighbours: w [B, M, K, C] -> [B, M, C], where entry
    (m, k) is added to the k-th neighbour of group m."""
    B, _, K, C = w.shape
    w = w.reshape(B, *grid, K, C)
    out = w.new_zeros(B, *[n + 2 * radius for n in grid], C)
    for k, off in enumerate(neighbour_offsets(len(grid), radius)):
        out[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(off, grid))] += w[..., k, :]
    crop = tuple(slice(radius, radius + n) for n in grid)
    return out[(slice(None),) + crop].reshape(B, -1, C)


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
        self.init = CONV[spatial_dims](dim, dim, kernel_size=stride, stride=stride)
        if mode == "none":
            return
        self.norm_x, self.norm_g, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.rose = RoSE(dim // heads, heads, spatial_dims, pe, rotary_ratio) if pe in ("rose", "rope") else None

    def forward(self, x, grid, spacing):
        """x: [B, N, C] on `grid` with `spacing` -> (groups [B, M, C], grid_out,
        spacing_out, A). A is the soft assignment averaged over heads:
        local [B, M, S^D, K], dense [B, N, M], none None."""
        B, N, C = x.shape
        S, D = self.stride, len(grid)
        go, so = out_grid(grid, S), tuple(s * S for s in spacing)
        xg = F.pad(x.transpose(1, 2).reshape(B, C, *grid), [p for g, o in zip(reversed(grid), reversed(go))
                                                             for p in (0, o * S - g)])
        groups = self.init(xg).flatten(2).transpose(1, 2)                       # [B, M, C]
        if self.mode == "none":
            return groups, go, so, None

        h, d = self.heads, C // self.heads
        k, v = self.to_kv(self.norm_x(x)).chunk(2, dim=-1)                      # [B, N, C] each
        k, v = (t.reshape(B, N, h, d).transpose(1, 2) for t in (k, v))          # [B, h, N, d]
        if self.rose is not None:
            k = rotate(k, self.rose(positions(grid, spacing, self.pe).to(x.device)))
            cs_groups = self.rose(positions(go, so, self.pe).to(x.device))   # same every iteration
        if self.mode == "local":   # block layout once, heads folded into the batch
            k, v = (to_blocks(t.reshape(B * h, N, d), grid, S) for t in (k, v))  # [Bh, M, S^D, d]
            mask = self._local_mask(grid, go, x.device)
        for _ in range(self.iters):
            q = self.to_q(self.norm_g(groups)).reshape(B, -1, h, d).transpose(1, 2)  # [B, h, M, d]
            if self.rose is not None:
                q = rotate(q, cs_groups)
            if self.mode == "local":
                upd, A = self._local(q, k, v, mask, go)
            else:
                upd, A = self._dense(q, k, v)
            groups = groups + self.out(upd.transpose(1, 2).reshape(B, -1, C))
            groups = groups + self.mlp(self.norm_mlp(groups))
        return groups, go, so, A.mean(dim=1)

    def _dense(self, q, k, v):
        A = torch.softmax(k @ q.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)   # [B, h, N, M]
        mass = A.sum(dim=2)[..., None]                                              # [B, h, M, 1]
        return (A.transpose(-1, -2) @ v) / (mass + self.eps), A

    def _local_mask(self, grid, go, device):
        """Candidates inside the group grid [1, M, 1, K], and real (not padding)
        tokens [1, M, S^D, 1]."""
        M = math.prod(go)
        cand = gather_neighbours(torch.ones(1, M, 1, device=device), go, self.radius) > 0
        real = to_blocks(torch.ones(1, math.prod(grid), 1, device=device), grid, self.stride)
        return cand.transpose(-1, -2), real

    def _local(self, q, kb, vb, mask, go):
        """q: [B, h, M, d]; kb, vb: [Bh, M, S^D, d] -> update [B, h, M, d], A [B, h, M, S^D, K]."""
        B, h, M, d = q.shape
        qn = gather_neighbours(q.reshape(B * h, M, d), go, self.radius)             # [Bh, M, K, d]
        logits = kb @ qn.transpose(-1, -2) / math.sqrt(d)                           # [Bh, M, S^D, K]
        cand, real = mask
        A = torch.softmax(logits.masked_fill(~cand, float("-inf")), dim=-1) * real
        wsum = scatter_neighbours(A.transpose(-1, -2) @ vb, go, self.radius)        # [Bh, M, d]
        mass = scatter_neighbours(A.sum(dim=2)[..., None], go, self.radius)         # [Bh, M, 1]
        upd = (wsum / (mass + self.eps)).reshape(B, h, M, d)
        return upd, A.reshape(B, h, M, *A.shape[2:])

    def unpool(self, groups, A, grid_in):
        """Inverse direction for the decoder: fine_i = sum_j A_ij group_j.
        groups: [B, M, C] on out_grid(grid_in) -> [B, N, C] on grid_in."""
        go = out_grid(grid_in, self.stride)
        if self.mode == "dense":
            return A @ groups
        if self.mode == "local":
            nb = gather_neighbours(groups, go, self.radius)                         # [B, M, K, C]
            return from_blocks(A @ nb, grid_in, self.stride)                        # A: [B, M, S^D, K]
        # none: every token takes its home group
        B, M, C = groups.shape
        rep = groups[:, :, None, :].expand(B, M, self.stride ** len(grid_in), C)
        return from_blocks(rep, grid_in, self.stride)
