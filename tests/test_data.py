import json
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import synthetic
import train
from conftest import ENV, ROOT, write_isic
from metrics import seg_scores


def pool(x, k):
    """[H,W] or [H,W,3] numpy -> k x k average pooled numpy."""
    t = torch.from_numpy(np.asarray(x, np.float32))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    out = F.avg_pool2d(t, k)
    return out[0].numpy() if x.ndim == 2 else out.permute(1, 2, 0).numpy()


# --------------------------- scales ---------------------------------------------------

def test_parse_scales_and_level_sizes():
    assert data.parse_scales("1,0.5,0.25") == [1.0, 0.5, 0.25]
    for bad in ["", "1,,0.5", "1,a", "0.5,0.25", "1,0", "1,-0.5", "1,2", "1,0.25,0.5"]:
        with pytest.raises(ValueError, match="--scales"):
            data.parse_scales(bad)
    assert data.level_sizes((96, 64), [1, 0.5, 0.25]) == [(96, 64), (48, 32), (24, 16)]
    assert data.level_sizes(10, [1, 0.01]) == [(10, 10), (1, 1)]


# --------------------------- synthetic lesions ------------------------------------------

def test_lesion_render_is_deterministic_and_distinct():
    image, mask = synthetic.render_lesion(0, 7, (48, 40))
    assert image.shape == (48, 40, 3) and image.dtype == np.float32 and mask.shape == (48, 40) and mask.dtype == bool
    assert 0 <= image.min() and image.max() <= 1 and mask.any()
    again, mask_again = synthetic.render_lesion(0, 7, (48, 40))
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    assert not np.allclose(image, synthetic.render_lesion(0, 8, (48, 40))[0])
    assert not np.allclose(image, synthetic.render_lesion(1, 7, (48, 40))[0])


def test_lesion_is_the_same_scene_at_every_resolution():
    for index in range(4):
        fine, fine_mask = synthetic.render_lesion(0, index, (256, 256))
        coarse, coarse_mask = synthetic.render_lesion(0, index, (64, 64))
        assert ((pool(fine_mask, 4) > 0.5) == coarse_mask).mean() >= 0.95
        # the coarse render approximates the area average of the fine one (box-filtered waves and edges)
        assert np.abs(pool(fine, 4) - coarse).mean() < 0.01


def test_drawing_inside_windows_matches_drawing_everywhere(monkeypatch):
    # the renderer evaluates each shape only inside its bounding window; that must not clip anything
    cases = [(synthetic.lesion_scene(0, i), size, data.random_affine(np.random.default_rng(i)))
             for i, size in [(0, (48, 64)), (1, (64, 64)), (2, (40, 40))]]
    windowed = [synthetic.draw_lesion(*case) for case in cases]
    monkeypatch.setattr(synthetic.PixelGrid, "window", lambda self, lo, hi: (slice(None), slice(None)))
    for (image, mask), case in zip(windowed, cases):
        full_image, full_mask = synthetic.draw_lesion(*case)
        assert np.array_equal(image, full_image) and np.array_equal(mask, full_mask)


def test_twins_add_a_smaller_lookalike_outside_the_mask():
    # --data twins: the plain scene plus a smaller copy of the lesion elsewhere; the mask is unchanged
    for i in range(12):
        plain, plain_mask = synthetic.render_lesion(0, i, 64)
        image, mask = synthetic.render_lesion(0, i, 64, twin=True)
        scene = synthetic.lesion_scene(0, i, twin=True)
        assert np.array_equal(mask, plain_mask)
        assert 0 < scene["twin"]["radius"] <= 0.75 * scene["lesion"]["radius"]
        changed = np.abs(image - plain).max(-1) > 0.02  # where the twin was painted
        assert changed.any() and not (changed & mask).any() and changed.sum() < mask.sum()
    levels, mask = data.SegDataset("twins", "val", 32, scales=(1.0, 0.5))[3]
    plain_levels, plain_mask = data.SegDataset("synthetic", "val", 32, scales=(1.0, 0.5))[3]
    assert torch.equal(mask, plain_mask) and [x.shape for x in levels] == [x.shape for x in plain_levels]
    assert not torch.equal(levels[0], plain_levels[0])
    with pytest.raises(ValueError, match="--data twins is not a det dataset"):
        train.fill_defaults(train.get_args_parser().parse_args(["--task", "det", "--data", "twins"]))


