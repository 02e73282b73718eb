"""ablate.sh and tools/ablate_table.py: the study writes its table, skips finished runs,
resumes after a kill, and reports a run that runs out of memory. Tiny preset, CPU."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import ROOT


def study_env(out, variants, **extra):
    return {**os.environ, "PRESET": "tiny", "OUT": str(out), "VARIANTS": variants, "SEEDS": "0",
            "EPOCHS": "1", "TRAIN_SIZE": "16", "VAL_SIZE": "4", "TEST_LIMIT": "4", **extra}


def study(env):
    run = subprocess.run(["bash", "ablate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def csv_rows(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def mtimes(run_dir):
    return {p: os.stat(os.path.join(dp, p)).st_mtime_ns
            for dp, _, files in os.walk(run_dir) for p in files if not p.endswith(".log")}


@pytest.mark.slow
def test_killed_study_resumes_and_finished_runs_are_skipped(tmp_path):
    out = tmp_path / "study"
    env = study_env(out, "default,pe_none")
    first = out / "runs" / "default_s0"
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(["bash", "ablate.sh"], cwd=ROOT, env=env, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            start = time.time()
            while not (first / "eval_ignore_spacing" / "results.json").exists():  # the first run is finished
                assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
                assert time.time() - start < 120
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole study: script, subshells, train.py / eval.py
            proc.wait()
    assert not (out / "results.md").exists()
    before = mtimes(first)

    log = study(env)  # resumes
    assert "skip default seed 0 (finished)" in log and "] train default" not in log and "] train pe_none" in log
    assert mtimes(first) == before  # nothing of the finished run was redone
    second = out / "runs" / "pe_none_s0"
    assert len((second / "metrics.jsonl").read_text().splitlines()) == 1  # one epoch, recorded once
    assert (second / "eval" / "results.json").exists() and not (second / "eval_ignore_spacing").exists()
    rows = csv_rows(out)
    assert [r["variant"] for r in rows] == ["default", "default (tested with --ignore-spacing)", "pe_none"]
    assert all(r["status"] == "ok" and r["seeds_ok"] == "1/1" and float(r["dice_mean"]) >= 0 for r in rows)
    assert int(rows[0]["params"]) > 0 and float(rows[0]["train_time_s_mean"]) > 0
    table = (out / "results.md").read_text()
    assert "| pe_none | `--pe none` |" in table and "(n=1)" in table.split("Paired differences")[1].split("| pe_none |")[1]

    snapshot = {d: mtimes(out / "runs" / d) for d in ("default_s0", "pe_none_s0")}
    log = study(env)  # everything finished: nothing runs again
    assert log.count("(finished)") == 2 and "] train " not in log and "] evaluated " not in log
    assert {d: mtimes(out / "runs" / d) for d in snapshot} == snapshot


@pytest.mark.slow
def test_out_of_memory_is_recorded_and_the_study_goes_on(tmp_path):
    # A `python` in front of the real one: train.py with --sga dense dies like a CPU out-of-memory.
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(
        "#!/usr/bin/env bash\n"
        'if [[ $1 == train.py && " $* " == *" --sga dense "* ]]; then\n'
        "  echo 'RuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
        "not enough memory: you tried to allocate 68719476736 bytes.' >&2; exit 1\n"
        "fi\n"
        f'exec {sys.executable} "$@"\n')
    (shim / "python").chmod(0o755)
    out = tmp_path / "study"
    env = study_env(out, "sga_dense", PATH=f"{shim}:{os.environ['PATH']}")
    log = study(env)
    marker = out / "runs" / "sga_dense_s0" / "does_not_fit.txt"
    assert "DOES NOT FIT sga_dense_s0" in log and "not enough memory" in marker.read_text()
    assert csv_rows(out)[0]["status"] == "does not fit"
    assert "| sga_dense | `--sga dense` |  |  | does not fit |" in (out / "results.md").read_text()
    assert "skip sga_dense seed 0" in study(env)  # not retried (delete the marker to retry)


def fake_run(run_dir, dice, size=32, resized=None):
    """A finished run folder as train.py and eval.py leave it, with made-up scores: dice at 0.5x,
    1x, 2x, 4x natively, resized (optional) the resize-to-train baseline at the same sizes."""
    os.makedirs(run_dir / "eval")
    args = {"data": "synthetic", "image_size": size, "train_size": 16, "val_size": 4, "epochs": 2, "batch_size": 8,
            "lr": 1e-3, "scales": [1.0], "pe": "rose", "sga": "local", "depth": 4, "dim": 16, "heads": 2, "patch": 4,
            "strides": [2, 2, 2, 1], "stem": "conv", "head": "conv", "token_grid": "physical", "sga_iters": 1}
    (run_dir / "args.json").write_text(json.dumps(args))
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "epoch_time_s": 1.5}\n{"epoch": 2, "epoch_time_s": 2.5}\n')
    torch.save({"model": {"w": torch.zeros(10, 10), "b": torch.zeros(10)}}, run_dir / "ckpt_last.pt")
    sizes = (size // 2, size, size * 2, size * 4)
    rows = [{"resolution": r, "input": "native", "dice": d, "iou": d / 2, "images": 4} for r, d in zip(sizes, dice)]
    rows += [{"resolution": r, "input": f"resized to {size}", "dice": d, "iou": d / 2, "images": 4}
             for r, d in zip(sizes, resized or ())]
    (run_dir / "eval" / "results.json").write_text(json.dumps({"rows": rows}))


@pytest.mark.slow
def test_table_statistics_and_paired_differences(tmp_path):
    (tmp_path / "variants.tsv").write_text("variant\tflags\ndefault\t\npe_none\t--pe none\nsga_dense\t--sga dense\n")
    runs = tmp_path / "runs"
    fake_run(runs / "default_s0", (0.5, 0.80, 0.7, 0.6), resized=(0.4, 0.80, 0.7, 0.7))
    fake_run(runs / "default_s1", (0.5, 0.82, 0.7, 0.6), resized=(0.4, 0.82, 0.7, 0.7))
    fake_run(runs / "default_s2", (0.5, 0.90, 0.7, 0.6), resized=(0.4, 0.90, 0.7, 0.7))
    # pe_none: 0.20, 0.18, 0.30 below the default of its seed at 1x (a paired effect the seed spread
    # of 0.053 would hide); at 2x 0.7 + (0.01, -0.01, 0.0): no effect
    fake_run(runs / "pe_none_s0", (0.5, 0.60, 0.71, 0.6))
    fake_run(runs / "pe_none_s1", (0.5, 0.64, 0.69, 0.6))
    fake_run(runs / "pe_none_s2", (0.5, 0.60, 0.70, 0.6))
    os.makedirs(runs / "sga_dense_s0")
    (runs / "sga_dense_s0" / "does_not_fit.txt").write_text("exit status 1\nout of memory\n")
    run = subprocess.run([sys.executable, "tools/ablate_table.py", "--out", str(tmp_path), "--seeds", "0,1,2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = {r["variant"]: r for r in csv_rows(tmp_path)}
    assert abs(float(rows["default"]["dice_mean"]) - 0.84) < 1e-9
    assert abs(float(rows["default"]["dice_std"]) - statistics.stdev([0.80, 0.82, 0.90])) < 1e-9
    assert abs(float(rows["default"]["gain_0.5x_mean"]) - 0.1) < 1e-9  # native 0.5 against 0.4 resized
    assert abs(float(rows["default"]["gain_4x_mean"]) + 0.1) < 1e-9 and rows["pe_none"]["gain_4x_mean"] == ""
    assert rows["default"]["params"] == "110" and float(rows["default"]["train_time_s_mean"]) == 4.0
    assert rows["sga_dense"]["status"] == "does not fit, missing" and rows["sga_dense"]["seeds_ok"] == "0/3"
    diffs = [-0.20, -0.18, -0.30]  # pe_none minus default, seed by seed
    half = 4.303 * statistics.stdev(diffs) / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert abs(float(rows["pe_none"]["paired_dice_1x_mean"]) - statistics.mean(diffs)) < 1e-9
    assert abs(float(rows["pe_none"]["paired_dice_1x_ci95"]) - half) < 1e-9
    table = (tmp_path / "results.md").read_text()
    m = statistics.mean(diffs)
    assert f"| pe_none | **{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]** | " in table  # resolved
    assert "| +0.000 [-0.025, +0.025] |" in table.split("| pe_none |")[2]  # 2x: not resolved, not bold
    # seeds that would resolve an effect of the measured size and paired std: 3 (4.303 * 0.064 / sqrt(3)
    # < 0.227, 12.706 * 0.064 / sqrt(2) is not); at 4x there is no effect to resolve
    assert table.split("| pe_none |")[2].splitlines()[0].endswith("| 3 / - |")
    assert "token grid physical, stem conv, head conv, scales 1, pe rose, sga local (1 round), depth 4, dim 16" in table
    assert "sga_dense" not in table.split("Paired differences")[1]  # nothing to compare
    with Image.open(tmp_path / "paired_differences.png") as im:  # the forest plot of the same numbers
        assert im.width > 600
        colours = dict((c, n) for n, c in im.convert("RGB").getcolors(1 << 20))
    assert colours.get((31, 119, 180), 0) > 50 and colours.get((130, 130, 130), 0) > 50  # resolved and not


@pytest.mark.parametrize("study", ["cpu", "cpu_rest", "cpu_seeds", "twins", "det"])
def test_results_doc_shows_the_table_the_study_wrote(study):
    readme = open(os.path.join(ROOT, "RESULTS.md")).read()
    start, end = f"<!-- begin ablations/{study}/results.md -->\n", f"\n<!-- end ablations/{study}/results.md -->"
    shown = readme[readme.index(start) + len(start):readme.index(end)]
    assert shown == open(os.path.join(ROOT, "ablations", study, "results.md")).read().rstrip()


# --- the resolution robustness study (PRESET=robust, tools/robust_table.py) ---------------

def robust_env(out, variants, **extra):
    """PRESET=robust at tiny sizes: 32 px (multi: 16..64 px), tested at 16, 32, 64, 128 px."""
    return study_env(out, variants, PRESET="robust", IMAGE_SIZE="32", DIM="16", HEADS="2", BATCH_SIZE="8",
                     SEEDS="1", **extra)


@pytest.mark.slow
def test_robust_study_writes_table_and_plot(tmp_path):
    # one real run (RAT, multi-size) through the whole preset; the table's arithmetic with
    # several models, recipes and seeds is checked on made-up runs below
    out = tmp_path / "robust"
    env = robust_env(out, "rose_multi")
    log = study(env)
    assert "] train rose_multi seed 1: python train.py ... --pe rose --train-sizes 16,24,32,48,64" in log
    args = json.loads((out / "runs" / "rose_multi_s1" / "args.json").read_text())
    assert args["train_sizes"] == [16, 24, 32, 48, 64] and args["image_size"] == 32 and args["model"] == "rat"
    evaluated = json.loads((out / "runs" / "rose_multi_s1" / "eval" / "results.json").read_text())["rows"]
    assert [(r["resolution"], r["input"]) for r in evaluated] == \
        [(r, how) for r in (16, 32, 64, 128) for how in ("native", "resized to 32")]

    rows = csv_rows(out)
    assert [(r["model"], r["recipe"], r["input"], r["resolution"]) for r in rows] == \
        [("rose", "multi", how, str(res)) for how in ("native", "resized") for res in (16, 32, 64, 128)]
    assert all(r["status"] == "ok" and r["seeds"] == "1" and 0 <= float(r["dice_mean"]) <= 1 for r in rows)
    table = (out / "results.md").read_text()
    assert "| RAT (rose) | 16-64 px | native |" in table and "| RAT (rose) | 16-64 px | resized to 32 |" in table
    assert "Dice 128 px (4x)" in table

    with Image.open(out / "dice_vs_resolution.png") as im:
        im.verify()  # a complete, valid PNG
    with Image.open(out / "dice_vs_resolution.png") as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 300
        colours = im.convert("RGB").getcolors(1 << 20)
    assert max(n for n, c in colours if c == (31, 119, 180)) > 100  # rose's line and markers are drawn
    with Image.open(out / "learning_curves.png") as im:   # train loss and validation Dice per epoch
        assert max(n for n, c in im.convert("RGB").getcolors(1 << 20) if c == (31, 119, 180)) > 20

    log = study(env)  # finished: only the table is rebuilt
    assert "skip rose_multi seed 1 (finished)" in log and "] train " not in log and "] evaluated " not in log


@pytest.mark.slow
@pytest.mark.parametrize("preset, models", [
    ("robust", ("rose", "rope", "absolute", "none", "unet")), ("robust_det", ("rat", "cnn", "resnet"))])
def test_robust_presets_list_every_model_and_recipe(tmp_path, preset, models):
    env = (robust_env if preset == "robust" else robust_det_env)(tmp_path / preset, "bogus")
    run = subprocess.run(["bash", "ablate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "unknown variant bogus (known: " + " ".join(
        f"{m}_{r}" for m in models for r in ("single", "multi")) + ")" in run.stderr, run.stderr


def fake_robust_run(run_dir, native, resized, train_sizes=None, size=32):
    """A finished robustness run folder with made-up Dice at 16, 32, 64, 128 px."""
    os.makedirs(run_dir / "eval")
    args = {"data": "synthetic", "model": "rat", "image_size": size, "train_sizes": train_sizes, "train_size": 16,
            "val_size": 4, "epochs": 2, "batch_size": 8, "lr": 1e-3, "scales": [1.0, 0.5], "pe": "rose",
            "sga": "local", "depth": 4, "dim": 16, "heads": 2, "patch": 2}
    (run_dir / "args.json").write_text(json.dumps(args))
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "epoch_time_s": 1.5}\n{"epoch": 2, "epoch_time_s": 2.5}\n')
    rows = [{"resolution": r, "input": how, "dice": d, "images": 4}
            for r, n, z in zip((16, 32, 64, 128), native, resized)
            for how, d in (("native", n), (f"resized to {size}", z))]
    (run_dir / "eval" / "results.json").write_text(json.dumps({"rows": rows}))


@pytest.mark.slow
def test_robust_table_statistics(tmp_path):
    (tmp_path / "variants.tsv").write_text(
        "variant\tflags\nrose_single\t--pe rose\nrose_multi\t--pe rose --train-sizes 16,32,64\nunet_single\t--model unet\n")
    runs = tmp_path / "runs"
    fake_robust_run(runs / "rose_single_s0", (0.5, 0.80, 0.6, 0.4), (0.6, 0.80, 0.7, 0.7))
    fake_robust_run(runs / "rose_single_s1", (0.5, 0.82, 0.6, 0.2), (0.6, 0.82, 0.7, 0.7))
    fake_robust_run(runs / "rose_multi_s0", (0.7, 0.80, 0.8, 0.8), (0.6, 0.80, 0.7, 0.7), train_sizes=[16, 32, 64])
    os.makedirs(runs / "unet_single_s0")
    (runs / "unet_single_s0" / "failed.txt").write_text("exit status 1\nboom\n")
    run = subprocess.run([sys.executable, "tools/robust_table.py", "--out", str(tmp_path), "--seeds", "0,1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = {(r["model"], r["recipe"], r["input"], int(r["resolution"])): r for r in csv_rows(tmp_path)}
    single = rows["rose", "single", "native", 32]
    assert abs(float(single["dice_mean"]) - 0.81) < 1e-9 and single["seeds"] == "2"
    assert abs(float(single["dice_std"]) - 0.02 ** 0.5 / 10) < 1e-9  # sample std of 0.80, 0.82
    at_4x = rows["rose", "single", "native", 128]  # native - resized per seed: -0.3, -0.5
    assert abs(float(at_4x["native_minus_resized_mean"]) + 0.4) < 1e-9
    assert rows["rose", "multi", "resized", 128]["dice_std"] == ""  # one seed: no std
    assert rows["unet", "single", "native", 32]["status"] == "failed, missing"
    table = (tmp_path / "results.md").read_text()
    assert "| RAT (rose) | 32 px | native | 4 ± 0 | 0.500 ± 0.000 | 0.810 ± 0.014 | 0.600 ± 0.000 | 0.300 ± 0.141 | 2/2 |" in table
    assert "| RAT (rose) | 16-64 px | native | 4 | 0.700 | 0.800 | 0.800 | 0.800 | 1/2 (missing) |" in table
    assert "| U-Net | 32 px | native | - | failed, missing | - | - | - | 0/2 (failed, missing) |" in table
    assert "| RAT (rose) | 32 px | -0.100 ± 0.000 | -0.100 ± 0.000 | -0.400 ± 0.141 |" in table
    assert "| RAT (rose) | 16-64 px | +0.100 | +0.100 | +0.100 |" in table
    with Image.open(tmp_path / "dice_vs_resolution.png") as im:
        im.verify()


# --- the same study for detection (PRESET=robust_det): AP50 and AP ----------------------

def robust_det_env(out, variants, **extra):
    """PRESET=robust_det at tiny sizes: 32 px (multi: 16..64 px), tested at 24, 32, 48, 64 px;
    dim 32, the smallest the detector takes (FCOS's GroupNorm(32))."""
    return study_env(out, variants, PRESET="robust_det", IMAGE_SIZE="32", DIM="32", HEADS="2", BATCH_SIZE="8",
                     TRAIN_SIZE="8", **extra)


@pytest.mark.slow
def test_robust_det_study_writes_table_and_plot(tmp_path):
    # one real detection run (RAT, multi-size) through the whole preset; the table's
    # arithmetic is checked on made-up runs below
    out = tmp_path / "robust_det"
    log = study(robust_det_env(out, "rat_multi"))
    assert "] train rat_multi seed 0: python train.py ... --model rat --train-sizes 16,24,32,48,64" in log
    args = json.loads((out / "runs" / "rat_multi_s0" / "args.json").read_text())
    assert (args["task"], args["model"], args["image_size"], args["patch"]) == ("det", "rat", 32, 4)
    assert args["train_sizes"] == [16, 24, 32, 48, 64]
    evaluated = json.loads((out / "runs" / "rat_multi_s0" / "eval" / "results.json").read_text())["rows"]
    assert [(r["resolution"], r["input"]) for r in evaluated] == \
        [(r, how) for r in (24, 32, 48, 64) for how in ("native", "resized to 32")]

    rows = csv_rows(out)
    assert [(r["model"], r["recipe"], r["input"], r["resolution"]) for r in rows] == \
        [("rat", "multi", how, str(res)) for how in ("native", "resized") for res in (24, 32, 48, 64)]
    assert all(0 <= float(r["ap50_mean"]) <= 1 and 0 <= float(r["ap_mean"]) <= 1 and r["status"] == "ok"
               for r in rows) and "dice_mean" not in rows[0]
    table = (out / "results.md").read_text()
    assert "| model | recipe | input | train time (s) | AP50 24 px (0.75x) | AP50 32 px (1x) | AP50 48 px (1.5x) " \
           "| AP50 64 px (2x) | seeds |" in table and "| AP 64 px (2x) |" in table
    native = [line for line in table.splitlines() if line.startswith("| RAT | 16-64 px | native |")]
    assert len(native) == 2  # the AP50 table and the AP table
    assert all(float(cell) >= 0 for cell in native[0].split("|")[5:9]), native[0]  # four AP50 numbers

    png = out / "ap50_vs_resolution.png"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.width > 500 and im.height > 300
        colours = im.convert("RGB").getcolors(1 << 20)
    assert max(n for n, c in colours if c == (31, 119, 180)) > 100  # RAT's line and markers are drawn
    assert not (out / "dice_vs_resolution.png").exists()


def fake_det_run(run_dir, model, native, resized, params, train_sizes=None, size=32):
    """A finished detection robustness run with made-up AP50 at 24, 32, 48, 64 px; its AP is
    half its AP50, so that a table showing AP50 as AP (or back) is caught."""
    os.makedirs(run_dir / "eval")
    args = {"task": "det", "data": "synthetic", "model": model, "image_size": size, "train_sizes": train_sizes,
            "train_size": 8, "val_size": 4, "epochs": 2, "batch_size": 8, "lr": 1e-3, "scales": [1.0, 0.5],
            "pe": "rose", "sga": "local", "depth": 4, "dim": 32, "heads": 2, "patch": 4, "strides": [2, 2, 1, 1]}
    (run_dir / "args.json").write_text(json.dumps(args))
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1, "epoch_time_s": 1.5}\n{"epoch": 2, "epoch_time_s": 2.5}\n')
    torch.save({"model": {"w": torch.zeros(params)}}, run_dir / "ckpt_last.pt")
    rows = [{"resolution": r, "input": how, "AP": v / 2, "AP50": v, "AP75": 0.0, "APs": v / 4, "images": 4}
            for r, n, z in zip((24, 32, 48, 64), native, resized)
            for how, v in (("native", n), (f"resized to {size}", z))]
    (run_dir / "eval" / "results.json").write_text(json.dumps({"task": "det", "rows": rows}))


