"""Resolution awareness by construction: with ref_size, the first grouping stride follows the
input's resolution, so every later block sees the token grid (and physical spacing) of training."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from model import build_seg_model
from sga import resize_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


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


def test_deep_tokens_keep_the_training_grid_at_any_resolution():
    fixed, physical = rat(None), rat(64)
    for size in (32, 48, 64, 128, 256):
        assert grids(physical, size) == [(8, 8), (4, 4), (2, 2), (2, 2)], size
    assert grids(fixed, 256) == [(32, 32), (16, 16), (8, 8), (8, 8)]   # without: 16x the tokens


def test_at_the_training_size_nothing_changes():
    levels = [torch.rand(2, 3, 64, 64), torch.rand(2, 3, 32, 32)]
    with torch.no_grad():
        assert torch.equal(rat(None)(levels), rat(64)(levels))


def test_train_builds_the_physical_grid_by_default():
    import train
    def built(*flags):
        args = train.fill_defaults(train.get_args_parser().parse_args(["--dim", "16", "--heads", "2", *flags]))
        args.num_classes = 1
        return train.build_model(args)
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
    model = train.build_model(args)
    saved = {k: v for k, v in vars(args).items() if k not in ("token_grid", "head")}
    torch.save({"model": model.state_dict(), "args": saved}, tmp_path / "old.pt")
    train_args, state = ev.load_run(str(tmp_path / "old.pt"), "seg")
    rebuilt = ev.build_eval_model(train_args, state, 64, torch.device("cpu"), "old.pt")
    assert rebuilt.backbone.ref_size is None and rebuilt.head == "linear"
    x = [torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32)]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


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


def test_detection_resumes_a_checkpoint_from_before_the_seg_flags(tmp_path):
    # --token-grid and --head are seg RAT's: a det checkpoint written before they existed
    # must resume, not be refused as "a different model".
    common = [sys.executable, "train.py", "--task", "det", "--image-size", "64", "--dim", "32", "--depth", "2",
              "--heads", "2", "--train-size", "4", "--val-size", "2", "--batch-size", "4", "--workers", "0",
              "--out", str(tmp_path)]
    first = subprocess.run(common + ["--epochs", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt_last.pt", weights_only=True)
    for k in ("token_grid", "head"):
        del ckpt["args"][k]
    torch.save(ckpt, tmp_path / "ckpt_last.pt")
    again = subprocess.run(common + ["--epochs", "2"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]


def test_eval_token_grid_override_changes_only_off_the_training_size(tmp_path):
    # One tiny checkpoint, evaluated with its physical grid and with the pixel grid forced:
    # identical at the training size, different at 4x (where the grids differ).
    run = subprocess.run([sys.executable, "train.py", "--image-size", "32", "--dim", "16", "--depth", "2", "--heads",
                          "2", "--epochs", "1", "--train-size", "16", "--val-size", "4", "--batch-size", "8",
                          "--workers", "0", "--out", str(tmp_path / "run")], cwd=ROOT, env=ENV, capture_output=True,
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
    assert rows["physical"][128]["specificity"] != rows["pixel"][128]["specificity"]


@pytest.mark.parametrize("f", [2, 4])
def test_zoomed_stem_is_the_resampled_kernel_at_linear_cost(f):
    # box filter + dilated trained kernel (what runs) == the area-resampled kernel (what it means)
    from model import pad_to_multiple
    torch.manual_seed(0)
    rat = build_seg_model("rat", dim=16, depth=4, heads=2, patch=2, ref_size=32).backbone
    x = torch.randn(2, 3, 32 * f + 3, 32 * f)   # a size the patch does not divide, too
    K = rat.stem.kernel_size[0] * f
    lo = (K - 2) // 2
    padded = F.pad(pad_to_multiple(x, 2), [lo, K - 2 - lo] * 2)
    expected = F.conv2d(padded, resize_kernel(rat.stem.weight, K), rat.stem.bias, stride=2)
    assert torch.allclose(rat.stem_tokens(x, f), expected, atol=1e-5)
