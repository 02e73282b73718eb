"""Benchmark sections `peers` and `gpu`: RAT next to what a user would pick instead, and on a GPU.

    pip install -r requirements-bench.txt                  # the peers: the published RAT, timm
    python tools/bench_peers.py --only peers --write       # into BENCHMARKS.md, next to bench.py's sections
    python tools/bench_peers.py --only gpu --write         # on a CUDA machine, unattended (--gpu-budget)
    python tools/bench_peers.py --only gpu --gpu-dry-run   # the same code on the CPU at 32-64 px

Built on bench.py (its helpers and command line, bench.cli); bench.py does not import this.
The peers are optional extras, imported only here, inside the measuring workers
(never by the model or training code). Each configuration runs in a fresh process
(run_worker), so its peak memory is its own; a failure (out of memory, an
error) becomes a row of the table, not a crash.
"""

import importlib.util
import json
import math
import os
import re
import resource
import sys
import time

import torch

# bench and model are top-level modules: importable from any working directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import metrics  # noqa: E402
from bench import log, slope, table  # noqa: E402

PEER_MODULES = {"resolution_aware_transformer": "resolution-aware-transformer", "timm": "timm"}
RAT_P1_MAX = 512                   # RAT with patch 1 at 1024 px: first global attention on 65536 tokens, minutes here
# glibc serves blocks of 64 KiB and more with mmap and gives them back when freed, so that the RSS growth
# of the memory workers is the tensors' peak, not what the heap happened to hold (RAT at 96 px: 50.6 MiB
# in three runs, against 55-60 MiB without); the timing workers keep the default allocator
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
CAP_GIB = 8                        # per worker: the machine is shared; beyond this an allocation fails cleanly
GPU_SIZES, GPU_LADDER = (512, 1024, 2048), (2048, 2896, 4096, 5792, 8192, 11584, 16384)   # ladder: steps of sqrt 2


def extras_missing():
    return [pip for mod, pip in PEER_MODULES.items() if importlib.util.find_spec(mod) is None]


def cap_memory(gib):
    """Address-space limit `gib` above what this process maps now: a tensor that does not fit
    raises "can't allocate" instead of waking the OOM killer on a shared machine."""
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + int(gib * 2 ** 30), resource.RLIM_INFINITY))


def mem_label():
    return "peak CUDA MiB" if torch.cuda.is_available() else "peak RSS growth MiB"


def proc_status_mib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024


