"""An ISIC 2018-layout folder of non-square built-in lesions, to try eval.py --resolutions native without the real data.

    python tools/isic_fixture.py /tmp/isic_fixture --train 400 --val 50 --test 100 --scale 1

Writes ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_<7 digits>.jpg and
ISIC2018_Task1_{...}_GroundTruth/ISIC_<7 digits>_segmentation.png (0/255): synthetic.py's lesions
rendered at photo-like shapes, 4:3, 3:2 and 3:4, from 90 x 120 to 100 x 150 px times --scale. Each
scene fills the image on both axes, as a photo squashed to a square fills the training frame, so a
model trained on the squashed images (train.py --data isic) meets every scene in the frame it was
trained in, and at its native size the physical token grid zooms differently per axis.
"""

import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository's modules
from synthetic import render_lesion  # noqa: E402

SHAPES = [(128, 96), (144, 96), (96, 128), (120, 90), (150, 100)]   # (width, height)
STAGES = ("Training", "Validation", "Test")


def write_stage(root, stage, count, first, scale, seed):
    image_dir = os.path.join(root, f"ISIC2018_Task1-2_{stage}_Input")
    mask_dir = os.path.join(root, f"ISIC2018_Task1_{stage}_GroundTruth")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(mask_dir, exist_ok=True)
    for k in range(first, first + count):
        w, h = SHAPES[k % len(SHAPES)]
        image, mask = render_lesion(seed, k, (round(h * scale), round(w * scale)))
        Image.fromarray((image * 255).round().astype(np.uint8)).save(os.path.join(image_dir, f"ISIC_{k:07d}.jpg"),
                                                                     quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(mask_dir, f"ISIC_{k:07d}_segmentation.png"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the folder to write (eval.py / train.py --data-dir)")
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--val", type=int, default=50)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every side (8: about 1000 px)")
    p.add_argument("--seed", type=int, default=24, help="of the scenes (the built-in splits use 0)")
    a = p.parse_args()
    if min(a.train, a.val, a.test) < 1 or a.scale <= 0:
        p.error("--train, --val and --test must be at least 1, --scale positive")
    first = 0
    for stage, count in zip(STAGES, (a.train, a.val, a.test)):
        write_stage(a.out, stage, count, first, a.scale, a.seed)
        first += count
    print(f"wrote {a.train} / {a.val} / {a.test} images to {a.out}")


if __name__ == "__main__":
    main()
