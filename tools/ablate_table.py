"""Assemble the component study's table from its run folders (written by ablate.sh).

    python tools/ablate_table.py --out ablations/cpu --seeds 0,1,2 --preset cpu

Reads OUT/variants.tsv (the requested variants and their train.py flags) and, per run
OUT/runs/<variant>_s<seed>/: metrics.jsonl (training time), ckpt_last.pt (parameter
count), eval/results.json (Dice, IoU at 0.5x, 1x, 2x, 4x the training size, test split,
native and resized to the training size) and, for the default, eval_ignore_spacing/.
Writes OUT/results.md and OUT/results.csv: mean +- std over seeds (sample std), then the
paired difference of each variant to the default run of the same seed (same data order,
same initial draw), with a 95% t interval over seeds.
"""

import argparse
import csv
import json
import os
import statistics

FACTORS = (1, 0.5, 2, 4)  # test size / training size
COLUMNS = [("dice", 1), ("iou", 1), ("dice", 0.5), ("dice", 2), ("dice", 4),
           ("gain", 0.5), ("gain", 2), ("gain", 4)]  # gain: native Dice minus resize-to-train Dice
HEADER = ["Dice", "IoU", "Dice 0.5x", "Dice 2x", "Dice 4x", "gain 0.5x", "gain 2x", "gain 4x"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # in the state dict, not parameters
# two-sided 95% quantiles of Student's t, by degrees of freedom (n seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def num_params(run):
    """Parameters in the run's ckpt_last.pt, None without one; shared with robust_table.py."""
    path = os.path.join(run, "ckpt_last.pt")
    if not os.path.exists(path):
        return None
    import torch  # only for the parameter count

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
    for tag, sub in (("", "eval"), ("ignore", "eval_ignore_spacing")):
        path = os.path.join(run, sub, "results.json")
        if not os.path.exists(path):
            continue
        res = read_json(path)
        out["images"] = res["rows"][0]["images"]
        for factor in FACTORS:
            rows = [r for r in res["rows"] if r["resolution"] == round(args["image_size"] * factor)]
            native = next((r for r in rows if r.get("input", "native") == "native"), None)
            resized = next((r for r in rows if r.get("input", "native") != "native"), None)
            if native:
                out[(tag, "dice", factor)], out[(tag, "iou", factor)] = native["dice"], native["iou"]
            if native and resized and factor != 1:
                out[(tag, "gain", factor)] = native["dice"] - resized["dice"]
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


def summarize(name, flags, runs, tag=""):
    ok = [r for r in runs if r["status"] == "ok"]
    row = {"variant": name + (" (tested with --ignore-spacing)" if tag else ""), "change": flags or "(default model)",
           "seeds": f"{len(ok)}/{len(runs)}", "status": ", ".join(sorted({r["status"] for r in runs} - {"ok"}))}
    row["params"] = ok[0]["params"] if ok else None
    row["time"] = stats([r["time"] for r in ok])
    for metric, factor in COLUMNS:
        row[(metric, factor)] = stats([r[(tag, metric, factor)] for r in ok if (tag, metric, factor) in r])
    return row


def paired(runs, ref_runs, tag, factor):
    """Per-seed Dice differences to the default run of the same seed (scores exist only for finished
    runs) -> (mean, half-width of the 95% t interval or None, n)."""
    key, ref_key = (tag, "dice", factor), ("", "dice", factor)
    diffs = [r[key] - d[ref_key] for r, d in zip(runs, ref_runs) if key in r and ref_key in d]
    m, s, n = stats(diffs)
    return m, (T975[n - 1] * s / n ** 0.5 if s is not None and n - 1 in T975 else None), n


def paired_cell(m, half, n):
    if m is None:
        return "-"
    if half is None:
        return f"{m:+.3f} (n={n})"
    resolved = "**" if abs(m) > half else ""  # the interval excludes 0
    return f"{resolved}{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]{resolved}"


def describe_default(d):
    """The default model's choices, every one a row of the study could change."""
    return (f"token grid {d.get('token_grid', 'pixel')}, stem {d.get('stem', 'patch')}, head {d.get('head', 'refine')}, "
            f"scales {','.join(f'{s:g}' for s in d['scales'])}, pe {d['pe']}, sga {d['sga']}, depth {d['depth']}, "
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


def main():
    a, seeds, table = read_study("Write the component study's results.md and results.csv")
    variants = [(r["variant"], r["flags"]) for r in table]
    loaded = {n: [read_study_run(os.path.join(a.out, "runs", f"{n}_s{s}")) for s in seeds] for n, _ in variants}
    rows = [summarize(n, fl, loaded[n]) for n, fl in variants]
    if "default" in loaded:
        rows.insert(1 + [r["variant"] for r in rows].index("default"), summarize("default", "", loaded["default"], "ignore"))
    any_ok = next((r for runs in loaded.values() for r in runs if r["status"] == "ok"), None)

    lines = [f"## Component study{' (preset ' + a.preset + ')' if a.preset else ''}", ""]
    if any_ok:
        g = any_ok["args"]
        d = next((r["args"] for r in loaded.get("default", []) if r["status"] == "ok"), g)
        lines += [f"{g['data']} data, {g['image_size']} px, {g['train_size'] or 'all'} train / {g['val_size'] or 'all'} "
                  f"val images, {g['epochs']} epochs, batch {g['batch_size']}, lr {g['lr']:g}. Default model: "
                  f"{describe_default(d)}; each row changes one thing. Seeds {','.join(map(str, seeds))}: mean ± std "
                  f"over seeds (sample std). Dice, IoU: test split ({any_ok['images']} images) at the training size, "
                  f"ckpt_best.pt; Dice 0.5x / 2x / 4x: the same test images rendered at "
                  f"{', '.join(str(round(g['image_size'] * f)) for f in FACTORS[1:])} px; gain: native Dice minus the "
                  f"Dice of the same image resized to {g['image_size']} px and the prediction resized back (eval.py "
                  f"--resize-to-train). Train time: sum of epoch times.", ""]
    cols = ["variant", "change", "params", "train time (s)", *HEADER, "seeds"]
    lines += ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    csv_rows = []
    for r in rows:
        scores = [fmt(*r[c][:2]) for c in COLUMNS]
        if r["status"] and r["seeds"].startswith("0/"):
            scores = [r["status"]] + ["-"] * (len(scores) - 1)
        note = r["seeds"] + (f" ({r['status']})" if r["status"] else "")
        ignore = "ignore-spacing" in r["variant"]
        lines.append("| " + " | ".join([r["variant"], "same runs" if ignore else f"`{r['change']}`",
                                        "" if ignore or r["params"] is None else f"{r['params'] / 1e6:.3f}M",
                                        "" if ignore or r["time"][0] is None else fmt(*r["time"][:2], digits=0), *scores, note]) + " |")
        csv_row = {"variant": r["variant"], "change": r["change"], "params": r["params"], "seeds_ok": r["seeds"],
                   "status": r["status"] or "ok", "train_time_s_mean": r["time"][0], "train_time_s_std": r["time"][1]}
        for (metric, factor), head in zip(COLUMNS, HEADER):
            key = head.lower().replace(" ", "_")
            csv_row[f"{key}_mean"], csv_row[f"{key}_std"] = r[(metric, factor)][:2]
        csv_rows.append(csv_row)
    if "default" in loaded:
        ref = loaded["default"]
        lines += ["", "Paired differences to the default (variant minus default, run by run on the same seed; mean "
                  "and 95% t interval over seeds; **bold**: the interval excludes 0):", "",
                  "| variant | " + " | ".join(f"Dice {f:g}x" for f in FACTORS) + " |", "|---|" + "---:|" * len(FACTORS)]
        # the default against itself tested with --ignore-spacing, then every other variant
        for name, tag in [("default", "ignore")] + [(n, "") for n, _ in variants if n != "default"]:
            cells = [paired(loaded[name], ref, tag, f) for f in FACTORS]
            if all(c[0] is None for c in cells):
                continue
            label = name + (" (tested with --ignore-spacing)" if tag else "")
            lines.append(f"| {label} | " + " | ".join(paired_cell(*c) for c in cells) + " |")
            row = next(r for r in csv_rows if r["variant"] == label)
            for f, (m, half, _) in zip(FACTORS, cells):
                row[f"paired_dice_{f:g}x_mean"], row[f"paired_dice_{f:g}x_ci95"] = m, half
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    fields = list(dict.fromkeys(k for r in csv_rows for k in r))
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(csv_rows)
    print("\n".join(lines))
    print(f"wrote {a.out}/results.md and results.csv")


if __name__ == "__main__":
    main()
