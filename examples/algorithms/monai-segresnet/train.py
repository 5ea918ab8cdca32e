"""Train the SegResNet of predict.py on generated phantoms (evaluation.phantoms), on the CPU.

    .venv/bin/python examples/algorithms/monai-segresnet/train.py            # writes segresnet.pt

Fixed seeds throughout (phantoms, weights, crops): the same command gives the same checkpoint up
to floating-point non-determinism of the CPU kernels. Training phantoms come from seeds
TRAIN_SEEDS (each seed its own hospitals), never the seeds the tests score on (tests use seeds
below 100). ``--eval-cases N`` scores N held-out cases of seed ``--eval-seed`` on their own grid
(the container's code path) and prints DSC per organ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[2]))  # the repository root: evaluation.phantoms

from monai.data import CacheDataset, DataLoader  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)
from monai.utils import set_determinism  # noqa: E402

import predict  # noqa: E402
from evaluation.labels import ORGANS  # noqa: E402
from evaluation.phantoms import generate_cases, write_case  # noqa: E402

TRAIN_SEEDS = range(1000, 1030)  # 30 seeds × 4 hospitals: 120 acquisition habits


def write_training_set(folder: Path, n_cases: int) -> list[dict[str, str]]:
    per_seed = max(1, -(-n_cases // len(TRAIN_SEEDS)))
    items: list[dict[str, str]] = []
    for seed in TRAIN_SEEDS:
        for case in generate_cases(per_seed, n_hospitals=4, size="tiny", seed=seed):
            case_dir = write_case(case, folder / f"s{seed}", combined=True)
            items.append({"image": str(case_dir / "ct.nii.gz"), "label": str(case_dir / "combined_labels.nii.gz")})
            if len(items) == n_cases:
                return items
    return items


def dice_per_organ(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for k, organ in enumerate(ORGANS, start=1):
        p, t = pred == k, truth == k
        denom = p.sum() + t.sum()
        out[organ] = 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)
    return out


def evaluate(model: torch.nn.Module, n_cases: int, seed: int, folder: Path) -> dict[str, float]:
    model.eval()
    transforms = predict.preprocess()
    scores: dict[str, list[float]] = {organ: [] for organ in ORGANS}
    for case in generate_cases(n_cases, n_hospitals=3, size="tiny", seed=seed):
        case_dir = write_case(case, folder / "eval", combined=True)
        labels = predict.predict_case(model, case_dir / "ct.nii.gz", torch.device("cpu"), transforms)
        for organ, value in dice_per_organ(labels, case.labels).items():
            scores[organ].append(value)
    means = {organ: float(np.mean(v)) for organ, v in scores.items()}
    print("DSC " + " ".join(f"{o}={v:.3f}" for o, v in means.items()) + f" mean={np.mean(list(means.values())):.3f}",
          flush=True)
    return means


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=240, help="training phantoms (tiny)")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-cases", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=500)
    parser.add_argument("--out", type=Path, default=predict.CHECKPOINT)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        items = write_training_set(Path(tmp), args.cases)
        augment = Compose([
            SpatialPadd(keys=["image", "label"], spatial_size=predict.ROI),
            RandSpatialCropd(keys=["image", "label"], roi_size=predict.ROI, random_size=False),
            RandScaleIntensityd(keys=["image"], factors=0.1, prob=0.5),
            RandShiftIntensityd(keys=["image"], offsets=0.05, prob=0.5),
        ])
        # CacheDataset caches everything before the first random transform (load, resample, pad)
        transforms = Compose([*predict.preprocess(("image", "label")).transforms, *augment.transforms])
        dataset = CacheDataset(items, transforms, num_workers=0, progress=False)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0,
                            generator=torch.Generator().manual_seed(args.seed))
        print(f"{len(items)} training phantoms cached in {time.monotonic() - start:.1f} s", flush=True)

        # class weights ~ frequency^-1/2 (normalised to mean 1), so that gall bladder, pancreas and the
        # vessels (about 1 % of the liver's voxels) are learned within a few hundred steps
        counts = np.bincount(np.concatenate([np.asarray(d["label"]).ravel().astype(np.int64)
                                             for d in dataset._cache]), minlength=predict.N_CLASSES)
        weights = 1.0 / np.sqrt(np.maximum(counts, 1) / counts.sum())
        weights = torch.tensor(weights / weights.mean(), dtype=torch.float32)
        print("class weights " + " ".join(f"{w:.2f}" for w in weights.tolist()), flush=True)
        # channels-last 3-D tensors: oneDNN's fast convolution path on the CPU (about 1.8x here)
        model = predict.build_model().to(memory_format=torch.channels_last_3d)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weights)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.iterations,
                                                        pct_start=0.1)
        model.train()
        step, t0 = 0, time.monotonic()
        while step < args.iterations:
            for batch in loader:
                x = batch["image"].as_tensor().contiguous(memory_format=torch.channels_last_3d)
                y = batch["label"].as_tensor()
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if step % 50 == 0 or step == args.iterations:
                    print(f"step {step}/{args.iterations} loss {loss.item():.4f} "
                          f"({time.monotonic() - t0:.0f} s)", flush=True)
                if step == args.iterations:
                    break
        train_s = time.monotonic() - t0
        state = {k: v.contiguous().half() for k, v in model.state_dict().items()}  # fp16 on disk: half the size
        torch.save({"model": state, "spacing": predict.SPACING, "roi": predict.ROI, "iterations": args.iterations,
                    "cases": len(items), "seed": args.seed}, args.out)
        print(f"trained {args.iterations} steps in {train_s:.0f} s; wrote {args.out} "
              f"({args.out.stat().st_size / 2**20:.1f} MiB)", flush=True)
        if args.eval_cases:
            evaluate(predict.load_model(torch.device("cpu"), args.out), args.eval_cases, args.eval_seed, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
