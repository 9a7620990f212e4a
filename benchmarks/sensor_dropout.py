"""What each sensor contributes to a trained student: score it on a split as recorded, with
every camera image black, and with no radar return, using the nuScenes metrics.

    python benchmarks/sensor_dropout.py --checkpoint RUN/checkpoints/last.safetensors \\
        --dataroot DRIVE [--split mini_val] [--out results.md]

A student that keeps most of its NDS without cameras is in effect a radar detector; one
that keeps little without radar leans on radar for everything. This is a test-time probe
(the network never saw a blanked sensor in training), not a retrained single-sensor model.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from imkd_deploy.atomic import atomic_write_text

BLANKS = {
    "as recorded": lambda f: f,
    "cameras black": lambda f: dataclasses.replace(f, images=np.zeros_like(f.images)),
    "no radar": lambda f: dataclasses.replace(f, radar_points=f.radar_points[:0]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a student checkpoint")
    p.add_argument("--dataroot", type=Path, required=True)
    p.add_argument("--version", default="v1.0-mini")
    p.add_argument("--split", default="mini_val")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.distill.checkpoint import load_checkpoint
    from imkd_deploy.distill.evaluate import predict_split
    from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission

    cfg = load_checkpoint(args.checkpoint).run_config.model
    drive = NuScenesDrive(args.dataroot, args.version, cfg, split=args.split, load_lidar=False)
    frames = [drive[i] for i in range(len(drive))]
    lines = [f"Sensor dropout at test time: `{args.checkpoint}` on {args.split} of {args.dataroot} "
             f"({len(frames)} samples).", "", "| inputs | NDS | mAP | mATE | mAVE |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, blank in BLANKS.items():
            res = predict_split(args.checkpoint, args.dataroot, args.version, args.split,
                                out=Path(tmp) / f"{name.replace(' ', '_')}.json", frames=[blank(f) for f in frames])
            m = evaluate_submission(res, args.dataroot, args.version, args.split, out_dir=Path(tmp) / name.replace(" ", "_"))
            tp = m["tp_errors"]
            lines.append(f"| {name} | {m['nd_score']:.3f} | {m['mean_ap']:.3f} | {tp['trans_err']:.3f} | {tp['vel_err']:.3f} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    if args.out is not None:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
