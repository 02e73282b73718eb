"""Is dilation what makes the zoomed conv stem and head slow? One 3x3 conv of the conv head's
full-resolution stage (48 -> 16 channels, batch 2), forward and backward, dilated by the zoom
against the same conv computed densely on the input's f x f phases (exact: a conv dilated by f
is a dense conv on each sub-grid of every f-th pixel), at 256 px (f = 1), 512 (2) and 1024 (4).

    python tools/dilation_cost.py
"""
import os
import time

import torch
import torch.nn.functional as F


def on_phases(x, w, b, d):
    """F.conv2d(x, w, b, padding=d, dilation=d) as a dense conv on the d x d phases of x."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // d, d, W // d, d).permute(0, 3, 5, 1, 2, 4).reshape(B * d * d, C, H // d, W // d)
    y = F.conv2d(x, w, b, padding=1)
    return y.reshape(B, d, d, -1, H // d, W // d).permute(0, 3, 4, 1, 5, 2).reshape(B, -1, H, W)


def main():
    for size, d in [(256, 1), (512, 2), (1024, 4)]:
        x = torch.randn(2, 48, size, size, requires_grad=True)
        w, b = torch.randn(16, 48, 3, 3, requires_grad=True), torch.zeros(16, requires_grad=True)
        ways = {"dilated": lambda: F.conv2d(x, w, b, padding=d, dilation=d), "phases": lambda: on_phases(x, w, b, d)}
        assert torch.allclose(ways["dilated"](), ways["phases"](), atol=1e-3)
        took = {}
        for name, fn in ways.items():
            fn().sum().backward()                       # warm-up
            t = time.perf_counter()
            for _ in range(3):
                fn().sum().backward()
            took[name] = (time.perf_counter() - t) / 3
        print(f"{size} px (zoom {d}): dilated {took['dilated']:.2f} s, on phases {took['phases']:.2f} s")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    main()