def mem_meter():
    """A function giving the peak memory (MiB) since this call: CUDA peak allocated, or CPU peak RSS growth."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return lambda: torch.cuda.max_memory_allocated() / 2 ** 20
    try:
        # reset the RSS high-water mark to now: the lifetime peak (ru_maxrss) can lie above the current RSS
        # (memory given back after the imports or the model's construction) and hide the growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = proc_status_mib("VmRSS")
        return lambda: proc_status_mib("VmHWM") - before
    except OSError:
        mark = metrics.memory_mark(bench.device())
        return lambda: metrics.memory_growth_mib(bench.device(), mark)


def short_error(e):
    text = str(e)
    m = re.search(r"tried to allocate (\d+) bytes", text)
    if m:
        return f"cannot allocate {int(m.group(1)) / 2 ** 30:.1f} GiB more"
    if isinstance(e, torch.OutOfMemoryError):
        return ". ".join(text.split(". ")[:2])                     # "CUDA out of memory. Tried to allocate X GiB"
    return f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0][:140]}"


# ------------------------------------------------------------------------ the models
def reference(dim=128, depth=4, heads=8):
    """The published RAT (PyPI resolution-aware-transformer): its defaults otherwise. Its stem is a
    stride-1 conv, so its first grouping sees every pixel; dense grouping (the sparse one needs NATTEN
    and CUDA), kernel 7, stride 3, 3 iterations."""
    from resolution_aware_transformer import ResolutionAwareTransformer
    torch.manual_seed(0)
    return ResolutionAwareTransformer(spatial_dims=2, input_features=3, feature_dims=dim, num_blocks=depth,
                                      num_heads=heads)


def rat(**kw):
    from model import RAT
    torch.manual_seed(0)
    return RAT(**{**bench.RAT, **kw})


def swin(size, target):
    """timm's Swin (windowed attention), patch 4, window 8, depths 2,2,2,2, heads 1,2,4,8; the width
    whose parameter count is closest to `target`."""
    from model import num_params
    from timm.models.swin_transformer import SwinTransformer
    make = lambda e: SwinTransformer(img_size=size, patch_size=4, window_size=8, embed_dim=e, depths=(2, 2, 2, 2),
                                     num_heads=(1, 2, 4, 8), num_classes=0)
    return make(min(range(16, 65, 8), key=lambda e: abs(num_params(make(e)) - target)))


def vit(size, target):
    """timm's plain ViT (global attention), patch 16 (RAT's first attention also runs at stride 16),
    width 128 and 8 heads like RAT, the depth whose parameter count is closest to `target`. Its position
    embedding is learned for 256 px and resampled to other sizes, so the count does not change with the size."""
    from model import num_params
    from timm.models.vision_transformer import VisionTransformer
    make = lambda d: VisionTransformer(img_size=256, patch_size=16, embed_dim=bench.RAT["dim"], depth=d,
                                       num_heads=bench.RAT["heads"], num_classes=0, dynamic_img_size=True)
    one, two = num_params(make(1)), num_params(make(2))             # blocks are identical: linear in depth
    return make(max(1, 1 + round((target - one) / (two - one))))


def build(name, size):
    from model import num_params
    if name == "reference":
        return reference(**bench.RAT)
    if name == "rat-p1":
        return rat(patch=1)                         # tokens at the first grouping = pixels, as in the reference
    target = num_params(rat())
    return {"rat": rat, "swin": lambda: swin(size, target), "vit": lambda: vit(size, target)}[name]()


def features(name, model, x):
    if name == "reference":
        return model(x)[0]["x_out"]
    if name.startswith("rat"):
        return model([x])[-1][0][0]                             # finest level after the last block
    return model.forward_features(x)


# ------------------------------------------------------------------------ workers (fresh processes)
def run_worker(spec, a, **kw):
    """bench.run_worker with this file as the worker script, for the WORKERS below."""
    return bench.run_worker(spec, a, script=os.path.abspath(__file__), **kw)


def peer_step(name, model, x, train):
    def step():
        if train:
            features(name, model, x).float().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                features(name, model, x)
    return step


def peer_worker(names, size, batch, train, reps, cap_gib=CAP_GIB):
    """Each model's first step (its peak memory: meaningful when it is alone in this fresh process), then
    the times of those that ran, interleaved, so that a shared machine slows them alike."""
    from model import num_params
    if cap_gib and not torch.cuda.is_available():           # CUDA maps a huge address space: no cap there
        cap_memory(cap_gib)
    x, out, steps = torch.rand(batch, 3, size, size, device=bench.device()), {}, {}
    for name in names:
        model = build(name, size).to(bench.device())
        step, peak = peer_step(name, model, x, train), mem_meter()
        try:
            step()
        except (RuntimeError, MemoryError) as e:
            out[name] = {"error": short_error(e)}
            continue
        out[name], steps[name] = {"mem": peak(), "params": num_params(model)}, step
    for name, s in (bench.timed(steps, reps) if reps and steps else {}).items():
        out[name]["s"] = s
    return out


def run_peers(a, names, size, batch, train):
    """{name: results}: the peak memory of each model in a fresh process of its own, and the times of
    all of them in one more process, interleaved."""
    spec, res = dict(kind="peer", size=size, batch=batch, train=train), {}
    for name in names:
        log(f"peers: {name} {size} px {'train' if train else 'inference'}")
        r = run_worker({**spec, "names": [name], "reps": 0}, a, timeout=900, env=MEASURE_ENV)
        res[name] = r.get(name, r)                                # the whole answer is an error if the process failed
    ok = [name for name in names if "error" not in res[name]]
    if ok:
        log(f"peers: timing {', '.join(ok)} at {size} px")
        r = run_worker({**spec, "names": ok, "reps": a.reps}, a, timeout=1800)
        for name in ok:                                           # its time; the memory from its own process
            t = r.get(name, r)
            res[name] = {**res[name], **({"s": t["s"]} if "s" in t else {"error": t.get("error", "not timed")})}
    return res


def amp_step(model, x, opt):
    """A training step as train.py runs it on a GPU: bf16 autocast forward, float32 loss, AdamW."""
    with torch.autocast(x[0].device.type, dtype=torch.bfloat16):
        y = model(x)
    y.float().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def gpu_worker(model, sizes, batch, reps, backend=None, stop_at_first_failure=False):
    """RATSeg or the U-Net, one size after the other (a recompile per new size with a backend);
    prints the results so far after each size, so that a time-out keeps what was done."""
    net = bench.seg(model)
    opt = torch.optim.AdamW(net.parameters())
    # static shapes, as a train.py run at one size sees them (a symbolic trace of RAT is slow to make)
    run = torch.compile(net, backend=backend, dynamic=False) if backend else net
    out = {}
    for n in sizes:
        x = bench.levels(n, batch)
        peak = mem_meter()
        try:
            t = time.perf_counter()
            amp_step(run, x, opt)                               # the first call compiles
            first = time.perf_counter() - t
            s = bench.timed({"s": lambda x=x: amp_step(run, x, opt)}, reps)["s"]
            out[str(n)] = {"s": s, "mem": peak(), "first": first}
        except (RuntimeError, MemoryError) as e:
            out[str(n)] = {"error": short_error(e)}
        del x
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print("RESULT " + json.dumps(out), flush=True)
        if stop_at_first_failure and "error" in out[str(n)]:
            break
    return out


WORKERS = {"peer": peer_worker, "gpu": gpu_worker}


# ------------------------------------------------------------------------ section peers
def ref_stages(size):
    """Token counts (N_in, N_out) and grids at each of the reference's groupings, from its own shape code."""
    model, grid, out = reference(**bench.RAT), (size, size), []
    for layer in model.sga_layers:
        nxt = tuple(layer._calculate_strided_grid_shape(grid))
        out.append((math.prod(grid), math.prod(nxt), nxt))
        grid = nxt
    return out


