"""Resolution awareness by construction: with ref_size, the first grouping stride follows the
input's resolution, so every later block sees the token grid (and physical spacing) of training."""
import json
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


def rat(ref_size):
    torch.manual_seed(0)
    model = build_seg_model("rat", dim=16, depth=4, heads=2, patch=2, strides=[4, 2, 2, 1])
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
    model = rat(16)
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


@pytest.mark.parametrize("D,P,zoom", [(1, 2, 3.0), (2, 2, 1.0), (2, 2, 1.5), (2, 4, 2.0), (2, 2, 0.5), (3, 2, 2.0)])
def test_cells_to_pixels_is_the_overlap_average_of_upsampled_patterns(D, P, zoom):
    # Oracle: every token writes its pattern, nearest-upsampled to Q = round(P f) pixels per
    # dim and centred on its cell, into an accumulator; each pixel is the mean of what it got.
    import itertools
    from model import cells_to_pixels
    torch.manual_seed(0)
    grid = (3, 4, 2)[:D]
    y = torch.randn(2, 3, *grid, *[P] * D)
    Q = max(P, round(P * zoom))
    lo = (Q - P) // 2
    total, count = torch.zeros(2, 3, *[g * P for g in grid]), torch.zeros([g * P for g in grid])
    for t in itertools.product(*[range(g) for g in grid]):
        for o in itertools.product(range(Q), repeat=D):
            p = [ti * P - lo + oi for ti, oi in zip(t, o)]
            if all(0 <= pi < g * P for pi, g in zip(p, grid)):
                total[(..., *p)] += y[(slice(None), slice(None), *t, *[oi * P // Q for oi in o])]
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
    assert built().head == "refine" and built("--head", "linear").head == "linear"


def test_checkpoints_from_before_the_flags_load_as_they_were_trained(tmp_path):
    # Checkpoints written before --token-grid and --head existed hold neither in their args:
    # eval.py must rebuild the pixel grid and the linear head they were trained with.
    import eval as ev
    import train
    args = train.fill_defaults(train.get_args_parser().parse_args(
        ["--dim", "16", "--heads", "2", "--token-grid", "pixel", "--head", "linear"]))
    args.num_classes = 1
    model = build_model(vars(args))
    saved = {k: v for k, v in vars(args).items() if k not in ("token_grid", "head")}
    torch.save({"model": model.state_dict(), "args": saved}, tmp_path / "old.pt")
    train_args, state = ev.load_run(str(tmp_path / "old.pt"), "seg")
    rebuilt = ev.build_eval_model(train_args, state, 64, torch.device("cpu"), "old.pt")
    assert rebuilt.backbone.ref_size is None and rebuilt.head == "linear"
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
    # The physical grid for FCOS: at 2x the training size the feature maps keep the training
    # grid, and the anchors (FCOS's unit for box offsets) double, so that a learned offset
    # keeps its physical length. The pixel grid keeps both in pixels.
    import train
    from model import set_detector_size
    def detector(*flags):
        args = train.fill_defaults(train.get_args_parser().parse_args(
            ["--task", "det", "--image-size", "32", "--dim", "32", "--heads", "2", *flags]))
        args.num_classes = 3
        return build_model(vars(args)).eval()
    def maps(det, size):
        set_detector_size(det, size)
        with torch.no_grad():
            feats = det.backbone(torch.rand(1, 3, size, size))
        return [tuple(f.shape[2:]) for f in feats.values()], [s[0] for s in det.anchor_generator.sizes]
    physical, pixel = detector(), detector("--token-grid", "pixel")
    assert maps(physical, 32) == maps(pixel, 32) == ([(4, 4), (2, 2)], [8, 16])
    assert maps(physical, 64) == ([(4, 4), (2, 2)], [16, 32])
    assert maps(pixel, 64) == ([(8, 8), (4, 4)], [8, 16])
    with torch.no_grad():
        boxes = physical([torch.rand(3, 64, 64)])[0]["boxes"]   # the whole detector runs at 2x
    assert boxes.shape[1] == 4 and bool((boxes <= 64).all())
    # 1.5x: strides 12 and 24, which the usual padding to 32 px does not divide
    set_detector_size(physical, 48)
    with torch.no_grad():
        images, _ = physical.transform([torch.rand(3, 48, 48)])
        feats = list(physical.backbone(images.tensors).values())
        anchors = physical.anchor_generator(images, feats)[0]
    for feat, stride in zip(feats, (12, 24)):
        centres = (anchors[:feat.shape[-1], 0] + anchors[:feat.shape[-1], 2]) / 2   # the first row of this map
        anchors = anchors[feat.shape[-2] * feat.shape[-1]:]
        assert torch.allclose(centres.diff(), torch.tensor(float(stride))), (stride, centres)


@pytest.mark.slow
def test_eval_token_grid_override_changes_only_off_the_training_size(tmp_path):
    # One tiny checkpoint, evaluated with its physical grid and with the pixel grid forced:
    # identical at the training size, different at 4x (where the grids differ).
    run = subprocess.run([sys.executable, "train.py", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads",
                          "2", "--epochs", "1", "--train-size", "16", "--val-size", "4", "--batch-size", "8",
                          "--stem", "patch", "--workers", "0", "--out", str(tmp_path / "run")], cwd=ROOT, env=ENV,
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
    rat = build_seg_model("rat", dim=16, depth=4, heads=2, patch=2, ref_size=32, stem="patch").backbone
    x = torch.randn(2, 3, 32 * f + 3, 32 * f)   # a size the patch does not divide, too
    K = rat.stem.kernel_size[0] * f
    lo = (K - 2) // 2
    padded = F.pad(pad_to_multiple(x, 2), [lo, K - 2 - lo] * 2)
    expected = F.conv2d(padded, resize_kernel(rat.stem.weight, K), rat.stem.bias, stride=2)
    assert torch.allclose(rat.stem_tokens(x, f), expected, atol=1e-5)


@pytest.mark.parametrize("D,f", [(1, 3), (2, 2), (2, 4), (3, 2)])
def test_pixel_stem_spans_the_same_physical_extent_at_f_times_the_resolution(D, f):
    """The full-resolution convolutions of the conv stem, dilated by f, see at f times the
    resolution what they saw in training: on an image upsampled f times they give exactly the
    upsampled features (GroupNorm included)."""
    from model import PixelStem
    torch.manual_seed(0)
    stem = PixelStem(3, 8, 2, D)
    x = torch.randn(2, 3, *(6, 5, 4)[:D])
    up = lambda t: t.repeat_interleave(f, -1) if D == 1 else F.interpolate(t, scale_factor=f, mode="nearest")
    with torch.no_grad():
        assert torch.allclose(stem(up(x), zoom=f), up(stem(x)), atol=1e-5)
        assert not torch.allclose(stem(up(x)), up(stem(x)), atol=1e-2)   # undilated, it sees 1/f of the extent
