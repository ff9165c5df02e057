#!/usr/bin/env python
"""Throughput benchmark: raw backbone vs our pipeline vs a reference-style naive loop.

In ONE run, on N synthetic JPEGs at a fixed size with a random-init model (speed does
not depend on the weights), prints a table of images/s:

1. raw backbone: ``model.forward_features`` in a tight loop on pre-made tensors;
2. pipeline: ``Discoverer.run`` from files on disk to a JSONL output file;
3. naive: the reference LOST main loop's way -- one image at a time, PIL + tensor
   transforms, a forward hook registered per image, full forward, features moved to
   CPU numpy, LOST on the CPU;
4. the discovery step alone (``lost()`` per image) as a percentage of the forward.

Options add the bf16 pipeline, the box agreement of bf16 with fp32 on real photos
(``--agreement``, offline DINOv2 weights), and the RSS growth of a long run
(``--rss 100 1000``).

    python scripts/bench.py --images 16 --size 518
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from discover.backbone import Backbone, cpu_supports_bf16
from discover.methods.lost import lost
from discover.pipeline import Discoverer
from discover.runs import Events, box_images


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """Synthetic photos: a smooth background with a few blobs, saved as JPEG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        img = np.stack([xx * rng.uniform(50, 200), yy * rng.uniform(50, 200), 0 * xx + 90], -1)
        for _ in range(3):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.2)
            disk = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            img[disk] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 8, img.shape)
        p = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def bench_raw(bb: Backbone, n: int, size: int, batch: int) -> float:
    model = bb.model
    x = torch.randn(batch, 3, size, size, device=bb.device)
    x = x.to(next(model.parameters()).dtype)  # bf16 weights take bf16 input
    with torch.inference_mode(), bb._autocast():
        model.forward_features(x)  # warm-up
        t0 = time.perf_counter()
        done = 0
        while done < n:
            model.forward_features(x)
            done += batch
        _sync(bb.device)
    return done / (time.perf_counter() - t0)


def bench_pipeline(disc: Discoverer, paths: list[Path], out: Path) -> float:
    """What ``discover boxes`` runs (discover.runs.box_images): files to a JSONL output."""
    list(disc.run(paths[:1]))  # warm-up
    t0 = time.perf_counter()
    box_images(paths, out=out, discoverer=disc)
    _sync(disc.backbone.device)
    return len(paths) / (time.perf_counter() - t0)


