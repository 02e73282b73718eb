"""Resolution awareness by construction: with ref_size, the first grouping stride follows the
input's resolution, so every later block sees the token grid (and physical spacing) of training."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ENV, ROOT
from model import build_model, build_seg_model
from sga import resize_kernel


@pytest.mark.parametrize("size", [8, 2, 12])
def test_resized_kernel_equals_resampling_the_input(size):
    torch.manual_seed(0)
    w, x = torch.randn(5, 5, 4, 4), torch.randn(2, 5, 48, 48)
    if size % 4 == 0:   # finer input: average-pool it by the factor, then the trained kernel
        ref = F.conv2d(F.avg_pool2d(x, size // 4), w, stride=4)
    elif 4 % size == 0:   # coarser input: repeat each token, then the trained kernel
        f = 4 // size
        ref = F.conv2d(x.repeat_interleave(f, -1).repeat_interleave(f, -2), w, stride=4)
    else:   # a fractional factor (3x) has no exact equivalent: the response to a constant is kept
        x = torch.ones_like(x)
        ref = F.conv2d(torch.ones(2, 5, 4, 4), w, stride=4).mean() * torch.ones(2, 5, 4, 4)
    out = F.conv2d(x, resize_kernel(w, size), stride=size)
    assert torch.allclose(out, ref, atol=1e-4)


def rat(ref_size, **kw):
    torch.manual_seed(0)
    model = build_seg_model("rat", dim=16, depth=4, heads=2, patch=2, strides=[4, 2, 2, 1], **kw)
    model.backbone.ref_size = ref_size
    return model.eval()


def grids(model, size):
    levels = [torch.rand(1, 3, size, size), torch.rand(1, 3, size // 2, size // 2)]
    with torch.no_grad():
        stages = model.backbone(levels)
        assert model(levels).shape == (1, 1, size, size)
    return [stage[0][1] for stage in stages[1:]]   # finest level, every block


@pytest.mark.slow
def test_deep_tokens_keep_the_training_grid_at_any_resolution():
    fixed, physical = rat(None), rat(64)
    for size in (32, 48, 64, 128, 256):
        assert grids(physical, size) == [(8, 8), (4, 4), (2, 2), (2, 2)], size
    assert grids(fixed, 256) == [(32, 32), (16, 16), (8, 8), (8, 8)]   # without: 16x the tokens


def test_at_the_training_size_nothing_changes():
    levels = [torch.rand(2, 3, 64, 64), torch.rand(2, 3, 32, 32)]
    with torch.no_grad():
        assert torch.equal(rat(None)(levels), rat(64)(levels))


def test_cell_patterns_keep_their_physical_size():
    """Each stem token predicts a pattern for its cell of P x P training pixels. At 2x the
    same cell is 4 x 4 pixels: the pattern must cover it, not shrink into 2 x 2 pixels and
    repeat at the token period, which is detail that is not in the image."""
    model = rat(16, stem="patch", head="refine")
    with torch.no_grad():
        model.to_pixels.weight.zero_()
        model.to_pixels.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))   # cell pattern [[4, 0], [0, 0]]
    def logits(size):   # the refine head starts at zero: the output is the cells' logits
        with torch.no_grad():
            return model([torch.rand(1, 3, size, size), torch.rand(1, 3, size // 2, size // 2)])[0, 0]
    assert torch.equal(logits(16), torch.tensor([[4.0, 0.0], [0.0, 0.0]]).repeat(8, 8))   # as trained
    at2x = logits(32)
    assert torch.allclose(at2x[1:-1, 1:-1], torch.tensor(1.0))   # inside: 4 overlapping cells, their mean
    # the image's corner pixel lies in the first token's patch alone
    assert torch.equal(at2x[:2, :2], torch.tensor([[4.0, 2.0], [2.0, 1.0]]))


@pytest.mark.parametrize("D,P,zoom", [(1, 2, 3.0), (2, 2, 1.0), (2, 2, 1.5), (2, 4, 2.0), (2, 2, 0.5), (3, 2, 2.0),
                                      (2, 2, (2.0, 1.0)), (2, 4, (1.5, 3.0)), (3, 2, (1.0, 2.0, 1.5))])
def test_cells_to_pixels_is_the_overlap_average_of_upsampled_patterns(D, P, zoom):
    # Oracle: every token writes its pattern, nearest-upsampled to Q_d = round(P f_d) pixels
    # along each dim and centred on its cell, into an accumulator; each pixel is the mean of
    # what it got. A per-axis zoom is a native image of another aspect than training.
    import itertools
    from model import cells_to_pixels
    torch.manual_seed(0)
    grid = (3, 4, 2)[:D]
    y = torch.randn(2, 3, *grid, *[P] * D)
    Q = [max(P, round(P * z)) for z in (zoom if isinstance(zoom, tuple) else (zoom,) * D)]
    lo = [(q - P) // 2 for q in Q]
    total, count = torch.zeros(2, 3, *[g * P for g in grid]), torch.zeros([g * P for g in grid])
    for t in itertools.product(*[range(g) for g in grid]):
        for o in itertools.product(*[range(q) for q in Q]):
            p = [ti * P - l + oi for ti, l, oi in zip(t, lo, o)]
            if all(0 <= pi < g * P for pi, g in zip(p, grid)):
                total[(..., *p)] += y[(slice(None), slice(None), *t, *[oi * P // q for oi, q in zip(o, Q)])]
                count[tuple(p)] += 1
    assert torch.allclose(cells_to_pixels(y, P, zoom), total / count, atol=1e-5)


def test_train_builds_the_physical_grid_by_default():
    import train
    def built(*flags):
        args = train.fill_defaults(train.get_args_parser().parse_args(["--dim", "16", "--heads", "2", *flags]))
        args.num_classes = 1
        return build_model(vars(args))
    assert built().backbone.ref_size == 64 and built("--image-size", "96").backbone.ref_size == 96
    assert built("--token-grid", "pixel").backbone.ref_size is None
    assert built().head == "conv" and built().backbone.conv_stem is not None
    assert built("--head", "linear").head == "linear"
    def rounds(*flags):
        return {sga.iters for sga in built(*flags).backbone.sgas}
    assert rounds() == {1} and rounds("--sga-iters", "3") == {3}
    det = train.fill_defaults(train.get_args_parser().parse_args(["--task", "det", "--dim", "32", "--heads", "2"]))
    det.num_classes = 3
    assert {sga.iters for sga in build_model(vars(det)).backbone.body.sgas} == {3}


def test_checkpoints_from_before_the_flags_load_as_they_were_trained(tmp_path):
    # Checkpoints written before --token-grid, --head, --stem and --sga-iters existed hold none in their
    # args: eval.py must rebuild the pixel grid, the linear head, the patch stem and the three rounds of
    # grouping they were trained with.
    import eval as ev
    import train
    args = train.fill_defaults(train.get_args_parser().parse_args(
        ["--dim", "16", "--heads", "2", "--token-grid", "pixel", "--head", "linear", "--stem", "patch",
         "--sga-iters", "3"]))
    args.num_classes = 1
    model = build_model(vars(args))
    saved = {k: v for k, v in vars(args).items() if k not in ("token_grid", "head", "stem", "sga_iters")}
    torch.save({"model": model.state_dict(), "args": saved}, tmp_path / "old.pt")
    train_args, state = ev.load_run(str(tmp_path / "old.pt"), "seg")
    rebuilt = ev.build_eval_model(train_args, state, 64, torch.device("cpu"), "old.pt")
    assert rebuilt.backbone.ref_size is None and rebuilt.head == "linear" and rebuilt.backbone.conv_stem is None
    assert {sga.iters for sga in rebuilt.backbone.sgas} == {3}
    x = [torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32)]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


@pytest.mark.slow
@pytest.mark.parametrize("change", [["--token-grid", "pixel"], ["--head", "linear"]])
def test_resume_refuses_another_token_grid_or_head(tmp_path, change):
    # The same weights load into either grid (and nearly either head): resuming must not
    # silently go on training another model than the one in the run folder.
    common = [sys.executable, "train.py", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads", "2",
              "--train-size", "8", "--val-size", "2", "--batch-size", "8", "--workers", "0", "--out", str(tmp_path)]
    first = subprocess.run(common + ["--epochs", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(common + ["--epochs", "2", *change], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode != 0 and "different model" in again.stderr, again.stderr[-2000:]
    assert change[0][2:].replace("-", "_") in again.stderr


@pytest.mark.slow
def test_detection_resumes_a_checkpoint_from_before_the_flags_on_its_own_grid(tmp_path):
    # --head is seg RAT's: a det checkpoint written before the flags existed resumes whatever
    # --head says. It was trained on the pixel grid, so it resumes with --token-grid pixel, and
    # the physical default (another detector off the training size) is refused by name.
    common = [sys.executable, "train.py", "--task", "det", "--image-size", "64", "--dim", "32", "--depth", "2",
              "--heads", "2", "--train-size", "4", "--val-size", "2", "--batch-size", "4", "--workers", "0",
              "--out", str(tmp_path)]
    first = subprocess.run(common + ["--epochs", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt_last.pt", weights_only=True)
    for k in ("token_grid", "head"):
        del ckpt["args"][k]
    torch.save(ckpt, tmp_path / "ckpt_last.pt")
    again = subprocess.run(common + ["--epochs", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "token_grid" in again.stderr and "head" not in again.stderr, again.stderr[-2000:]
    again = subprocess.run(common + ["--epochs", "1", "--token-grid", "pixel", "--head", "linear"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
def test_detector_keeps_the_training_grid_and_box_units_at_any_size():
    # The physical grid for FCOS: at 2x the training size the five maps keep the training grid
    # and the anchors (FCOS's unit for box offsets) double, so that a learned offset keeps its
    # physical length: a box at the same physical place gets the same regression targets from
    # the same anchors. The pixel grid keeps both in pixels.
    import train
    from model import set_detector_size
    def detector(*flags):
        args = train.fill_defaults(train.get_args_parser().parse_args(
            ["--task", "det", "--image-size", "32", "--dim", "32", "--heads", "2", *flags]))
        args.num_classes = 3
        return build_model(vars(args)).eval()
    def run(det, size):   # -> map sizes, anchor sizes, anchors [N, 4] on the padded image
        set_detector_size(det, size)
        with torch.no_grad():
            images, _ = det.transform([torch.rand(3, size, size)])
            feats = list(det.backbone(images.tensors).values())
            anchors = det.anchor_generator(images, feats)[0]
        return [tuple(f.shape[2:]) for f in feats], [s[0] for s in det.anchor_generator.sizes], anchors
    assert detector("--image-size", "128").backbone.strides == [4, 8, 16, 32, 64]   # at 128 px: five levels
    physical, pixel = detector("--image-size", "64"), detector("--image-size", "64", "--token-grid", "pixel")
    # at 64 px strides 4 to 32 (a stride-64 map would be one cell): the batch is padded to 64 px
    grid = [(16, 16), (8, 8), (4, 4), (2, 2)]
    maps1, sizes1, anchors1 = run(physical, 64)
    assert (maps1, sizes1) == run(pixel, 64)[:2] == (grid, [4, 8, 16, 32])
    maps2, sizes2, anchors2 = run(physical, 128)
    assert (maps2, sizes2) == (grid, [8, 16, 32, 64])
    assert run(pixel, 128)[:2] == ([(32, 32), (16, 16), (8, 8), (4, 4)], [4, 8, 16, 32])
    assert torch.equal(anchors2, 2 * anchors1)          # every anchor: twice the centre, twice the size
    box = torch.tensor([[5.0, 7.0, 21.0, 30.0]])
    targets1 = physical.box_coder.encode(anchors1, box.expand(len(anchors1), 4))
    targets2 = physical.box_coder.encode(anchors2, 2 * box.expand(len(anchors2), 4))
    assert torch.allclose(targets1, targets2)
    with torch.no_grad():
        boxes = physical([torch.rand(3, 128, 128)])[0]["boxes"]   # the whole detector runs at 2x
    assert boxes.shape[1] == 4 and bool((boxes <= 128).all())
    # 3x: strides 12 to 96 px, anchors spaced by them on the padded batch
    set_detector_size(physical, 192)
    with torch.no_grad():
        images, _ = physical.transform([torch.rand(3, 192, 192)])
        feats = list(physical.backbone(images.tensors).values())
        anchors = physical.anchor_generator(images, feats)[0]
    assert tuple(images.image_sizes[0]) == (192, 192)
    assert [f.shape[-1] * s for f, s in zip(feats, (12, 24, 48, 96))] == [images.tensors.shape[-1]] * 4
    for feat, stride in zip(feats, (12, 24, 48, 96)):
        centres = (anchors[:feat.shape[-1], 0] + anchors[:feat.shape[-1], 2]) / 2   # the first row of this map
        anchors = anchors[feat.shape[-2] * feat.shape[-1]:]
        assert torch.allclose(centres.diff(), torch.tensor(float(stride))), (stride, centres)


@pytest.mark.slow
@pytest.mark.parametrize("size,exact", [((24, 24), (32, 32)), ((48, 48), (64, 64)), ((40, 40), (32, 32)),
                                        ((56, 32), (64, 32))])
def test_detector_resamples_the_image_to_the_nearest_integer_zoom(size, exact):
    # Trained at 32 px. Only integer zooms are exact on the physical grid: at 1.5x (48 px) the
    # image goes up to 2x, at 1.25x (40 px) down to 1x, at 1.75x on one axis up to 2x on that one,
    # and at 0.75x (a kernel cannot shrink below a pixel) up to the training pitch. The backbone
    # sees that size, the anchors zoom with it, and the boxes come back in the image's pixels:
    # the same boxes as resizing by hand.
    import train
    from model import set_detector_size
    args = train.fill_defaults(train.get_args_parser().parse_args(
        ["--task", "det", "--image-size", "32", "--dim", "32", "--heads", "2"]))
    args.num_classes = 3
    det = build_model(vars(args)).eval()
    det.score_thresh = 0.0
    torch.manual_seed(0)
    image = torch.rand(3, *size)
    set_detector_size(det, size)
    seen = []
    det.backbone.body.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0][0].shape[2:])))
    with torch.no_grad():
        boxes, sizes = det([image])[0]["boxes"], det.anchor_generator.sizes
        assert seen == [exact] and sizes[0] == (4.0 * (exact[0] * exact[1]) ** 0.5 / 32,)
        set_detector_size(det, exact)   # the same by hand: resized, the boxes scaled back
        resized = F.interpolate(image[None], size=exact, mode="bilinear", align_corners=False)[0]
        by_hand = det([resized])[0]["boxes"] * torch.tensor([size[1] / exact[1], size[0] / exact[0]] * 2)
    assert len(boxes) > 0 and torch.allclose(boxes, by_hand, atol=1e-4)


@pytest.mark.slow
def test_eval_token_grid_override_changes_only_off_the_training_size(tmp_path):
    # One tiny checkpoint, evaluated with its physical grid and with the pixel grid forced:
    # identical at the training size, different at 4x (where the grids differ).
    run = subprocess.run([sys.executable, "train.py", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads",
                          "2", "--epochs", "1", "--train-size", "16", "--val-size", "4", "--batch-size", "8",
                          "--stem", "patch", "--head", "refine", "--workers", "0", "--out", str(tmp_path / "run")],
                         cwd=ROOT, env=ENV,
                         capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {}
    for grid in ("physical", "pixel"):
        out = tmp_path / grid
        ev = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "run" / "ckpt_best.pt"),
                             "--resolutions", "32,128", "--limit", "4", "--samples", "0", "--workers", "0",
                             "--token-grid", grid, "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
        assert ev.returncode == 0, ev.stderr[-2000:]
        result = json.loads((out / "results.json").read_text())
        assert result["token_grid"] == grid
        rows[grid] = {r["resolution"]: r for r in result["rows"]}
    assert rows["physical"][32]["dice"] == rows["pixel"][32]["dice"]
    scores = ("dice", "iou", "sensitivity", "specificity")   # a model that predicts one class everywhere scores alike
    assert [rows["physical"][128][k] for k in scores] != [rows["pixel"][128][k] for k in scores]


@pytest.mark.parametrize("f", [2, 4])
def test_zoomed_stem_is_the_resampled_kernel_at_linear_cost(f):
    # box filter + dilated trained kernel (what runs) == the area-resampled kernel (what it means)
    from model import pad_to_multiple
    torch.manual_seed(0)
    rat = build_seg_model("rat", dim=16, depth=4, heads=2, patch=2, ref_size=32, stem="patch", head="refine").backbone
    x = torch.randn(2, 3, 32 * f + 3, 32 * f)   # a size the patch does not divide, too
    K = rat.stem.kernel_size[0] * f
    lo = (K - 2) // 2
    padded = F.pad(pad_to_multiple(x, 2), [lo, K - 2 - lo] * 2)
    expected = F.conv2d(padded, resize_kernel(rat.stem.weight, K), rat.stem.bias, stride=2)
    assert torch.allclose(rat.stem_tokens(x, f), expected, atol=1e-5)


def upsample(t, f):
    """Nearest upsampling by an integer f along every spatial axis of [B, C, *size]."""
    for axis in range(2, t.dim()):
        t = t.repeat_interleave(f, axis)
    return t


@pytest.mark.parametrize("D,f", [(1, 3), (2, 2), (2, 4), (3, 2)])
def test_conv_stem_spans_the_same_physical_extent_at_f_times_the_resolution(D, f):
    """The conv stem's 3x3 convolutions, dilated by f, see at f times the resolution what they
    saw in training: on an image upsampled f times the full-resolution map is exactly the
    upsampled map, and the half-resolution one (after the stride-2 conv, on a grid f times
    denser than training's) holds training's map at every f-th position."""
    from model import ConvStem
    torch.manual_seed(0)
    stem = ConvStem(3, (4, 8), D)
    x = torch.randn(2, 3, *(6, 8, 4)[:D])
    every_f = (...,) + (slice(None, None, f),) * D
    with torch.no_grad():
        full, half = stem(x, 1)
        full_f, half_f = stem(upsample(x, f), f)
        assert torch.allclose(full_f, upsample(full, f), atol=1e-5)
        assert half_f.shape[2:] == tuple(f * n for n in half.shape[2:])
        assert torch.allclose(half_f[every_f], half, atol=1e-5)
        full_1, half_1 = stem(upsample(x, f), 1)              # undilated: 1/f of the extent it learned
        assert not torch.allclose(half_1[every_f], half, atol=1e-2)


@pytest.mark.parametrize("zoom,undilated", [(1.5, True), (1.99, True), (2.5, False)])
def test_conv_stem_never_dilates_beyond_the_zoom(zoom, undilated):
    """Between integer zooms a 3x3 kernel cannot span exactly the extent it learned; it must
    stay short of it (dilation floor(f)): rounding 1.5 up to 2 spanned 5 pixels where 4.5 were
    learned, and lost Dice against resizing (RESULTS.md, fractional zooms)."""
    from model import ConvStem
    torch.manual_seed(0)
    stem = ConvStem(3, (4, 8), 2)
    x = torch.randn(1, 3, 12, 10)
    with torch.no_grad():
        full, full_1, full_2 = stem(x, zoom)[0], stem(x, 1)[0], stem(x, 2)[0]
    assert torch.allclose(full, full_1 if undilated else full_2)


@pytest.mark.parametrize("D,f", [(1, 3), (2, 2), (2, 3)])
def test_full_resolution_stem_with_group_norm_is_exact_at_f_times_the_resolution(D, f):
    """Detection's stem: no stride, so on an image upsampled f times both maps, GroupNorm's
    statistics included, are exactly the upsampled maps of training."""
    from model import FullResStem
    torch.manual_seed(0)
    stem = FullResStem(3, 16, D)
    x = torch.randn(2, 3, *(6, 8, 4)[:D])
    with torch.no_grad():
        for a, b in zip(stem(upsample(x, f), f), stem(x, 1)):
            assert torch.allclose(a, upsample(b, f), atol=1e-5)
        assert not torch.allclose(stem(upsample(x, f), 1)[1], upsample(stem(x, 1)[1], f), atol=1e-2)


@pytest.mark.parametrize("D", [2, 3])
def test_conv_head_keeps_its_physical_extent_and_the_image_size(D):
    # The conv head's layers are conv_gelu too: at f times the resolution the same shapes
    # relations hold (logits at the input's size) and the head's convs are dilated.
    from model import RATSeg, conv_gelu
    torch.manual_seed(0)
    conv = getattr(torch.nn, f"Conv{D}d")(5, 3, 3)
    x = torch.randn(1, 5, *[6] * D)
    with torch.no_grad():
        assert torch.allclose(conv_gelu(conv, upsample(x, 3), 3), upsample(conv_gelu(conv, x, 1), 3), atol=1e-5)
        model = RATSeg(dim=16, depth=2, heads=2, patch=4, spatial_dims=D, ref_size=16).eval()
        for size in (16, 32, 48, 40):
            assert model([torch.rand(1, 3, *[size] * D)]).shape[2:] == (size,) * D


def test_below_the_training_size_the_model_reads_the_image_at_the_training_pitch():
    # A coarser input has no detail to keep and a kernel cannot shrink below a pixel: the image
    # goes up to the training pitch and the logits come back, i.e. exactly the resize baseline.
    from model import RATSeg
    torch.manual_seed(0)
    model = RATSeg(dim=16, depth=2, heads=2, patch=4, ref_size=32).eval()
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        up = F.interpolate(x, size=(32, 32), mode="bilinear")      # zoom (0.5, 0.75): both axes go up
        expected = F.interpolate(model([up]), size=(16, 24), mode="bilinear")
        assert torch.allclose(model([x]), expected, atol=1e-6)
        wide = torch.rand(1, 3, 16, 64)                               # zoom (0.5, 2): only the first axis
        assert torch.allclose(model([wide]), F.interpolate(model([F.interpolate(wide, size=(32, 64), mode="bilinear")]),
                                                           size=(16, 64), mode="bilinear"), atol=1e-6)


def test_the_conv_head_needs_the_conv_stem():
    from model import RATSeg
    with pytest.raises(ValueError, match="needs --stem conv"):
        RATSeg(dim=16, depth=2, heads=2, stem="patch")
    assert RATSeg(dim=16, depth=2, heads=2, stem="patch", head="refine").backbone.conv_stem is None


# ------------------------------------------------------------------ anisotropic zoom (issue 24)
# Training squashes every image to ref x ref (field of view 1 per axis), so a native H x W image
# zooms by H / ref and W / ref: per axis. A volume of anisotropic voxels is the same case in 3D.
# An image stretched f times along one axis (nearest) must look, to every zoomed layer, like the
# unstretched image: stretched output (pixel stem), the original's tokens (stem), the original's
# groups (first grouping), the training grid (deep blocks). The model as a whole only
# approximates it, as at an isotropic zoom: its stem grid keeps one token per P native pixels.

def stretch(x, f, axis):
    """Nearest upsampling by an integer f along one spatial axis of [B, C, *size]."""
    return x.repeat_interleave(f, 2 + axis)


@pytest.mark.parametrize("D,size,deep", [(2, (64, 32), [(8, 8), (4, 4)]), (2, (32, 96), [(8, 8), (4, 4)]),
                                         (2, (48, 80), [(8, 8), (4, 4)]),
                                         (3, (32, 16, 48), [(4, 4, 4), (2, 2, 2)])])
def test_anisotropic_input_keeps_the_training_grid_and_spacing(D, size, deep):
    ref = 32 if D == 2 else 16
    torch.manual_seed(0)
    model = build_seg_model("rat", dim=16, depth=2, heads=2, patch=2, strides=[2, 2], spatial_dims=D,
                            ref_size=ref).eval()
    assert model.backbone.zoom(size) == tuple(n / ref for n in size)
    with torch.no_grad():
        trained = model.backbone([torch.rand(1, 3, *[ref] * D)])
        stages = model.backbone([torch.rand(1, 3, *size)])
        assert model([torch.rand(1, 3, *size)]).shape == (1, 1, *size)
    assert [s[0][1] for s in stages[1:]] == [s[0][1] for s in trained[1:]] == deep
    for native, train in zip(stages[1:], trained[1:]):   # the deep tokens' spacing is training's too
        assert native[0][2] == pytest.approx(train[0][2])


@pytest.mark.parametrize("D,axis,f", [(2, 0, 2), (2, 1, 3), (3, 1, 2), (3, 2, 3)])
def test_conv_stem_of_a_stretched_image_is_the_stretched_features(D, axis, f):
    from model import RAT
    torch.manual_seed(0)
    rat = RAT(dim=16, depth=2, heads=2, patch=2, spatial_dims=D, ref_size=6, stem="conv")
    x = torch.randn(2, 3, *[6] * D)
    zoom = rat.zoom(stretch(x, f, axis).shape[2:])
    assert zoom == tuple(f if d == axis else 1 for d in range(D))
    every_f = (...,) + tuple(slice(None, None, f if d == axis else 1) for d in range(D))
    with torch.no_grad():
        full, half = rat.conv_stem(x, 1)
        full_f, half_f = rat.conv_stem(stretch(x, f, axis), zoom)
        assert torch.allclose(full_f, stretch(full, f, axis), atol=1e-5)
        assert torch.allclose(half_f[every_f], half, atol=1e-5)


@pytest.mark.parametrize("D,P,axis,f", [(2, 2, 0, 3), (2, 4, 1, 3), (2, 2, 1, 5), (3, 2, 1, 3), (3, 2, 0, 3)])
def test_stem_of_a_stretched_image_holds_the_original_tokens_at_its_cell_centres(D, P, axis, f):
    # Stretched f times (odd) along one axis, the stem has f times more tokens there, one per P
    # native pixels; the middle one of every f sits at the centre of an original cell, and its
    # kernel, zoomed on that axis alone, sees what the original token saw.
    from model import RAT
    torch.manual_seed(0)
    rat = RAT(dim=16, depth=2, heads=2, patch=P, spatial_dims=D, ref_size=8 * P, stem="patch")
    x = torch.randn(2, 3, *[8 * P] * D)
    with torch.no_grad():
        original = rat.stem_tokens(x, rat.zoom(x.shape[2:]))
        b = stretch(x, f, axis)
        tokens = rat.stem_tokens(b, rat.zoom(b.shape[2:]))
    centres = tokens.index_select(2 + axis, torch.arange(f // 2, tokens.shape[2 + axis], f))
    assert torch.allclose(centres, original, atol=1e-5)


@pytest.mark.parametrize("f", [(2, 1), (1, 4), (3, 2), (1.5, 1), (0.5, 2.5), (0.3, 1), (15.625, 23.4375)])
def test_zoomed_stem_is_the_per_axis_resampled_kernel(f):
    # what runs (box sums per trained tap, then a 1x1 conv) == the area-resampled kernel (what it
    # means), for integer, fractional and shrinking zooms, per axis; the last is a 4000 x 6000
    # photo on a model trained at 256 px
    from model import pad_to_multiple
    torch.manual_seed(0)
    rat = build_seg_model("rat", dim=16, depth=4, heads=2, patch=2, ref_size=32, stem="patch", head="refine").backbone
    x = torch.randn(2, 3, 45, 38)
    K = [max(1, round(4 * z)) for z in f]
    lo = [(k - 2) // 2 for k in K]
    padded = F.pad(pad_to_multiple(x, 2), [lo[1], K[1] - 2 - lo[1], lo[0], K[0] - 2 - lo[0]])
    expected = F.conv2d(padded, resize_kernel(rat.stem.weight, K), rat.stem.bias, stride=2)
    assert torch.allclose(rat.stem_tokens(x, f), expected, atol=1e-5)


@pytest.mark.parametrize("D,axis,grid", [(2, 0, (6, 5)), (2, 1, (4, 7)), (3, 2, (4, 3, 5))])
def test_first_grouping_of_stretched_tokens_gives_the_original_groups(D, axis, grid):
    # The first grouping stride zooms per axis (RAT.block_strides): over tokens stretched 2x
    # along one axis, a stride twice as long there gives the original's groups, and unpooling
    # gives the stretched tokens back. Without a rotary position encoding (RoSE turns the
    # copies of a token by their own positions), this holds exactly.
    from model import RAT
    from sga import SGA
    torch.manual_seed(0)
    rat = RAT(dim=16, depth=2, heads=2, patch=2, strides=[2, 2], spatial_dims=D, ref_size=16)
    stride = rat.block_strides(tuple(32 if d == axis else 16 for d in range(D)))   # zoom 2 on that axis
    assert stride == [tuple(4 if d == axis else 2 for d in range(D)), 2]
    sga = SGA(16, 2, 2, D, pe="none")
    x = torch.randn(2, math.prod(grid), 16)
    big = tuple(2 * g if d == axis else g for d, g in enumerate(grid))
    xs = stretch(x.transpose(1, 2).reshape(2, 16, *grid), 2, axis).flatten(2).transpose(1, 2)
    spacing = (0.1,) * D
    with torch.no_grad():
        groups, go, so, A = sga(x, grid, spacing)
        groups_s, go_s, so_s, A_s = sga(xs, big, tuple(s / 2 if d == axis else s for d, s in enumerate(spacing)),
                                        stride[0])
        assert go_s == go and so_s == pytest.approx(so)
        assert torch.allclose(groups_s, groups, atol=1e-5)
        unpooled = sga.unpool(groups, A, grid).transpose(1, 2).reshape(2, 16, *grid)
        unpooled_s = sga.unpool(groups_s, A_s, big, stride[0]).transpose(1, 2).reshape(2, 16, *big)
        assert torch.allclose(unpooled_s, stretch(unpooled, 2, axis), atol=1e-5)


def test_detector_anchors_and_maps_follow_each_axis():
    # A 64 x 32 image on a detector trained at 32 px square: zoom (2, 1). The maps keep the
    # training grid, the anchors (FCOS's units for the box sides) are twice as tall as wide.
    from model import build_detector, set_detector_size
    torch.manual_seed(0)
    det = build_detector("rat", 3, 32, scales=(1.0, 0.5), dim=32, depth=2, heads=2, patch=4, strides=[2, 2],
                         ref_size=32).eval()
    set_detector_size(det, (64, 32))
    with torch.no_grad():
        images, _ = det.transform([torch.rand(3, 64, 32)])
        assert tuple(images.image_sizes[0]) == (64, 32)        # kept at its native size
        feats = list(det.backbone(images.tensors).values())
        anchors = det.anchor_generator(images, feats)[0]
        boxes = det([torch.rand(3, 64, 32)])[0]["boxes"]
    H, W = images.tensors.shape[2:]
    assert [tuple(f.shape[2:]) for f in feats] == [(H // (8 * s), W // (4 * s)) for s in (1, 2, 4)]  # 32 px: 3 levels
    first = anchors[:feats[0].shape[2] * feats[0].shape[3]]
    assert torch.equal(first[0], torch.tensor([-2.0, -4.0, 2.0, 4.0]))      # 4 wide, 8 tall, centred on (0, 0)
    assert torch.allclose((first[1] - first[0])[[0, 2]], torch.tensor(4.0))   # x stride 4 px
    assert bool((boxes[:, [0, 2]] <= 32).all() and (boxes[:, [1, 3]] <= 64).all())
