"""Is a change to model.py an exact speed-up? The segmentation training step (forward,
backward, fused AdamW) of the RAT in model.py at a git revision against the working tree's,
both built from one seed and interleaved in one process, with their largest logit difference:
at 64 px the default run's model (`python train.py --task seg`, batch 16), at 512 px bench.py's
(dim 128, batch 2).

    python tools/step_ab.py 5f2a930      # the revision before conv_gelu took a list of maps
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402

DEFAULT_RUN = vars(train.fill_defaults(train.get_args_parser().parse_args(["--task", "seg"])))
CASES = [(64, 16, lambda m: m.build_model(DEFAULT_RUN)), (512, 2, lambda m: m.build_seg_model("rat", **bench.RAT))]


def model_at(rev, folder):
    """model.py of `rev`, imported under another name beside that revision's rose.py and sga.py."""
    for name in ("model.py", "rose.py", "sga.py"):
        source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{name}"], capture_output=True, text=True)
        if source.returncode:
            raise SystemExit(f"git show {rev}:{name}: {source.stderr.strip()}")
        with open(os.path.join(folder, name), "w") as f:
            f.write(source.stdout)
    # its own rose and sga, not the working tree's, so that the whole revision is timed
    saved = {k: sys.modules.pop(k) for k in ("rose", "sga") if k in sys.modules}
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("model_at_rev", os.path.join(folder, "model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path.remove(folder)
    sys.modules.update(saved)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="git revision whose model.py is the baseline")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    with tempfile.TemporaryDirectory() as folder:
        modules = {a.rev: model_at(a.rev, folder), "working tree": model}
    for size, batch, build in CASES:
        nets = {}
        for name, module in modules.items():
            torch.manual_seed(0)
            nets[name] = build(module)
        opts = {name: torch.optim.AdamW(net.parameters(), fused=True) for name, net in nets.items()}
        x = bench.levels(size, batch)
        with torch.no_grad():
            old, new = (net(x) for net in nets.values())
        t = bench.timed({name: lambda n=name: bench.train_step(nets[n], x, opts[n]) for name in nets}, a.reps)
        old_s, new_s = t.values()
        print(f"{size} px, batch {batch}: {a.rev} {old_s:.3f} s, working tree {new_s:.3f} s, ratio "
              f"{new_s / old_s:.2f}; largest logit difference {(new - old).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
