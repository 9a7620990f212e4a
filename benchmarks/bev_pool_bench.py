"""BEVPool latency at nuScenes size, every implementation measured in one run.

    python benchmarks/bev_pool_bench.py [--bins 118 59] [--repeats 20] [--threads 2] [--json out.json]

Sizes come from the ``nuscenes_r50`` preset (6 cameras, 16x44 features, C=80, 128x128 BEV);
the geometry is real, from ``example_rig`` (nuScenes-like intrinsics/extrinsics). ``--bins``
picks depth-bin counts over 1-60 m (118 = 0.5 m steps, 59 = 1 m). Rows: the torch
reference (gather + index_add), the imkd::bev_pool custom op (CSR sparse matmul), the numpy
kernel alone, ONNX Runtime with the imkd::BEVPool Python kernel (``--ops plugin``), ONNX
Runtime on what the exporter makes of the plain reference (GatherND + ScatterND: the
baseline), and ONNX Runtime on our standard-op lowering (``--ops onnx``). Times are medians
after warm-up; the ratios are against the lowering, all from this one run, so they hold even
when the machine is shared. Each ORT row also runs ``--repeats`` more times on the same input:
its error is the worst run's (against the float32 reference and against a float64 evaluation,
which separates the reference's own rounding from the form's), and "runs differing" counts
outputs that differ from the first (a scatter-add that threads race on shows there with
``--threads`` >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class _Pool(torch.nn.Module):
    def __init__(self, bev_hw):
        super().__init__()
        self.bev_hw = bev_hw

    def forward(self, depth, feat, rd, rf, rb, starts, lengths):
        from imkd_deploy.ops.bev_pool import bev_pool

        return bev_pool(depth, feat, rd, rf, rb, starts, lengths, self.bev_hw)


class _PoolReference(_Pool):
    """The plain-torch reference, no custom op: what the exporter makes of index_add."""

    def forward(self, depth, feat, rd, rf, rb, starts, lengths):
        from imkd_deploy.ops.bev_pool import bev_pool_reference

        return bev_pool_reference(depth, feat, rd, rf, rb, starts, lengths, *self.bev_hw)


def _export(module, args, mode: str | None, path: Path) -> None:
    from imkd_deploy.ops import onnx_translation_table

    points, cells = torch.export.Dim("P"), torch.export.Dim("K")
    dyn = (None, None, {0: points}, {0: points}, {0: points}, {0: cells}, {0: cells})
    table = onnx_translation_table(mode) if mode else None
    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dyn, verbose=False,
                                custom_translation_table=table)
    program.save(str(path))


def bench(bins: int, repeats: int, threads: int, workdir: Path) -> dict:
    import onnxruntime as ort

    from imkd_deploy.config import nuscenes_r50
    from imkd_deploy.ops import register_ort_kernels
    from imkd_deploy.ops.bev_pool import bev_pool, bev_pool_numpy, bev_pool_reference, compute_geometry, example_rig

    base = nuscenes_r50()
    lo, hi = 1.0, 60.0
    cfg = base.replace(depth_bins=(lo, hi, (hi - lo) / bins))
    assert cfg.num_depth_bins == bins
    geom = compute_geometry(*example_rig(cfg), cfg)
    fh, fw = cfg.feature_size
    ny, nx = geom.bev_hw
    gen = torch.Generator().manual_seed(0)
    depth = torch.rand(1, cfg.num_cams, bins, fh, fw, generator=gen).softmax(2)
    feat = torch.randn(1, cfg.num_cams, fh, fw, cfg.context_channels, generator=gen)
    ranks = geom.to_torch()
    args = (depth, feat, *ranks)
    np_args = tuple(a.numpy() for a in args)

    with torch.no_grad():
        expected = bev_pool_reference(*args, ny, nx).numpy()
        # the float32 reference rounds too: a float64 evaluation shows whose rounding is whose
        exact = bev_pool_reference(depth.double(), feat.double(), *ranks, ny, nx).numpy()
        rows = {
            "torch reference": _median_ms(lambda: bev_pool_reference(*args, ny, nx), repeats),
            "torch custom op (imkd::bev_pool)": _median_ms(lambda: bev_pool(*args, (ny, nx)), repeats),
        }
    rows["numpy kernel alone"] = _median_ms(lambda: bev_pool_numpy(*np_args, ny, nx), repeats)
    errors = {"numpy kernel alone": float(np.abs(bev_pool_numpy(*np_args, ny, nx) - expected).max())}
    errors64 = {"torch reference": float(np.abs(expected - exact).max())}
    differing = {}

    variants = (
        ("plugin", _Pool, "ORT imkd::BEVPool Python kernel"),
        (None, _PoolReference, "ORT exporter's index_add lowering"),
        ("onnx", _Pool, "ORT standard lowering (--ops onnx)"),
    )
    for mode, module_cls, label in variants:
        path = workdir / f"bev_pool_{mode or 'default'}_{bins}.onnx"
        _export(module_cls((ny, nx)).eval(), args, mode, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if mode == "plugin":
            register_ort_kernels(opts)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = {i.name: a for i, a in zip(sess.get_inputs(), np_args)}
        rows[label] = _median_ms(lambda: sess.run(None, feeds), repeats)
        # worst run of several: a scatter-add split across threads without atomics can lose updates
        runs = [sess.run(None, feeds)[0] for _ in range(repeats)]
        errors[label] = max(float(np.abs(out - expected).max()) for out in runs)
        errors64[label] = max(float(np.abs(out - exact).max()) for out in runs)
        differing[label] = sum(not np.array_equal(out, runs[0]) for out in runs[1:])
    return {
        "depth_bins": bins, "cams": cfg.num_cams, "feat_hw": [fh, fw], "channels": cfg.context_channels,
        "bev_hw": [ny, nx], "points": geom.num_points, "intervals": geom.num_intervals,
        "ms": rows, "max_abs_err_vs_reference": errors, "max_abs_err_vs_float64": errors64,
        "runs_differing_from_the_first": differing,
        "repeats": repeats,
    }


def _print(result: dict) -> None:
    lowering = result["ms"]["ORT standard lowering (--ops onnx)"]
    print(f"\nBEVPool, {result['cams']} cams x {result['depth_bins']} bins x {result['feat_hw'][0]}x{result['feat_hw'][1]}, "
          f"C={result['channels']}, BEV {result['bev_hw'][0]}x{result['bev_hw'][1]}: "
          f"{result['points']} points in {result['intervals']} cells")
    print(f"{'implementation':42s} {'median ms':>10s} {'x lowering':>11s} {'max abs err':>12s} "
          f"{'err vs fp64':>12s} {'runs differing':>15s}")
    for name, ms in result["ms"].items():
        err = result["max_abs_err_vs_reference"].get(name)
        err_s = f"{err:12.2e}" if err is not None else f"{'(ref)':>12s}"
        err64 = result["max_abs_err_vs_float64"].get(name)
        err64_s = f"{err64:12.2e}" if err64 is not None else f"{'':12s}"
        diff = result["runs_differing_from_the_first"].get(name)
        diff_s = f"{diff:>7d} of {result['repeats'] - 1:<4d}" if diff is not None else ""
        print(f"{name:42s} {ms:10.2f} {ms / lowering:11.2f} {err_s} {err64_s} {diff_s}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bins", type=int, nargs="+", default=[118, 59], help="depth-bin counts over 1-60 m")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (atomically)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    print(f"torch {torch.__version__}, {opts.threads} threads, {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.1f}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for bins in opts.bins:
            results.append(bench(bins, opts.repeats, opts.threads, Path(tmp)))
            _print(results[-1])
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = opts.json.with_suffix(opts.json.suffix + ".tmp")
        tmp_path.write_text(json.dumps({"threads": opts.threads, "load_average": os.getloadavg()[0], "results": results}, indent=2))
        os.replace(tmp_path, opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
