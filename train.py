"""Train RAT (or a baseline) for segmentation or detection.

    python train.py --task seg                                  # one CPU, built-in data
    torchrun --nproc_per_node=8 train.py --task seg --data isic --data-dir ISIC2018
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...

DDP is set up from torchrun's environment variables; without them this is a
single process. --batch-size is global (split across processes). A run folder
holds args.json, metrics.jsonl, ckpt_last.pt and ckpt_best.pt; running the same
command on an existing run folder resumes from ckpt_last.pt.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import (COCO_VAL_SIZE, DetDataset, SegDataset, atomic_open, boxes_to_original, check_size, det_collate,
                  parse_scales, read_original_masks, seg_collate)
from metrics import SEG_METRICS, coco_ap, score_logits
from model import ARCH, LEGACY_ARCH, autocast, build_model, load_checkpoint, num_params, set_detector_size
from rose import PE_CHOICES
from sga import SGA_CHOICES

# Training flags: resuming with other values would repeat or skip samples (the mid-epoch
# position is counted in steps of the saved batch and data) or bend the LR schedule.
TRAINING = ("data", "batch_size", "epochs", "lr", "weight_decay", "warmup", "clip", "train_size", "train_sizes",
            "val_size", "coco_val_size", "seed")
# The numeric flags' accepted values, checked before any work starts (None: the task's default).
RANGES = [
    (("image_size", "epochs", "patch", "depth", "dim", "heads", "sga_iters", "batch_size", "train_size",
      "val_size", "coco_val_size", "sync_every"), lambda v: v >= 1, "a positive integer"),
    (("workers", "ckpt_every"), lambda v: v >= 0, "an integer >= 0"),
    (("seed",), lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)"),
    (("lr", "dist_timeout"), lambda v: 0 < v < math.inf, "a finite number > 0"),
    (("weight_decay", "clip"), lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    (("warmup",), lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    (("dropout",), lambda v: 0 <= v < 1, "in [0, 1)"),
]


def get_args_parser():
    p = argparse.ArgumentParser(description="Train RAT for segmentation or detection", add_help=True)
    p.add_argument("--task", default="seg", choices=["seg", "det"])
    p.add_argument("--data", default="synthetic", choices=["synthetic", "twins", "isic", "coco"],
                   help="built-in synthetic (lesions for seg, shapes for det), twins (seg: each lesion with a "
                        "smaller look-alike that is not in the mask), or a real dataset under --data-dir")
    p.add_argument("--data-dir", default=None, help="dataset root (ISIC 2018 or COCO 2017 layout)")
    p.add_argument("--out", default=None, help="run folder (default runs/<task>)")
    p.add_argument("--model", default="rat", choices=["rat", "unet", "cnn", "resnet"],
                   help="rat, or a baseline: unet (seg); cnn (det, about RAT's parameter count) or resnet "
                        "(det, ResNet-18: many more parameters)")
    p.add_argument("--image-size", type=int, default=None,
                   help="training and validation resolution (default 64 seg, 128 det)")
    p.add_argument("--train-sizes", default=None,
                   help="multi-resolution training: comma-separated image sizes, one drawn per step (the same on "
                        "every rank), e.g. 32,48,64,96,128; validation stays at --image-size")
    p.add_argument("--scales", default=None,
                   help="image pyramid as relative factors, finest first (default 1 for seg, 1,0.5 for det)")
    p.add_argument("--pe", default="rose", choices=PE_CHOICES)
    p.add_argument("--sga", default="local", choices=SGA_CHOICES)
    p.add_argument("--sga-iters", type=int, default=None,
                   help="rounds of grouping in every SGA (default 1 for seg, 3 for det)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=4, help="stem stride: pixels per token")
    p.add_argument("--strides", default=None,
                   help="SGA stride per block, e.g. 2,2,2,1 (default 2,2,2,1,1.. for seg, 2,2,1,1.. for det)")
    p.add_argument("--head", default="conv", choices=["conv", "refine", "linear"],
                   help="seg RAT's head to full resolution: conv (default), a U-Net's last two decoder stages on "
                        "the conv stem's maps; refine and linear, the heads of checkpoints from before the conv stem "
                        "(each token predicts its pixels, then two 3x3 convs or one correct them)")
    p.add_argument("--stem", default=None, choices=["patch", "conv", "full"],
                   help="RAT: conv (default for seg), 3x3 convs at full and half resolution before the patch "
                        "projection (ConvStem, in model.py); full (default for det), two 3x3 convs with GroupNorm "
                        "at full resolution (FullResStem); patch, the patch projection alone")
    p.add_argument("--token-grid", default="physical", choices=["physical", "pixel"],
                   help="RAT: physical (default) zooms the stem kernel and the first grouping stride with the "
                        "input's resolution relative to --image-size, so deep tokens keep their physical spacing at "
                        "any test resolution (det: FCOS's anchors zoom with them); pixel keeps them fixed in pixels")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split across processes")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps with linear warmup")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--train-size", type=int, default=None, help="use only this many training samples")
    p.add_argument("--val-size", type=int, default=None, help="use only this many validation samples")
    p.add_argument("--coco-val-size", type=int, default=COCO_VAL_SIZE,
                   help="COCO: train2017 images held out (fixed, seeded) for validation; val2017 is the test split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loader processes per rank")
    p.add_argument("--ckpt-every", type=int, default=0, help="also save ckpt_last.pt every N steps (0: per epoch)")
    p.add_argument("--sync-every", type=int, default=10,
                   help="steps between the checks for a non-finite loss and for SIGTERM (one collective, which "
                        "waits for the GPU): a SIGTERM is saved within this many steps")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend inductor by default): faster GPU steps after minutes "
                        "of compiling; aot_eager traces without generating code")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the convolutions")
    p.add_argument("--dist-backend", default=None,
                   help="torch.distributed backend (default nccl on CUDA, gloo on CPU); cuda:gloo registers gloo "
                        "for CUDA tensors only, as NCCL, so that 2 ranks can share one GPU")
    p.add_argument("--dist-timeout", type=float, default=60,
                   help="minutes a rank may wait in a collective before the job fails; the other ranks of a node "
                        "wait in one while its first process caches ISIC or parses COCO (NCCL's default: 10)")
    p.add_argument("--cache-dir", default=None,
                   help="where ISIC's decoded, resized copies go (default <data-dir>/.cache; use this when the "
                        "dataset folder is read-only)")
    return p


def fill_defaults(args):
    """Task-dependent defaults: small enough that the built-in data trains in minutes on a CPU."""
    seg = args.task == "seg"
    for flags, accepts, accepted in RANGES:  # 0 is a mistake, not a request for the default
        for flag in flags:
            value = getattr(args, flag)
            if value is not None and not accepts(value):
                raise ValueError(f"--{flag.replace('_', '-')} must be {accepted}, got {value}")
    args.image_size = args.image_size or (64 if seg else 128)
    if args.scales is None:
        args.scales = "1" if seg else "1,0.5"
    args.stem = args.stem or ("conv" if seg else "full")
    args.sga_iters = args.sga_iters or (1 if seg else 3)
    if args.strides is None:  # seg: tokens at 4, 8, 16, 32 px; det: keep stride-8 features for small objects
        args.strides = (([2, 2, 2] if seg else [2, 2]) + [1] * args.depth)[:args.depth]
    if args.stem == "conv" and args.patch % 2:
        raise ValueError(f"--patch {args.patch}: the conv stem halves the resolution first, so --patch must be even")
    if seg and args.model == "rat" and args.head == "conv" and args.stem != "conv":
        raise ValueError("--head conv decodes onto the conv stem's maps: it needs --stem conv (or --head refine)")
    args.epochs = args.epochs or (8 if seg else 12)
    args.out = args.out or os.path.join("runs", args.task)
    if args.model in (("cnn", "resnet") if seg else ("unet",)):
        raise ValueError(f"--model {args.model} is not a baseline for --task {args.task}")
    if args.data in (("coco",) if seg else ("isic", "twins")):
        raise ValueError(f"--data {args.data} is not a {args.task} dataset")
    if not seg and args.dim % 32:
        raise ValueError(f"--dim {args.dim}: torchvision's FCOS head uses GroupNorm(32), so --dim must be a multiple of 32")
    if args.dim % args.heads:
        raise ValueError(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    if args.compile and args.compile not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"--compile {args.compile}: unknown backend (known: "
                         f"{', '.join(torch.compiler.list_backends(exclude_tags=()))})")
    args.scales = parse_scales(args.scales) if isinstance(args.scales, str) else args.scales
    if isinstance(args.train_sizes, str):
        args.train_sizes = parse_train_sizes(args.train_sizes, args)
    if isinstance(args.strides, str):
        try:
            args.strides = [int(s) for s in args.strides.split(",")]
        except ValueError:
            raise ValueError(f"--strides: expected comma-separated integers like 4,2,2,1, got {args.strides!r}")
        if len(args.strides) != args.depth or min(args.strides) < 1:
            raise ValueError(f"--strides: need {args.depth} positive integers (one per block), got {args.strides}")
    return args


def parse_train_sizes(text, args):
    try:
        sizes = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise ValueError(f"--train-sizes: expected comma-separated integers like 32,48,64,96,128, got {text!r}") from None
    for size in sizes:
        if size < 1:
            raise ValueError(f"--train-sizes: every size must be a positive integer, got {size}")
        check_size(size, args.scales, args.patch if args.model == "rat" else 1, "--train-sizes")
    return sizes


def step_size(args, step):
    """The image size of a step under --train-sizes: a function of the seed and the step
    alone, so that every rank, and a resumed run, draws the same."""
    return args.train_sizes[np.random.default_rng([args.seed, step, 11]).integers(len(args.train_sizes))]


def build_datasets(args):
    common = dict(source=args.data, image_size=args.image_size, data_dir=args.data_dir, seed=args.seed)
    if args.task == "seg":
        # ISIC's training copies are decoded at the largest size a step draws: larger --train-sizes
        # than --image-size then carry real detail, not an upsampled cache
        train = SegDataset(split="train", scales=args.scales, augment=True, length=args.train_size,
                           cache_dir=args.cache_dir, cache_size=max(args.train_sizes or [args.image_size]), **common)
        # ISIC is validated as the challenge scores: on each image's original mask, which evaluate()
        # reads itself (the loader carries indices: masks of up to 24 MB would overflow the
        # workers' shared memory)
        val = SegDataset(split="val", scales=args.scales, length=args.val_size, with_masks=args.data != "isic",
                         cache_dir=args.cache_dir, **common)
    else:
        common["coco_val_size"] = args.coco_val_size  # COCO: val is a fixed hold-out of train2017
        train = DetDataset(split="train", augment=True, length=args.train_size, **common)
        val = DetDataset(split="val", length=args.val_size, **common)
    return train, val


# ---------------------------------------------------------------------------------------
# losses and evaluation
# ---------------------------------------------------------------------------------------

def seg_loss(model, batch, device):
    """BCE + soft Dice, each computed per sample, then averaged over the batch."""
    levels, mask = batch
    logits = model([x.to(device, non_blocking=True) for x in levels])
    mask = mask.to(device, non_blocking=True)
    bce = F.binary_cross_entropy_with_logits(logits.float(), mask, reduction="none").flatten(1).mean(1)
    prob = logits.float().sigmoid().flatten(1)
    inter, total = (prob * mask.flatten(1)).sum(1), prob.sum(1) + mask.flatten(1).sum(1)
    dice = (2 * inter + 1) / (total + 1)
    return (bce + 1 - dice).mean()


def det_loss(model, batch, device):
    images, targets = batch
    # Crowd boxes are kept by the loader for evaluation only.
    targets = [{"boxes": t["boxes"][t["iscrowd"] == 0].to(device), "labels": t["labels"][t["iscrowd"] == 0].to(device)}
               for t in targets]
    return sum(model([im.to(device, non_blocking=True) for im in images], targets).values())


@torch.no_grad()
def evaluate(model, loader, args, device):
    """Metrics over the whole validation set, each sample counted once across ranks
    (the loader holds this rank's disjoint shard, without padding): a dict of the
    metrics and val_images, the number of images they cover."""
    model.eval()
    if args.task == "seg":
        total = torch.zeros(len(SEG_METRICS) + 1, dtype=torch.float64, device=device)
        dataset = getattr(loader.dataset, "dataset", loader.dataset)     # through this rank's Subset
        for levels, masks in loader:
            if not dataset.with_masks:        # the loader carries indices (build_datasets says why)
                masks = read_original_masks(dataset, masks.tolist())
            with autocast(device):
                logits = model([x.to(device) for x in levels])
            scores, _ = score_logits(logits, masks)  # [B, 5], at the truth's size (ISIC: the original)
            total += torch.cat([scores.sum(0), scores.new_tensor([len(scores)])])
        total = all_sum(total, device)
        model.train()
        return {**dict(zip(SEG_METRICS, (total[:-1] / total[-1]).tolist())), "val_images": int(total[-1])}
    gts, dets = [], []
    for images, targets in loader:
        out = model([im.to(device) for im in images])  # no autocast: boxes and NMS in float32
        # scored as COCOeval scores: boxes back in original pixels, against the annotations as they are
        for o, im, t in zip(out, images, targets):
            boxes = boxes_to_original(o["boxes"].float().cpu(), im.shape[-2:], t["orig_size"])
            dets.append({"boxes": boxes, "scores": o["scores"].float().cpu(), "labels": o["labels"].cpu()})
            gts.append(t["eval_gt"])
    parts = gather_objects((gts, dets))
    gts, dets = [g for p in parts for g in p[0]], [d for p in parts for d in p[1]]
    model.train()
    return {**coco_ap(gts, dets, num_classes=args.num_classes), "val_images": len(gts)}


def read_metrics(path):
    """metrics.jsonl's records: none before the first validation."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def lr_lambda(total_steps, warmup):
    warm = max(1, int(warmup * total_steps))
    return lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total_steps - warm)))


