"""eval.py review fixes: --cache-dir, --ignore-spacing leaves the token grid alone, the default
checkpoint, background detections, original masks kept out of the loader."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import eval as ev
import model as model_module
import rose
import sga
from data import seg_collate
from model import RATSeg
from conftest import TEST, darkness_model, fake_checkpoint, run_eval, write_isic_tree

SEG_ARCH = dict(task="seg", image_size=32, dim=16, patch=2, num_classes=1)


def isic_checkpoint(tmp_path, name="ckpt.pt", **extra):
    return fake_checkpoint(tmp_path / name, **SEG_ARCH, data="isic", data_dir=str(tmp_path / "isic"), **extra)


# ------------------------------------------------------------------ --cache-dir (item 2)

def test_eval_caches_isic_where_training_did_or_in_its_own_cache_dir(tmp_path, monkeypatch):
    # A dataset folder that cannot hold the cache: a file named .cache is in the way (the tests
    # run as root, whom a read-only chmod would not stop).
    write_isic_tree(tmp_path / "isic")
    (tmp_path / "isic" / ".cache").write_text("in the way")
    monkeypatch.setattr(ev, "build_eval_model", lambda *a: darkness_model)
    flags = ["--resolutions", "24", "--samples", "0"]
    with pytest.raises(ValueError, match=r"isic/\.cache/24x24: cannot write the decoded-image cache.*--cache-dir"):
        run_eval(isic_checkpoint(tmp_path), tmp_path / "plain", *flags)
    # the training run's --cache-dir is the default...
    trained = isic_checkpoint(tmp_path, "trained.pt", cache_dir=str(tmp_path / "train_cache"))
    assert run_eval(trained, tmp_path / "a", *flags)["rows"][0]["images"] == len(TEST)
    assert len(os.listdir(tmp_path / "train_cache" / "24x24")) == 2 * len(TEST)  # image and mask
    # ...and eval.py's own flag overrides it
    run_eval(trained, tmp_path / "b", *flags, "--cache-dir", str(tmp_path / "own"))
    assert len(os.listdir(tmp_path / "own" / "24x24")) == 2 * len(TEST)


# ------------------------------------------------------------------ --ignore-spacing (item 3)

TRAINING_SPACINGS = ev.training_spacings({"image_size": 32, "scales": [1.0, 0.5]})


def tiny_rat(pe):
    torch.manual_seed(0)
    return RATSeg(dim=16, depth=2, heads=2, patch=2, pe=pe, ref_size=32).eval()


def pyramid(size):
    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    return [image, F.interpolate(image, scale_factor=0.5, mode="bilinear", antialias=True)]


@torch.no_grad()
def test_ignore_spacing_changes_nothing_without_a_position_encoding():
    model, levels = tiny_rat("none"), pyramid(64)  # twice the training size
    assert torch.equal(model(levels), model(levels, TRAINING_SPACINGS))


@torch.no_grad()
def test_ignore_spacing_changes_only_the_positions(monkeypatch):
    model, levels = tiny_rat("rose"), pyramid(64)
    told = model.backbone(levels, TRAINING_SPACINGS)
    # the physical grid still zooms: at 2x the deep tokens sit on the training grid
    assert [grid for _, grid, _, _ in told[-1]] == [grid for _, grid, _, _ in model.backbone(pyramid(32))[-1]]
    assert not torch.equal(model(levels), model(levels, TRAINING_SPACINGS))  # RoSE sees the spacing...
    blind = lambda grid, spacing, pe: rose.positions(grid, [1.0] * len(grid), pe)
    monkeypatch.setattr(model_module, "positions", blind)
    monkeypatch.setattr(sga, "positions", blind)
    assert torch.equal(model(levels), model(levels, TRAINING_SPACINGS))  # ...and nothing else does


@torch.no_grad()
def test_fractional_zoom_whose_kernel_is_whole_runs():
    # 80 px on a 32 px model: f = 2.5, the 4 px stem kernel zooms to exactly 10 px; once
    # taken for an integer zoom, avg_pool2d(kernel 2.5) raised a TypeError
    assert tiny_rat("rose")(pyramid(80)).shape == (2, 1, 80, 80)


# ------------------------------------------------------------------ default checkpoint (item 8)

def no_detections(images):
    return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
            for _ in images]


def test_default_checkpoint_is_the_run_that_trained_last(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seg, det = tmp_path / "runs" / "seg", tmp_path / "runs" / "det"
    for run in (seg, det):
        run.mkdir(parents=True)
    fake_checkpoint(seg / "ckpt_best.pt", **SEG_ARCH)
    fake_checkpoint(det / "ckpt_best.pt", task="det", image_size=64, dim=32, patch=4, strides=[2, 2], num_classes=3)
    # seg improved long ago, det more recently; but seg kept training after det stopped
    for path, when in [(seg / "ckpt_best.pt", 1000), (det / "ckpt_best.pt", 2000), (det / "ckpt_last.pt", 2000),
                       (det / "metrics.jsonl", 2000), (seg / "ckpt_last.pt", 3000), (seg / "metrics.jsonl", 3000)]:
        path.touch()
        os.utime(path, (when, when))
    monkeypatch.setattr(ev, "build_eval_model", lambda train_args, *a: darkness_model
                        if train_args["task"] == "seg" else no_detections)
    flags = ["--workers", "0", "--limit", "2", "--samples", "0"]
    for task, extra in [("seg", []), ("det", ["--task", "det"])]:
        resolution = SEG_ARCH["image_size"] if task == "seg" else 64
        ev.main(ev.get_args_parser().parse_args(["--resolutions", str(resolution), *flags, *extra]))
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(f"evaluating {os.path.join('runs', task, 'ckpt_best.pt')}: the {task} run"), first
        assert (tmp_path / "runs" / task / "eval" / "results.json").exists()


# ------------------------------------------------------------------ background detections (item 9)

def test_background_detections_are_not_written_as_a_category():
    det = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0], [0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.9, 0.8]),
           "labels": torch.tensor([2, 0])}  # label 0: FCOS's background class
    coco = SimpleNamespace(source="coco", cat_ids=[5, 9], num_classes=2)
    entries = ev.detections_json([det], [{"image_id": 42, "orig_size": (50, 50)}], coco, 50)
    assert [e["category_id"] for e in entries] == [9]  # not also cat_ids[-1] for label 0


# ------------------------------------------------------------------ original masks (item 11)

def test_eval_loader_carries_indices_not_original_masks(tmp_path):
    write_isic_tree(tmp_path / "isic")
    train_args = dict(SEG_ARCH, scales=[1.0, 0.5], data="isic", data_dir=str(tmp_path / "isic"))
    dataset = ev.build_eval_dataset(train_args, ev.get_args_parser().parse_args(["--resolutions", "32"]), 32)
    levels, masks = next(iter(DataLoader(dataset, batch_size=3, collate_fn=seg_collate)))
    assert levels[0].shape == (3, 3, 32, 32) and torch.equal(masks, torch.arange(3))
    # eval_seg reads the truths in the main process, at their original size
    assert [tuple(m.shape) for m in ev.read_original_masks(dataset, masks.tolist())] == \
        [(1, h, w) for w, h, *_ in TEST[:3]]