def test_synthetic_splits_are_disjoint():
    scenes = {split: {data._scene_index(split, i) for i in range(n)}
              for split, n in [("train", 2600), ("val", data.N_VAL), ("test", data.N_TEST)]}
    assert not scenes["train"] & scenes["val"] and not scenes["train"] & scenes["test"]
    assert not scenes["val"] & scenes["test"]
    first = [data.SegDataset("synthetic", split, 24)[0][0][0] for split in ("train", "val", "test")]
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[1], first[2])
    with pytest.raises(ValueError, match="overlap"):
        data.SegDataset("synthetic", "val", 24, length=data.N_VAL + 1)


def test_seg_levels_have_the_right_sizes():
    ds = data.SegDataset("synthetic", "train", (40, 48), scales=(1, 0.5, 0.25), length=3)
    levels, mask = ds[0]
    assert [tuple(x.shape) for x in levels] == [(3, 40, 48), (3, 20, 24), (3, 10, 12)]
    assert mask.shape == (1, 40, 48) and set(mask.unique().tolist()) <= {0.0, 1.0}
    # each level is rendered, not resized, yet shows the same scene
    assert (levels[1] - F.avg_pool2d(levels[0], 2)).abs().mean() < 0.02
    batch_levels, batch_masks = data.seg_collate([ds[0], ds[1], ds[2]])
    assert [tuple(x.shape) for x in batch_levels] == [(3, 3, 40, 48), (3, 3, 20, 24), (3, 3, 10, 12)]
    assert batch_masks.shape == (3, 1, 40, 48)


def test_seg_augmentation_is_consistent_across_image_mask_and_levels():
    ds = data.SegDataset("synthetic", "train", 64, scales=(1, 0.5), augment=True, length=4)
    for i in range(4):
        levels, mask = ds[i]
        assert (levels[1] - F.avg_pool2d(levels[0], 2)).abs().mean() < 0.03
        # re-derive the geometry from the sample's seed: the mask follows the same transform
        affine = data.random_affine(data._augment_rng(0, i, 0))
        scene = synthetic.lesion_scene(0, data._scene_index("train", i))
        assert torch.equal(mask[0], torch.from_numpy(synthetic.draw_lesion(scene, (64, 64), affine)[1]).float())
    # a pure horizontal flip of the scene equals the mirrored render
    scene = synthetic.lesion_scene(0, 3)
    image, mask = synthetic.draw_lesion(scene, (64, 64))
    flipped, flipped_mask = synthetic.draw_lesion(scene, (64, 64), (np.diag([-1.0, 1.0]), np.zeros(2)))
    assert np.abs(flipped - image[:, ::-1]).max() < 1e-3 and (flipped_mask == mask[:, ::-1]).mean() > 0.999


def test_seg_augmentation_is_seeded_by_index_and_epoch():
    ds = data.SegDataset("synthetic", "train", 32, scales=(1, 0.5), augment=True, length=4)
    a, b = ds[2], ds[2]
    assert all(torch.equal(x, y) for x, y in zip(a[0] + [a[1]], b[0] + [b[1]]))
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0][0], a[0][0])
    plain = data.SegDataset("synthetic", "train", 32, length=4)
    assert not torch.equal(plain[2][0][0], a[0][0])


def test_color_threshold_baseline_is_weak_on_synthetic_lesions():
    levels, masks = data.seg_collate([data.SegDataset("synthetic", "val", 64)[i] for i in range(50)])
    pred = data.color_threshold_baseline(levels[0])
    assert pred.shape == masks.shape and pred.dtype == torch.bool
    pred, masks = pred.flatten(1).float(), masks.flatten(1)
    both = pred.sum(1) + masks.sum(1)
    dice = torch.where(both > 0, 2 * (pred * masks).sum(1) / both.clamp_min(1), torch.ones_like(both))
    assert dice.mean() <= 0.60


def test_otsu_threshold_splits_two_clusters():
    values = torch.cat([torch.full((1, 50), 0.2), torch.full((1, 30), 0.7)], 1)
    t = data.otsu_threshold(values)
    assert 0.2 < t.item() < 0.7


# --------------------------- ISIC -----------------------------------------------------

