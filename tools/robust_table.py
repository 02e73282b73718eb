"""Assemble the resolution robustness study's table and plot from its run folders
(written by `PRESET=robust bash ablate.sh`, or PRESET=robust_det for detection).

    python tools/robust_table.py --out ablations/robust --seeds 0,1,2 --preset robust
    python tools/robust_table.py --out ablations/robust_det --seeds 0 --preset robust_det

Reads OUT/variants.tsv (names <model>_<recipe>, recipe single: trained at one size, multi:
--train-sizes) and, per run OUT/runs/<name>_s<seed>/: args.json (the task), metrics.jsonl
(training time) and eval/results.json (eval.py --resize-to-train: the scores at each test
resolution, for the native image and for the resize baseline; seg: Dice; det: AP50 and AP,
and ckpt_last.pt for the parameter count). Writes OUT/results.md, OUT/results.csv (one row
per model, recipe, input and test resolution; mean and sample std over seeds) and
OUT/<metric>_vs_resolution.png (dice_vs_resolution.png; det: ap50_vs_resolution.png).
"""

import json
import math
import os
import sys

from PIL import Image, ImageDraw

# tools.ablate_table from any working directory, run as a script or imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import atomic_open, save_png_atomic  # noqa: E402
from tools.ablate_table import fmt, font, num_params, read_json, read_study, stats, write_csv  # noqa: E402

INPUTS = ("native", "resized")  # eval.py's input column: "native" or "resized to <train size>"
RECIPES = ("single", "multi")  # trained at one size; with --train-sizes
# Per task, the scores of eval.py's rows that the study reports, (key, label). The first is
# the study's metric (the plot, native minus resized); det adds COCO's AP (IoU 0.5:0.95) as a
# second table, since AP50 alone hides how well the boxes fit.
METRICS = {"seg": (("dice", "Dice"),), "det": (("AP50", "AP50"), ("AP", "AP"))}
DET_MODELS = {"rat": "RAT", "cnn": "small CNN", "resnet": "ResNet-18"}  # train.py --model
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
          (23, 190, 207), (127, 127, 127)]


def display(model, task="seg"):
    """seg: 'rose' -> 'RAT (rose)': the RAT runs differ in --pe; 'unet' -> 'U-Net'.
    det: the variant's model is train.py's --model: 'cnn' -> 'small CNN'."""
    if task == "det":
        return DET_MODELS.get(model, model)
    return "U-Net" if model == "unet" else f"RAT ({model})"


def split_name(name):
    """'rose_multi' -> ('rose', 'multi')"""
    model, _, recipe = name.rpartition("_")
    if recipe not in RECIPES or not model:
        raise ValueError(f"variant {name!r}: expected <model>_single or <model>_multi")
    return model, recipe


def read_sweep_run(run):
    """-> dict with status ('ok', 'does not fit', 'failed', 'missing'), args, time and
    scores[(metric, input, resolution)]; det also params (the baselines' sizes matter)."""
    for marker, status in (("does_not_fit.txt", "does not fit"), ("failed.txt", "failed")):
        if os.path.exists(os.path.join(run, marker)):
            return {"status": status}
    results = os.path.join(run, "eval", "results.json")
    if not os.path.exists(results):
        return {"status": "missing"}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    res, args = read_json(results), read_json(os.path.join(run, "args.json"))
    task = args.setdefault("task", "seg")
    scores = {(key, "native" if row["input"] == "native" else "resized", row["resolution"]): row[key]
              for row in res["rows"] for key, _ in METRICS[task] if key in row}
    val = METRICS[task][0][0]
    curves = {"train loss": [e.get("train_loss") for e in epochs], f"validation {val}": [e.get(val) for e in epochs]}
    return {"status": "ok", "args": args, "images": res["rows"][0]["images"],
            "time": sum(e["epoch_time_s"] for e in epochs), "scores": scores, "curves": curves,
            "params": num_params(run) if task == "det" else None}


