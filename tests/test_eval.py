"""eval.py: the resolution sweep, end to end on tiny checkpoints trained on the CPU."""
import csv
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import eval as ev
from conftest import ENV, ROOT, run as python
from data import SegDataset, seg_collate

TINY = ["--epochs", "1", "--train-size", "16", "--val-size", "8", "--batch-size", "8", "--depth", "2",
        "--heads", "2", "--workers", "0"]
SEG_TRAIN, DET_TRAIN = ["--task", "seg", "--image-size", "32", "--dim", "16", "--scales", "1,0.5"], \
    ["--task", "det", "--image-size", "64", "--dim", "32"]  # FCOS's head needs dim % 32 == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny seg and one tiny det checkpoint, trained side by side. -> {task: ckpt path}"""
    root = tmp_path_factory.mktemp("runs")
    procs = {task: subprocess.Popen([sys.executable, "train.py", *flags, *TINY, "--out", str(root / task)], cwd=ROOT,
                                    env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for task, flags in [("seg", SEG_TRAIN), ("det", DET_TRAIN)]}
    for task, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    return {task: root / task / "ckpt_best.pt" for task in procs}


def evaluate(ckpt, out, *extra):
    """eval.main in this process (no interpreter start-up): -> results.json as a dict."""
    args = ev.get_args_parser().parse_args(["--ckpt", str(ckpt), "--out", str(out), "--workers", "0",
                                            "--limit", "4", "--samples", "1", *extra])
    ev.main(args)
    with open(out / "results.json") as f:
        return json.load(f)


def check_rows(rows, resolutions, metrics):
    assert [row["resolution"] for row in rows] == resolutions
    for row in rows:
        for k in metrics:
            assert math.isfinite(row[k]) and (0 <= row[k] <= 1 or (k.startswith("AP") and row[k] == -1)), (k, row)
        assert row["ms_per_image"] > 0 and math.isfinite(row["peak_mem_mb"])


@pytest.mark.slow
def test_seg_sweep_writes_every_file(runs):
    run = python("eval.py", "--ckpt", str(runs["seg"]), "--resolutions", "64,16,32", "--limit", "8",
                 "--samples", "2", "--batch-size", "4", "--workers", "0")
    assert run.returncode == 0, run.stderr[-3000:]
    out = runs["seg"].parent / "eval"  # default: next to the checkpoint
    assert sorted(os.listdir(out)) == sorted(["results.csv", "results.md", "results.json",
                                              "samples_16.png", "samples_32.png", "samples_64.png"])
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "seg" and results["split"] == "test" and results["ignore_spacing"] is False
    check_rows(results["rows"], [16, 32, 64], ev.SEG_METRICS)
    assert all(row["images"] == 8 for row in results["rows"])
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(row["resolution"]) for row in table] == [16, 32, 64]
    assert float(table[0]["dice"]) == pytest.approx(results["rows"][0]["dice"])
    md = (out / "results.md").read_text().splitlines()
    assert str(runs["seg"]) in md[0] and len([line for line in md if line.startswith("| ")]) == 1 + 3
    assert md[-1] in run.stdout  # the table is printed
    # image | truth | prediction, 2 rows, upscaled to >= 256 px per tile
    with Image.open(out / "samples_16.png") as im:
        assert im.size == (3 * 256 + 2 * 4, 2 * 256 + 4)


@pytest.mark.slow
def test_det_sweep_writes_every_file(runs):
    run = python("eval.py", "--task", "det", "--ckpt", str(runs["det"]), "--resolutions", "96,64", "--limit", "4",
                 "--samples", "2", "--workers", "0", "--out", str(runs["det"].parent / "sweep"))
    assert run.returncode == 0, run.stderr[-3000:]
    out = runs["det"].parent / "sweep"
    assert sorted(os.listdir(out)) == sorted(["results.csv", "results.md", "results.json", "samples_64.png",
                                              "samples_96.png", "detections_64.json", "detections_96.json"])
    results = json.loads((out / "results.json").read_text())
    check_rows(results["rows"], [64, 96], ev.DET_METRICS)
    for r in (64, 96):
        for d in json.loads((out / f"detections_{r}.json").read_text()):
            assert d["image_id"] in range(4) and d["category_id"] in (1, 2, 3) and len(d["bbox"]) == 4


@pytest.mark.slow
def test_ignore_spacing_sweep(runs, tmp_path):
    plain = evaluate(runs["seg"], tmp_path / "plain", "--resolutions", "32")
    ignore = evaluate(runs["seg"], tmp_path / "ignore", "--resolutions", "32,64", "--ignore-spacing")
    assert ignore["ignore_spacing"] is True and "--ignore-spacing" in (tmp_path / "ignore" / "results.md").read_text()
    check_rows(ignore["rows"], [32, 64], ev.SEG_METRICS)
    # at the training resolution the training spacing is the default one: same numbers
    for k in ev.SEG_METRICS:
        assert ignore["rows"][0][k] == plain["rows"][0][k]
    # default folder: its own, next to the checkpoint
    ev.main(ev.get_args_parser().parse_args(["--ckpt", str(runs["seg"]), "--resolutions", "32", "--ignore-spacing",
                                             "--limit", "2", "--samples", "0", "--workers", "0"]))
    assert (runs["seg"].parent / "eval_ignore_spacing" / "results.json").exists()


