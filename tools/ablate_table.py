"""Assemble a component study's table from its run folders (written by ablate.sh).

    python tools/ablate_table.py --out ablations/cpu --seeds 0,1,2 --preset cpu
    python tools/ablate_table.py --out ablations/det --seeds 0 --preset det

Reads OUT/variants.tsv (the requested variants and their train.py flags) and, per run
OUT/runs/<variant>_s<seed>/: metrics.jsonl (training time), ckpt_last.pt (parameter
count), eval/results.json (test split, native and resized to the training size:
segmentation Dice and IoU at 0.5x, 1x, 2x, 4x the training size; detection AP50, AP and
AP small at 0.75x, 1x, 1.5x, 2x) and, for the segmentation default, eval_ignore_spacing/.
Writes OUT/results.md and OUT/results.csv: mean +- std over seeds (sample std), then the
paired difference of each variant to the default run of the same seed (same data order,
same initial draw), with a 95% t interval over seeds and the seeds an effect of the measured
size would need; OUT/paired_differences.png draws those intervals.
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys

import torch
from PIL import Image, ImageDraw, ImageFont

# data.py from any working directory, run as a script or imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import atomic_open, save_png_atomic  # noqa: E402

# task -> the scores of eval.py's rows shown at the training size (the first is also shown at the
# other test sizes, and as gain: native minus resize-to-train), and the test sizes / training size
TASKS = {"seg": (("dice", "iou"), (1, 0.5, 2, 4)), "det": (("AP50", "AP", "APs"), (1, 0.75, 1.5, 2))}
NAMES = {"dice": "Dice", "iou": "IoU", "AP50": "AP50", "AP": "AP", "APs": "AP small"}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # in the state dict, not parameters
# two-sided 95% quantiles of Student's t, by degrees of freedom (n seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def num_params(run):
    """Parameters in the run's ckpt_last.pt, None without one; shared with robust_table.py."""
    path = os.path.join(run, "ckpt_last.pt")
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return sum(v.numel() for k, v in state.items() if not k.endswith(BUFFERS))


def read_study_run(run):
    """-> dict with status ('ok', 'does not fit', 'failed', 'missing'), args, time, params, scores."""
    if os.path.exists(os.path.join(run, "does_not_fit.txt")):
        return {"status": "does not fit"}
    if os.path.exists(os.path.join(run, "failed.txt")):
        return {"status": "failed"}
    if not os.path.exists(os.path.join(run, "eval", "results.json")):
        return {"status": "missing"}
    args = read_json(os.path.join(run, "args.json"))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    out = {"status": "ok", "args": args, "time": sum(e["epoch_time_s"] for e in epochs), "params": num_params(run)}
    scores, factors = TASKS[args.get("task", "seg")]
    for tag, sub in (("", "eval"), ("ignore", "eval_ignore_spacing")):
        path = os.path.join(run, sub, "results.json")
        if not os.path.exists(path):
            continue
        res = read_json(path)
        out["images"] = res["rows"][0]["images"]
        for factor in factors:
            rows = [r for r in res["rows"] if r["resolution"] == round(args["image_size"] * factor)]
            native = next((r for r in rows if r.get("input", "native") == "native"), None)
            resized = next((r for r in rows if r.get("input", "native") != "native"), None)
            if native:
                out.update(((tag, k, factor), native[k]) for k in scores)
            if native and resized and factor != 1:
                out[(tag, "gain", factor)] = native[scores[0]] - resized[scores[0]]
    return out


def stats(values):
    """-> (mean, std or None, n)"""
    if not values:
        return None, None, 0
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def fmt(m, s, digits=3):
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def columns(task):
    """-> [(score key, factor)], their headers"""
    scores, factors = TASKS[task]
    cols = [(k, 1) for k in scores] + [(scores[0], f) for f in factors[1:]] + [("gain", f) for f in factors[1:]]
    return cols, [NAMES.get(k, k) + ("" if f == 1 and k != "gain" else f" {f:g}x") for k, f in cols]