def test_isic_loads_resizes_and_caches(tmp_path):
    image_dir, mask_dir = write_isic(tmp_path, "Training", 6)
    write_isic(tmp_path, "Validation", 2, first=100)
    write_isic(tmp_path, "Test", 2, first=200)
    ds = data.SegDataset("isic", "train", 32, scales=(1, 0.5), data_dir=str(tmp_path))
    assert len(ds) == 6  # official val and test folders exist: all of Training trains
    samples = [ds[i] for i in range(len(ds))]
    for levels, mask in samples:
        assert [tuple(x.shape) for x in levels] == [(3, 32, 32), (3, 16, 16)] and mask.shape == (1, 32, 32)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        darkness = 1 - levels[0].mean(0)
        assert darkness[mask[0] > 0].mean() > darkness[mask[0] == 0].mean() + 0.4  # mask sits on the lesion
    cached = sorted(os.listdir(tmp_path / ".cache" / "32x32"))
    assert len(cached) == 12 and all(name.endswith(".png") for name in cached)
    # a second run reads only the cache: corrupt the originals, nothing changes
    for name in os.listdir(image_dir):
        if name.endswith(".jpg"):
            (image_dir / name).write_bytes(b"not a jpeg")
    again = data.SegDataset("isic", "train", 32, scales=(1, 0.5), data_dir=str(tmp_path))
    for (levels, mask), (levels_again, mask_again) in zip(samples, (again[i] for i in range(6))):
        assert torch.equal(mask, mask_again) and torch.equal(levels[0], levels_again[0])
    assert len(data.SegDataset("isic", "val", 32, data_dir=str(tmp_path))) == 2


def test_isic_augmentation_moves_image_and_mask_together(tmp_path):
    write_isic(tmp_path, "Training", 3, sizes=((48, 48),))
    ds = data.SegDataset("isic", "train", 32, scales=(1, 0.5), augment=True, data_dir=str(tmp_path))
    for epoch in range(3):
        ds.set_epoch(epoch)
        levels, mask = ds[0]
        dark = (1 - levels[0].mean(0)) > 0.5
        assert (dark == (mask[0] > 0)).float().mean() > 0.95
        assert (levels[1] - F.avg_pool2d(levels[0], 2)).abs().mean() < 0.03