def ref_assignment(size, batch=1):
    """The first grouping's dense assignment [B, heads, N_out, N_in] (float32: `torch.empty` takes the
    default dtype): its shape and GiB."""
    n_in, n_out, _ = ref_stages(size)[0]
    shape = (batch, bench.RAT["heads"], n_out, n_in)
    return shape, math.prod(shape) * 4 / 2 ** 30


def why_not(size, train):
    """Why the reference is not run at this size, computed from the shapes in its code, not run."""
    shape, gib = ref_assignment(size)
    what = f"[{', '.join(map(str, shape))}] float32, {gib:.1f} GiB each"
    # training: autograd keeps the softmax output and the normalized assignment of each of the 3 iterations
    # (counted with saved-tensor hooks at 96 px); inference: `torch.empty` attn_k and its `clone` attn_q
    count, why = (6, "autograd keeps, of the first grouping alone,") if train else (2, "the first grouping allocates")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    over = f", over this machine's {ram:.0f} GiB" if count * gib > ram else ""
    return f"not run: {why} {count} x {what} ({count * gib:.1f} GiB{over})"


def cell(r, key, fmt):
    return r.get("error") or fmt(r[key])


def ratio(a, b, key):
    ok = "error" not in a and "error" not in b and b[key] > 0          # tiny sizes can grow RSS by 0 MiB
    return f"{a[key] / b[key]:.2f}" if ok else ""


def ref_table(a, sizes, computed, train, batch=1):
    rows, res = [], {}
    for n in sizes + computed:
        run = [m for m, skip in (("reference", n in computed), ("rat-p1", n > RAT_P1_MAX)) if not skip]
        r = run_peers(a, run, n, batch, train) if run else {}
        r.setdefault("reference", {"error": why_not(n, train)})
        r.setdefault("rat-p1", {"error": f"not run (over {RAT_P1_MAX} px: quadratic first attention, slow here)"})
        ref, ours = r["reference"], r["rat-p1"]
        res[("reference", n)], res[("rat-p1", n)] = ref, ours
        rows.append([n, n * n, cell(ref, "s", lambda v: f"{v:.2f}"), cell(ours, "s", lambda v: f"{v:.3f}"),
                     ratio(ref, ours, "s"), "" if "error" in ref else f"{ref['mem']:.0f}",
                     "" if "error" in ours else f"{ours['mem']:.0f}", ratio(ref, ours, "mem")])
    header = ["size", "tokens at the 1st grouping", "reference s", "RAT s", "time ratio", f"reference {mem_label()}",
              f"RAT {mem_label()}", "memory ratio"]
    return table(header, rows), res