def summarize(name, flags, runs, cols, tag=""):
    ok = [r for r in runs if r["status"] == "ok"]
    row = {"variant": name + (" (tested with --ignore-spacing)" if tag else ""), "change": flags or "(default model)",
           "seeds": f"{len(ok)}/{len(runs)}", "status": ", ".join(sorted({r["status"] for r in runs} - {"ok"}))}
    row["params"] = ok[0]["params"] if ok else None
    row["time"] = stats([r["time"] for r in ok])
    for metric, factor in cols:
        row[(metric, factor)] = stats([r[(tag, metric, factor)] for r in ok if (tag, metric, factor) in r])
    return row


def paired(runs, ref_runs, tag, score, factor):
    """Per-seed differences to the default run of the same seed (scores exist only for finished
    runs) -> (mean, half-width of the 95% t interval or None, n, std of the differences)."""
    key, ref_key = (tag, score, factor), ("", score, factor)
    diffs = [r[key] - d[ref_key] for r, d in zip(runs, ref_runs) if key in r and ref_key in d]
    m, s, n = stats(diffs)
    return m, (T975[n - 1] * s / n ** 0.5 if s is not None and n - 1 in T975 else None), n, s


def seeds_to_resolve(m, s):
    """The fewest paired seeds whose 95% interval would exclude 0, were the effect m and the std of
    the differences s as measured (a planning estimate for the next study) -> n, or None past 31."""
    if s is None or not m:
        return None
    return next((n for n in range(2, 32) if T975[n - 1] * s / n ** 0.5 < abs(m)), None)


def paired_cell(m, half, n):
    if m is None:
        return "-"
    if half is None:
        return f"{m:+.3f} (n={n})"
    resolved = "**" if abs(m) > half else ""  # the interval excludes 0
    return f"{resolved}{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]{resolved}"


def font(size):
    """Pillow's default font at `size` px where it can scale; shared with robust_table.py."""
    try:
        return ImageFont.load_default(size=size)  # scalable, where Pillow has FreeType
    except (TypeError, AttributeError, OSError):
        return ImageFont.load_default()


def nice_limit(x):
    """The smallest of 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1 (times powers of ten) at least x."""
    decade = 10 ** math.floor(math.log10(max(x, 1e-6)))
    return next(m * decade for m in (1, 2, 5, 10) if m * decade >= x)


def plot_paired(cells, score_name, factors, path):
    """A forest plot of the paired table: one panel per test size, one row per variant, the mean
    difference to the default as a dot and its 95% interval as a bar; blue where it excludes 0.
    cells: [(variant, [(mean, half, n, std) per factor])]."""
    label_w, W, row_h, top, bottom = 170, 230, 24, 58, 46
    img = Image.new("RGB", (label_w + len(factors) * (W + 34) + 10, top + row_h * len(cells) + bottom), "white")
    d = ImageDraw.Draw(img)
    small = font(13)
    d.text((10, 8), f"{score_name}: variant minus default, paired by seed (dot: mean; bar: 95% t interval; "
           "blue: excludes 0)", fill="black", font=font(15))
    for k, (name, _) in enumerate(cells):
        d.text((label_w - 8, top + row_h * (k + 0.5)), name, fill="black", font=small, anchor="rm")
    for p, f in enumerate(sorted(factors)):  # panels from the coarsest test size to the finest
        i = factors.index(f)
        ends = [abs(c[i][0]) + (c[i][1] or 0) for _, c in cells if c[i][0] is not None]
        lim = nice_limit(max(ends, default=0.01))
        x0, x1 = label_w + p * (W + 34), label_w + p * (W + 34) + W
        y0, y1 = top, top + row_h * len(cells)
        X = lambda v: (x0 + x1) / 2 + v / lim * (x1 - x0) / 2 * 0.92
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.line([(X(0), y0), (X(0), y1)], fill=(150, 150, 150))
        d.text(((x0 + x1) / 2, y0 - 8), f"{f:g}x the training size", fill="black", font=small, anchor="ms")
        for v in (-lim, -lim / 2, 0, lim / 2, lim):
            d.line([(X(v), y1), (X(v), y1 + 4)], fill="black")
            d.text((X(v), y1 + 6), f"{v:+g}" if v else "0", fill="black", font=small, anchor="mt")
        for k, (_, c) in enumerate(cells):
            m, half = c[i][0], c[i][1]
            if m is None:
                continue
            y = top + row_h * (k + 0.5)
            color = (31, 119, 180) if half is not None and abs(m) > half else (130, 130, 130)
            if half is not None:
                d.line([(X(m - half), y), (X(m + half), y)], fill=color, width=3)
            d.ellipse([X(m) - 4, y - 4, X(m) + 4, y + 4], fill=color)
    save_png_atomic(img, path)