def test_isic_fixed_split_when_only_training_exists(tmp_path):
    write_isic(tmp_path, "Training", 20)
    files = {split: data.isic_split_files(str(tmp_path), split) for split in ("train", "val", "test")}
    assert [len(files[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    names = [set(files[s]) for s in files]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    assert len(names[0] | names[1] | names[2]) == 20
    # independent of the dataset seed
    assert len(data.SegDataset("isic", "test", 16, data_dir=str(tmp_path), seed=5)) == 2
    assert data.isic_split_files(str(tmp_path), "test") == files["test"]


def isic_error_cases():
    def missing_root(root, image_dir, mask_dir):
        return root / "nowhere", "nowhere"

    def empty_root(root, image_dir, mask_dir):
        empty = root / "empty"
        empty.mkdir()
        return empty, "ISIC2018_Task1-2_Training_Input"

    def image_without_mask(root, image_dir, mask_dir):
        os.remove(mask_dir / "ISIC_0000001_segmentation.png")
        return root, "ISIC_0000001.jpg"

    def mask_without_image(root, image_dir, mask_dir):
        os.remove(image_dir / "ISIC_0000002.jpg")
        return root, "ISIC_0000002_segmentation.png"

    def corrupt_jpeg(root, image_dir, mask_dir):
        path = image_dir / "ISIC_0000000.jpg"
        path.write_bytes(path.read_bytes()[:200])
        return root, "ISIC_0000000.jpg"

    def truncated_png(root, image_dir, mask_dir):
        path = mask_dir / "ISIC_0000002_segmentation.png"
        noise = (np.random.default_rng(0).random((50, 50)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[:150])
        return root, "ISIC_0000002_segmentation.png"

    def mask_size_mismatch(root, image_dir, mask_dir):
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask_dir / "ISIC_0000000_segmentation.png")
        return root, "ISIC_0000000_segmentation.png"

    def bad_mask_values(root, image_dir, mask_dir):
        values = np.zeros((30, 40), np.uint8)
        values[:10], values[10:20] = 128, 255
        Image.fromarray(values).save(mask_dir / "ISIC_0000000_segmentation.png")
        return root, "ISIC_0000000_segmentation.png.*0, 128, 255"

    return [missing_root, empty_root, image_without_mask, mask_without_image, corrupt_jpeg, truncated_png,
            mask_size_mismatch, bad_mask_values]


@pytest.mark.parametrize("break_it", isic_error_cases(), ids=lambda f: f.__name__)
def test_isic_errors_name_the_file(tmp_path, break_it):
    image_dir, mask_dir = write_isic(tmp_path, "Training", 3)
    root, expected = break_it(tmp_path, image_dir, mask_dir)
    with pytest.raises(ValueError, match=expected):
        data.SegDataset("isic", "train", 16, data_dir=str(root))


# --------------------------- synthetic shapes -------------------------------------------

def coco_area_ranges(boxes):
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return {"small": (area < 32 ** 2).sum(), "medium": ((area >= 32 ** 2) & (area <= 96 ** 2)).sum(),
            "large": (area > 96 ** 2).sum()}


def test_shapes_render_is_deterministic_and_valid():
    image, target = synthetic.render_shapes(0, 3, 64)
    again, target_again = synthetic.render_shapes(0, 3, 64)
    assert image.shape == (64, 64, 3) and np.array_equal(image, again)
    assert np.array_equal(target["boxes"], target_again["boxes"])
    counts = []
    for index in range(60):
        image, target = synthetic.render_shapes(0, index, 64)
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == np.float32 and labels.dtype == np.int64 and len(boxes) == len(labels) <= 6
        assert ((labels >= 1) & (labels <= len(synthetic.SHAPE_CLASSES))).all()
        assert (boxes >= 0).all() and (boxes <= 64).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        counts += labels.tolist()
    assert set(counts) == {1, 2, 3}


def test_shape_boxes_scale_with_resolution():
    for index in range(5):
        small, large = synthetic.render_shapes(0, index, 64)[1]["boxes"], synthetic.render_shapes(0, index, 160)[1]["boxes"]
        assert np.allclose(large, small * 2.5, atol=1e-3)
    image, target = synthetic.render_shapes(0, 1, (48, 96))
    assert image.shape == (48, 96, 3) and (target["boxes"][:, [1, 3]] <= 48).all()


@pytest.mark.parametrize("size", [128, 160])
def test_shapes_cover_all_coco_area_ranges(size):
    boxes = [o["box"] for i in range(200) for o in synthetic.shapes_scene(0, i)["objects"]]
    ranges = coco_area_ranges(np.array(boxes) * size)
    assert all(n >= 10 for n in ranges.values()), ranges


def test_det_dataset_synthetic_targets_and_flip():
    plain = data.DetDataset("synthetic", "train", 64, length=8)
    aug = data.DetDataset("synthetic", "train", 64, augment=True, length=8)
    assert plain.num_classes == 3 and plain.class_names == synthetic.SHAPE_CLASSES
    flips = 0
    for i in range(8):
        image, target = plain[i]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert target["boxes"].shape == (len(target["labels"]), 4) and target["labels"].dtype == torch.int64
        assert target["iscrowd"].tolist() == [0] * len(target["labels"]) and isinstance(target["image_id"], int)
        aug_image, aug_target = aug[i]
        mirrored = (aug_image - image.flip(-1)).abs().mean() < (aug_image - image).abs().mean()
        expected = target["boxes"].clone()
        if mirrored:
            expected[:, [0, 2]] = 64 - target["boxes"][:, [2, 0]]
            flips += 1
        assert torch.allclose(aug_target["boxes"], expected)
    assert 0 < flips < 8
    images, targets = data.det_collate([plain[0], plain[1]])
    assert len(images) == 2 and len(targets) == 2


# --------------------------- COCO -----------------------------------------------------

def write_coco(root, drop_key=None):
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    images = [dict(id=11, file_name="a.jpg", width=40, height=30), dict(id=12, file_name="b.jpg", width=60, height=50),
              dict(id=13, file_name="c.jpg", width=20, height=20)]
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (120, 80, 40)).save(root / "val2017" / im["file_name"])
    annotations = [
        dict(id=1, image_id=11, category_id=3, bbox=[5, 5, 10, 8], area=80, iscrowd=0),
        dict(id=2, image_id=11, category_id=7, bbox=[0, 10, 20, 10], area=150, iscrowd=1),
        dict(id=3, image_id=12, category_id=1, bbox=[30, 20, 40, 40], area=900, iscrowd=0),  # overhangs: clipped
        dict(id=4, image_id=12, category_id=1, bbox=[3, 3, 0, 5], area=0, iscrowd=0),  # zero area
        dict(id=5, image_id=12, category_id=99, bbox=[3, 3, 5, 5], area=25, iscrowd=0),  # unknown category
        dict(id=6, image_id=12, category_id=3, bbox=[100, 100, 5, 5], area=25, iscrowd=0),  # outside the image
    ]
    if drop_key:
        del annotations[2][drop_key]
    categories = [dict(id=7, name="kite"), dict(id=1, name="person"), dict(id=3, name="car")]
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
    return path


def test_coco_loader(tmp_path, capsys):
    write_coco(tmp_path)
    ds = data.DetDataset("coco", "test", 64, data_dir=str(tmp_path))  # test is val2017
    assert "dropped 3 annotations from training" in capsys.readouterr().out
    assert len(ds) == 3 and ds.num_classes == 3 and ds.cat_ids == [1, 3, 7]
    assert ds.class_names == ("person", "car", "kite")
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["image_id"] == 11 and target["orig_size"] == (30, 40)
    sx, sy = 64 / 40, 64 / 30
    expected = torch.tensor([[5 * sx, 5 * sy, 15 * sx, 13 * sy], [0, 10 * sy, 20 * sx, 20 * sy]])  # xywh -> xyxy
    assert torch.allclose(target["boxes"], expected)
    assert target["labels"].tolist() == [2, 3] and target["iscrowd"].tolist() == [0, 1]
    image, target = ds[1]
    assert torch.allclose(target["boxes"], torch.tensor([[30 * 64 / 60, 20 * 64 / 50, 64, 64]]))
    assert target["labels"].tolist() == [1]
    # evaluation sees the annotations as COCOeval does: unclipped, zero-area and outside ones included
    gt = target["eval_gt"]
    assert gt["bbox"].tolist() == [[30, 20, 40, 40], [3, 3, 0, 5], [100, 100, 5, 5]]
    assert gt["labels"].tolist() == [1, 1, 2] and gt["area"].tolist() == [900, 0, 25]
    image, target = ds[2]  # no annotations: kept, empty targets
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["image_id"] == 13
    assert target["eval_gt"]["bbox"].shape == (0, 4)
    with pytest.raises(ValueError, match="instances_train2017.json"):  # val: a hold-out of train2017
        data.DetDataset("coco", "val", 32, data_dir=str(tmp_path))


def test_coco_missing_key_names_file_and_key(tmp_path):
    write_coco(tmp_path, drop_key="bbox")
    with pytest.raises(ValueError, match=r"instances_val2017\.json.*'bbox'"):
        data.DetDataset("coco", "test", 32, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "annotations" / "instances_train2017.json"))):
        data.DetDataset("coco", "train", 32, data_dir=str(tmp_path))