# ---------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------

def setup_distributed(backend=None, timeout=None):
    """(rank, world size, local rank, device) from torchrun's environment, or a single process.
    timeout: how long a collective may wait (a timedelta; None: the backend's default)."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if cuda else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        gpus = torch.cuda.device_count()
        # NCCL cannot put two ranks on one GPU; gloo can (cuda:gloo tests the multi-GPU path on one GPU).
        if local_world > gpus and "nccl" in backend:
            raise ValueError(f"{local_world} processes on this node but {gpus} GPU(s) visible: use "
                             f"--nproc_per_node={gpus} (or --dist-backend cuda:gloo to share GPUs)")
        device = torch.device(f"cuda:{local % gpus}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # torchrun gives each process 1 thread; share the cores out instead, never more threads than cores.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world))
    store, _, _ = next(dist.rendezvous("env://"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's own store outlives a --max-restarts restart; without a prefix per attempt, a
        # restarted group reads the dead group's addresses (pytorch#135712). The restart count is
        # kept per node (a node whose worker did not fail restarts it without counting,
        # pytorch#108158), so several nodes must not share that store across restarts.
        if world > local_world and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            raise ValueError("several nodes with --max-restarts: run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                             "on every node, or a restarted job hangs (restart counts differ between nodes)")
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world, local, device


def all_sum(x, device):
    """Sum of tensor x over ranks, as float64 on the training device. Every collective of this
    script goes through here: NCCL serves CUDA tensors only."""
    x = torch.as_tensor(x).to(device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]. torch pickles them into tensors on the device
    that the process group serves (the current GPU for NCCL and cuda:gloo)."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_rows(row, rank, world, device):
    """[n] from every rank -> [world, n] on every rank (an all_sum of one filled row each)."""
    rows = torch.zeros(world, len(row), dtype=torch.float64)
    rows[rank] = torch.as_tensor(row, dtype=torch.float64)
    return all_sum(rows, device).cpu()


def rng_state(device):
    """This rank's CPU (and CUDA) generator states as one uint8 vector."""
    state = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    return torch.cat(state)