def describe_default(d):
    """The default model's choices, every one a row of the study could change."""
    head = "FCOS" if d.get("task") == "det" else d.get("head", "refine")
    return (f"token grid {d.get('token_grid', 'pixel')}, stem {d.get('stem', 'patch')}, head {head}, "
            f"scales {','.join(f'{s:g}' for s in d['scales'])}, pe {d['pe']}, sga {d['sga']} "
            f"({d.get('sga_iters', 3)} round{'s' if d.get('sga_iters', 3) > 1 else ''}), depth {d['depth']}, "
            f"dim {d['dim']}, heads {d['heads']}, patch {d['patch']}, strides "
            f"{','.join(map(str, d.get('strides') or []))}")


def read_study(description):
    """The command line of a study's table script -> (args, seeds, rows of variants.tsv);
    shared with robust_table.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="study folder (holds variants.tsv and runs/)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--preset", default="", help="preset name, for the title")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.replace(" ", ",").split(",") if s]
    with open(os.path.join(a.out, "variants.tsv")) as f:
        return a, seeds, list(csv.DictReader(f, delimiter="\t"))


def header_line(g, d, seeds, images, task):
    """What was trained and how it was scored, in one paragraph."""
    _, factors = TASKS[task]
    score, scores = ("AP50", "AP50, AP, AP small (AP for boxes under 32 x 32 px at the training size)") \
        if task == "det" else ("Dice", "Dice, IoU")
    others = " / ".join(f"{f:g}x" for f in factors[1:])
    return (f"{g['data']} data, {g['image_size']} px, {g['train_size'] or 'all'} train / {g['val_size'] or 'all'} "
            f"val images, {g['epochs']} epochs, batch {g['batch_size']}, lr {g['lr']:g}. Default model: "
            f"{describe_default(d)}; each row changes one thing. Seeds {','.join(map(str, seeds))}: mean ± std "
            f"over seeds (sample std). {scores}: test split ({images} images) at the training size, "
            f"ckpt_best.pt; {score} {others}: the same test images rendered at "
            f"{', '.join(str(round(g['image_size'] * f)) for f in factors[1:])} px; gain: native {score} minus the "
            f"{score} of the same image resized to {g['image_size']} px and the prediction resized back (eval.py "
            f"--resize-to-train). Train time: sum of epoch times.")


def study_table(rows, cols, heads):
    """-> markdown lines, csv rows: one row per variant, mean ± std over seeds"""
    lines = ["| " + " | ".join(["variant", "change", "params", "train time (s)", *heads, "seeds"]) + " |",
             "|---|---|" + "---:|" * (len(heads) + 3)]
    csv_rows = []
    for r in rows:
        scores = [fmt(*r[c][:2]) for c in cols]
        if r["status"] and r["seeds"].startswith("0/"):
            scores = [r["status"]] + ["-"] * (len(scores) - 1)
        note = r["seeds"] + (f" ({r['status']})" if r["status"] else "")
        ignore = "ignore-spacing" in r["variant"]
        lines.append("| " + " | ".join([r["variant"], "same runs" if ignore else f"`{r['change']}`",
                                        "" if ignore or r["params"] is None else f"{r['params'] / 1e6:.3f}M",
                                        "" if ignore or r["time"][0] is None else fmt(*r["time"][:2], digits=0), *scores, note]) + " |")
        csv_row = {"variant": r["variant"], "change": r["change"], "params": r["params"], "seeds_ok": r["seeds"],
                   "status": r["status"] or "ok", "train_time_s_mean": r["time"][0], "train_time_s_std": r["time"][1]}
        for c, head in zip(cols, heads):
            key = head.lower().replace(" ", "_")
            csv_row[f"{key}_mean"], csv_row[f"{key}_std"] = r[c][:2]
        csv_rows.append(csv_row)
    return lines, csv_rows


def paired_table(loaded, variants, csv_rows, task):
    """-> markdown lines of each variant minus the default, seed by seed; adds the numbers to csv_rows"""
    (score, *_), factors = TASKS[task]
    ref, name_of = loaded["default"], NAMES[score]
    lines = ["", "Paired differences to the default (variant minus default, run by run on the same seed; mean "
             "and 95% t interval over seeds; **bold**: the interval excludes 0):", "",
             "| variant | " + " | ".join(f"{name_of} {f:g}x" for f in factors) + f" | seeds to resolve {factors[0]:g}x / "
             f"{factors[-1]:g}x |", "|---|" + "---:|" * (len(factors) + 1)]
    plotted = []
    # the default against itself tested with --ignore-spacing, then every other variant
    for name, tag in [("default", "ignore")] + [(n, "") for n, _ in variants if n != "default"]:
        cells = [paired(loaded[name], ref, tag, score, f) for f in factors]
        if all(c[0] is None for c in cells):
            continue
        if not tag:
            plotted.append((name, cells))
        label = name + (" (tested with --ignore-spacing)" if tag else "")
        needed = [seeds_to_resolve(cells[i][0], cells[i][3]) for i in (0, -1)]
        lines.append(f"| {label} | " + " | ".join(paired_cell(*c[:3]) for c in cells) + " | "
                     + " / ".join("-" if n is None else str(n) for n in needed) + " |")
        row = next(r for r in csv_rows if r["variant"] == label)
        for f, (m, half, _, _) in zip(factors, cells):
            row[f"paired_{score.lower()}_{f:g}x_mean"], row[f"paired_{score.lower()}_{f:g}x_ci95"] = m, half
    return lines, plotted


def write_csv(path, rows):
    """rows as a CSV, the union of their keys as columns, written whole or not at all (data.atomic_open);
    shared with robust_table.py."""
    with atomic_open(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def main():
    a, seeds, table = read_study("Write the component study's results.md and results.csv")
    variants = [(r["variant"], r["flags"]) for r in table]
    loaded = {n: [read_study_run(os.path.join(a.out, "runs", f"{n}_s{s}")) for s in seeds] for n, _ in variants}
    any_ok = next((r for runs in loaded.values() for r in runs if r["status"] == "ok"), None)
    task = any_ok["args"].get("task", "seg") if any_ok else "seg"
    cols, heads = columns(task)
    rows = [summarize(n, fl, loaded[n], cols) for n, fl in variants]
    if "default" in loaded and task == "seg":  # --ignore-spacing: the segmentation default only
        at = 1 + [r["variant"] for r in rows].index("default")
        rows.insert(at, summarize("default", "", loaded["default"], cols, "ignore"))

    folder = os.path.basename(os.path.normpath(a.out))
    named = ", ".join(n for n in (a.preset and f"preset {a.preset}", folder != a.preset and folder) if n)
    lines = [f"## Component study{f' ({named})' if a.preset else ''}", ""]
    if any_ok:
        d = next((r["args"] for r in loaded.get("default", []) if r["status"] == "ok"), any_ok["args"])
        lines += [header_line(any_ok["args"], d, seeds, any_ok["images"], task), ""]
    body, csv_rows = study_table(rows, cols, heads)
    lines += body
    plotted = []
    if "default" in loaded:
        paired_lines, plotted = paired_table(loaded, variants, csv_rows, task)
        lines += paired_lines
        if plotted:
            plot_paired(plotted, NAMES[TASKS[task][0][0]], TASKS[task][1], os.path.join(a.out, "paired_differences.png"))
    with atomic_open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_csv(os.path.join(a.out, "results.csv"), csv_rows)
    print("\n".join(lines))
    print(f"wrote {a.out}/results.md and results.csv" + (" and paired_differences.png" if plotted else ""))


if __name__ == "__main__":
    main()
