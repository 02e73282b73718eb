"""data.py review fixes: decode only what is used, parse COCO's annotations once, cache ISIC
at the largest training size."""
import json
import os
from argparse import Namespace

import torch
from PIL import Image

import data
import eval as ev
import train
from conftest import TEST, darkness_model, fake_checkpoint, run_eval, write_coco_tree, write_isic, write_isic_tree


# ------------------------------------------------------------------ only what is used (item 6)

def test_isic_length_decodes_only_the_samples_it_keeps(tmp_path):
    write_isic_tree(tmp_path)
    cache = tmp_path / ".cache" / "32x32"
    part = data.SegDataset("isic", "test", 32, scales=(1, 0.5), data_dir=str(tmp_path), length=2)
    assert len(part) == 2 and len(os.listdir(cache)) == 2 * 2  # image and mask of two of the five
    full = data.SegDataset("isic", "test", 32, scales=(1, 0.5), data_dir=str(tmp_path))
    assert len(full) == len(TEST) and len(os.listdir(cache)) == 2 * len(TEST)
    for i in range(2):  # the same samples as before: the first of the split
        (levels, mask), (full_levels, full_mask) = part[i], full[i]
        assert torch.equal(mask, full_mask) and all(torch.equal(a, b) for a, b in zip(levels, full_levels))


def test_eval_limit_decodes_only_the_images_it_scores(tmp_path, monkeypatch):
    write_isic_tree(tmp_path / "isic")
    ckpt = fake_checkpoint(tmp_path / "ckpt.pt", task="seg", image_size=32, dim=16, patch=2, num_classes=1,
                           data="isic", data_dir=str(tmp_path / "isic"))
    monkeypatch.setattr(ev, "build_eval_model", lambda *a: darkness_model)
    results = run_eval(ckpt, tmp_path / "out", "--resolutions", "24,40", "--limit", "2", "--samples", "0")
    assert [row["images"] for row in results["rows"]] == [2, 2]
    for r in (24, 40):
        assert len(os.listdir(tmp_path / "isic" / ".cache" / f"{r}x{r}")) == 2 * 2


def test_coco_annotations_are_parsed_once_for_train_and_val(tmp_path, monkeypatch):
    write_coco_tree(tmp_path / "coco", n_train=12)
    ann_path = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    parsed, real_load = [], json.load
    monkeypatch.setattr(json, "load", lambda f: parsed.append(f.name) or real_load(f))
    args = Namespace(task="det", data="coco", data_dir=str(tmp_path / "coco"), image_size=32, seed=0,
                     train_size=None, val_size=None, coco_val_size=3)
    train_set, val = train.build_datasets(args)
    assert parsed == [str(ann_path)]
    assert len(train_set) == 9 and len(val) == 3
    assert not {r["id"] for r in train_set.records} & {r["id"] for r in val.records}
    # a rewritten file is read again
    annotations = json.loads(ann_path.read_text())
    annotations["images"] = annotations["images"][:10]
    ann_path.write_text(json.dumps(annotations))
    assert len(data.DetDataset("coco", "train", 32, data_dir=str(tmp_path / "coco"), coco_val_size=3)) == 9 - 2
    assert len(parsed) == 2


# ------------------------------------------------------------------ cache size (item 11)

def test_isic_training_copies_are_cached_at_the_largest_train_size(tmp_path):
    write_isic(tmp_path, "Training", 3, sizes=((96, 80),))
    write_isic(tmp_path, "Validation", 2, first=100)
    args = train.fill_defaults(train.get_args_parser().parse_args(
        ["--data", "isic", "--data-dir", str(tmp_path), "--image-size", "32", "--train-sizes", "32,64", "--scales", "1,0.5"]))
    train_set, val = train.build_datasets(args)
    cache = tmp_path / ".cache"
    assert sorted(os.listdir(cache)) == ["32x32", "64x64"]
    assert len(os.listdir(cache / "64x64")) == 2 * 3 and len(os.listdir(cache / "32x32")) == 2 * 2  # train, val
    for name in os.listdir(cache / "64x64"):
        with Image.open(cache / "64x64" / name) as image:
            assert image.size == (64, 64)
    for size in (32, 64):  # each step's size resampled from the 64 px copies
        levels, mask = train_set[(0, size)]
        assert [tuple(x.shape) for x in levels] == [(3, size, size), (3, size // 2, size // 2)]
        assert mask.shape == (1, size, size)
