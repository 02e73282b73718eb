"""predict.py (your own images at their own size) and eval.py's native size, --tta and --largest-component."""
import json
import os
import subprocess
import sys
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as ev
import predict
from conftest import ENV, ROOT, TEST, VAL_IMAGES, darkness_model, fake_checkpoint, run_eval, write_coco_tree, \
    write_isic_tree
from data import image_tensor, native_levels, resize, to_rgb
from metrics import upsample_logits
from model import build_model, set_detector_size

SEG = dict(task="seg", model="rat", image_size=32, scales=[1.0, 0.5], pe="rose", sga="local", depth=1, dim=16, heads=2,
           patch=2, strides=None, dropout=0.0, num_classes=1, token_grid="physical", head="refine", stem="patch",
           sga_iters=1)
DET = dict(SEG, task="det", image_size=64, dim=32, patch=4, strides=[2], scales=[1.0], num_classes=3, sga_iters=3,
           class_names=["disk", "square", "triangle"])


def checkpoint(path, **arch):
    """A real (untrained, seeded) model's checkpoint, as train.py writes it."""
    args = {**SEG, **arch}
    torch.manual_seed(0)
    model = build_model(args)
    if args["task"] == "det":   # scores of about 0.5 instead of FCOS's prior 0.07: some boxes pass its threshold
        torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    torch.save({"model": model.state_dict(), "args": args}, path)
    return path