def summarize(name, runs, resolutions, metrics):
    """One table entry per (model, recipe): stats over the seeds that finished."""
    ok = [r for r in runs if r["status"] == "ok"]
    model, recipe = split_name(name)
    entry = {"model": model, "recipe": recipe, "seeds": f"{len(ok)}/{len(runs)}",
             "status": ", ".join(sorted({r["status"] for r in runs} - {"ok"})), "time": stats([r["time"] for r in ok]),
             "params": next((r["params"] for r in ok if r["params"]), None)}
    for key, _ in metrics:
        for how in INPUTS:
            for res in resolutions:
                entry[key, how, res] = stats([r["scores"][key, how, res] for r in ok if (key, how, res) in r["scores"]])
    # native minus resized in the study's metric, per seed (the same model both ways), then over seeds
    key = metrics[0][0]
    for res in resolutions:
        entry["gain", res] = stats([r["scores"][key, "native", res] - r["scores"][key, "resized", res] for r in ok
                                    if (key, "native", res) in r["scores"] and (key, "resized", res) in r["scores"]])
    return entry


def factor(res, size):
    return f"{res / size:g}x"


def recipe_labels(ok, size):
    """{'single': '64 px', 'multi': '32-128 px'}, from the runs' own arguments."""
    multi = next((r["args"]["train_sizes"] for r in ok if r["args"].get("train_sizes")), None)
    return {"single": f"{size} px", "multi": f"{min(multi)}-{max(multi)} px" if multi else "multi-size"}


def markdown(entries, resolutions, size, labels, seeds, preset, loaded, task):
    ok = [r for runs in loaded.values() for r in runs if r["status"] == "ok"]
    metrics = METRICS[task]
    title = "Resolution robustness study" + (", detection" if task == "det" else "")
    lines = [f"## {title}{' (preset ' + preset + ')' if preset else ''}", ""]
    if ok:
        g = ok[0]["args"]
        multi = next((r["args"]["train_sizes"] for r in ok if r["args"].get("train_sizes")), None)
        rat = next((r["args"] for r in ok if r["args"]["model"] == "rat"), g)
        arch = (f"scales {','.join(f'{s:g}' for s in rat['scales'])}, sga {rat['sga']}, depth {rat['depth']}, "
                f"dim {rat['dim']}, heads {rat['heads']}, patch {rat['patch']}, stem {rat.get('stem', 'patch')}")
        if task == "det":
            params = {e["model"]: e["params"] for e in entries if e["params"]}
            models = (f"RAT: {arch}, pe {rat['pe']}, strides {','.join(map(str, rat['strides']))}, FCOS on the "
                      f"stem tokens, the last block at each stride and max-pooled maps above them; small CNN "
                      f"(`--model cnn`): a plain CNN + FPN as wide as brings its parameter count closest to RAT's; "
                      f"ResNet-18 (`--model resnet`) + FPN: a reference with many more parameters; all with "
                      f"torchvision's FCOS head, from scratch. Parameters: "
                      + (", ".join(f"{display(m, task)} {n / 1e6:.2f}M" for m, n in params.items()) or "-") + ".")
            scored = "AP50 (first table) and AP (IoU 0.5:0.95, second table)"
        else:
            models, scored = f"RAT: {arch}; RAT (x): --pe x.", "Dice"
        lines += [f"{g['data']} data, {g['train_size'] or 'all'} train / {g['val_size'] or 'all'} val images, "
                  f"{g['epochs']} epochs, batch {g['batch_size']}, lr {g['lr']:g}. Recipes: {labels['single']} = "
                  f"trained at that size; {labels['multi']} = one size per step drawn from "
                  f"{','.join(map(str, multi)) if multi else '--train-sizes'} px (`--train-sizes`); both validated "
                  f"(ckpt_best.pt picked) at {size} px. {models} Seeds {','.join(map(str, seeds))}: "
                  f"mean ± std over seeds (sample std). {scored} on the test split ({ok[0]['images']} images) at each "
                  f"test resolution; native: the image rendered at that resolution; resized: the same image resized "
                  f"to {size} px and the prediction resized back (`eval.py --resize-to-train`, the baseline of "
                  f"DESIGN.md section 8). Train time: sum of epoch times.", ""]
    for k, (key, name) in enumerate(metrics):  # one table per metric; the train time in the first
        if k:
            lines += ["", f"{name}, the same runs:", ""]
        heads = [f"{name} {r} px ({factor(r, size)})" for r in resolutions]
        cols = ["model", "recipe", "input", *(["train time (s)"] if k == 0 else []), *heads, "seeds"]
        lines += ["| " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * (len(cols) - 3)]
        for e in entries:
            for how in INPUTS:
                scores = [fmt(*e[key, how, r][:2]) for r in resolutions]
                if e["status"] and e["seeds"].startswith("0/"):
                    scores = [e["status"]] + ["-"] * (len(scores) - 1)
                time = [fmt(*e["time"][:2], digits=0) if how == "native" else ""] if k == 0 else []
                note = e["seeds"] + (f" ({e['status']})" if e["status"] else "")
                label = "native" if how == "native" else f"resized to {size}"
                lines.append("| " + " | ".join([display(e["model"], task), labels[e["recipe"]], label, *time, *scores,
                                                note]) + " |")
    away = [r for r in resolutions if r != size]
    lines += ["", f"Native minus resized {metrics[0][1]} (per seed, then mean ± std over seeds): above 0, the model "
                  "does better on the image as it is than on the image resized to its training size.", "",
              "| model | recipe | " + " | ".join(f"{r} px ({factor(r, size)})" for r in away) + " |",
              "|---|---|" + "---:|" * len(away)]
    for e in entries:
        lines.append(f"| {display(e['model'], task)} | {labels[e['recipe']]} | "
                     + " | ".join(signed(*e["gain", r][:2]) for r in away) + " |")
    return "\n".join(lines) + "\n"


