"""Helpers of gpu_check.sh: each subcommand checks one thing and prints one line of detail
(its last line of output), exiting 0 (pass) or 1 (fail, the line says why).

    python tools/gpu_check.py header                          # date, torch, GPU
    python tools/gpu_check.py summary RUN --device cuda [--like RUN2]
    python tools/gpu_check.py sigterm-resume --run RUN -- CMD ...
    python tools/gpu_check.py eval-summary DIR ... --device cuda
    python tools/gpu_check.py bench --size 512 [--dim 128 --depth 4 --heads 8]

Only header and bench import torch: the other checks read files, so they cost no start-up time.
"""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

# the bench subcommand imports bench.py, a top-level module: importable from any working directory
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Fail(Exception):
    pass


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise Fail(f"no {path}") from None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise Fail(f"no {path}") from None


def tail(path, n=1):
    """The last n non-empty lines of a log, without tqdm's carriage-return clutter."""
    try:
        with open(path, errors="replace") as f:
            lines = [l.split("\r")[-1].strip() for l in f.read().splitlines()]
    except FileNotFoundError:
        return "(no log)"
    return " | ".join([l for l in lines if l][-n:])[-300:]


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_device(log):
    """The device train.py reports ("... N process(es) on cuda:0 ..."), from its output."""
    try:
        with open(log, errors="replace") as f:
            m = re.search(r"process\(es\) on (\S+)", f.read())
    except FileNotFoundError:
        m = None
    return m.group(1) if m else None


def check_device(found, expected):
    if found is None:
        raise Fail("the run did not say where it ran")
    if not found.startswith(expected):
        raise Fail(f"ran on {found}, expected {expected}")