@pytest.mark.slow
def test_ignore_spacing_feeds_the_training_spacing(runs, tmp_path, monkeypatch):
    train_args = {"image_size": 32, "scales": [1.0, 0.5]}
    assert ev.training_spacings(train_args) == [(1 / 32, 1 / 32), (1 / 16, 1 / 16)]

    seen = []  # the spacings argument of every forward
    build = ev.build_eval_model

    def recording_model(*a, **kw):
        model = build(*a, **kw)
        forward = model.forward
        model.forward = lambda levels, spacings=None: seen.append(spacings) or forward(levels, spacings)
        return model

    monkeypatch.setattr(ev, "build_eval_model", recording_model)
    evaluate(runs["seg"], tmp_path / "a", "--resolutions", "64", "--ignore-spacing")
    assert seen and all(s == ev.training_spacings(train_args) for s in seen)
    seen.clear()
    evaluate(runs["seg"], tmp_path / "b", "--resolutions", "64")
    assert seen and all(s is None for s in seen)  # the model derives 1 / size: 1/64, 1/32

    # ...and it changes what RoSE computes away from the training size
    monkeypatch.undo()
    train_args, state = ev.load_run(str(runs["seg"]), None)
    model = ev.build_eval_model(train_args, state, 64, torch.device("cpu"), "ckpt")
    levels, _ = seg_collate([SegDataset("synthetic", "test", 64, scales=train_args["scales"])[0]])
    with torch.no_grad():
        assert not torch.allclose(model(levels), model(levels, ev.training_spacings(train_args)))


def test_detections_json_in_original_pixels():
    det = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}
    coco = SimpleNamespace(source="coco", cat_ids=[5, 9], num_classes=2)
    [entry] = ev.detections_json([det], [{"image_id": 42, "orig_size": (200, 100)}], coco, 50)
    assert entry["image_id"] == 42 and entry["category_id"] == 9  # label 2 -> second category id
    assert entry["bbox"] == pytest.approx([20, 40, 20, 80])  # x * 100/50, y * 200/50, as xywh
    synthetic = SimpleNamespace(source="synthetic", num_classes=3)
    entries = ev.detections_json([det, det], [{"image_id": 7, "orig_size": (50, 50)}] * 2, synthetic, 50)
    assert [e["image_id"] for e in entries] == [0, 1] and entries[0]["bbox"] == pytest.approx([10, 10, 10, 20])


@pytest.mark.slow
@pytest.mark.parametrize("value", ["abc", "12a", "128,,256", "", "0", "-64", "2"])
def test_bad_resolutions_are_clear_errors(runs, tmp_path, value):
    with pytest.raises(ValueError, match="^--resolutions: ") as e:
        evaluate(runs["seg"], tmp_path / "out", "--resolutions", value)
    assert "\n" not in str(e.value) and (value == "" or value.split(",")[-1] in str(e.value))
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.slow
def test_too_small_resolution_message(runs, tmp_path):
    # det: patch 4, scales 1,0.5 -> a 4 px image has a 2 px coarsest level
    with pytest.raises(ValueError, match="--resolutions: 4 is too small for this model: its coarsest pyramid "
                                         "level would be 2 px, below the stem patch of 4 px"):
        evaluate(runs["det"], tmp_path / "out", "--resolutions", "64,4")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_command_line_errors_exit_without_traceback(runs, tmp_path):
    # one run through the command line (the other cases above go through the same ValueError)
    run = python("eval.py", "--ckpt", str(runs["seg"]), "--resolutions", "64,2", "--out", str(tmp_path / "out"))
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().startswith("error: --resolutions:") and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_failed_forward_names_the_resolution(runs, tmp_path, monkeypatch):
    def out_of_memory(levels, spacings=None):
        if levels[0].shape[-1] == 64:
            raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore details")
        return torch.zeros(levels[0].shape[0], 1, *levels[0].shape[2:])

    monkeypatch.setattr(ev, "build_eval_model", lambda *a: out_of_memory)
    with pytest.raises(ValueError, match="^--resolutions: evaluation at 64 px failed: CUDA out of memory") as e:
        evaluate(runs["seg"], tmp_path / "out", "--resolutions", "32,64")
    assert "\n" not in str(e.value)
    assert [row["resolution"] for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]] == [32]


@pytest.mark.slow
def test_task_mismatch_and_bad_checkpoints(runs, tmp_path):
    with pytest.raises(ValueError, match="^--task det: checkpoint is for task seg"):
        evaluate(runs["seg"], tmp_path / "out", "--task", "det", "--resolutions", "64")
    truncated = tmp_path / "truncated.pt"
    data = runs["seg"].read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"^{truncated}: cannot load checkpoint"):
        evaluate(truncated, tmp_path / "out", "--resolutions", "64")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not a train.py checkpoint"):
        evaluate(tmp_path / "other.pt", tmp_path / "out", "--resolutions", "64")
    with pytest.raises(ValueError, match="--ignore-spacing: only for --task seg"):
        evaluate(runs["det"], tmp_path / "out", "--resolutions", "64", "--ignore-spacing")
    assert not (tmp_path / "out").exists()
