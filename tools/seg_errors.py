"""Where a segmentation checkpoint errs: at the lesion's boundary or away from it.

    python tools/seg_errors.py runs/seg/ckpt_best.pt runs/seg_unet/ckpt_best.pt

For each checkpoint, on its validation split at its training size: pixels wrong per image
within the boundary band (the true mask's 5x5 dilation minus its 5x5 erosion: about 2 px
either side of the edge) and away from it (split into false positives, such as a decoy
taken for the lesion, and false negatives), and the images scored under Dice 0.8 and 0.5.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import SegDataset, seg_collate  # noqa: E402
from model import build_model, load_run  # noqa: E402


def errors(path, batch=50):
    args, state = load_run(path, "seg")
    model = build_model(args)
    model.load_state_dict(state)
    # synthetic data (ISIC's validation masks are scored at their original size: eval.py does that)
    val = SegDataset(args["data"], "val", args["image_size"], scales=args["scales"], length=args.get("val_size"),
                     data_dir=args.get("data_dir"), seed=args["seed"])
    rows = []
    with torch.no_grad():
        for i in range(0, len(val), batch):
            levels, mask = seg_collate([val[j] for j in range(i, min(i + batch, len(val)))])[:2]
            pred = (model.eval()(levels) > 0).float()
            band = (F.max_pool2d(mask, 5, 1, 2) + F.max_pool2d(-mask, 5, 1, 2)) > 0   # dilation - erosion
            per_image = lambda t: t.flatten(1).sum(1).float()
            dice = 2 * per_image(pred * mask) / (per_image(pred) + per_image(mask)).clamp(min=1)
            rows.append(torch.stack([per_image((pred != mask) & band), per_image((pred > mask) & ~band),
                                     per_image((pred < mask) & ~band), dice], 1))
    r = torch.cat(rows)
    print(f"{path}: {len(r)} val images, mean Dice {r[:, 3].mean():.4f}; wrong pixels per image: "
          f"boundary band {r[:, 0].mean():.1f}, away from it {r[:, 1].mean() + r[:, 2].mean():.1f} "
          f"(false positive {r[:, 1].mean():.1f}, false negative {r[:, 2].mean():.1f}); "
          f"images under Dice 0.8: {(r[:, 3] < 0.8).sum().item()}, under 0.5: {(r[:, 3] < 0.5).sum().item()}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpts", nargs="+")
    for ckpt in p.parse_args().ckpts:
        errors(ckpt)