def lesion(w, h, mode="RGB"):
    """A dark ellipse on skin: the darkness model's mask is the ellipse."""
    yy, xx = np.mgrid[:h, :w] + 0.5
    inside = ((xx / w - 0.5) / 0.3) ** 2 + ((yy / h - 0.4) / 0.25) ** 2 < 1
    rgb = np.where(inside[..., None], [60, 30, 20], [230, 190, 170]).astype(np.uint8)
    rgb[: h // 5, : w // 5] = [40, 40, 40]   # a dark corner: not symmetric, so a rotation shows
    return Image.fromarray(rgb).convert(mode)


def predict_main(*argv):
    """predict.main in this process -> its exit status."""
    return predict.main(predict.get_args_parser().parse_args([str(a) for a in argv]))


def mask_of(out, stem):
    with Image.open(out / f"{stem}_mask.png") as im:
        assert im.mode == "L"
        return np.array(im)


def no_temporaries(folder):
    return not [n for n in os.listdir(folder) if n.endswith(".tmp")]


# ------------------------------------------------------------------ the odd-file matrix

def test_odd_files_are_converted_as_training_reads_them(tmp_path, monkeypatch, capsys):
    # Each odd file is predicted as its plain 8-bit RGB twin (the same pixels, as training reads
    # images): grayscale, RGBA, CMYK JPEG, 16-bit PNG, EXIF-rotated JPEG, an odd non-square size,
    # TIFF and BMP; a corrupt file and a missing path get one line each, and the exit status is 1.
    monkeypatch.setattr(predict, "build_eval_model", lambda *a: darkness_model)
    odd, twins = tmp_path / "odd", tmp_path / "twins"
    odd.mkdir(), twins.mkdir()
    base = lesion(97, 61)
    base.save(odd / "plain.png")
    base.convert("L").save(odd / "gray.png")
    base.convert("L").convert("RGB").save(twins / "gray.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((61, 97), 90, np.uint8)))   # translucent: alpha is dropped, as convert does
    rgba.save(odd / "rgba.png")
    base.save(twins / "rgba.png")
    base.convert("CMYK").save(odd / "cmyk.jpg", quality=95)
    with Image.open(odd / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        im.convert("RGB").save(twins / "cmyk.png")
    grey = np.array(base.convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(odd / "deep.png")   # 16-bit: 255 -> 65535
    with Image.open(odd / "deep.png") as im:
        assert im.mode.startswith("I")
    Image.fromarray(grey).convert("RGB").save(twins / "deep.png")
    exif = base.getexif()
    exif[0x0112] = 6                          # stored sideways: a viewer turns it 90 degrees clockwise
    base.save(odd / "turned.jpg", exif=exif, quality=95)
    with Image.open(odd / "turned.jpg") as im:
        im.transpose(Image.Transpose.ROTATE_270).save(twins / "turned.png")
    base.save(odd / "tiff.tif")
    base.save(odd / "bmp.bmp")
    (odd / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(600))
    (odd / "notes.txt").write_text("not an image: not read from a folder")

    ckpt = checkpoint(tmp_path / "c.pt")
    status = predict_main(odd, tmp_path / "missing.png", "--ckpt", ckpt, "--out", tmp_path / "out", "--overlay")
    assert predict_main(twins, "--ckpt", ckpt, "--out", tmp_path / "twins_out") == 0
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if "corrupt.jpg" in line] == \
        [f"{odd / 'corrupt.jpg'}: cannot read image (cannot identify image file '{odd / 'corrupt.jpg'}')"]
    assert f"{tmp_path / 'missing.png'}: no such file or folder" in err
    out = tmp_path / "out"
    assert not (out / "corrupt_mask.png").exists() and not (out / "notes_mask.png").exists() and no_temporaries(out)
    plain = mask_of(out, "plain")
    assert plain.shape == (61, 97) and set(np.unique(plain)) == {0, 255}
    for name in ("tiff", "bmp"):
        assert np.array_equal(mask_of(out, name), plain)
    for name in ("gray", "rgba", "cmyk", "deep", "turned"):
        assert np.array_equal(mask_of(out, name), mask_of(tmp_path / "twins_out", name)), name
    assert mask_of(out, "turned").shape == (97, 61)           # upright: its own width and height
    with Image.open(out / "turned_overlay.png") as im:
        assert im.size == (61, 97) and im.mode == "RGB"


def test_sixteen_bit_images_use_their_full_range():
    values = np.array([[0, 257, 32768, 65535]], np.uint16)
    rgb = np.array(to_rgb(Image.fromarray(values), "x.png"))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 128, 255]   # not clipped at 255


# ------------------------------------------------------------------ native, resized, baseline

def test_mask_is_the_models_own_prediction_at_the_native_size(tmp_path):
    # A 97 x 61 image enters at its own pixel grid: the mask is the model's prediction on the
    # native pyramid (zoom per axis, RAT.zoom), not on a squashed square.
    ckpt = checkpoint(tmp_path / "ckpt.pt")
    lesion(97, 61).save(tmp_path / "odd.png")
    train_args, state = ev.load_run(str(ckpt))
    model = ev.build_eval_model(train_args, state, 32, torch.device("cpu"), "ckpt")
    x = image_tensor(lesion(97, 61))
    with torch.no_grad():
        native = model([t[None] for t in native_levels(x, [1.0, 0.5])])[0, 0] > 0
        small = model([t[None] for t in native_levels(resize(x, (25, 40)), [1.0, 0.5])])
        resized = upsample_logits(small[0], (61, 97))[0] > 0
        baseline = ev.resized_to_train(model, train_args)([t[None] for t in native_levels(x, [1.0, 0.5])])[0, 0] > 0
        tta = ev.with_flips(model)([t[None] for t in native_levels(x, [1.0, 0.5])])[0, 0] > 0
    assert 0 < native.float().mean() < 1                     # not a constant mask: the comparison means something
    for flags, expected in [([], native), (["--resize", "40"], resized), (["--resize-to-train"], baseline),
                            (["--tta"], tta)]:
        out = tmp_path / "_".join(["out", *flags])
        assert predict_main(tmp_path / "odd.png", "--ckpt", ckpt, "--out", out, *flags) == 0
        assert np.array_equal(mask_of(out, "odd") > 0, expected.numpy()), flags
    assert not np.array_equal(native.numpy(), baseline.numpy())   # native is not the squashed baseline


def test_default_checkpoint_is_named_on_the_first_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "seg").mkdir(parents=True)
    checkpoint(tmp_path / "runs" / "seg" / "ckpt_best.pt")
    lesion(40, 30).save(tmp_path / "a.png")
    assert predict_main(tmp_path / "a.png") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"predicting with {os.path.join('runs', 'seg', 'ckpt_best.pt')}: the seg run"), first
    assert mask_of(tmp_path / "predictions", "a").shape == (30, 40)


