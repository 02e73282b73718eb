import math

import pytest
import torch

from sga import SGA, from_blocks, gather_neighbours, head_blocks, out_grid, scatter_neighbours

CASES = [(2, (7, 5), 2), (2, (7, 6), 3), (3, (5, 4, 3), 2)]


def tokens(grid, dim=32, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, math.prod(grid), dim, generator=g)


def to_blocks(x, grid, stride):
    """[B, N, C] on `grid` -> [B, n_groups, S^D, C], zero-padded: head_blocks with one head."""
    return head_blocks(x, grid, stride, 1).reshape(x.shape[0], -1, stride ** len(grid), x.shape[-1])


@pytest.mark.parametrize("D,grid,stride", CASES)
def test_blocks_round_trip(D, grid, stride):
    x = tokens(grid)
    assert torch.equal(from_blocks(to_blocks(x, grid, stride), grid, stride), x)


@pytest.mark.parametrize("D,grid", [(2, (4, 3)), (3, (3, 2, 3))])
def test_scatter_is_the_adjoint_of_gather(D, grid):
    # <gather(g), w> == <g, scatter(w)> for all g, w
    g = tokens(grid, dim=5, batch=1)
    w = torch.randn(1, math.prod(grid), 3 ** D, 5)
    lhs = (gather_neighbours(g, grid, 1) * w).sum()
    rhs = (g * scatter_neighbours(w, grid, 1)).sum()
    assert torch.allclose(lhs, rhs, atol=1e-4)


@pytest.mark.parametrize("D,grid,stride", CASES)
def test_local_equals_dense_when_neighbourhood_covers_grid(D, grid, stride):
    torch.manual_seed(0)
    local = SGA(32, 4, stride, D, mode="local", radius=max(out_grid(grid, stride)))
    dense = SGA(32, 4, stride, D, mode="dense")
    dense.load_state_dict(local.state_dict())
    x, spacing = tokens(grid), (0.1,) * D
    gl, grid_l, sp_l, A_l = local(x, grid, spacing)
    gd, grid_d, sp_d, A_d = dense(x, grid, spacing)
    assert grid_l == grid_d and sp_l == sp_d
    assert (gl - gd).abs().max() < 1e-5
    # the same assignment, seen through the decoder's unpooling
    assert (local.unpool(gl, A_l, grid) - dense.unpool(gd, A_d, grid)).abs().max() < 1e-5


@pytest.mark.parametrize("D,grid,stride", CASES)
def test_assignment_sums_to_one_and_padding_gets_no_weight(D, grid, stride):
    torch.manual_seed(0)
    sga = SGA(32, 4, stride, D)
    groups, go, so, A = sga(tokens(grid), grid, (0.1,) * D)
    assert groups.shape == (2, math.prod(go), 32) and go == out_grid(grid, stride)
    assert so == pytest.approx((0.1 * stride,) * D)
    sums = A.sum(-1)                                                          # [B, M, S^D]
    real = to_blocks(torch.ones(1, math.prod(grid), 1), grid, stride)[..., 0] > 0
    assert torch.allclose(sums[real.expand_as(sums)], torch.ones(1), atol=1e-5)
    assert (A[(~real).expand_as(sums)] == 0).all() and (~real).any()         # padding exists and is empty
    # no candidate outside the group grid: corner group's "up-left" candidate
    assert (A[:, 0, :, 0] == 0).all()


@pytest.mark.parametrize("mode", ["local", "dense", "none"])
@pytest.mark.parametrize("D,grid,stride", [(2, (7, 5), 2), (3, (5, 4, 3), 2)])
def test_every_parameter_gets_a_gradient(mode, D, grid, stride):
    torch.manual_seed(0)
    sga = SGA(32, 4, stride, D, mode=mode)
    x = tokens(grid).requires_grad_()
    groups, go, so, A = sga(x, grid, (0.1,) * D)
    (groups.pow(2).mean() + sga.unpool(groups, A, grid).pow(2).mean()).backward()
    for name, p in sga.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_local_memory_is_linear_no_dense_matrix():
    # The local assignment has one row per input token and (2r+1)^D columns.
    sga = SGA(16, 2, 4, 2)
    grid = (64, 64)
    _, go, _, A = sga(tokens(grid, dim=16, batch=1), grid, (1 / 64, 1 / 64))
    assert A.shape == (1, math.prod(go), 16, 9)
    assert A.numel() == 64 * 64 * 9   # an N_in x N_out matrix would be 4096 * 256
