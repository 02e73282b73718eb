import math

import pytest
import torch
import torch.nn.functional as F

from model import RAT, RATSeg, UNet, build_detector, build_seg_model, num_params

TINY = dict(dim=32, heads=4)


def check_forward_backward(model, levels):
    out = model(levels)
    assert out.shape == (levels[0].shape[0], 1, *levels[0].shape[2:])
    out.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    return out


def pyramid(x, scales):
    return [x] + [F.interpolate(x, scale_factor=s, mode="bilinear", antialias=True) for s in scales[1:]]


def test_single_2d_image():
    torch.manual_seed(0)
    check_forward_backward(RATSeg(depth=3, **TINY), [torch.rand(2, 3, 64, 64)])


def test_three_level_pyramid_with_non_square_size_strides_do_not_divide():
    torch.manual_seed(0)
    check_forward_backward(RATSeg(depth=3, patch=2, **TINY), pyramid(torch.rand(2, 3, 45, 37), [1, 0.5, 0.25]))


def test_3d_volume():
    torch.manual_seed(0)
    check_forward_backward(RATSeg(depth=2, spatial_dims=3, patch=2, **TINY), [torch.rand(1, 3, 13, 10, 9)])


@pytest.mark.parametrize("depth", [2, 4, 6, 8])
def test_depths(depth):
    torch.manual_seed(0)
    check_forward_backward(RATSeg(depth=depth, **TINY), [torch.rand(1, 3, 50, 34)])


@pytest.mark.parametrize("pe", ["rose", "rope", "absolute", "none"])
@pytest.mark.parametrize("sga", ["local", "dense", "none"])
def test_every_variant_runs(pe, sga):
    torch.manual_seed(0)
    check_forward_backward(RATSeg(depth=2, pe=pe, sga=sga, **TINY), pyramid(torch.rand(1, 3, 40, 40), [1, 0.5]))


def test_pyramid_levels_share_the_physical_frame():
    rat = RAT(depth=2, **TINY)
    stages = rat(pyramid(torch.rand(1, 3, 64, 64), [1, 0.5]))
    (_, g0, s0, _), (_, g1, s1, _) = stages[-1]
    # level 1 is half the size, so twice the spacing; both span the same field of view
    assert [g * s for g, s in zip(g0, s0)] == pytest.approx([g * s for g, s in zip(g1, s1)])
    assert s1 == pytest.approx(tuple(2 * s for s in s0))


def test_coarse_levels_reach_the_output():
    # The finest level's logits must depend on the coarse level (joint attention).
    torch.manual_seed(0)
    model = RATSeg(depth=2, **TINY).eval()
    x = torch.rand(1, 3, 32, 32)
    coarse = F.interpolate(x, scale_factor=0.5).requires_grad_()
    model([x, coarse]).sum().backward()
    assert coarse.grad.abs().sum() > 0


@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("zoom", [1, 2, 1.5, 3])
def test_inference_in_strips_gives_the_one_pass_logits(monkeypatch, D, zoom):
    # Without gradients the full-resolution layers, the stem's patch projection and the decoder run
    # by strips of rows (model.by_rows), and the head computes the stem's full-resolution map again
    # from the image: every strip must read the rows its kernels reach (halo), dilated by the zoom,
    # and land where the one pass with gradients (training's) has it; odd sizes, so that the last
    # strip is short.
    import model as model_module
    torch.manual_seed(0)
    ref = 16 if D == 2 else 8
    net = RATSeg(dim=16, depth=2, heads=2, patch=4, spatial_dims=D, ref_size=ref).eval()
    size = [math.ceil(ref * zoom) + 3, math.ceil(ref * zoom) + 1] + [ref] * (D - 2)
    x = torch.rand(1, 3, *size)
    whole = net([x]).detach()
    monkeypatch.setattr(model_module, "STRIP_PIXELS", 3 * math.prod(size[1:]))
    with torch.no_grad():
        strips = net([x])
    assert torch.allclose(strips, whole, atol=1e-5), (strips - whole).abs().max()


@pytest.mark.parametrize("D, s, d", [(1, 2, 1), (2, 2, 1), (2, 4, 2), (2, 2, 3), (3, 2, 2), (2, (2, 4), (1, 3))])
def test_conv_of_an_upsampled_map_at_its_own_resolution_is_the_conv_of_the_concatenation(D, s, d):
    # A U-Net stage's low-resolution map y is convolved at its own resolution (a transposed conv
    # of stride s) beside its skip: the same output and gradients, for both maps and the weight,
    # as the conv of the skip concatenated after y upsampled (nearest) by s, at dilation d
    # (the zoom d, with d below, at and above s; anisotropic in the last case).
    from model import conv_gelu
    torch.manual_seed(0)
    s, d = [s] * D if isinstance(s, int) else s, [d] * D if isinstance(d, int) else d
    conv = getattr(torch.nn, f"Conv{D}d")(7, 4, 3).double()       # double: the norm amplifies rounding
    low = torch.randn(2, 5, *(5, 3, 2)[:D], dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 2, *[n * f for n, f in zip(low.shape[2:], s)], dtype=torch.float64, requires_grad=True)
    zoom = [float(z) for z in d]
    outs, grads = [], []
    for out in (conv_gelu(conv, skip, zoom, up=(low, s)),
                conv_gelu(conv, torch.cat([F.interpolate(low, scale_factor=s, mode="nearest"), skip], dim=1), zoom)):
        outs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [low, skip, conv.weight, conv.bias]))
    assert outs[0].shape == skip.shape[:1] + (4,) + skip.shape[2:]
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-8)


def test_upsampled_kernel_is_built_on_the_weights_device():
    # On a GPU the tap masks must live beside the weight: no op may mix devices. A weight on the
    # meta device stands in for a CUDA one, and a dispatch mode checks every op's tensors.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from model import upsampled_kernel

    class OneDevice(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            devices = {a.device for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
            assert len(devices) <= 1, (func, devices)
            return func(*args, **(kwargs or {}))

    with OneDevice():
        kernel = upsampled_kernel(torch.empty(4, 5, 3, 3, device="meta"), (2, 2), (1, 1))
    assert kernel.shape == (5, 4, 4, 4) and kernel.device.type == "meta"


def test_unet_baseline_has_similar_size():
    kw = dict(dim=64, depth=4, heads=4)
    rat, unet = build_seg_model("rat", **kw), build_seg_model("unet", **kw)
    assert isinstance(unet, UNet)
    assert 0.7 < num_params(unet) / num_params(rat) < 1.3
    check_forward_backward(unet, [torch.rand(1, 3, 45, 37)])


@pytest.mark.slow
def test_fcos_with_rat_backbone_overfits_a_tiny_batch():
    torch.manual_seed(0)
    det = build_detector("rat", num_classes=3, image_size=64, depth=3, **TINY).train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 30, 40]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 20, 60, 50], [30, 5, 50, 25]]), "labels": torch.tensor([2, 3])}]
    opt = torch.optim.AdamW(det.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = sum(det(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_cnn_detector_baseline_matches_rats_parameter_count_and_trains():
    from model import build_detector, num_params
    kw = dict(dim=32, depth=2, heads=2, patch=4, strides=[2, 2])
    rat, cnn = build_detector("rat", 3, 128, **kw), build_detector("cnn", 3, 128, **kw)
    assert abs(num_params(cnn) - num_params(rat)) < 0.15 * num_params(rat)
    losses = cnn([torch.rand(3, 128, 128)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1])}])
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in cnn.backbone.parameters())