def test_largest_component_option_keeps_one_region(tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "build_eval_model", lambda *a: darkness_model)
    lesion(97, 61).save(tmp_path / "two.png")   # the lesion and the dark corner: two regions
    ckpt = checkpoint(tmp_path / "ckpt.pt")
    assert predict_main(tmp_path / "two.png", "--ckpt", ckpt, "--out", tmp_path / "all") == 0
    assert predict_main(tmp_path / "two.png", "--ckpt", ckpt, "--out", tmp_path / "one", "--largest-component") == 0
    every, largest = mask_of(tmp_path / "all", "two") > 0, mask_of(tmp_path / "one", "two") > 0
    assert every[:5, :5].all() and not largest[:5, :5].any()          # the corner goes
    assert np.array_equal(largest, every & ~np.pad(np.ones((12, 19), bool), ((0, 49), (0, 78))))


def test_overlay_draws_the_contour_on_the_image(tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "build_eval_model", lambda *a: darkness_model)
    lesion(97, 61).save(tmp_path / "a.png")
    assert predict_main(tmp_path / "a.png", "--ckpt", checkpoint(tmp_path / "c.pt"), "--out", tmp_path, "--overlay") == 0
    mask = mask_of(tmp_path, "a") > 0
    overlay = np.array(Image.open(tmp_path / "a_overlay.png"))
    red = (overlay == [255, 0, 0]).all(-1)
    inner = F.max_pool2d(-torch.from_numpy(mask)[None, None].float(), 3, 1, 1)[0, 0].numpy() > -1   # touches background
    assert red.any() and np.array_equal(red, mask & inner)           # the mask's boundary pixels, 1 px at this size
    assert np.array_equal(overlay[~red], np.array(lesion(97, 61))[~red])


# ------------------------------------------------------------------ bad input, memory

def test_an_image_too_large_says_how_large_fits_and_the_others_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(predict, "build_eval_model", lambda *a: darkness_model)
    lesion(900, 600).save(tmp_path / "big.png")
    lesion(97, 61).save(tmp_path / "small.png")
    ckpt = checkpoint(tmp_path / "c.pt")
    limit = (predict.FIXED_BYTES + 100_000 * 300) / 2 ** 30   # room for about 0.1 MP
    assert predict_main(tmp_path, "--ckpt", ckpt, "--out", tmp_path / "out", "--memory-limit", limit) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if "big.png" in line]
    assert line.startswith(f"{tmp_path / 'big.png'}: 900x600 (0.5 MP) needs about ") and "MP fit" in line
    assert (tmp_path / "out" / "small_mask.png").exists() and not (tmp_path / "out" / "big_mask.png").exists()
    assert "images up to about 0.10 MP fit (3" in line      # ~390 px on the longer side at its shape
    fit = int(line.rsplit("--resize ", 1)[1])
    assert 200 < fit < 390
    # the size it names does fit, and the mask still has the original's size
    assert predict_main(tmp_path / "big.png", "--ckpt", ckpt, "--out", tmp_path / "out", "--memory-limit", limit,
                        "--resize", fit) == 0
    assert mask_of(tmp_path / "out", "big").shape == (600, 900)


def test_a_failed_write_leaves_no_half_written_mask(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(predict, "build_eval_model", lambda *a: darkness_model)
    for name in ("a", "b"):
        lesion(40, 30).save(tmp_path / f"{name}.png")
    save, calls = Image.Image.save, []

    def full_disk(self, fp, *a, **kw):   # the first mask written fails halfway
        calls.append(fp)
        if len(calls) == 1:
            fp.write(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert predict_main(tmp_path / "a.png", tmp_path / "b.png", "--ckpt", checkpoint(tmp_path / "c.pt"),
                        "--out", tmp_path / "out") == 1
    assert "a.png: cannot write its outputs to" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "out")) == ["b_mask.png"]     # nothing of a's, not even a temporary