def signed(m, s):
    return "-" if m is None else f"{m:+.3f}" + (f" ± {s:.3f}" if s is not None else "")


def csv_rows(entries, resolutions, size, metrics):
    """<metric>_mean, _std per metric (dice; det: ap50, ap), then native minus resized in the first."""
    rows = []
    for e in entries:
        for how in INPUTS:
            for r in resolutions:
                row = {"model": e["model"], "recipe": e["recipe"], "input": how, "resolution": r, "factor": r / size}
                for key, _ in metrics:
                    row[f"{key.lower()}_mean"], row[f"{key.lower()}_std"], _ = e[key, how, r]
                gm, gs, _ = e["gain", r]
                rows.append({**row, "seeds": e[metrics[0][0], how, r][2],
                             "native_minus_resized_mean": gm if how == "native" else None,
                             "native_minus_resized_std": gs if how == "native" else None,
                             "status": e["status"] or "ok"})
    return rows


# ---------------------------------------------------------------------------------------
# the plot (Pillow only)
# ---------------------------------------------------------------------------------------

def lighter(color, amount=0.55):
    return tuple(round(c + (255 - c) * amount) for c in color)


def dashed(draw, points, color, width, dash=9, gap=6):
    """A polyline drawn as dashes (Pillow has no dash style); the pattern runs on across vertices."""
    period, walked = dash + gap, 0.0  # walked: length of the polyline before this segment
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        length = math.hypot(xb - xa, yb - ya)
        t = -(walked % period)  # where the current dash started, from this segment's start
        while t < length:
            a, b = max(t, 0.0), min(t + dash, length)
            if b > a:
                draw.line([(xa + (xb - xa) * a / length, ya + (yb - ya) * a / length),
                           (xa + (xb - xa) * b / length, ya + (yb - ya) * b / length)], fill=color, width=width)
            t += period
        walked += length


