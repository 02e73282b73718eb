"""Assemble the component study's table from its run folders (written by ablate.sh).

    python tools/ablate_table.py --out ablations/cpu --seeds 0,1,2 --preset cpu

Reads OUT/variants.tsv (the requested variants and their train.py flags) and, per run
OUT/runs/<variant>_s<seed>/: metrics.jsonl (training time), ckpt_last.pt (parameter
count), eval/results.json (Dice, IoU at 0.5x, 1x, 2x the training size; test split) and,
for the default, eval_ignore_spacing/results.json. Writes OUT/results.md and
OUT/results.csv: mean +- std over seeds (sample std), then one line per comparison with
the default saying whether the difference exceeds the sum of the two stds.
"""

import argparse
import csv
import json
import os
import statistics

COLUMNS = [("dice", 1), ("iou", 1), ("dice", 0.5), ("dice", 2)]  # (metric, test size / training size)
HEADER = ["Dice", "IoU", "Dice 0.5x", "Dice 2x"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # in the state dict, not parameters


def read_json(path):
    with open(path) as f:
        return json.load(f)


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
    import torch  # only for the parameter count

    state = torch.load(os.path.join(run, "ckpt_last.pt"), map_location="cpu", weights_only=True)["model"]
    out = {"status": "ok", "args": args, "time": sum(e["epoch_time_s"] for e in epochs),
           "params": sum(v.numel() for k, v in state.items() if not k.endswith(BUFFERS))}
    for tag, sub in (("", "eval"), ("ignore", "eval_ignore_spacing")):
        path = os.path.join(run, sub, "results.json")
        if os.path.exists(path):
            res = read_json(path)
            out["images"] = res["rows"][0]["images"]
            for row in res["rows"]:
                for metric, factor in COLUMNS:
                    if row["resolution"] == round(args["image_size"] * factor):
                        out[(tag, metric, factor)] = row[metric]
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


def comparison(row, ref, metric, factor, label):
    (m, s, _), (m0, s0, _) = row[(metric, factor)], ref[(metric, factor)]
    if m is None or m0 is None:
        return None
    if s is None or s0 is None:
        return f"- {row['variant']}: {label} {fmt(m, s)} vs {fmt(m0, s0)}: difference {m - m0:+.3f} (no std with one seed)"
    spread = s + s0
    verdict = "exceeds" if abs(m - m0) > spread else "is within"
    return (f"- {row['variant']}: {label} {fmt(m, s)} vs {fmt(m0, s0)}: difference {m - m0:+.3f} "
            f"{verdict} the combined std {spread:.3f}")


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
    ref = next((r for r in rows if r["variant"] == "default"), None)
    any_ok = next((r for runs in loaded.values() for r in runs if r["status"] == "ok"), None)

    lines = [f"## Component study{' (preset ' + a.preset + ')' if a.preset else ''}", ""]
    if any_ok:
        g = any_ok["args"]
        d = next((r["args"] for r in loaded.get("default", []) if r["status"] == "ok"), g)
        lines += [f"{g['data']} data, {g['image_size']} px, {g['train_size'] or 'all'} train / {g['val_size'] or 'all'} "
                  f"val images, {g['epochs']} epochs, batch {g['batch_size']}, lr {g['lr']:g}. Default model: scales "
                  f"{','.join(f'{s:g}' for s in d['scales'])}, pe {d['pe']}, sga {d['sga']}, depth {d['depth']}, dim "
                  f"{d['dim']}, heads {d['heads']}, patch {d['patch']}; each row changes one thing. Seeds "
                  f"{','.join(map(str, seeds))}: mean ± std over seeds (sample std). Dice, IoU: test split "
                  f"({any_ok['images']} images) at the training size, ckpt_best.pt; Dice 0.5x / 2x: the same test "
                  f"images at {g['image_size'] // 2} / {g['image_size'] * 2} px. Train time: sum of epoch times.", ""]
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
    if ref:
        lines += ["", "Differences to the default (does |mean - mean_default| exceed std + std_default?):", ""]
        for r in rows:
            if r is ref:
                continue
            pe = r["change"].startswith("--pe") or "ignore-spacing" in r["variant"]
            for (metric, factor), head in zip(COLUMNS, HEADER):
                if (metric, factor) == ("dice", 1) or (pe and metric == "dice"):
                    line = comparison(r, ref, metric, factor, head)
                    lines += [line] if line else []
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        w.writeheader()
        w.writerows(csv_rows)
    print("\n".join(lines))
    print(f"wrote {a.out}/results.md and results.csv")


if __name__ == "__main__":
    main()