def test_an_image_smaller_than_the_patch_is_one_line(tmp_path, capsys):
    Image.new("RGB", (2, 40)).save(tmp_path / "thin.png")
    assert predict_main(tmp_path / "thin.png", "--ckpt", checkpoint(tmp_path / "c.pt"), "--out", tmp_path / "o") == 1
    assert "thin.png: (40, 2) is too small for this model" in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_bad_files_exit_1_without_traceback(tmp_path):
    checkpoint(tmp_path / "c.pt")
    lesion(40, 30).save(tmp_path / "good.jpg")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))   # a PNG header, then nothing
    run = subprocess.run([sys.executable, "predict.py", str(tmp_path / "good.jpg"), str(tmp_path / "bad.png"),
                          "--ckpt", str(tmp_path / "c.pt"), "--out", str(tmp_path / "out")], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert len([line for line in run.stderr.splitlines() if "bad.png: cannot read image" in line]) == 1
    assert "1 of 2 images predicted" in run.stdout and (tmp_path / "out" / "good_mask.png").exists()
    bad_flag = subprocess.run([sys.executable, "predict.py", str(tmp_path), "--ckpt", str(tmp_path / "nope.pt")],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad_flag.returncode == 1 and bad_flag.stderr.strip().startswith("error: ") and "Traceback" not in bad_flag.stderr


@pytest.mark.slow
def test_a_large_image_at_a_small_model_width(tmp_path):
    # 3 MP through the whole pipeline of a width-16 model: the mask at the image's own size
    ckpt = checkpoint(tmp_path / "c.pt", depth=2)
    lesion(2100, 1400).save(tmp_path / "big.jpg", quality=90)
    assert predict_main(tmp_path / "big.jpg", "--ckpt", ckpt, "--out", tmp_path) == 0
    assert mask_of(tmp_path, "big").shape == (1400, 2100)


def test_bench_measures_one_photo_against_the_estimate():
    torch.set_num_threads(1)
    import bench
    r = bench.predict_worker(megapixels=0.01, dim=16)
    assert r["size"] == [82, 123] and r["seconds"] > 0 and r["peak_mib"] >= 0 and r["estimate_mib"] > 0


# ------------------------------------------------------------------ detection

class FakeDetector:
    """One box over the middle of every image, in its pixels; records the sizes it was given."""
    def __init__(self):
        self.transform, self.backbone, self.seen = SimpleNamespace(), None, []

    def __call__(self, images):
        self.seen += [tuple(im.shape[-2:]) for im in images]
        return [dict(boxes=torch.tensor([[im.shape[-1] / 4, im.shape[-2] / 4, im.shape[-1] / 2, im.shape[-2] / 2]]),
                     scores=torch.tensor([0.9]), labels=torch.tensor([2])) for im in images]


def test_detection_boxes_come_back_in_original_pixels(tmp_path, monkeypatch):
    fake = FakeDetector()
    monkeypatch.setattr(predict, "build_eval_model", lambda *a: fake)
    lesion(100, 60).save(tmp_path / "a.png")
    ckpt = checkpoint(tmp_path / "det.pt", **DET)
    assert predict_main(tmp_path / "a.png", "--ckpt", ckpt, "--out", tmp_path / "native", "--overlay") == 0
    assert predict_main(tmp_path / "a.png", "--ckpt", ckpt, "--out", tmp_path / "small", "--resize", "50") == 0
    assert fake.seen == [(60, 100), (30, 50)]
    for out in ("native", "small"):
        result = json.loads((tmp_path / out / "a_boxes.json").read_text())
        assert (result["width"], result["height"]) == (100, 60)
        assert result["detections"] == [dict(box=[25.0, 15.0, 50.0, 30.0], score=0.9, label="square")]
    with Image.open(tmp_path / "native" / "a_overlay.png") as im:
        assert im.size == (100, 60)


def test_detector_sees_the_native_image_with_per_axis_anchors(tmp_path):
    # the real detector: boxes inside the 97 x 61 image, the same as the model's own call at that size
    ckpt = checkpoint(tmp_path / "det.pt", **DET)
    lesion(97, 61).save(tmp_path / "a.png")
    assert predict_main(tmp_path / "a.png", "--ckpt", ckpt, "--out", tmp_path, "--score-threshold", "0") == 0
    found = json.loads((tmp_path / "a_boxes.json").read_text())["detections"]
    train_args, state = ev.load_run(str(ckpt))
    model = ev.build_eval_model(train_args, state, 64, torch.device("cpu"), "ckpt")
    set_detector_size(model, (61, 97))
    with torch.no_grad():
        own = model([image_tensor(lesion(97, 61))])[0]
    keep = own["labels"] > 0
    assert found and len(found) == int(keep.sum())
    assert np.allclose([d["box"] for d in found], own["boxes"][keep].numpy(), atol=0.01)
    assert all(0 <= d["box"][0] <= d["box"][2] <= 97 and 0 <= d["box"][1] <= d["box"][3] <= 61 for d in found)
    assert {d["label"] for d in found} <= set(DET["class_names"])


def test_tta_and_largest_component_are_for_segmentation(tmp_path):
    with pytest.raises(ValueError, match="--tta and --largest-component: only for segmentation"):
        predict_main(tmp_path, "--ckpt", checkpoint(tmp_path / "det.pt", **DET), "--tta")


# ------------------------------------------------------------------ the shared pieces

def test_tta_is_the_mean_over_the_four_flips():
    ramp = torch.arange(12.0).reshape(1, 1, 3, 4)
    model = lambda levels, spacings=None: levels[0][:, :1] * ramp   # not flip-equivariant
    x = torch.rand(1, 3, 3, 4)
    expected = sum((model([x.flip(d) if d else x])).flip(d) if d else model([x])
                   for d in ((), (-1,), (-2,), (-2, -1))) / 4
    assert torch.allclose(ev.with_flips(model)([x]), expected)
    assert torch.allclose(ev.with_flips(lambda levels, spacings=None: levels[0])([x]), x)   # equivariant: itself


def flood_fill_largest(mask):
    """Oracle: label 8-connected regions by breadth-first search in raster order; the largest (first on ties)."""
    labels, sizes = np.zeros(mask.shape, int), [0]
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        sizes.append(0)
        queue = deque([start])
        labels[start] = len(sizes) - 1
        while queue:
            y, x = queue.popleft()
            sizes[-1] += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    n = (y + dy, x + dx)
                    if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and not labels[n]:
                        labels[n] = labels[start]
                        queue.append(n)
    return labels == int(np.argmax(sizes)) if len(sizes) > 1 else mask


@pytest.mark.parametrize("seed", range(6))
def test_largest_component_matches_a_flood_fill(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 31)) < [0.3, 0.45, 0.55, 0.6, 0.05, 0.8][seed]
    assert np.array_equal(ev.largest_component(mask), flood_fill_largest(mask))
    assert torch.equal(ev.largest_component(torch.from_numpy(mask)), torch.from_numpy(flood_fill_largest(mask)))


def test_largest_component_edge_cases():
    diagonal = np.eye(5, dtype=bool)
    assert np.array_equal(ev.largest_component(diagonal), diagonal)         # corners touch: one region
    apart = np.zeros((5, 7), bool)
    apart[1:3, 1:3], apart[1:4, 4:7] = True, True
    assert ev.largest_component(apart).sum() == 9 and not ev.largest_component(apart)[1, 1]
    assert not ev.largest_component(np.zeros((4, 4), bool)).any() and ev.largest_component(np.ones((4, 4), bool)).all()


# ------------------------------------------------------------------ eval.py --resolutions native

def test_eval_native_scores_isic_images_at_their_own_size(tmp_path, monkeypatch):
    write_isic_tree(tmp_path / "isic")
    seen = []
    monkeypatch.setattr(ev, "build_eval_model",
                        lambda *a: lambda levels, spacings=None: seen.append(levels[0].shape[2:]) or darkness_model(levels))
    ckpt = fake_checkpoint(tmp_path / "c.pt", task="seg", image_size=32, dim=16, patch=2, num_classes=1, data="isic",
                           data_dir=str(tmp_path / "isic"))
    result = run_eval(ckpt, tmp_path / "out", "--resolutions", "native,32", "--samples", "2")
    assert [(row["resolution"], row["images"]) for row in result["rows"]] == [(32, 5), ("native", 5)]
    assert set(seen) == {(32, 32)} | {(h, w) for w, h, *_ in TEST}      # each image at its own size
    for k, (w, h, *_) in enumerate(TEST):
        with Image.open(tmp_path / "out" / "masks_native" / f"ISIC_{200 + k:07d}_segmentation.png") as im:
            assert im.size == (w, h)
    with Image.open(tmp_path / "out" / "samples_native.png") as im:
        assert im.size == (3 * 256 + 2 * 4, 2 * 256 + 4)   # shown at the training size, upscaled
    tta = run_eval(ckpt, tmp_path / "tta", "--resolutions", "native", "--samples", "0", "--tta", "--largest-component")
    assert tta["tta"] and tta["largest_component"] and "--tta" in (tmp_path / "tta" / "results.md").read_text()


def test_eval_native_detects_coco_images_at_their_own_size(tmp_path, monkeypatch):
    write_coco_tree(tmp_path / "coco")
    fakes = []
    monkeypatch.setattr(ev, "build_eval_model", lambda *a: fakes.append(FakeDetector()) or fakes[-1])
    ckpt = fake_checkpoint(tmp_path / "c.pt", task="det", image_size=64, dim=32, patch=4, strides=[2, 2],
                           num_classes=3, data="coco", data_dir=str(tmp_path / "coco"))
    result = run_eval(ckpt, tmp_path / "out", "--resolutions", "64,native")
    assert [row["resolution"] for row in result["rows"]] == [64, "native"]
    by_id = {im["id"]: im for im in VAL_IMAGES}
    assert fakes[-1].seen == [(by_id[i]["height"], by_id[i]["width"]) for i in sorted(by_id)] * 2   # warm-up, then timed
    for d in json.loads((tmp_path / "out" / "detections_native.json").read_text()):
        im = by_id[d["image_id"]]
        assert d["bbox"] == pytest.approx([im["width"] / 4, im["height"] / 4, im["width"] / 4, im["height"] / 4])


@pytest.mark.slow
def test_isic_fixture_tool_writes_the_official_layout_of_non_square_images(tmp_path):
    run = subprocess.run([sys.executable, "tools/isic_fixture.py", str(tmp_path), "--train", "3", "--val", "1",
                          "--test", "5"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    from data import NativeSegDataset
    test = NativeSegDataset("test", [1.0, 0.5], str(tmp_path))
    shapes = {tuple(test[i][0][0].shape[1:]) for i in range(len(test))}
    assert len(test) == 5 and shapes == {(96, 128), (96, 144), (128, 96), (90, 120), (100, 150)}
    levels, mask = test[0]
    assert mask.shape == (1, 100, 150) and mask.any() and not mask.all() and levels[1].shape == (3, 50, 75)   # ISIC_0000004


def test_eval_native_needs_a_real_dataset(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "c.pt", task="seg", image_size=32, dim=16, patch=2, num_classes=1)
    with pytest.raises(ValueError, match="^--resolutions native: needs a real dataset") as e:
        run_eval(ckpt, tmp_path / "out", "--resolutions", "64,native")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