def sec_peers_reference(a):
    sizes, train_sizes = ([32, 48], [32]) if a.quick else ([64, 96, 128], [64, 96])
    computed = [256, 512, 1024]
    inf_md, inf = ref_table(a, sizes, computed[:0] if a.quick else computed, train=False)
    train_md, tr = ref_table(a, train_sizes, [] if a.quick else [128, 256], train=True)
    n = sizes[-1]
    r, o = inf[("reference", n)], inf[("rat-p1", n)]
    lead = ""
    if ratio(r, o, "s") and ratio(r, o, "mem"):
        lead = (f"At {n} px the reference takes {r['s']:.2f} s and {r['mem']:.0f} MiB, RAT {o['s']:.3f} s and "
                f"{o['mem']:.0f} MiB: **{ratio(r, o, 's')}x the time and {ratio(r, o, 'mem')}x the memory**. ")
    fails = [m for m, v in tr.items() if m[0] == "reference" and "inplace" in v.get("error", "")]
    note = ""
    if fails:
        k = fails[0][1]
        grids = ", ".join("x".join(map(str, g)) for *_, g in ref_stages(k))
        note = (f"\n\nAt {k} px its training forward fails: its groupings leave grids {grids}, and with one image "
                f"a single-token stage makes the RoSE block (`RoSE/rose.py`, `_q[:, ...] = self.rose(...)`) write in "
                f"place into a view that autograd forbids; with gradients off, or two images, it runs.")
    params = f"{r.get('params', 0) / 1e6:.2f}M / {o.get('params', 0) / 1e6:.2f}M"
    return (f"The published RAT (`pip install resolution-aware-transformer==2025.9.29.2036`, "
            f"`ResolutionAwareTransformer(spatial_dims=2, feature_dims=128, num_blocks=4, num_heads=8)`, otherwise "
            f"its defaults: stride-1 stem, dense grouping kernel 7 stride 3, parameters {params} reference / RAT) "
            f"against this repository's RAT backbone (`model.RAT`, dim 128, 4 blocks, 8 heads, `--patch 1`, so that "
            f"both group every pixel at the first grouping; default strides). One RGB image. Memory: each model "
            f"alone in a fresh process, {mem_label()} over its first call (large blocks mmapped, so the heap's "
            f"leftovers do not hide growth); time: both models of a row in one more process, interleaved, "
            f"min of {a.reps}; ratio = reference / RAT. "
            f"Where the reference is not run, the size is computed from the shapes in its code.\n\n"
            f"Inference (`torch.no_grad`):\n\n{inf_md}\n\n"
            f"Training (forward + backward, no optimizer):\n\n{train_md}\n\n"
            f"{lead}The reference groups densely: every group competes for every token, an "
            f"N_out x N_in assignment per head and iteration, so its memory grows with the square of the pixels; "
            f"RAT's local grouping is linear (with `--patch 1`, its quadratic part is the first global attention, "
            f"over pixels / 16 tokens).{note}"), {"reference": inf, "reference_train": tr}