@pytest.mark.slow
def test_robust_table_statistics_det(tmp_path):
    (tmp_path / "variants.tsv").write_text("variant\tflags\nrat_single\t--model rat\ncnn_multi\t--model cnn "
                                           "--train-sizes 16,32,64\nresnet_single\t--model resnet\n")
    runs = tmp_path / "runs"
    fake_det_run(runs / "rat_single_s0", "rat", (0.5, 0.60, 0.6, 0.4), (0.6, 0.60, 0.7, 0.7), 100_000)
    fake_det_run(runs / "rat_single_s1", "rat", (0.5, 0.70, 0.6, 0.2), (0.6, 0.70, 0.7, 0.7), 100_000)
    fake_det_run(runs / "cnn_multi_s0", "cnn", (0.8, 0.90, 0.9, 0.9), (0.7, 0.90, 0.8, 0.8), 120_000,
                 train_sizes=[16, 32, 64])
    os.makedirs(runs / "resnet_single_s0")
    (runs / "resnet_single_s0" / "failed.txt").write_text("exit status 1\nboom\n")
    run = subprocess.run([sys.executable, "tools/robust_table.py", "--out", str(tmp_path), "--seeds", "0,1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = {(r["model"], r["recipe"], r["input"], int(r["resolution"])): r for r in csv_rows(tmp_path)}
    single = rows["rat", "single", "native", 32]
    assert abs(float(single["ap50_mean"]) - 0.65) < 1e-9 and single["seeds"] == "2"
    assert abs(float(single["ap50_std"]) - 0.005 ** 0.5) < 1e-9  # sample std of 0.60, 0.70
    assert abs(float(single["ap_mean"]) - 0.325) < 1e-9 and abs(float(single["ap_std"]) - 0.005 ** 0.5 / 2) < 1e-9
    at_2x = rows["rat", "single", "native", 64]  # native - resized AP50 per seed: -0.3, -0.5
    assert abs(float(at_2x["native_minus_resized_mean"]) + 0.4) < 1e-9
    assert rows["cnn", "multi", "resized", 64]["ap50_std"] == ""  # one seed: no std
    assert rows["resnet", "single", "native", 32]["status"] == "failed, missing"
    table = (tmp_path / "results.md").read_text()
    assert "## Resolution robustness study, detection" in table
    assert "Parameters: RAT 0.10M, small CNN 0.12M." in table
    assert "| RAT | 32 px | native | 4 ± 0 | 0.500 ± 0.000 | 0.650 ± 0.071 | 0.600 ± 0.000 | 0.300 ± 0.141 | 2/2 |" \
        in table
    assert "| RAT | 32 px | native | 0.250 ± 0.000 | 0.325 ± 0.035 | 0.300 ± 0.000 | 0.150 ± 0.071 | 2/2 |" \
        in table.split("AP, the same runs:")[1]  # the AP table: no train time column
    assert "| small CNN | 16-64 px | native | 4 | 0.800 | 0.900 | 0.900 | 0.900 | 1/2 (missing) |" in table
    assert "| ResNet-18 | 32 px | native | - | failed, missing | - | - | - | 0/2 (failed, missing) |" in table
    assert "| RAT | 32 px | -0.100 ± 0.000 | -0.100 ± 0.000 | -0.400 ± 0.141 |" in table
    assert "| small CNN | 16-64 px | +0.100 | +0.100 | +0.100 |" in table
    with Image.open(tmp_path / "ap50_vs_resolution.png") as im:
        im.verify()
    assert not (tmp_path / "dice_vs_resolution.png").exists()


# --- the detection component study (PRESET=det, tools/ablate_table.py) ---------------------

@pytest.mark.slow
def test_det_preset_lists_its_variants_and_sweep(tmp_path):
    env = study_env(tmp_path / "det", "bogus", PRESET="det")
    run = subprocess.run(["bash", "ablate.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "unknown variant bogus (known: default scales_1 pe_rope pe_none sga_none cnn)" \
        in run.stderr, run.stderr


@pytest.mark.slow
def test_det_component_table(tmp_path):
    # detection runs in the component table: AP50, AP, AP small at 1x, AP50 at 0.75x, 1.5x, 2x and the
    # gain over the resize baseline; no --ignore-spacing row (the segmentation default only)
    (tmp_path / "variants.tsv").write_text("variant\tflags\ndefault\t\npe_none\t--pe none\ncnn\t--model cnn\n")
    runs = tmp_path / "runs"
    fake_det_run(runs / "default_s0", "rat", (0.5, 0.60, 0.6, 0.4), (0.6, 0.60, 0.7, 0.7), 100)
    fake_det_run(runs / "pe_none_s0", "rat", (0.5, 0.52, 0.5, 0.3), (0.6, 0.52, 0.6, 0.6), 100)
    fake_det_run(runs / "cnn_s0", "cnn", (0.2, 0.70, 0.6, 0.5), (0.6, 0.70, 0.7, 0.7), 120)
    run = subprocess.run([sys.executable, "tools/ablate_table.py", "--out", str(tmp_path), "--seeds", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rows = {r["variant"]: r for r in csv_rows(tmp_path)}
    assert list(rows) == ["default", "pe_none", "cnn"]
    assert float(rows["default"]["ap50_mean"]) == 0.6 and float(rows["default"]["ap_mean"]) == 0.3
    assert float(rows["default"]["ap_small_mean"]) == 0.15 and float(rows["default"]["ap50_2x_mean"]) == 0.4
    assert abs(float(rows["default"]["gain_0.75x_mean"]) + 0.1) < 1e-9  # native 0.5 against 0.6 resized
    assert abs(float(rows["cnn"]["paired_ap50_1x_mean"]) - 0.1) < 1e-9 and rows["cnn"]["paired_ap50_1x_ci95"] == ""
    assert abs(float(rows["pe_none"]["paired_ap50_1.5x_mean"]) + 0.1) < 1e-9
    table = (tmp_path / "results.md").read_text()
    assert "| AP50 | AP | AP small | AP50 0.75x | AP50 1.5x | AP50 2x | gain 0.75x | gain 1.5x | gain 2x |" in table
    assert "head FCOS, scales 1,0.5" in table and "ignore-spacing" not in table
    assert "| pe_none | -0.080 (n=1) | +0.000 (n=1) | -0.100 (n=1) | -0.100 (n=1) |" in table


def test_tables_are_written_whole_or_not_at_all(tmp_path):
    from tools.ablate_table import write_csv

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot format")

    path = tmp_path / "results.csv"
    path.write_text("the previous table\n")
    with pytest.raises(RuntimeError):
        write_csv(str(path), [{"a": 1}, {"a": Unprintable()}])  # fails after the first row
    assert path.read_text() == "the previous table\n" and os.listdir(tmp_path) == ["results.csv"]
