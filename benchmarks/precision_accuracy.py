"""Accuracy of every precision: the same student weights at FP32, FP16 and INT8 in ONNX Runtime
(CPU), scored with the nuScenes metrics on the synthetic mini_val, plus per-output errors
against torch FP32 on the same frames.

    python benchmarks/precision_accuracy.py --checkpoint RUN/checkpoints/last.safetensors \
        --dataroot DRIVE --out benchmarks/results

INT8 is calibrated on mini_train frames (never the evaluated split), symmetric int8
activations and per-channel weights (TensorRT's convention), BEVPool/fusion/head kept FP32.
Writes precision_accuracy.json and .md into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

VERSION = "v1.0-mini"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="student checkpoint (.safetensors)")
    p.add_argument("--dataroot", type=Path, required=True, help="v1.0-mini drive with mini_train and mini_val")
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/imkd_precision"), help="exports and submissions")
    p.add_argument("--calib-frames", type=int, default=100)
    p.add_argument("--method", default="percentile", help="INT8 range method: percentile | entropy | minmax")
    p.add_argument("--ops", default="onnx", help="export form (onnx: fastest in ORT; tensorrt: what engines build)")
    args = p.parse_args()

    from imkd_deploy.calibration.calib_set import make_set, samples_by_scene
    from imkd_deploy.calibration.feeds import calibrate_from_drive
    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.distill.evaluate import predict_split
    from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission
    from imkd_deploy.export.onnx_export import export_checkpoint
    from imkd_deploy.runtime.backends import OUTPUT_NAMES, OnnxRuntimeBackend, TorchBackend
    from imkd_deploy.runtime.infer import infer_drive
    from imkd_deploy.runtime.preprocess import preprocess

    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    fp32 = export_checkpoint(args.checkpoint, w / f"student_{args.ops}.onnx", args.ops, dataroot=args.dataroot).path
    models = {"fp32": fp32}
    models["fp16"] = calibrate_from_drive(fp32, None, "fp16", w / "student.fp16.onnx", None).out_path
    cset = make_set(samples_by_scene(args.dataroot, VERSION, "mini_train"), args.calib_frames, VERSION, "mini_train")
    manifest = w / f"calib_{args.calib_frames}.txt"
    cset.write(manifest)
    models["int8"] = calibrate_from_drive(fp32, manifest, "int8", w / "student.int8.onnx", args.dataroot,
                                          args.method).out_path

    ref_path = predict_split(args.checkpoint, args.dataroot, VERSION, "mini_val", out=w / "torch_fp32.json")
    rows = {"torch fp32": {**_metrics(evaluate_submission(ref_path, args.dataroot, VERSION, "mini_val")),
                           "size_mb": args.checkpoint.stat().st_size / 1e6}}
    for prec, model in models.items():
        t0 = time.perf_counter()
        summary = infer_drive(model, args.dataroot, VERSION, w / f"ort_{prec}.json", split="mini_val", progress=False)
        rows[f"onnxruntime {prec}"] = {**_metrics(evaluate_submission(summary.out, args.dataroot, VERSION, "mini_val")),
                                       "network_p50_ms": summary.latency_ms["network"]["p50"],
                                       "size_mb": model.stat().st_size / 1e6, "seconds": time.perf_counter() - t0}
    # per-output errors against torch FP32 on 8 val frames
    torch_be = TorchBackend.from_checkpoint(args.checkpoint, device="cpu")    # the FP32 reference: no TF32
    drive = NuScenesDrive(args.dataroot, VERSION, torch_be.config, split="mini_val")
    picks = np.unique(np.linspace(0, len(drive) - 1, 8).round().astype(int))
    feeds = [preprocess(drive[int(i)], torch_be.config).inputs for i in picks]
    refs = [torch_be.run(f) for f in feeds]
    for prec, model in models.items():
        be = OnnxRuntimeBackend(model)
        outs = [be.run(f) for f in feeds]
        rows[f"onnxruntime {prec}"]["errors"] = {
            name: {"max_abs": float(max(np.abs(o[name] - r[name]).max() for o, r in zip(outs, refs))),
                   "rel_l2": float(np.sqrt(sum(((o[name] - r[name]) ** 2).sum() for o, r in zip(outs, refs))
                                           / max(sum((r[name] ** 2).sum() for r in refs), 1e-12)))}
            for name in OUTPUT_NAMES}
    result = {"checkpoint": str(args.checkpoint), "calibration": {"frames": len(cset), "method": args.method,
                                                                  "set_sha256": cset.sha256},
              "ops": args.ops, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision_accuracy.json").write_text(json.dumps(result, indent=2))
    md = _markdown(result)
    (args.out / "precision_accuracy.md").write_text(md)
    print(md)


def _metrics(m: dict) -> dict:
    return {"nds": m["nd_score"], "map": m["mean_ap"]}


def _markdown(result: dict) -> str:
    lines = ["| model | NDS | mAP | ΔNDS vs torch | heatmap max abs / rel L2 | regression rel L2 (max) | size MB | ORT network p50 ms |",
             "|---|---|---|---|---|---|---|---|"]
    base = result["rows"]["torch fp32"]["nds"]
    for name, r in result["rows"].items():
        err = r.get("errors")
        heat = f"{err['heatmap']['max_abs']:.2e} / {err['heatmap']['rel_l2']:.1e}" if err else "reference"
        reg = f"{max(v['rel_l2'] for k, v in err.items() if k != 'heatmap'):.1e}" if err else "-"
        lat = f"{r['network_p50_ms']:.0f}" if "network_p50_ms" in r else "-"
        lines.append(f"| {name} | {r['nds']:.4f} | {r['map']:.4f} | {r['nds'] - base:+.4f} | {heat} | {reg} | "
                     f"{r['size_mb']:.1f} | {lat} |")
    cal = result["calibration"]
    lines.append(f"\nINT8: {cal['frames']} mini_train calibration frames, {cal['method']} ranges, symmetric int8 "
                 f"activations, per-channel weights, BEVPool/fusion/head FP32; export `--ops {result['ops']}`.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
