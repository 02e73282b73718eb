"""Benchmarks: scaling, baselines, detection, utilization, data, distributed, threads, compile, predict.

    python bench.py                          # every section, markdown to stdout
    python bench.py --write                  # ... and into BENCHMARKS.md (its other sections are kept)
    python bench.py --quick                  # tiny sizes: a smoke test
    python bench.py --only scaling,baseline  # some sections (with --write: only those sections of the file change)
    python bench.py --only predict --threads 2 --megapixels 1,4,12,24   # predict.py on one photo per size

The sections `peers` (the published RAT, timm's Swin and ViT: `pip install -r
requirements-bench.txt`) and `gpu` (skipped without CUDA) are tools/bench_peers.py's,
which builds on this module (`python tools/bench_peers.py --only peers,gpu --write`).

Things compared are timed interleaved in one process (min over repeats), so that
a shared machine slows them alike; ratios are the numbers to read. Peak memory:
each scaling configuration runs in a fresh process; on CPU the growth of peak RSS
(ru_maxrss) over the measured work, on CUDA torch.cuda.max_memory_allocated.
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import flop_counter

import metrics
from data import atomic_open

ROOT = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("scaling", "baseline", "det", "util", "data", "dist", "threads", "compile", "predict")
RAT = dict(dim=128, depth=4, heads=8)                 # the model under test: default patch and strides
SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLOP_OPS = ("mm", "addmm", "bmm", "convolution", "convolution_backward", "_scaled_dot_product")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def levels(size, batch=2, D=2, scales=(1.0,)):
    x = torch.rand(batch, 3, *[size] * D, device=device())
    mode = "bilinear" if D == 2 else "trilinear"
    return [x] + [F.interpolate(x, scale_factor=s, mode=mode, antialias=D == 2) for s in scales[1:]]


def seg(kind="rat", **kw):
    from model import build_seg_model
    torch.manual_seed(0)
    return build_seg_model(kind, **{**RAT, **kw}).to(device())


def detector(kind, size):
    """The detector `python train.py --task det --model <kind> --image-size <size>` trains."""
    import train
    from model import build_model
    args = train.fill_defaults(train.get_args_parser().parse_args(
        ["--task", "det", "--model", kind, "--image-size", str(size)]))
    args.num_classes = 3
    torch.manual_seed(0)
    return build_model(vars(args)).to(device()).train()


def det_step(model, n, batch=2):
    images = [torch.rand(3, n, n, device=device()) for _ in range(batch)]
    boxes = torch.tensor([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.9, 0.8], [0.3, 0.05, 0.36, 0.12]], device=device()) * n
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3], device=device())}] * batch
    sum(model(images, targets).values()).backward()
    model.zero_grad(set_to_none=True)


def train_step(model, x, opt=None):
    model(x).float().mean().backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)


def timed(fns, reps):
    """Min seconds of each function, run interleaved after one warm-up call each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(metrics.timed(f, device())[1])
    return {k: min(v) for k, v in times.items()}


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def slope(x, y):
    """Exponent of y ~ x^a by least squares in log-log."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0]) if len(x) > 1 else float("nan")


def flops(model, x):
    """FLOPs of forward+backward, by op; CPU flash attention counted like the CUDA kernels."""
    mapping = {SDPA_CPU: lambda q, k, v, *a, **kw: flop_counter.sdpa_flop_count(q, k, v),
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
                   lambda g, q, k, v, *a, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v)}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        train_step(model, x)
    return {str(op).split(".")[-1]: n for op, n in fc.get_flop_counts()["Global"].items()}


def worker(spec, threads, workers):
    """Runs one measurement, workers[spec["kind"]], in this (fresh) process; prints RESULT <json>."""
    torch.set_num_threads(threads)
    r = workers[spec.pop("kind")](**spec)
    if r is not None:                                   # dist_worker prints its own (rank 0)
        print("RESULT " + json.dumps(r), flush=True)


def run_worker(spec, args, timeout=900, env=None, nproc=0, script=None):
    """The measurement `spec` in a fresh process: `script --worker spec` (default this file; a script
    built on this module, such as tools/bench_peers.py, passes its own for its workers)."""
    script = os.path.abspath(script or __file__)
    cmd = [sys.executable, script, "--threads", str(args.threads), "--worker", json.dumps(spec)]
    if nproc:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        # a worker that prints its results as it goes (gpu) keeps what it finished
        done = [l for l in (e.stdout or b"").decode(errors="replace").splitlines() if l.startswith("RESULT ")]
        if done:
            return {**json.loads(done[-1][7:]), "partial": f"timed out after {timeout} s"}
        return {"error": f"timed out after {timeout} s"}
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {"error": "killed (out of memory?)" if p.returncode in (-9, 137) else tail}
    return json.loads(lines[-1][7:])


# ------------------------------------------------------------------------ scaling
def scale_worker(size, D, batch, dim, reps, strides=None, ref_size=None):
    model, x = seg(dim=dim, spatial_dims=D, strides=strides, ref_size=ref_size), levels(size, batch, D)
    mark = metrics.memory_mark(device())
    with torch.no_grad():
        model(x)
    fwd_mem = metrics.memory_growth_mib(device(), mark)
    train_step(model, x)
    mem = metrics.memory_growth_mib(device(), mark)
    with torch.no_grad():
        t = timed({"fwd": lambda: model(x)}, reps)
    t.update(timed({"train": lambda: train_step(model, x)}, reps))
    fl = flops(model, x)
    with torch.profiler.profile() as prof:
        train_step(model, x)
    ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    attn_time = sum(v for k, v in ops.items() if "attention" in k) / sum(ops.values())
    return dict(t, fwd_mem=fwd_mem, mem=mem, flops=sum(fl.values()), attn_time=attn_time, ops=ops,
                attn=sum(v for k, v in fl.items() if "attention" in k))


def bandwidth(mib):
    """GB/s of a plain copy of `mib` MiB (read + write)."""
    a = torch.randn(mib * 2 ** 18, device=device())
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / timed({"c": lambda: b.copy_(a)}, 5)["c"] / 1e9


def growth(lo, hi, scale, top=8):
    """Per-op self time at two sizes, and how much more than linear it grew."""
    rows = []
    for k in sorted(hi["ops"], key=lambda k: -hi["ops"][k])[:top]:
        a, b = lo["ops"].get(k, 0.0), hi["ops"][k]
        rows.append([k, f"{a:.1f}", f"{b:.1f}", f"{b / (scale * a):.2f}" if a else ""])
    return rows


def sec_scaling(a):
    sizes2, sizes3 = ([32, 64, 96], [16, 24]) if a.quick else ([128, 256, 512, 768, 1024], [32, 48, 64, 96])
    dim = 32 if a.quick else RAT["dim"]
    # physical grid: a model trained at the smallest size of the fit, run at every size (model.RAT.zoom)
    physical = sizes2[-3:] if a.quick else [256, 512, 1024]
    series = [("2D", 2, sizes2, 2, None, None), ("3D", 3, sizes3, 1, None, None),
              ("2D, strides 8,2,1,1", 2, sizes2[-3:] if a.quick else [256, 512, 1024], 2, [8, 2, 1, 1], None),
              (f"2D, physical grid (ref {physical[0]})", 2, physical, 2, None, physical[0])]
    rows, res, fits, lines = [], {}, {}, []
    for label, D, sizes, batch, strides, ref in series:
        for n in sizes:
            log(f"scaling {label} {n}")
            r = res[(label, n)] = run_worker(dict(kind="scale", size=n, D=D, batch=batch, dim=dim, reps=a.reps,
                                                  strides=strides, ref_size=ref), a)
            if "error" in r:
                rows.append([label, f"{n}^{D} x{batch}", n ** D, r["error"]] + [""] * 6)
                continue
            rows.append([label, f"{n}^{D} x{batch}", n ** D, f"{r['fwd'] * 1e3:.0f}", f"{r['train'] * 1e3:.0f}",
                         f"{r['fwd_mem']:.0f}", f"{r['mem']:.0f}", f"{r['flops'] / 1e9:.1f}",
                         f"{100 * r['attn'] / r['flops']:.0f}%", f"{100 * r['attn_time']:.0f}%"])
        done = []
        for fit, lo in (("256 to 1024 px", 256), ("all sizes", 0)) if D == 2 else (("all sizes", 0),):
            ok = [n for n in sizes if n >= lo and "error" not in res[(label, n)]]
            if len(ok) < 2 or ok in done:
                continue
            done.append(ok)
            px = [n ** D for n in ok]
            e = fits[(label, lo)] = {k: slope(px, [res[(label, n)][k] for n in ok])
                                     for k in ("fwd", "train", "mem", "flops")}
            lines.append(f"| {label}, {fit} | {e['fwd']:.2f} | {e['train']:.2f} | {e['mem']:.2f} | {e['flops']:.2f} |")
    mem_label = "peak CUDA MiB" if torch.cuda.is_available() else "peak RSS growth MiB"
    lo, hi = sizes2[1], sizes2[-1]
    notes = ""
    for label in ("2D", "2D, strides 8,2,1,1"):
        r_lo, r_hi = res.get((label, lo), {"error": 1}), res.get((label, hi), {"error": 1})
        if "error" not in r_lo and "error" not in r_hi:
            notes += (f"\n\nWhere the time goes, {label}: self time of the top ops (one profiled step) at {lo} and "
                      f"{hi} px, and its growth relative to the {(hi / lo) ** 2:.3g}x pixels (1.00 = linear):\n\n"
                      + table(["op", f"ms at {lo}", f"ms at {hi}", "growth / linear"],
                              growth(r_lo, r_hi, (hi / lo) ** 2)))
    small, big = bandwidth(4 if a.quick else 16), bandwidth(16 if a.quick else 256)
    notes += (f"\n\nMemory-bound ops slow down per element once activations leave the caches: a plain copy runs "
              f"at {small:.0f} GB/s on {4 if a.quick else 16} MiB and {big:.0f} GB/s on {16 if a.quick else 256} MiB "
              f"here (one activation [2, N, 128] float32 is 8 MiB at 256 px, 128 MiB at 1024 px).")
    md = (f"RATSeg dim {dim}, depth 4, heads 8, patch 4, default strides 4,2,2,1 (and, as a fix for the "
          f"quadratic first attention, 8,2,1,1: same final stride, first global attention on 4x fewer tokens), "
          f"one pyramid level. fwd under no_grad; train = forward+backward. Memory: {mem_label}, each row a "
          f"fresh process. GFLOP: forward+backward (FlopCounterMode); attn: share of the FLOPs, and of the "
          f"profiled time, in global attention (SDPA).\n\n"
          + table(["model", "input", "pixels", "fwd ms", "train ms", f"fwd {mem_label}", f"train {mem_label}",
                   "GFLOP", "attn FLOPs", "attn time"], rows)
          + "\n\nFitted exponents (log-log least squares against the number of pixels):\n\n"
          "| fit | fwd time | train time | train memory | FLOPs |\n|---|---|---|---|---|\n" + "\n".join(lines)
          + notes)
    return md, {"fits": fits, "res": res, "bandwidth": (small, big)}


# ------------------------------------------------------------------------ baselines
def dense_worker(size, reps, cap_mib):
    """Local against dense grouping (same weights), interleaved; dense may not fit."""
    local, dense = seg("rat"), seg("rat", sga="dense")
    dense.load_state_dict(local.state_dict())
    x = levels(size)
    n_in = (size // 4) ** 2
    need = 2 * RAT["heads"] * n_in * (n_in // 16) * 4 / 2 ** 20      # one [B, h, N_in, N_out] assignment
    if need > cap_mib:
        t = timed({"local": lambda: train_step(local, x)}, reps)
        return dict(t, dense=f"skipped: one N_in x N_out assignment is {need / 1024:.1f} GiB")
    try:
        return timed({"local": lambda: train_step(local, x), "dense": lambda: train_step(dense, x)}, reps)
    except (RuntimeError, MemoryError) as e:
        return {"local": None, "dense": f"does not fit ({type(e).__name__})"}


def sec_baseline(a):
    from model import num_params
    sizes = [64] if a.quick else [256, 512]
    kw = dict(dim=32, heads=4) if a.quick else {}
    rows, out = [], {}
    for n in sizes:
        log(f"baseline {n}")
        rat, unet = seg("rat", **kw), seg("unet", **kw)
        opts = [torch.optim.AdamW(m.parameters()) for m in (rat, unet)]
        x = levels(n)
        t = timed({"rat": lambda: train_step(rat, x, opts[0]), "unet": lambda: train_step(unet, x, opts[1])}, a.reps)
        out[n] = t["rat"] / t["unet"]
        rows.append([n, f"{num_params(rat) / 1e6:.2f}M / {num_params(unet) / 1e6:.2f}M",
                     f"{t['rat'] * 1e3:.0f}", f"{t['unet'] * 1e3:.0f}", f"{out[n]:.2f}"])
    md = ("Training step (forward, backward, AdamW), batch 2, one level; U-Net width picked by "
          "build_seg_model to match RAT's parameter count.\n\n"
          + table(["size", "params RAT / U-Net", "RAT ms", "U-Net ms", "RAT / U-Net"], rows))
    rows = []
    for n in ([64] if a.quick else [128, 256, 512]):
        log(f"dense {n}")
        r = run_worker(dict(kind="dense", size=n, reps=a.reps, cap_mib=512), a)
        if "error" in r:
            r = {"local": None, "dense": r["error"]}
        ms = lambda v: f"{v * 1e3:.0f}" if isinstance(v, float) else (v or "")
        ratio = f"{r['dense'] / r['local']:.1f}" if isinstance(r["dense"], float) and r["local"] else ""
        rows.append([n, ms(r["local"]), ms(r["dense"]), ratio])
    md += ("\n\nLocal against dense grouping (`sga=\"dense\"`, O(N_in x N_out)), training step (no optimizer), "
           "batch 2, in a fresh process per size:\n\n" + table(["size", "local ms", "dense ms", "dense / local"], rows))
    rows = []
    for n in ([64] if a.quick else [256, 512]):
        log(f"pyramid {n}")
        model = seg("rat", **kw)
        x1, x3 = levels(n), levels(n, scales=(1.0, 0.5, 0.25))
        x3 = [x1[0]] + x3[1:]
        t = timed({"1": lambda: train_step(model, x1), "3": lambda: train_step(model, x3)}, a.reps)
        rows.append([n, f"{t['1'] * 1e3:.0f}", f"{t['3'] * 1e3:.0f}", f"{t['3'] / t['1']:.2f}"])
    md += ("\n\nOne pyramid level against three (scales 1, 0.5, 0.25, F.interpolate antialias), training step:\n\n"
           + table(["size", "1 level ms", "3 levels ms", "ratio"], rows))
    return md, {"unet": out}


def sec_det(a):
    from model import num_params
    rows, out = [], {}
    for n in ([64] if a.quick else [128, 512]):
        log(f"detector {n}")
        rat, cnn = detector("rat", n), detector("cnn", n)
        t = timed({"rat": lambda: det_step(rat, n), "cnn": lambda: det_step(cnn, n)}, a.reps)
        out[f"det{n}"] = t["rat"] / t["cnn"]
        rows.append([n, f"{num_params(rat) / 1e6:.2f}M / {num_params(cnn) / 1e6:.2f}M",
                     f"{t['rat'] * 1e3:.0f}", f"{t['cnn'] * 1e3:.0f}", f"{out[f'det{n}']:.2f}"])
    md = ("Detection: the FCOS training step (forward, backward; 2 images of 3 boxes) of `train.py --task "
          "det` at its defaults for that image size, RAT against the small CNN + FPN sized to its parameter "
          "count (`--model cnn`):\n\n"
          + table(["size", "params RAT / CNN", "RAT ms", "CNN ms", "RAT / CNN"], rows))
    return md, out


# ------------------------------------------------------------------------ utilization
def sec_util(a):
    n = 64 if a.quick else 512
    log(f"utilization {n}")
    model, x = seg("rat"), levels(n)
    by_op = flops(model, x)
    step = timed({"s": lambda: train_step(model, x)}, a.reps)["s"]
    m = 1024 if a.quick else 4096
    A, B = torch.randn(m, m, device=device()), torch.randn(m, m, device=device())
    peak = 2 * m ** 3 / timed({"mm": lambda: A @ B}, a.reps)["mm"]
    total = sum(by_op.values())
    with torch.profiler.profile() as prof:
        train_step(model, x)
    ev = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    prof_total = sum(e.self_cpu_time_total for e in ev)
    rows, matmul_share, top_mem = [], 0.0, None
    for e in ev:
        name = e.key.replace("aten::", "")
        f = by_op.get("convolution" if name == "mkldnn_convolution" else name, 0)
        share = e.self_cpu_time_total / prof_total
        if name.startswith(FLOP_OPS) or name == "mkldnn_convolution":
            matmul_share += share
        elif top_mem is None:
            top_mem = (e.key, share)
        if len(rows) < 12:
            rate = f"{f / (e.self_cpu_time_total * 1e-6) / 1e9:.0f}" if f else ""
            rows.append([e.key, e.count, f"{e.self_cpu_time_total / 1e3:.1f}", f"{100 * share:.1f}%",
                         f"{f / 1e9:.2f}" if f else "", rate])
    util = total / step / peak
    bmm = next((float(r[5]) * 1e9 for r in rows if r[0] == "aten::bmm" and r[5]), None)
    held = (f"memory-bound work: {100 * (1 - matmul_share):.0f}% of the time (elementwise ops, layout copies, "
            f"normalization: no FLOPs counted; the largest is `{top_mem[0]}` at {100 * top_mem[1]:.0f}%)"
            + (f", and the batched matmuls of local SGA (`aten::bmm`, thousands of 9x16x16 products: "
               f"{bmm / 1e9:.0f} GFLOP/s, {100 * bmm / peak:.0f}% of peak)" if bmm else ""))
    md = (f"RAT training step at {n}x{n}, batch 2: {total / 1e9:.1f} GFLOP (forward+backward) in "
          f"{step * 1e3:.0f} ms = **{total / step / 1e9:.1f} GFLOP/s**; a {m}x{m} float32 matmul on the "
          f"same machine and threads: **{peak / 1e9:.1f} GFLOP/s**; utilization **{100 * util:.0f}%**.\n\n"
          f"Top operations by self CPU time (torch.profiler, one step); GFLOP/s = that op's FLOPs over its time:\n\n"
          + table(["op", "calls", "self ms", "share", "GFLOP", "GFLOP/s"], rows)
          + f"\n\nThe large matmuls (linear layers: `mm`, `addmm`) run near the matmul peak; what holds the step "
          f"back is {held}.")
    return md, {"util": util, "peak": peak, "achieved": total / step, "held": held}


# ------------------------------------------------------------------------ data
def fake_isic(root, count, hw=(1500, 2000)):
    from PIL import Image, ImageDraw
    img_dir, gt_dir = (os.path.join(root, f) for f in ("ISIC2018_Task1-2_Training_Input",
                                                        "ISIC2018_Task1_Training_GroundTruth"))
    os.makedirs(img_dir), os.makedirs(gt_dir)
    rng = np.random.default_rng(0)
    h, w = hw
    yy, xx = np.mgrid[:h, :w]
    for i in range(count):
        skin = np.stack([200 + 20 * np.sin(xx / (50 + 10 * c) + i) for c in range(3)], -1)
        skin = skin + rng.normal(0, 6, (h, w, 3))
        mask = Image.new("L", (w, h))
        ImageDraw.Draw(mask).ellipse([w // 4, h // 4, 3 * w // 4 + 40 * i, 3 * h // 4], fill=255)
        skin[np.asarray(mask) > 0] *= 0.5
        Image.fromarray(skin.clip(0, 255).astype(np.uint8)).save(os.path.join(img_dir, f"ISIC_{i:07d}.jpg"), quality=90)
        mask.save(os.path.join(gt_dir, f"ISIC_{i:07d}_segmentation.png"))


def samples_per_s(make, passes=1):
    t = time.perf_counter()
    ds = make()
    count = 0
    for _ in range(passes):
        for i in range(len(ds)):
            ds[i]
            count += 1
    return count / (time.perf_counter() - t), len(ds)


def sec_data(a):
    from data import SegDataset
    n, scales = (64, (1.0, 0.5)) if a.quick else (256, (1.0, 0.5))
    count = 4 if a.quick else 12
    log("data")
    rows = []
    length = 8 if a.quick else 32
    syn, _ = samples_per_s(lambda: SegDataset("synthetic", "train", n, scales, augment=True, length=length))
    rows.append(["synthetic renderer (augment)", f"{syn:.1f}"])
    root = tempfile.mkdtemp(prefix="rat_bench_isic_")
    try:
        fake_isic(root, count, (300, 400) if a.quick else (1500, 2000))
        isic = lambda: SegDataset("isic", "train", n, scales, augment=True, data_dir=root)
        first, k = samples_per_s(isic)
        later, _ = samples_per_s(isic, passes=2)
        rows += [[f"ISIC loader, first pass ({k} JPEGs, {'300x400' if a.quick else '2000x1500'}, decode + cache)",
                  f"{first:.1f}"], ["ISIC loader, later passes (cached PNGs)", f"{later:.1f}"]]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    model, x = seg("rat"), levels(n, scales=scales)
    opt = torch.optim.AdamW(model.parameters())
    step = timed({"s": lambda: train_step(model, x, opt)}, a.reps)["s"]
    rows.append([f"RAT training step (batch 2, {n} px, scales {','.join(map(str, scales))})", f"{2 / step:.1f}"])
    md = (f"Samples per second at {n} px in one process (`__getitem__` in a loop; train.py's DataLoader "
          f"adds `--workers` processes per rank):\n\n" + table(["source", "samples/s"], rows))
    return md, {}


# ------------------------------------------------------------------------ distributed and threads
def dist_worker(size, batch, steps):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    model = seg("rat")
    ddp = DDP(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters())
    x = levels(size, batch // world)
    step = lambda: train_step(ddp, x, opt)
    step()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    per_step = (time.perf_counter() - t) / steps
    grads = torch.zeros(sum(p.numel() for p in model.parameters()), device=device())
    _, seconds = metrics.timed(lambda: [dist.all_reduce(grads) for _ in range(5)], device())
    if rank == 0:
        print("RESULT " + json.dumps({"step": per_step, "allreduce": seconds / 5,
                                      "mib": grads.numel() * 4 / 2 ** 20}), flush=True)
    dist.destroy_process_group()


def sec_dist(a):
    n, batch = (32, 2) if a.quick else (256, 4)
    res = {}
    for w in (1, 2):
        log(f"dist {w}")
        res[w] = run_worker(dict(kind="dist", size=n, batch=batch, steps=2 if a.quick else 5), a, nproc=w,
                            env={"OMP_NUM_THREADS": str(a.threads)})
    if any("error" in r for r in res.values()):
        return "Failed: " + "; ".join(f"{w} process(es): {r.get('error')}" for w, r in res.items()), {}
    t1, t2 = res[1]["step"], res[2]["step"]
    md = (f"Global batch {batch} at {n} px, {'NCCL' if torch.cuda.is_available() else 'gloo on this CPU'}, "
          f"{a.threads} thread(s) per process "
          f"(torch.distributed.run --standalone):\n\n"
          + table(["processes", "s / step", "speed-up", "all_reduce of the gradients, ms"],
                  [[1, f"{t1:.3f}", "1.00", ""],
                   [2, f"{t2:.3f}", f"{t1 / t2:.2f}", f"{res[2]['allreduce'] * 1e3:.1f}"]])
          + f"\n\nIdeal with 2 processes: {t1 / 2:.3f} s / step; overhead {t2 - t1 / 2:+.3f} s / step "
          f"(all_reduce of the {res[2]['mib']:.1f} MiB of gradients: {res[2]['allreduce'] * 1e3:.0f} ms; the rest "
          f"is the processes sharing {os.cpu_count()} cores with each other and with whatever else runs). "
          "On GPUs with NCCL, DDP overlaps the gradient all_reduce (a few MB for this model) with the backward "
          "pass; over NVLink it costs well under a millisecond, so scaling is near-linear while the per-GPU "
          "batch keeps the GPU busy (at 256 px, several images per GPU).")
    return md, {}


def step_worker(size, reps):
    model, x = seg("rat"), levels(size)
    return timed({"s": lambda: train_step(model, x)}, reps)


def sec_threads(a):
    """Intra-op threads on an idle machine and with one busy process competing (a shared machine)."""
    n = 32 if a.quick else 256
    configs = (("1 thread", 1, {}), ("2 threads, OpenMP default (spin-wait)", 2, {}),
               ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}))
    times = {}
    for busy in (0, 1):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for label, threads, env in configs:
                log(f"threads: {label}, {busy} busy process(es)")
                r = run_worker(dict(kind="step", size=n, reps=a.reps), argparse.Namespace(threads=threads), env=env)
                times[(label, busy)] = r.get("error") or f"{r['s'] * 1e3:.0f}"
        finally:
            for s in spinners:
                s.kill()
                s.wait()
    rows = [[label, times[(label, 0)], times[(label, 1)]] for label, _, _ in configs]
    return (f"RAT training step at {n} px, batch 2, in a fresh process each; as the machine was, and with one "
            f"more busy process (`while True: pass`) competing for the {os.cpu_count()} cores:\n\n"
            + table(["intra-op threads", "ms / step", "ms / step, 1 busy process"], rows)), {}


# ------------------------------------------------------------------------ compile, autocast
def compile_worker(size, reps, depth):
    model, x = seg("rat", depth=depth), levels(size)
    compiled = torch.compile(model)
    t = time.perf_counter()
    train_step(compiled, x)
    first = time.perf_counter() - t
    return dict(timed({"eager": lambda: train_step(model, x), "compiled": lambda: train_step(compiled, x)}, reps),
                compile=first)


def sec_compile(a):
    n = 32 if a.quick else 256
    log("compile")
    # a fresh inductor cache, so that the compile time is a cold one
    with tempfile.TemporaryDirectory(prefix="rat_bench_inductor_") as cache:
        r = run_worker(dict(kind="compile", size=n, reps=a.reps, depth=a.compile_depth), a, timeout=a.compile_timeout,
                       env={"TORCHINDUCTOR_CACHE_DIR": cache})
    what = f"torch.compile (inductor, CPU) of a training step of RAT depth {a.compile_depth} at {n} px, batch 2"
    if "error" in r:
        md = f"{what}: failed ({r['error']})."
    else:
        md = (f"{what} (`--compile-depth 4` for the full model, "
              f"which takes several times longer to compile): first call (compile) {r['compile']:.0f} s; "
              f"then eager {r['eager'] * 1e3:.0f} ms, compiled "
              f"{r['compiled'] * 1e3:.0f} ms per step (speed-up {r['eager'] / r['compiled']:.2f}x).")
    model, x = seg("rat"), levels(n)

    def bf16():
        with torch.autocast(device().type, dtype=torch.bfloat16):
            train_step(model, x)
    t = timed({"fp32": lambda: train_step(model, x), "bf16": bf16}, a.reps)
    md += (f"\n\nbf16 autocast (full model, depth 4): train.py enables it on CUDA only. Here on {device().type}: "
           f"float32 "
           f"{t['fp32'] * 1e3:.0f} ms, bf16 autocast {t['bf16'] * 1e3:.0f} ms per step ({t['fp32'] / t['bf16']:.2f}x).")
    return md, {}


# ------------------------------------------------------------------------ predict: one photo at its own size
# The ISIC recipe's model (README, Datasets): what a user segments their own photos with
ISIC_PRESET = dict(task="seg", model="rat", image_size=256, scales=[1.0, 0.5], pe="rose", sga="local", depth=4, dim=128,
                   heads=8, patch=4, strides=[2, 2, 2, 1], dropout=0.1, num_classes=1, token_grid="physical",
                   head="conv", stem="conv", sga_iters=1)


def photo_size(megapixels):
    """(H, W) of a 3:2 landscape photo of about that many megapixels (24: 4000 x 6000)."""
    h = round(math.sqrt(megapixels * 1e6 * 2 / 3))
    return h, round(h * 3 / 2)


def predict_worker(megapixels, dim):
    """predict.py's work for one JPEG photo (decode, forward at its native size, mask written), in this
    fresh process: seconds, peak RSS growth, and predict.py's own estimate of that peak."""
    from PIL import Image

    import predict
    from model import build_model
    arch = dict(ISIC_PRESET, dim=dim)
    torch.manual_seed(0)
    model = build_model(arch).to(device()).eval()          # random weights: the cost does not depend on them
    h, w = photo_size(megapixels)
    with tempfile.TemporaryDirectory(prefix="rat_bench_predict_") as tmp:
        path = os.path.join(tmp, "photo.jpg")
        coarse = np.random.default_rng(0).integers(0, 256, (h // 200 + 2, w // 200 + 2, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((w, h), Image.BICUBIC).save(path, quality=90)   # smooth, as a photo
        args = predict.get_args_parser().parse_args([path, "--out", tmp])
        mark = metrics.memory_mark(device())
        start = time.perf_counter()
        predict.predict_file(path, model, predict.predictor(model, arch, args), arch, args, device(), None)
        seconds = time.perf_counter() - start
        peak = metrics.memory_growth_mib(device(), mark)
    return dict(size=[h, w], seconds=seconds, peak_mib=peak,
                estimate_mib=predict.peak_bytes((h, w), (h, w), arch, False) / 2 ** 20)


def sec_predict(a):
    sizes = [0.02, 0.05] if a.quick else [float(v) for v in a.megapixels.split(",")]
    dim = 32 if a.quick else ISIC_PRESET["dim"]
    rows = []
    for mp in sizes:
        log(f"predict {mp:g} MP")
        r = run_worker(dict(kind="predict", megapixels=mp, dim=dim), a, timeout=1800)
        h, w = photo_size(mp)
        if "error" in r:
            rows.append([f"{mp:g}", f"{w} x {h}", r["error"], "", ""])
            continue
        rows.append([f"{mp:g}", f"{w} x {h}", f"{r['seconds']:.1f}", f"{r['peak_mib'] / 1024:.2f}",
                     f"{r['estimate_mib'] / 1024:.2f}"])
    mem = "peak CUDA GiB" if torch.cuda.is_available() else "peak RSS growth GiB"
    arch = ", ".join(f"{k} {v}" for k, v in dict(ISIC_PRESET, dim=dim).items() if k not in ("task", "model", "num_classes"))
    return (f"`predict.py` on one photo at its native size (a smooth 3:2 JPEG), each size in a fresh process, "
            f"{a.threads} intra-op thread(s): the ISIC recipe's model ({arch}; random weights), so the zoom is "
            f"about (H / {ISIC_PRESET['image_size']}, W / {ISIC_PRESET['image_size']}). Seconds: "
            f"decode, forward (inference mode), mask written. Memory: over that work; estimate: what predict.py "
            f"compares with the free memory (or --memory-limit). Target (issue 24): 24 MP within 8 GB and 60 s.\n\n"
            + table(["MP", "W x H", "seconds", mem, "estimate GiB"], rows)), {}


def cli(sections, workers, script, doc, add_args=None, quick_skips=()):
    """The command line of a benchmark script (this one, tools/bench_peers.py): runs sections
    {name: sec_<name>(args) -> (markdown, measurements)} and prints the markdown; --write puts each
    section into BENCHMARKS.md, keeping the file's other sections; --worker runs one of `workers`
    (run_worker's fresh processes). quick_skips: sections --quick leaves out unless named."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    p.add_argument("--only", default=None, help=f"comma-separated sections of {','.join(sections)} (default: all"
                   + (f"; with --quick all but {','.join(quick_skips)}, which takes minutes whatever the size)"
                      if quick_skips else ")"))
    p.add_argument("--reps", type=int, default=None, help="timed repeats per measurement (min is kept)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable on a shared machine)")
    p.add_argument("--write", action="store_true", help="also write these sections into BENCHMARKS.md (atomically; "
                   "its other sections are kept)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    if add_args:
        add_args(p)
    a = p.parse_args()
    if a.worker:
        return worker(json.loads(a.worker), a.threads, workers)
    torch.set_num_threads(a.threads)
    a.reps = a.reps or (1 if a.quick else 3)
    only = [s for s in (a.only or ",".join(s for s in sections if not (a.quick and s in quick_skips))).split(",")
            if s]
    if set(only) - set(sections):
        p.error(f"unknown sections {sorted(set(only) - set(sections))}; choose from {','.join(sections)}")
    t0, parts, took = time.time(), {}, {}
    for name, run in sections.items():
        if name in only:
            took[name] = time.time()
            parts[name] = run(a)[0]
            took[name] = time.time() - took[name]
    cmd = (f"python {os.path.relpath(os.path.abspath(script), ROOT)} " + " ".join(sys.argv[1:])).strip()
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    machine = (f"{cpu}, {os.cpu_count()} cores, {a.threads} intra-op thread(s), torch {torch.__version__}, "
               f"device {device()}")
    # the load says how much other work shared the machine (timings on a shared machine are noisy)
    stamp = lambda s: (f"Command: `{cmd}` ({s:.0f} s, {time.strftime('%Y-%m-%d')}, load average "
                       f"{os.getloadavg()[2]:.1f} over the last 15 min)  \nMachine: {machine}.\n\n")
    head = f"# Benchmarks\n\n{stamp(time.time() - t0).rstrip()}\n"
    out = "\n".join([head] + [f"## {k}\n\n{v}\n" for k, v in parts.items()])
    print(out)
    if a.write:
        path = os.path.join(ROOT, "BENCHMARKS.md")
        if os.path.exists(path):
            # replace these sections (each with its command) and keep the rest of the file
            out = merge_sections(open(path).read(), {k: stamp(took[k]) + v for k, v in parts.items()})
        with atomic_open(path, "w") as f:
            f.write(out)


WORKERS = {"scale": scale_worker, "dense": dense_worker, "step": step_worker, "compile": compile_worker,
           "dist": dist_worker, "predict": predict_worker}


def add_args(p):
    p.add_argument("--compile-depth", type=int, default=1, help="RAT depth for the torch.compile measurement")
    p.add_argument("--compile-timeout", type=int, default=400, help="seconds allowed to compile and time it")
    p.add_argument("--megapixels", default="1,4,12,24", help="predict: photo sizes, one fresh process each")


def main():
    cli({name: globals()[f"sec_{name}"] for name in SECTIONS}, WORKERS, __file__, __doc__, add_args,
        quick_skips=("compile",))


def merge_sections(old, new):
    """Markdown `old` with the body of each `## name` section in `new` replaced, or appended at the end."""
    chunks = re.split(r"(?m)^(?=## )", old)
    out = []
    for c in chunks:
        name = c[3:].split("\n", 1)[0].strip() if c.startswith("## ") else None
        out.append(f"## {name}\n\n{new.pop(name)}" if name in new else c)
    out += [f"## {k}\n\n{v}" for k, v in new.items()]
    return "\n\n".join(c.strip("\n") for c in out) + "\n"


if __name__ == "__main__":
    main()