def bench_naive(model: torch.nn.Module, paths: list[Path], patch: int, device) -> float:
    """The reference main loop's structure, image by image."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            img = Image.open(f).convert("RGB")
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
        x = (x - mean) / std
        c, h, w = x.shape
        padded = torch.zeros(c, -(-h // patch) * patch, -(-w // patch) * patch)
        padded[:, :h, :w] = x
        x = padded.to(device)
        feat_out = {}
        hook = model.blocks[-1].attn.qkv.register_forward_hook(
            lambda m, i, o, store=feat_out: store.__setitem__("qkv", o)
        )
        with torch.no_grad():
            model.forward_features(x[None])
        hook.remove()
        dim = model.embed_dim
        k = feat_out["qkv"][0, model.num_prefix_tokens :, dim : 2 * dim]
        feats = torch.from_numpy(k.cpu().numpy())  # the reference's CPU round trip
        lost(feats, (x.shape[1] // patch, x.shape[2] // patch))
    return len(paths) / (time.perf_counter() - t0)


def bench_lost(bb: Backbone, n: int, size: int) -> tuple[float, float]:
    """Seconds per image of lost() and of one forward at batch 1."""
    x = torch.randn(1, 3, size, size, device=bb.device)
    f = bb(x)
    feats, grid = f.patches[0], f.grid
    lost(feats, grid)
    t0 = time.perf_counter()
    for _ in range(n):
        lost(feats, grid)
    _sync(bb.device)
    t_lost = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(max(2, n // 4)):
        bb(x)
    _sync(bb.device)
    t_fwd = (time.perf_counter() - t0) / max(2, n // 4)
    return t_lost, t_fwd


def agreement(model: str, precision: str, device: str) -> dict:
    """Boxes of ``precision`` vs fp32 on real photos (samples/ and crops of them)."""
    from discover.boxes import pairwise_iou
    from discover.corloc import CorLocAccumulator
    from discover.datasets import load_dataset

    root = Path(__file__).resolve().parents[1] / "samples"
    photos = sorted(root.glob("*.jpg"))
    arrays = []
    for p in photos:  # the photos, their mirror images and four corner crops of each
        a = np.asarray(Image.open(p).convert("RGB"))
        h, w = a.shape[:2]
        arrays += [a, a[:, ::-1].copy()]
        arrays += [a[: h * 3 // 4, : w * 3 // 4].copy(), a[h // 4 :, w // 4 :].copy()]
        arrays += [a[: h * 3 // 4, w // 4 :].copy(), a[h // 4 :, : w * 3 // 4].copy()]
    ref = Discoverer(model, device=device)
    low = Discoverer(model, device=device, precision=precision)
    ious = []
    for a in arrays:
        b0, b1 = ref(a)[0].box, low(a)[0].box
        ious.append(float(pairwise_iou(torch.tensor([b0]), torch.tensor([b1]))[0, 0]))
    ds = load_dataset("voc07", root / "annotations")
    corloc = {}
    for name, disc in (("fp32", ref), (precision, low)):
        acc = CorLocAccumulator()
        for s, res in zip(ds, disc.run([s.path for s in ds]), strict=True):
            acc.add(s.image_id, np.asarray(res.boxes) if res.boxes else None, s.boxes)
        corloc[name] = round(100 * acc.corloc, 2)
    ious_np = np.asarray(ious)
    return {
        "images": len(ious),
        "agree_iou_0.9": round(float((ious_np >= 0.9).mean()) * 100, 1),
        "mean_iou": round(float(ious_np.mean()), 4),
        "corloc_samples": corloc,
    }


def rss_growth(model: str, n1: int, n2: int, size: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), 50, size, seed=1)
        seq = [paths[i % len(paths)] for i in range(n2)]
        disc = Discoverer(model, pretrained=False, batch_size=batch)
        marks = {}

        class Marks(Events):
            done = 0

            def advance(self, status: str) -> None:
                self.done += 1
                if self.done in (n1, n2):
                    marks[self.done] = current_rss_mb()

        # the same file many times over: names differ, so none is skipped as a repeat
        links = []
        for i, p in enumerate(seq):
            link = Path(tmp) / "seq" / f"{i:06d}{p.suffix}"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(p)
            links.append(link)
        box_images(links, out=Path(tmp) / "out.jsonl", discoverer=disc, events=Marks())
    return {
        f"rss_mb_at_{n1}": round(marks[n1], 1),
        f"rss_mb_at_{n2}": round(marks[n2], 1),
        "growth_mb": round(marks[n2] - marks[n1], 1),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="regdiscover throughput benchmark")
    ap.add_argument("--model", default="vit_small_patch14_reg4_dinov2")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved repeats (median).")
    ap.add_argument("--bf16", action="store_true", help="Also time the bf16/fp16 pipeline.")
    ap.add_argument("--agreement", action="store_true", help="bf16 vs fp32 boxes (real weights)")
    ap.add_argument("--rss", type=int, nargs=2, metavar=("N1", "N2"), default=None)
    ap.add_argument("--json", default=None, help="Also write the numbers here.")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    dev = torch.device(args.device)
    low = "fp16" if dev.type == "cuda" else "bf16"
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "cpu": _cpu_name(),
        "model": args.model,
        "size": args.size,
        "images": args.images,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images, args.size)
        disc = Discoverer(
            args.model,
            pretrained=False,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        bb = disc.backbone
        disc16 = None
        if args.bf16 and (dev.type == "cuda" or cpu_supports_bf16()):
            disc16 = Discoverer(
                args.model,
                backbone=Backbone(
                    args.model, model=copy.deepcopy(bb.model), device=args.device, precision=low
                ),
                batch_size=args.batch_size,
                num_workers=args.workers,
            )
        # Each measurement is repeated, the repeats interleaved, and the median reported:
        # a shared machine drifts, and interleaving spreads the drift over every row.
        runs: dict[str, list[float]] = {}
        lost_ratio: list[float] = []
        t_lost_all: list[float] = []
        out = Path(tmp)
        for _ in range(args.repeats):
            runs.setdefault("raw backbone (forward_features)", []).append(
                bench_raw(bb, args.images, args.size, args.batch_size)
            )
            runs.setdefault("pipeline (Discoverer.run, files -> jsonl)", []).append(
                bench_pipeline(disc, paths, out / "out.jsonl")
            )
            runs.setdefault("naive reference-style loop", []).append(
                bench_naive(bb.model, paths, bb.patch_size, dev)
            )
            if disc16 is not None:
                runs.setdefault(f"raw backbone {low}", []).append(
                    bench_raw(disc16.backbone, args.images, args.size, args.batch_size)
                )
                runs.setdefault(f"pipeline {low}", []).append(
                    bench_pipeline(disc16, paths, out / "out16.jsonl")
                )
            t_lost, t_fwd = bench_lost(bb, 20, args.size)
            t_lost_all.append(t_lost)
            lost_ratio.append(t_lost / t_fwd)
        rows = {k: float(np.median(v)) for k, v in runs.items()}
        t_lost = float(np.median(t_lost_all))
    raw = rows["raw backbone (forward_features)"]
    pipe = rows["pipeline (Discoverer.run, files -> jsonl)"]
    naive = rows["naive reference-style loop"]
    print(
        f"# {info['device']} ({info['cpu']}), torch {info['torch']}, {info['threads']} threads, "
        f"{args.model} random init, {args.images} images {args.size}x{args.size}, "
        f"batch {args.batch_size}, median of {args.repeats} interleaved repeats"
    )
    print("| what | images/s |")
    print("|---|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |")
    ratios = {
        "pipeline / raw": pipe / raw,
        "pipeline / naive": pipe / naive,
        "lost() % of forward": 100 * float(np.median(lost_ratio)),
    }
    if f"pipeline {low}" in rows:
        ratios[f"pipeline {low} / pipeline fp32"] = rows[f"pipeline {low}"] / pipe
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |")
    print(f"| lost() ms per image | {1000 * t_lost:.2f} |")
    print(f"| peak RSS MB | {peak_rss_mb():.0f} |")
    extra = {}
    if args.agreement:
        extra["agreement"] = agreement("vit_small_patch14_dinov2.imgfocus", low, args.device)
        print("agreement:", json.dumps(extra["agreement"]))
    if args.rss:
        extra["rss"] = rss_growth(args.model, *args.rss, size=224, batch=args.batch_size)
        print("rss:", json.dumps(extra["rss"]))
    if args.json:
        data = {"info": info, "images_per_s": rows, "ratios": ratios, **extra}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


if __name__ == "__main__":
    sys.exit(main())