def sec_peers_backbones(a):
    sizes, names = ([64, 128] if a.quick else [256, 512, 1024]), ("rat", "swin", "vit")
    res = {}
    for n in sizes:
        res.update({(name, n): r for name, r in run_peers(a, names, n, 2, train=True).items()})
    rows = []
    for n in sizes:
        for name in names:
            r = res[(name, n)]
            rows.append([n, name, f"{r['params'] / 1e6:.2f}M" if "params" in r else "",
                         cell(r, "s", lambda v: f"{v * 1e3:.0f}"), "" if "error" in r else f"{r['mem']:.0f}",
                         ratio(res[("rat", n)], r, "s"), ratio(res[("rat", n)], r, "mem")])
    fits = {}
    for name in names:
        for k in ("s", "mem"):
            ok = [n for n in sizes if res[(name, n)].get(k, 0) > 0]
            fits.setdefault(name, {})[k] = slope([n * n for n in ok], [res[(name, n)][k] for n in ok])
    fit_rows = [[name, f"{fits[name]['s']:.2f}", f"{fits[name]['mem']:.2f}"] for name in names]
    md = (f"Training step (forward + backward of the backbone's features, mean as the loss; no optimizer), batch 2, "
          f"one RGB image per sample. Memory: each model alone in a fresh process, {mem_label()} over its first step "
          f"(large blocks mmapped); "
          f"time: the three models of a size in one more process, interleaved, min of {a.reps}. "
          f"rat: `model.RAT`, dim 128, 4 blocks, 8 heads, patch 4, default strides. swin: timm `SwinTransformer`, "
          f"patch 4, window 8, depths 2,2,2,2, heads 1,2,4,8, width picked by parameter count. vit: timm "
          f"`VisionTransformer`, patch 16, width 128, 8 heads, depth picked by parameter count. "
          f"RAT / peer > 1: RAT is slower or larger.\n\n"
          + table(["size", "model", "params", "train ms", mem_label(), "RAT / this, time",
                   "RAT / this, memory"], rows)
          + f"\n\nFitted exponents against the number of pixels ({sizes[0]} to {sizes[-1]} px):\n\n"
          + table(["model", "train time", "train memory"], fit_rows)
          + "\n\n" + behind(res, sizes, fits))
    return md, {"backbones": res, "fits": fits}


def behind(res, sizes, fits):
    """Plain words: against each peer, where RAT is behind (slower, larger, steeper)."""
    lines = []
    for peer in ("swin", "vit"):
        worse = []
        for key, what in (("s", "time"), ("mem", "memory")):
            ok = [n for n in sizes if "error" not in res[("rat", n)] and "error" not in res[(peer, n)]]
            rs = {n: res[("rat", n)][key] / res[(peer, n)][key] for n in ok}
            slow = [n for n in ok if rs[n] > 1]
            if slow:
                worse.append(f"{what} at {', '.join(map(str, slow))} px (RAT / {peer} "
                             f"{', '.join(f'{rs[n]:.2f}' for n in slow)})")
            if fits["rat"][key] > fits[peer][key]:
                worse.append(f"{what} exponent ({fits['rat'][key]:.2f} against {fits[peer][key]:.2f})")
        lines.append(f"- Against {peer}: RAT is behind in " + "; ".join(worse) + "." if worse
                     else f"- Against {peer}: RAT is not behind on any of these measurements.")
    return "Where RAT is behind:\n\n" + "\n".join(lines)


def sec_peers(a):
    missing = extras_missing()
    if missing:
        return (f"Skipped: the optional extras {', '.join(missing)} are not installed "
                f"(`pip install -r requirements-bench.txt`)."), {}
    md1, m1 = sec_peers_reference(a)
    md2, m2 = sec_peers_backbones(a)
    return f"### Against the published RAT\n\n{md1}\n\n### Against Swin and ViT\n\n{md2}", {**m1, **m2}


# ------------------------------------------------------------------------ section gpu
def gpu_plan(a):
    """Sizes, ladder and compile backend: the real ones on CUDA; tiny ones and no code generation
    (backend "eager") for the CPU dry run."""
    if a.gpu_dry_run:
        return (32, 64), (32, 48, 64), "eager", 1
    return GPU_SIZES, GPU_LADDER, "inductor", a.reps + 2