def set_rng_state(state, device):
    cpu = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu].clone())
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu:].clone(), device)


class Preemption:
    """SIGTERM (torchrun, a scheduler). Inside the training loop: save at the next check
    (--sync-every), then exit, every rank at the same step. Anywhere else (caching data,
    validation, whose epoch was saved before it started) there is nothing unsaved: exit at once,
    inside torchrun's grace period."""

    def __init__(self):
        self.asked, self.in_training = False, False
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, *_):
        if not self.in_training:
            raise SystemExit(143)
        self.asked = True


def ignore_sigterm(worker_id):
    """DataLoader workers: torchrun and scancel signal the whole process group, and a worker
    killed by it would fail the step before the main process could save. Its parent ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------
# checkpoints and resuming
# ---------------------------------------------------------------------------------------

def build_optimizer(model, args, total_steps):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "freqs" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "freqs" in n]
    # fused: one kernel over every parameter, not a loop over them: RAT has many small ones,
    # and on a CPU the loop was a visible share of a small step (RESULTS.md, "Exact speed-ups")
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, args.warmup))


def save(path, raw_model, optimizer, scheduler, progress, args, device):
    """Called on every rank (the RNG states are gathered); rank 0 writes."""
    # A finite loss can still come with an update that overflows: never save such weights.
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
        raise FloatingPointError(f"non-finite weights after step {progress['step']}; the last good checkpoint "
                                 f"is kept: {os.path.join(args.out, 'ckpt_last.pt')}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rng = gather_rows(rng_state(device).double(), rank, world, device).to(torch.uint8)  # [world, n]
    if rank == 0:
        with atomic_open(path) as f:
            torch.save({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), **progress, "rng": rng, "args": vars(args)}, f)


def resume(raw_model, optimizer, scheduler, args, steps_per_epoch, rank, world, device):
    """-> progress {step, validated, best}: from ckpt_last.pt, or a fresh start. step: optimizer
    steps taken; validated: epochs whose validation has run (a checkpoint written on an epoch's
    last step, before its validation, resumes with that validation)."""
    progress = {"step": 0, "validated": 0, "best": -math.inf}
    path = os.path.join(args.out, "ckpt_last.pt")
    ckpt = load_checkpoint(path) if os.path.exists(path) else None
    # Every rank must resume from the same step, or the collectives go out of step and hang.
    found = gather_rows([ckpt["step"] if ckpt else -1], rank, world, device)[:, 0]
    if found.min() != found.max():
        raise ValueError(f"{path}: ranks see different run folders (steps {found.int().tolist()}, -1: none); "
                         "the run folder (--out) must be visible to every node, e.g. on a shared filesystem")
    if ckpt:
        check_same_run(path, ckpt["args"], args)
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        progress = {"step": ckpt["step"], "validated": ckpt.get("validated", ckpt["step"] // steps_per_epoch),
                    "best": ckpt["best"]}
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], device)
        else:  # another number of processes: new streams, still different per rank and per resume
            torch.manual_seed(args.seed + 1000 * (rank + 1) + progress["step"])
        if rank == 0:
            print(f"resuming {path} at step {progress['step']}/{steps_per_epoch * args.epochs}")
    if rank == 0:
        repair_metrics_log(progress, args, steps_per_epoch)
    # rank 0 decided: every rank needs `validated` and `best` for the same collectives
    validated, best = gather_rows([progress["validated"], progress["best"]], rank, world, device)[0].tolist()
    return {**progress, "validated": int(validated), "best": best}


def check_same_run(path, saved, args):
    """A resume must be the run that was started: another model cannot load the weights, and other
    training flags would repeat or skip samples mid-epoch, or bend the LR schedule."""
    saved_arch = {**LEGACY_ARCH, **saved}
    keys = ARCH if args.task == "seg" else [k for k in ARCH if k != "head"]  # det ignores the seg head
    changed = {k: (saved_arch.get(k), vars(args).get(k)) for k in keys if saved_arch.get(k) != vars(args).get(k)}
    if changed:
        raise ValueError(f"{path}: run folder holds a different model {changed}; use a new --out")
    retrained = [f"--{k.replace('_', '-')} {vars(args)[k]} (saved: {saved[k]})" for k in TRAINING
                 if k in saved and saved[k] != vars(args)[k]]
    if retrained:
        raise ValueError(f"{path}: the run was started with other training flags: {', '.join(retrained)}; "
                         "resume with the saved values or use a new --out (a longer --epochs too: the cosine "
                         "schedule is laid out for the saved one)")


def repair_metrics_log(progress, args, steps_per_epoch):
    """One metrics.jsonl line per validated epoch. A line past `validated` comes from a validation
    that ckpt_last (written last) does not record, and that this run repeats: drop it. Run folders
    of the earlier write order (ckpt_last first) could lose the epoch's ckpt_best and line in a
    crash between the writes; the weights are still that epoch's: validate them again."""
    path = os.path.join(args.out, "metrics.jsonl")
    logged = read_metrics(path)
    records = [r for r in logged if r["epoch"] <= progress["validated"]]
    validated, key = progress["validated"], "dice" if args.task == "seg" else "AP"
    lost = [r["epoch"] for r in records] == list(range(1, validated)) and progress["step"] == validated * steps_per_epoch
    if validated and lost:
        progress.update(validated=validated - 1, best=max([r[key] for r in records], default=-math.inf))
    if len(records) < len(logged):
        with atomic_open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------