def legend(draw, items, top, column):
    """(label, colour, dashed) entries, four per row from y = top, `column` px apart."""
    for k, (label, c, dash) in enumerate(items):
        x, y = 20 + (k % 4) * column, top + 22 * (k // 4)
        if dash:
            dashed(draw, [(x, y), (x + 34, y)], c, 2)
        else:
            draw.line([(x, y), (x + 34, y)], fill=c, width=3)
        draw.text((x + 42, y), label, fill="black", font=font(13), anchor="lm")


def y_range(entries, resolutions, key):
    values = [e[key, how, r][0] + sign * (e[key, how, r][1] or 0) for e in entries for how in INPUTS
              for r in resolutions for sign in (-1, 1) if e[key, how, r][0] is not None]
    if not values:
        return 0.0, 1.0
    lo, hi = max(0.0, math.floor(min(values) * 10) / 10), min(1.0, math.ceil(max(values) * 10) / 10)
    return (lo, hi) if hi - lo >= 0.1 else (max(0.0, hi - 0.1), max(hi, 0.1))


def plot(entries, resolutions, size, labels, path, task):
    """The study's metric (Dice; det: AP50) against test resolution: one panel per recipe,
    one colour per model; native solid with ± std bars, the resize baseline dashed in a
    lighter shade."""
    key, name = METRICS[task][0]
    models = list(dict.fromkeys(e["model"] for e in entries))
    recipes = [r for r in RECIPES if any(e["recipe"] == r for e in entries)]
    color = {m: COLORS[i % len(COLORS)] for i, m in enumerate(models)}
    W, H, left, right, top, bottom, gap = 520, 420, 64, 20, 54, 66, 30
    legend_rows = (len(models) + 2 + 3) // 4
    img = Image.new("RGB", (len(recipes) * (W + gap) - gap + 20, H + 30 + 22 * legend_rows), "white")
    d = ImageDraw.Draw(img)
    small, big = font(13), font(16)
    d.text((10, 8), f"{name} against test resolution (mean over seeds; dashed: resized to {size} px, the baseline)",
           fill="black", font=big)
    lo, hi = y_range(entries, resolutions, key)
    step = 0.1 if hi - lo <= 0.6 else 0.2
    xs = [math.log2(r) for r in resolutions]
    for p, recipe in enumerate(recipes):
        x0, y0 = 10 + p * (W + gap) + left, 10 + top  # plot area: x0..x1, y0..y1
        x1, y1 = x0 + W - left - right, y0 + H - top - bottom
        X = lambda r: x0 + 12 + (math.log2(r) - xs[0]) / max(xs[-1] - xs[0], 1e-9) * (x1 - x0 - 24)
        Y = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)
        d.text(((x0 + x1) / 2, y0 - 10), f"trained at {labels[recipe]}", fill="black", font=big, anchor="ms")
        for k in range(round((hi - lo) / step) + 1):  # horizontal grid and y tick labels
            v = lo + k * step
            d.line([(x0, Y(v)), (x1, Y(v))], fill=(225, 225, 225))
            d.text((x0 - 6, Y(v)), f"{v:.1f}", fill="black", font=small, anchor="rm")
        for r in resolutions:  # x ticks: pixels and factor of the training size
            d.line([(X(r), y1), (X(r), y1 + 5)], fill="black")
            d.text((X(r), y1 + 8), f"{r}", fill="black", font=small, anchor="mt")
            d.text((X(r), y1 + 24), factor(r, size), fill=(90, 90, 90), font=small, anchor="mt")
        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text(((x0 + x1) / 2, y1 + 44), "test resolution (px)", fill="black", font=small, anchor="mt")
        d.text((x0 - 52, (y0 + y1) / 2), name, fill="black", font=small, anchor="lm")
        for e in (e for e in entries if e["recipe"] == recipe):
            base = [(X(r), Y(e[key, "resized", r][0])) for r in resolutions if e[key, "resized", r][0] is not None]
            native = [(X(r), Y(e[key, "native", r][0]), e[key, "native", r][1]) for r in resolutions
                      if e[key, "native", r][0] is not None]
            if len(base) > 1:
                dashed(d, base, lighter(color[e["model"]]), 2)
            if len(native) > 1:
                d.line([(x, y) for x, y, _ in native], fill=color[e["model"]], width=3, joint="curve")
            for x, y, s in native:
                if s:  # ± std over seeds
                    d.line([(x, y - s / (hi - lo) * (y1 - y0)), (x, y + s / (hi - lo) * (y1 - y0))],
                           fill=color[e["model"]], width=1)
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color[e["model"]])
    # legend: colours for the models, line styles for the inputs
    legend(d, [(display(m, task), color[m], False) for m in models] + [
        ("native input", (60, 60, 60), False), (f"resized to {size} px", lighter((60, 60, 60)), True)], H + 30, 250)
    save_png_atomic(img, path)


