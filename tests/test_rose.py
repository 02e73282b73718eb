
import pytest
import torch

from rose import RoSE, grid_centers, positions, rotate, sincos_embedding


def scores(rose, q, k, pos_q, pos_k):
    return rotate(q, rose(pos_q)) @ rotate(k, rose(pos_k)).transpose(-1, -2)


@pytest.mark.parametrize("D", [2, 3])
def test_scores_depend_only_on_offsets(D):
    torch.manual_seed(D)
    rose = RoSE(head_dim=16, heads=4, spatial_dims=D, rotary_ratio=1.0)
    with torch.no_grad():   # random learnable frequencies, not just the init
        rose.freqs.mul_(torch.rand_like(rose.freqs) + 0.5)
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 7, 16)
    pq, pk = torch.rand(10, D), torch.rand(7, D)
    shift = torch.rand(1, D) * 3 - 1.5
    before = scores(rose, q, k, pq, pk)
    after = scores(rose, q, k, pq + shift, pk + shift)
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-4)
    # ...and they do depend on position: a relative move changes them.
    moved = scores(rose, q, k, pq + shift, pk)
    assert (moved - before).abs().max() > 1e-2


def test_coarse_token_sits_at_mean_of_its_children():
    fine = grid_centers((8, 6), (1 / 8, 1 / 6)).reshape(8, 6, 2)
    coarse = positions((4, 3), (2 / 8, 2 / 6), "rose").reshape(4, 3, 2)
    children = fine.reshape(4, 2, 3, 2, 2).mean(dim=(1, 3))
    assert torch.allclose(coarse, children, atol=1e-6)


def test_rope_ignores_spacing_rose_does_not():
    assert torch.equal(positions((5, 4), (0.1, 0.2), "rope"), positions((5, 4), (0.3, 0.7), "rope"))
    assert not torch.equal(positions((5, 4), (0.1, 0.2), "rose"), positions((5, 4), (0.3, 0.7), "rose"))
    assert positions((5, 4), (0.1, 0.2), "absolute") is None and positions((5, 4), (0.1, 0.2), "none") is None


def test_unrotated_channels_pass_through():
    rose = RoSE(head_dim=32, heads=2, spatial_dims=2, rotary_ratio=0.5)
    x = torch.randn(1, 2, 9, 32)
    y = rotate(x, rose(torch.rand(9, 2)))
    assert torch.equal(y[..., 16:], x[..., 16:])
    assert not torch.allclose(y[..., :16], x[..., :16])
    # a rotation keeps the norm of each rotated pair
    assert torch.allclose(y[..., :16].norm(dim=-1), x[..., :16].norm(dim=-1), atol=1e-5)


def test_runs_under_bf16_autocast_with_gradients():
    rose = RoSE(head_dim=16, heads=2, spatial_dims=2)
    lin = torch.nn.Linear(16, 16)
    pos = torch.rand(12, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = lin(torch.randn(1, 2, 12, 16))
        s = rotate(q, rose(pos)) @ rotate(q, rose(pos)).transpose(-1, -2)
    assert s.dtype == torch.bfloat16 and torch.isfinite(s).all()
    s.float().sum().backward()
    assert rose.freqs.grad is not None and torch.isfinite(rose.freqs.grad).all()
    # phases stay in float32 under autocast: the bf16 result is close to the float32 one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = rotate(q, rose(pos * 100)).float()
    ref = rotate(q.float(), rose(pos * 100))
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_sincos_embedding_shape_and_range():
    emb = sincos_embedding(torch.rand(20, 2), 30)
    assert emb.shape == (20, 30) and emb.abs().max() <= 1.0
    assert not torch.allclose(emb[0], emb[1])