def train_one_epoch(model, raw_model, loader, optimizer, scheduler, progress, epoch, args, device, preemption):
    """One pass over `loader` (the rest of the epoch when resuming). -> mean training loss, or None
    when no step was left. SIGTERM: saves ckpt_last.pt at the next check and exits 143."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    loss_fn = seg_loss if args.task == "seg" else det_loss
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master, leave=False)
    seen, checked = 0, progress["step"]  # checked: the losses up to this step were finite
    # [loss sum, non-finite losses] on the device: reading them at every step would make the CPU
    # wait for the GPU, step after step
    stats = torch.zeros(2, dtype=torch.float64, device=device)
    preemption.in_training = True
    for batch in bar:
        if args.task == "det" and args.train_sizes:
            set_detector_size(raw_model, batch[0][0].shape[-1])
        with autocast(device) if args.task == "seg" else nullcontext():  # det: its backbone autocasts
            loss = loss_fn(model, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        progress["step"], seen = progress["step"] + 1, seen + 1
        stats += torch.stack([loss.detach().double(), loss.detach().isfinite().logical_not().double()])
        step = progress["step"]
        ckpt_due = args.ckpt_every and step % args.ckpt_every == 0
        if not (ckpt_due or step % args.sync_every == 0 or seen == len(loader)):
            continue
        # One collective for both checks, on every rank at the same steps. Weights updated by a
        # non-finite loss are never saved: the check comes first (and save() checks the weights).
        non_finite, stop = all_sum(torch.cat([stats[1:], stats.new_tensor([preemption.asked])]), device).tolist()
        if non_finite:
            raise FloatingPointError(f"non-finite loss in steps {checked + 1}-{step} (epoch {epoch + 1}); the last "
                                     f"good checkpoint is kept: {os.path.join(args.out, 'ckpt_last.pt')}")
        checked = step
        if master:
            bar.set_postfix(loss=f"{stats[0].item() / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if stop or ckpt_due:
            last = os.path.join(args.out, "ckpt_last.pt")
            save(last, raw_model, optimizer, scheduler, progress, args, device)
            if stop:
                if master:
                    print(f"SIGTERM: saved {last} at step {step}; rerun the same command to resume")
                cleanup()
                sys.exit(143)
    preemption.in_training = False
    return stats[0].item() / seen if seen else None


def epoch_loader(train_set, sampler, epoch, progress, steps_per_epoch, local_batch, loader_args, args):
    """This epoch's batches. Resuming mid-epoch: the same order as before, minus the batches
    already done (none left when the checkpoint was written at the epoch's end, before validation)."""
    sampler.set_epoch(epoch)
    train_set.set_epoch(epoch)
    step = progress["step"]
    order = list(sampler)[(step - epoch * steps_per_epoch) * local_batch: steps_per_epoch * local_batch]
    if args.train_sizes:  # dataset keys (index, size): the k-th sample belongs to step `step + k // local_batch`
        order = [(i, step_size(args, step + k // local_batch)) for k, i in enumerate(order)]
    return DataLoader(train_set, sampler=order, drop_last=True, **loader_args)


def main(args):
    rank, world, local_rank, device = setup_distributed(args.dist_backend, timedelta(minutes=args.dist_timeout))
    master = rank == 0
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    os.makedirs(args.out, exist_ok=True)
    preemption = Preemption()
    # One process per node decodes and caches the dataset while the others wait, then read the cache.
    if local_rank != 0:
        all_sum(0, device)
    train_set, val_set = build_datasets(args)
    if local_rank == 0:
        all_sum(0, device)
    args.num_classes = getattr(train_set, "num_classes", 1)
    args.class_names = list(getattr(train_set, "class_names", []))   # predict.py names its detections
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw_model = build_model(vars(args)).to(device)
    if args.task == "det" and device.type == "cuda":
        raw_model.backbone.amp_dtype = torch.bfloat16  # boxes, losses and NMS stay in float32
    if args.channels_last:  # before the optimizer and the checkpoint see the parameters
        raw_model = raw_model.to(memory_format=torch.channels_last)  # conv weights; their outputs follow
    local_batch = args.batch_size // world
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} samples)")
    optimizer, scheduler = build_optimizer(raw_model, args, steps_per_epoch * args.epochs)
    torch.manual_seed(args.seed + 1000 * (rank + 1))  # each rank its own stream (dropout masks differ)
    progress = resume(raw_model, optimizer, scheduler, args, steps_per_epoch, rank, world, device)
    if master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        print(f"{args.model} {args.task}: {num_params(raw_model) / 1e6:.2f}M parameters, {world} process(es) on "
              f"{device} ({torch.get_num_threads()} threads each), {len(train_set)} train / {len(val_set)} val "
              f"samples, {steps_per_epoch * args.epochs} steps")
    model = DDP(raw_model) if world > 1 else raw_model
    if args.compile:  # after DDP, so that the compiled graph splits at DDP's gradient buckets
        model = torch.compile(model, backend=args.compile)
    # Loaders get a generator of their own: drawing their seed from the global one would shift
    # the dropout stream by one draw per loader, so a resumed run would not repeat the original.
    loader_args = dict(batch_size=local_batch, num_workers=args.workers, worker_init_fn=ignore_sigterm,
                       collate_fn=seg_collate if args.task == "seg" else det_collate,
                       pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    val_loader = DataLoader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)), **loader_args)
    checkpoint = lambda name: save(os.path.join(args.out, name), raw_model, optimizer, scheduler, progress, args, device)
    for epoch in range(progress["validated"], args.epochs):
        t0 = time.time()
        loader = epoch_loader(train_set, sampler, epoch, progress, steps_per_epoch, local_batch, loader_args, args)
        train_loss = train_one_epoch(model, raw_model, loader, optimizer, scheduler, progress, epoch, args, device,
                                     preemption)
        if args.task == "det":
            set_detector_size(raw_model, args.image_size)
        checkpoint("ckpt_last.pt")  # the epoch's training is safe before validation starts
        # The plain module, not DDP: a rank with no validation batch must not miss a
        # collective that DDP's forward would start on the others.
        metrics = evaluate(raw_model, val_loader, args, device)
        key = "dice" if args.task == "seg" else "AP"
        is_best = metrics[key] > progress["best"]
        progress.update(best=max(progress["best"], metrics[key]), validated=epoch + 1)
        # ckpt_last last: until it says `validated`, a rerun repeats this validation, which rewrites
        # ckpt_best and the epoch's line (a line already written is dropped by repair_metrics_log).
        if is_best:
            checkpoint("ckpt_best.pt")
        if master:
            record = {"epoch": epoch + 1, "step": progress["step"], "train_loss": train_loss,
                      "lr": scheduler.get_last_lr()[0], "epoch_time_s": time.time() - t0, **metrics}
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        checkpoint("ckpt_last.pt")
    cleanup()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(fill_defaults(args))
    except (ValueError, FloatingPointError) as e:
        cleanup()
        sys.exit(f"error: {e}")