def plot_curves(loaded, names, path, task):
    """Learning curves, mean over seeds: training loss and the validation metric (at the
    training size) per epoch; one colour per model, solid: single size, dashed: multi. They
    show whether a model that trails at the training size is still improving when training
    stops (under-trained) or has levelled off."""
    models = list(dict.fromkeys(split_name(n)[0] for n in names))
    color = {m: COLORS[i % len(COLORS)] for i, m in enumerate(models)}
    series = {}  # (name, curve) -> mean per epoch over the seeds that finished
    for n in names:
        for curve in next((r["curves"] for r in loaded[n] if r["status"] == "ok"), {}):
            runs = [r["curves"][curve] for r in loaded[n] if r["status"] == "ok"]
            epochs = min(len(c) for c in runs)
            series[n, curve] = [sum(c[e] for c in runs) / len(runs) for e in range(epochs)
                                if all(c[e] is not None for c in runs)]
    curves = list(dict.fromkeys(c for (_, c), v in series.items() if v))
    if not curves:
        return
    W, H, left, right, top, bottom, gap = 460, 360, 60, 20, 40, 50, 30
    img = Image.new("RGB", (len(curves) * (W + gap) - gap + 20, H + 30 + 22 * ((len(models) + 5) // 4)), "white")
    d, small, big = ImageDraw.Draw(img), font(13), font(16)
    for p, curve in enumerate(curves):
        data = {n: v for (n, c), v in series.items() if c == curve and v}
        lo, hi = min(min(v) for v in data.values()), max(max(v) for v in data.values())
        lo, hi = lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9)
        n_ep = max(len(v) for v in data.values())
        x0, y0 = 10 + p * (W + gap) + left, 10 + top
        x1, y1 = x0 + W - left - right, y0 + H - top - bottom
        X = lambda e: x0 + 10 + e / max(n_ep - 1, 1) * (x1 - x0 - 20)
        Y = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)
        d.text(((x0 + x1) / 2, y0 - 12), curve, fill="black", font=big, anchor="ms")
        for k in range(5):
            v = lo + k * (hi - lo) / 4
            d.line([(x0, Y(v)), (x1, Y(v))], fill=(225, 225, 225))
            d.text((x0 - 6, Y(v)), f"{v:.2f}", fill="black", font=small, anchor="rm")
        for e in range(n_ep):
            d.text((X(e), y1 + 6), str(e + 1), fill="black", font=small, anchor="mt")
        d.text(((x0 + x1) / 2, y1 + 26), "epoch", fill="black", font=small, anchor="mt")
        d.rectangle([x0, y0, x1, y1], outline="black")
        for n, v in data.items():
            model, recipe = split_name(n)
            pts = [(X(e), Y(y)) for e, y in enumerate(v)]
            if len(pts) > 1:
                (dashed(d, pts, color[model], 2) if recipe == "multi" else
                 d.line(pts, fill=color[model], width=3, joint="curve"))
    legend(d, [(display(m, task), color[m], False) for m in models] + [
        ("single size", (60, 60, 60), False), ("--train-sizes", (60, 60, 60), True)], H + 30, 230)
    save_png_atomic(img, path)


def main():
    a, seeds, table = read_study("Write the resolution robustness study's results.md, .csv and plot")
    names = [r["variant"] for r in table]
    loaded = {n: [read_sweep_run(os.path.join(a.out, "runs", f"{n}_s{s}")) for s in seeds] for n in names}
    ok = [r for runs in loaded.values() for r in runs if r["status"] == "ok"]
    if not ok:  # nothing to tabulate; say why, per run (ablate.sh lists the failures)
        status = [f"- {n}_s{s}: {r['status']}" for n in names for s, r in zip(seeds, loaded[n])]
        md = "## Resolution robustness study\n\nNo run finished:\n\n" + "\n".join(status) + "\n"
        with atomic_open(os.path.join(a.out, "results.md"), "w") as f:
            f.write(md)
        print(md)
        return
    tasks = {r["args"]["task"] for r in ok}
    if len(tasks) > 1:  # one metric per study: seg and det runs do not share a table
        sys.exit(f"robust_table.py: {a.out} holds runs of both tasks ({', '.join(sorted(tasks))})")
    task = tasks.pop()
    size = ok[0]["args"]["image_size"]
    resolutions = sorted({res for r in ok for _, _, res in r["scores"]})
    entries = [summarize(n, loaded[n], resolutions, METRICS[task]) for n in names]
    labels = recipe_labels(ok, size)
    md = markdown(entries, resolutions, size, labels, seeds, a.preset, loaded, task)
    with atomic_open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md)
    write_csv(os.path.join(a.out, "results.csv"), csv_rows(entries, resolutions, size, METRICS[task]))
    png = f"{METRICS[task][0][0].lower()}_vs_resolution.png"  # dice_vs_resolution.png, ap50_vs_resolution.png
    plot(entries, resolutions, size, labels, os.path.join(a.out, png), task)
    plot_curves(loaded, names, os.path.join(a.out, "learning_curves.png"), task)
    print(md)
    print(f"wrote {a.out}/results.md, results.csv, {png} and learning_curves.png")


if __name__ == "__main__":
    main()