def sec_gpu(a):
    if not torch.cuda.is_available() and not a.gpu_dry_run:
        return ("No CUDA device was available on this machine: nothing measured. On a GPU machine, "
                f"`python tools/bench_peers.py --only gpu --write` measures this section in under "
                f"{a.gpu_budget // 60 + 1} min "
                "(`--gpu-budget` seconds, unattended); `--gpu-dry-run` runs the same code on the CPU at 32-64 px."), {}
    sizes, ladder, backend, reps = gpu_plan(a)
    t0, res = time.time(), {}
    left = lambda: max(10, int(a.gpu_budget - (time.time() - t0)))
    for model in ("rat", "unet"):               # eager first (fast), then the largest size, then compile
        log(f"gpu: {model} eager")
        res[(model, "eager")] = run_worker(dict(kind="gpu", model=model, sizes=sizes, batch=2, reps=reps), a,
                                           timeout=left())
    for model in ("rat", "unet"):
        log(f"gpu: {model} largest batch-1 size")
        res[(model, "largest")] = run_worker(dict(kind="gpu", model=model, sizes=ladder, batch=1, reps=1,
                                                  stop_at_first_failure=True), a, timeout=left() // 5)
    for i, model in enumerate(("rat", "unet")):
        log(f"gpu: {model} compiled ({backend})")
        res[(model, "compiled")] = run_worker(dict(kind="gpu", model=model, sizes=sizes, batch=2, reps=reps,
                                                   backend=backend), a, timeout=left() // (2 - i))
    return gpu_report(a, res, sizes, ladder, backend, time.time() - t0), {"gpu": res}


def gpu_row(r, n, batch=2):
    v = r.get(str(n)) or {"error": r.get("error") or r.get("partial") or "not reached"}
    if "error" in v:
        return [v["error"], "", ""]
    return [f"{v['s'] * 1e3:.0f}", f"{batch / v['s']:.1f}", f"{v['mem'] / 1024:.2f}"]


def largest(r, ladder):
    fit = [n for n in ladder if "error" not in r.get(str(n), {"error": 1})]
    fail = next((n for n in ladder if "error" in r.get(str(n), {})), None)
    if not fit:
        return f"none of {ladder[0]}..{ladder[-1]} px ({r.get('error') or r.get(str(ladder[0]), {}).get('error')})"
    v = r[str(fit[-1])]
    s = f"**{fit[-1]} px** ({v['mem'] / 1024:.1f} GiB, {v['s']:.2f} s per step, {1 / v['s']:.2f} images/s)"
    if fail:
        return s + f"; {fail} px: {r[str(fail)]['error']}"
    if "partial" in r:
        return s + f"; {r['partial']} before the next size"
    return s + f"; the ladder stops at {ladder[-1]} px"


def gpu_report(a, res, sizes, ladder, backend, took):
    where = "**DRY RUN on the CPU** (`--gpu-dry-run`: tiny sizes, compile backend `eager`; not GPU numbers)"
    mem = "peak GiB (RSS growth)"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        where, mem = f"GPU: **{p.name}**, {p.total_memory / 2 ** 30:.0f} GiB", "peak GiB (CUDA allocated)"
    rows = []
    for model in ("rat", "unet"):
        for n in sizes:
            c = res[(model, "compiled")].get(str(n), {})
            rows.append([model, n] + gpu_row(res[(model, "eager")], n) + gpu_row(res[(model, "compiled")], n)
                        + [f"{c['first']:.0f}" if "first" in c else ""])
    header = ["model", "size", "eager ms", "eager images/s", f"eager {mem}", "compiled ms", "compiled images/s",
              f"compiled {mem}", "first compiled step s"]
    return (f"{where}; torch {torch.__version__}; {took:.0f} s in all (budget `--gpu-budget {a.gpu_budget}`). "
            f"Training step: bf16 autocast forward, float32 loss, backward, AdamW; batch 2, one level; RATSeg dim "
            f"128, 4 blocks, 8 heads, patch 4, and the U-Net of the same parameter count; compiled: "
            f"`torch.compile(model, backend=\"{backend}\")` as `train.py --compile`, the first step at each size "
            f"(compile) not timed. Each model and mode in a fresh process; time: min of {gpu_plan(a)[3]}.\n\n"
            + table(header, rows)
            + f"\n\nLargest size that trains at batch 1 (eager bf16, sizes {ladder[0]} to {ladder[-1]} in steps of "
            f"about sqrt 2):\n\n- RAT: {largest(res[('rat', 'largest')], ladder)}\n"
            f"- U-Net: {largest(res[('unet', 'largest')], ladder)}")


SECTIONS = {"peers": sec_peers, "gpu": sec_gpu}


def add_gpu_args(p):
    p.add_argument("--gpu-budget", type=int, default=270, help="seconds for the whole gpu section (compiles included)")
    p.add_argument("--gpu-dry-run", action="store_true", help="gpu section: run its code on the CPU at 32-64 px")


def main():
    bench.cli(SECTIONS, WORKERS, __file__, __doc__, add_gpu_args)


if __name__ == "__main__":
    main()