# ---------------------------------------------------------------------------------------
def cmd_header(a):
    import torch
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')} on {os.uname().nodename}, python {sys.version.split()[0]}, "
          f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:  # nvidia-smi sees the GPU even where CUDA_VISIBLE_DEVICES hides it from torch
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    for line in smi.splitlines():
        print(f"# GPU (nvidia-smi): {line}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"# GPU (torch): {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2 ** 30:.0f} GiB, "
              f"compute capability {p.major}.{p.minor}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    elif not smi:
        print("# GPU: none visible")


def cmd_summary(a):
    """A finished training run: every epoch logged, finite loss and metric, on the expected device."""
    records = read_jsonl(os.path.join(a.run, "metrics.jsonl"))
    epochs = read_json(os.path.join(a.run, "args.json"))["epochs"]
    if not records or records[-1]["epoch"] != epochs:
        raise Fail(f"{a.run}: metrics.jsonl ends at epoch {records[-1]['epoch'] if records else 0} of {epochs}")
    last = records[-1]
    key = "dice" if "dice" in last else "AP"
    if not finite(last["train_loss"]) or not finite(last[key]):
        raise Fail(f"non-finite: train loss {last['train_loss']}, {key} {last[key]}")
    device = run_device(a.log)
    check_device(device, a.device)
    seconds = sum(r["epoch_time_s"] for r in records)
    detail = (f"{last['step']} steps on {device}{' (bf16 autocast)' if device.startswith('cuda') else ''} "
              f"in {seconds:.0f} s, train loss {last['train_loss']:.4f}, val {key} {last[key]:.3f}")
    if a.like and not os.path.exists(os.path.join(a.like, "metrics.jsonl")):
        detail += f" (no run in {a.like} to compare with)"          # its own item reports why
    elif a.like:
        # the same run without the option: the option must not change the arithmetic beyond
        # rounding (bf16 and GPU kernels round differently, hence the loose tolerance)
        other = read_jsonl(os.path.join(a.like, "metrics.jsonl"))[-1]["train_loss"]
        rel = abs(last["train_loss"] - other) / abs(other)
        detail += f" (without the option: {other:.4f}, {100 * rel:.1f}% apart)"
        if rel > a.tolerance:
            raise Fail(f"train loss {last['train_loss']:.4f} against {other:.4f} without the option: "
                       f"{100 * rel:.1f}% apart (> {100 * a.tolerance:.0f}%)")
    print(detail)


def children(pid):
    """Child process ids of pid, in increasing order (torchrun's workers are its children)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            pass
    return sorted(found)


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return {}


def cmd_sigterm_resume(a):
    """Start CMD (torchrun, 2 ranks, --ckpt-every 1), SIGTERM rank 1's process group once a
    checkpoint exists, expect a save and an exit; then CMD again must resume and finish."""
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    os.makedirs(a.run, exist_ok=True)
    ckpt, logs = os.path.join(a.run, "ckpt_last.pt"), [os.path.join(a.run, f"{n}.log") for n in ("first", "resume")]
    procs = []

    def stop(*_):  # the driver's time-out: take torchrun (and through it its workers) down too
        for p in procs:
            if p.poll() is None:
                p.terminate()
        sys.exit(124)

    signal.signal(signal.SIGTERM, stop)
    with open(logs[0], "w") as log:
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    first = procs[0]
    while not os.path.exists(ckpt):
        if first.poll() is not None:
            raise Fail(f"the first run ended (rc {first.returncode}) before any checkpoint: {tail(logs[0])}")
        time.sleep(0.02)
    rank1 = [c for c in children(first.pid) if environ(c).get(b"RANK") == b"1"]
    if len(rank1) != 1:
        first.terminate()
        raise Fail(f"found {len(rank1)} rank-1 workers under torchrun pid {first.pid}")
    # torchrun's shutdown and scancel signal a worker's whole process group, its DataLoader
    # workers with it; torchrun makes each worker the leader of a group of its own
    if os.getpgid(rank1[0]) != rank1[0]:
        first.terminate()
        raise Fail(f"rank 1 (pid {rank1[0]}) leads no process group of its own")
    os.killpg(rank1[0], signal.SIGTERM)
    first.wait()
    with open(logs[0], errors="replace") as f:
        m = re.search(r"SIGTERM: saved \S+ at step (\d+)", f.read())
    if not m:
        raise Fail(f"no 'SIGTERM: saved' after SIGTERM to rank 1's group (rc {first.returncode}): {tail(logs[0])}")
    saved_at = int(m.group(1))
    with open(logs[1], "w") as log:
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    if procs[1].wait():
        raise Fail(f"the rerun failed (rc {procs[1].returncode}): {tail(logs[1])}")
    with open(logs[1], errors="replace") as f:
        m = re.search(r"resuming \S+ at step (\d+)/(\d+)", f.read())
    if not m or int(m.group(1)) != saved_at:
        raise Fail(f"the rerun did not resume at step {saved_at}: {tail(logs[1], 3)}")
    total = int(m.group(2))
    last = read_jsonl(os.path.join(a.run, "metrics.jsonl"))[-1]
    epochs = read_json(os.path.join(a.run, "args.json"))["epochs"]
    if last["epoch"] != epochs or last["step"] != total:
        raise Fail(f"the rerun ended at epoch {last['epoch']}/{epochs}, step {last['step']}/{total}")
    device = run_device(logs[1])
    check_device(device, a.device)
    key = "dice" if "dice" in last else "AP"
    print(f"2 ranks on {device}: SIGTERM to rank 1's process group at step {saved_at}/{total}, saved and exited "
          f"(torchrun rc {first.returncode}); rerun resumed at step {saved_at}, finished epoch {epochs}, "
          f"val {key} {last[key]:.3f}")


def cmd_eval_summary(a):
    """eval.py's results.json in each folder: one finite row per resolution, on the expected device."""
    parts = []
    for d in a.dirs:
        res = read_json(os.path.join(d, "results.json"))
        check_device(res["device"], a.device)
        key = "dice" if res["task"] == "seg" else "AP50"
        rows = res["rows"]
        if not rows or not all(finite(r[key]) for r in rows):
            raise Fail(f"{d}: missing or non-finite {key}: {[r.get(key) for r in rows]}")
        parts.append(f"{res['task']} {key} " + "/".join(f"{r[key]:.3f}" for r in rows) + " at "
                     + "/".join(str(r["resolution"]) for r in rows) + " px")
    print("; ".join(parts) + f" on {res['device']}")


def cmd_bench(a):
    """bench.py's RAT training step at one size, batch 2: float32 forward+backward (as the
    scaling table of BENCHMARKS.md) and as train.py runs it on a GPU (bf16 autocast, AdamW)."""
    import torch

    import bench
    torch.manual_seed(0)
    model = bench.seg("rat", **{k: v for k, v in vars(a).items() if k in ("dim", "depth", "heads") and v})
    x = bench.levels(a.size, 2)
    opt = torch.optim.AdamW(model.parameters())
    cuda = torch.cuda.is_available()

    def amp_step():
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            y = model(x)
        y.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = []
    for label, step in (("float32 fwd+bwd", lambda: bench.train_step(model, x)),
                        ("bf16 autocast + AdamW" if cuda else "float32 + AdamW", amp_step)):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        s = bench.timed({"s": step}, a.reps)["s"]
        mem = f"peak {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB" if cuda else "peak RSS n/a"
        if not math.isfinite(s):
            raise Fail(f"{label}: no time")
        out.append(f"{label} {s * 1e3:.1f} ms, {mem}")
    dims = bench.RAT | {k: v for k, v in vars(a).items() if k in ("dim", "depth", "heads") and v}
    print(f"RAT dim {dims['dim']} depth {dims['depth']} heads {dims['heads']}, {a.size} px, batch 2, "
          f"{'cuda' if cuda else 'cpu'}: " + "; ".join(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("header")
    s = sub.add_parser("summary")
    s.add_argument("run")
    s.add_argument("--device", required=True, help="cuda or cpu: where the run must have run")
    s.add_argument("--log", default=os.environ.get("ITEM_LOG"), help="the run's output (default $ITEM_LOG)")
    s.add_argument("--like", help="a run of the same command without the option under test")
    s.add_argument("--tolerance", type=float, default=0.1, help="relative train-loss difference allowed with --like")
    s = sub.add_parser("sigterm-resume")
    s.add_argument("--run", required=True, help="the run folder (--out) of CMD")
    s.add_argument("--device", required=True)
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- then the torchrun command line")
    s = sub.add_parser("eval-summary")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--device", required=True)
    s = sub.add_parser("bench")
    s.add_argument("--size", type=int, default=512)
    s.add_argument("--dim", type=int)
    s.add_argument("--depth", type=int)
    s.add_argument("--heads", type=int)
    s.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    try:
        globals()[f"cmd_{a.cmd.replace('-', '_')}"](a)
    except Fail as e:
        print(f"{e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