@pytest.mark.slow
def test_resize_ceiling_is_a_perfect_soft_prediction_upsampled():
    # The ceiling of the resize baseline: a perfect 16 px prediction upsampled to 32 and 64 px.
    # Perfect means soft (each pixel's lesion coverage), so it beats the 16 px binary mask
    # upsampled (what it once measured, which understated the baseline), and it stays below 1:
    # the finer renders have detail that 16 px cannot hold.
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "data.py", "--resize-ceiling", "16"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    dice = [float(v) for v in re.findall(r"Dice ([0-9.]+)", run.stdout)]
    test16 = data.SegDataset("synthetic", "test", 16)
    binary = data.seg_collate([test16[i] for i in range(len(test16))])[1]
    for f, d in zip((2, 4), dice):
        test = data.SegDataset("synthetic", "test", 16 * f)
        truth = data.seg_collate([test[i] for i in range(len(test))])[1]
        up = F.interpolate(binary, scale_factor=f, mode="bilinear", align_corners=False) > 0.5
        assert seg_scores(up, truth)[:, 0].mean().item() + 0.005 < d < 0.995, (f, run.stdout)
    assert len(dice) == 2


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["--resize-ceiling", "--baseline"])
def test_data_cli_rejects_sizes_below_one(flag):
    # -4 once printed "upsampled to -16 px ... Dice 1.000"
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "data.py", flag, "-4"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and f"{flag} must be a positive image size, got -4" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "Dice" not in run.stdout
