"""What the conv stem and conv head cost: the 512 px training step (RAT dim 128, batch 2) with
them and with the patch stem, refine head and three rounds of grouping before them, interleaved
in one process; then
the step at 256, 512 and 1024 px and its exponent in pixels (pixel grid, as bench.py scaling).

    python tools/seg_cost.py
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
from model import build_seg_model  # noqa: E402



def model(**kw):
    torch.manual_seed(0)
    return build_seg_model("rat", **{**bench.RAT, **kw})


def main():
    before, now = model(stem="patch", head="refine", sga_iters=3), model()
    x = bench.levels(512)
    t = bench.timed({"before": lambda: bench.train_step(before, x), "now": lambda: bench.train_step(now, x)}, 3)
    print(f"512 px step: patch stem + refine head {t['before']:.2f} s, conv stem + conv head {t['now']:.2f} s, "
          f"ratio {t['now'] / t['before']:.2f}")
    physical, sizes, times = model(ref_size=256), [256, 512, 1024], []   # trained at 256 px, run at 2x and 4x
    for n in sizes:
        x = bench.levels(n)
        times.append(bench.timed({n: lambda: bench.train_step(physical, x)}, 2)[n])
        print(f"{n} px step, physical grid: {times[-1]:.2f} s")
    print(f"time exponent in pixels, 256 to 1024 px: {math.log(times[-1] / times[0]) / math.log(16):.2f}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    main()
