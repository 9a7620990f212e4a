"""The `imkd` command line: a thin typer layer over library functions.

Each command parses its options, calls ONE library function (imported lazily, so
`imkd --help` stays fast and works without TensorRT or a GPU), and prints a summary.
Library errors that are the user's fault derive from ``imkd_deploy.errors.UserError``
and are printed as one red line with exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from imkd_deploy.errors import UserError

console = Console(stderr=True)
# piped output (logs, CI) gets room for the tables instead of rich's 80-column default
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

app = typer.Typer(
    name="imkd",
    help=(
        "IMKD camera+radar 3D detection: synthesise or load nuScenes-format drives, train the "
        "LiDAR teacher and the distilled camera+radar student, export ONNX with the imkd custom "
        "ops, calibrate INT8, build TensorRT engines and run them on recorded drives.\n\n"
        "Start with `imkd quickstart` (all steps, on a CPU) or `imkd data synth OUT`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Recorded drives in the nuScenes format: synthesise, inspect, render.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _fail(exc: Exception) -> None:
    # escape: messages quote install extras such as imkd-deploy[rtx], which rich would eat as markup;
    # soft_wrap: a message names files, and rich's hard wrap at 80 columns would break a path in two
    console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(2)


# --------------------------------------------------------------------------- data
@data_app.command("synth")
def data_synth(
    out_dir: Path = typer.Argument(..., help="Dataroot to write (created; must be empty or absent)."),
    version: str = typer.Option("v1.0-mini", help="Table folder name. 'v1.0-mini' uses the devkit's mini scene names; any other version also writes splits.json (train; val, every fifth scene; all, for scoring a drive of another seed as a held-out test)."),
    scenes: int = typer.Option(10, min=1, help="Number of scenes (10 = the devkit's whole mini split)."),
    samples: int = typer.Option(40, min=2, help="Key frames (2 Hz) per scene."),
    image_size: str = typer.Option("800x450", help="Camera image size WxH (real nuScenes: 1600x900)."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same drive, byte for byte."),
    conditions: str = typer.Option("day", help="day, rain or night for every scene, or mixed: a nuScenes-like share of rain and night scenes (the scene description names them)."),
    radar_clutter: str = typer.Option("light", help="light: random radar clutter only; urban: also fixed roadside reflectors (poles, signs, rails) with car-like RCS and the ARS408's wide-angle azimuth error."),
    radar_rcs: str = typer.Option("class", help="class: each return's RCS about its class mean; swerling: also the Swerling I aspect fluctuation of real targets (5.6 dB), so one return's RCS tells less of the class."),
    night_lighting: str = typer.Option("street", help="Night scenes' camera. street: ambient street light only, objects are dim silhouettes; lamps: also the head and tail lamps of moving vehicles and the ego's low beams (road ahead lit, reflective stripes bright). Day and rain scenes are the same either way."),
    night_exposure: str = typer.Option("fixed", help="Night scenes' exposure. fixed: the dark frame (mean ~9 of 255, signal about its noise); auto: metered as a real camera does, a longer shutter (up to 4x the signal) then gain to a mean of 60, noise amplified, lamps saturated."),
) -> None:
    """Write a synthetic recorded drive in the real nuScenes on-disk format (offline, deterministic)."""
    from imkd_deploy.data.synth import SynthConfig, write_drive

    try:
        w, h = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        _fail(UserError(f"--image-size must look like 800x450, got '{image_size}'"))
    try:
        summary = write_drive(out_dir, SynthConfig(version=version, num_scenes=scenes, samples_per_scene=samples, image_width=w, image_height=h, seed=seed,
                                                     conditions=conditions, radar_clutter=radar_clutter, radar_rcs=radar_rcs,
                                                     night_lighting=night_lighting, night_exposure=night_exposure))
    except UserError as exc:
        _fail(exc)
    out.print(summary.pretty())
    out.print(f"\nnext: imkd data inspect --dataroot {out_dir} --version {version}")


@data_app.command("inspect")
def data_inspect(
    dataroot: Path = typer.Option(..., help="nuScenes dataroot (holds samples/, sweeps/, <version>/)."),
    version: str = typer.Option("v1.0-mini", help="Table folder name, e.g. v1.0-mini or v1.0-trainval."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Count scenes, samples, sweeps per sensor and annotations per class."""
    from imkd_deploy.data.inspect import inspect_drive

    try:
        report = inspect_drive(dataroot, version)
    except UserError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        report.print(out)


@data_app.command("render")
def data_render(
    dataroot: Path = typer.Option(..., help="nuScenes dataroot."),
    version: str = typer.Option("v1.0-mini", help="Table folder name."),
    sample: Optional[str] = typer.Option(None, help="Sample token (default: the first sample of the first scene)."),
    index: int = typer.Option(0, help="Sample index in the drive, used when --sample is not given."),
    out_png: Path = typer.Option(Path("frame.png"), "--out", help="PNG to write."),
) -> None:
    """Render one frame: 6 cameras with projected GT boxes, and a BEV of LiDAR+radar with boxes and velocities."""
    from imkd_deploy.data.render import render_sample

    try:
        path = render_sample(dataroot, version, out_png, sample_token=sample, index=index)
    except UserError as exc:
        _fail(exc)
    out.print(f"saved {path} ({path.stat().st_size / 1e3:.0f} kB)")


# --------------------------------------------------------------------------- train
@app.command("train")
def train_cmd(
    role: str = typer.Argument(..., help="teacher (LiDAR, trained on ground truth) or student (camera+radar, distilled)."),
    config: str = typer.Option("tiny", help="Preset (tiny | nuscenes_r50), or a ModelConfig/RunConfig JSON file."),
    dataroot: Path = typer.Option(..., help="nuScenes dataroot to train on."),
    version: str = typer.Option("v1.0-mini", help="Table folder name."),
    split: str = typer.Option("mini_train", help="Training split (devkit name, or a name in <version>/splits.json)."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory: config.json, metrics.jsonl, checkpoints/."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher checkpoint (student runs that distill)."),
    distill: Optional[str] = typer.Option(None, help="IMKD levels: none | radar | fused | all (or a+b); default: the config's."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Override the config's number of optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Per-process batch size (DDP: per rank)."),
    seed: Optional[int] = typer.Option(None, help="Override the config's seed."),
    resume: bool = typer.Option(True, help="Continue from RUN/checkpoints/last.safetensors when it exists."),
) -> None:
    """Train the LiDAR teacher or the IMKD student. Under torchrun each rank trains a DDP replica."""
    import os
    import time

    from imkd_deploy.config import FIELD_LEVELS
    from imkd_deploy.distill.trainer import resolve_run_config, train

    if role not in ("teacher", "student"):
        _fail(UserError(f"role must be 'teacher' or 'student', got '{role}'"))
    if role == "teacher" and teacher is not None:
        _fail(UserError("--teacher is for student runs (the teacher learns from ground truth)"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        run = resolve_run_config(config, distill=distill, max_steps=max_steps, seed=seed, batch_size=batch_size)
        if role == "teacher":
            run = run.replace(distill=run.distill.replace(levels="none").to_dict())
        elif rank == 0:
            # a setting of a level the run leaves off trains exactly as without it: say so before hours of training
            for name, value in run.distill.idle_settings().items():
                console.print(f"[yellow]warning:[/] distill.{name}={value} acts on level(s) {'/'.join(FIELD_LEVELS[name])}, "
                              f"which distill '{run.distill.levels}' leaves off: it changes nothing")
        t0 = time.perf_counter()
        if rank == 0:
            console.print(f"train {role}: config {run.model.name}, {run.train.max_steps} steps, batch {run.train.batch_size}, "
                          f"distill {run.distill.levels} -> {out_dir}")
        ckpt = train(run, dataroot, out_dir, teacher, role=role, version=version, split=split, resume=resume)
    except UserError as exc:
        _fail(exc)
    if rank == 0:
        out.print(f"saved {ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s; "
                  f"metrics in {out_dir / 'metrics.jsonl'}")
        nxt = (f"imkd train student --config {config} --dataroot {dataroot} --version {version} --out RUN_STUDENT --teacher {ckpt}"
               if role == "teacher" else f"imkd eval --checkpoint {ckpt} --dataroot {dataroot} --version {version}")
        out.print(f"next: {nxt}")


# --------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    dataroot: Path = typer.Option(..., help="nuScenes dataroot with ground truth."),
    version: str = typer.Option("v1.0-mini", help="Table folder name; must match the split (mini splits need a *-mini version)."),
    split: str = typer.Option("mini_val", help="Evaluation split (devkit name, or a name in <version>/splits.json)."),
    results: Optional[Path] = typer.Option(None, help="nuScenes submission JSON to score."),
    checkpoint: Optional[Path] = typer.Option(None, help="Instead of --results: run this torch checkpoint over the split first."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where metrics_summary.json (and plots) go; default beside the results."),
    plots: bool = typer.Option(False, help="Also render the devkit's PR/TP plots (slow)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    condition: Optional[str] = typer.Option(None, help="Score only the split's day, rain or night scenes (by scene description, as nuScenes val is usually split)."),
) -> None:
    """nuScenes detection metrics (mAP, TP errors, NDS, per-class table) via nuscenes-devkit."""
    from imkd_deploy.data.loader import condition_scene_names
    from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission, print_metrics

    if (results is None) == (checkpoint is None):
        _fail(UserError("give exactly one of --results R.json or --checkpoint CKPT"))
    try:
        scenes = condition_scene_names(dataroot, version, split, condition) if condition is not None else None
        if checkpoint is not None:
            from imkd_deploy.distill.evaluate import predict_split

            results = predict_split(checkpoint, dataroot, version, split)
        if out_dir is None and condition is not None:
            out_dir = results.parent / f"{results.stem}_eval_{condition}"
        metrics = evaluate_submission(results, dataroot, version, split, out_dir=out_dir, plots=plots, scenes=scenes)
    except UserError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(metrics))
    else:
        print_metrics(metrics, out)


# --------------------------------------------------------------------------- export / infer
def _print_parity(rows) -> None:
    for row in rows:
        colour = "green" if row.passed else "red"
        out.print(f"[{colour}]{row.line()}[/]")


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Option(..., help="Student checkpoint (.safetensors) from imkd train student."),
    out_path: Path = typer.Option(..., "--out", help="ONNX file to write, e.g. export/student.onnx (+ .onnx.json sidecar)."),
    ops: str = typer.Option("onnx", help="onnx: standard ops, BEVPool as blocked prefix sums (the fast, deterministic ONNX Runtime path); tensorrt: standard ops TensorRT's parser accepts (segmented-scan BEVPool; for engines without plugins, e.g. TensorRT-RTX); plugin: imkd::BEVPool / imkd::IntensityFusion nodes (NVIDIA TensorRT >= 10.6 plugins, ORT Python kernels)."),
    dataroot: Optional[Path] = typer.Option(None, help="Check parity on a real frame of this drive (default: a synthetic nuScenes-like rig)."),
    version: str = typer.Option("v1.0-mini", help="Table folder name of --dataroot."),
    atol: Optional[float] = typer.Option(None, help="Parity tolerance against torch (FP32, max abs; default onnx_export.PARITY_ATOL, 1e-4)."),
    check: bool = typer.Option(True, help="Run onnx.checker and the torch-vs-ONNX Runtime parity check."),
) -> None:
    """Export the student to ONNX with the imkd custom ops, then check it against torch."""
    from imkd_deploy.export.onnx_export import export_checkpoint

    try:
        res = export_checkpoint(checkpoint, out_path, ops, dataroot=dataroot, version=version, check=check,
                              **({} if atol is None else {"atol": atol}))
    except UserError as exc:
        _fail(exc)
    _print_parity(res.parity)
    out.print(f"saved {res.path} ({res.size_bytes / 1e6:.1f} MB, ops={ops}, opset {res.metadata['opset']}) "
              f"in {res.seconds:.1f} s; metadata {res.sidecar}")
    if res.parity and not res.passed:
        console.print("[bold red]parity FAILED[/] against torch")
        raise typer.Exit(1)
    out.print(f"\nnext: imkd infer --model {res.path} --dataroot DATAROOT --split mini_val --out results.json --eval"
              f"\n      imkd calibrate --model {res.path} --set calibration/SET.txt --precision int8")


def _print_latency(table: dict, title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for col in ("stage", "min", "p50", "p90", "p99", "mean"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    for stage, row in table.items():
        t.add_row(stage, *(f"{row[k]:.1f}" for k in ("min", "p50", "p90", "p99", "mean")))
    out.print(t)


@app.command("infer")
def infer_cmd(
    model: Path = typer.Option(..., help="A student checkpoint (.safetensors, torch), an .onnx (ONNX Runtime) or an .engine (TensorRT)."),
    dataroot: Path = typer.Option(..., help="nuScenes dataroot of the recorded drive(s)."),
    version: str = typer.Option("v1.0-mini", help="Table folder name."),
    split: Optional[str] = typer.Option(None, help="Split to run (e.g. mini_val); default all scenes."),
    scenes: Optional[str] = typer.Option(None, help="Comma-separated scene names instead of --split."),
    out_path: Path = typer.Option(Path("results.json"), "--out", help="nuScenes submission JSON (written atomically)."),
    backend: Optional[str] = typer.Option(None, help="Force a backend: torch | onnxruntime | tensorrt (default: from the file type)."),
    score_threshold: float = typer.Option(0.05, help="Drop detections scoring below this (imkd eval --checkpoint uses the same default)."),
    eval_: bool = typer.Option(False, "--eval", help="Score the submission with the nuScenes metrics (needs GT and --split)."),
    render: Optional[Path] = typer.Option(None, help="Write one PNG per frame into this folder (BEV detections vs GT + cameras)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its journal; the result equals an uninterrupted run."),
    shard: Optional[str] = typer.Option(None, help="i/n: this process runs every n-th scene; join parts with `imkd infer-merge`. torchrun ranks are used automatically."),
    max_frames: Optional[int] = typer.Option(None, help="Stop after this many frames (smoke tests)."),
) -> None:
    """Run a model over recorded drives: nuScenes submission, latency per stage, optional metrics."""
    from imkd_deploy.runtime.infer import infer_drive, parse_shard

    try:
        summary = infer_drive(
            model, dataroot, version, out_path, split=split,
            scenes=[s for s in scenes.split(",") if s] if scenes else None, shard=parse_shard(shard),
            resume=resume, score_threshold=score_threshold, backend=backend, render_dir=render,
            max_frames=max_frames, console=out,
        )
        if eval_:
            if not split:
                raise UserError("--eval needs --split (the split whose ground truth scores the submission)")
            from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission, print_metrics

            summary.metrics = evaluate_submission(summary.out, dataroot, version, split)
    except UserError as exc:
        _fail(exc)
    _print_latency(summary.latency_ms, f"latency per frame, ms ({summary.backend})")
    out.print(f"{summary.frames} frames ({summary.resumed} from the journal), {len(summary.skipped)} skipped, "
              f"{summary.seconds:.1f} s -> {summary.out}")
    for token, reason in list(summary.skipped.items())[:10]:
        out.print(f"[yellow]skipped[/] {token}: {reason}")
    if summary.metrics is not None:
        print_metrics(summary.metrics, out)


@app.command("infer-merge")
def infer_merge_cmd(
    parts: list[Path] = typer.Argument(..., help="The OUT.part-i-of-n.json files of a sharded run."),
    out_path: Path = typer.Option(..., "--out", help="Merged submission JSON."),
) -> None:
    """Join the parts of a sharded `imkd infer` run into one submission."""
    from imkd_deploy.runtime.infer import merge_parts

    try:
        path = merge_parts(parts, out_path)
    except UserError as exc:
        _fail(exc)
    out.print(f"merged {len(parts)} parts -> {path}")


# --------------------------------------------------------------------------- bench
@app.command("bench")
def bench_cmd(
    dataroot: Path = typer.Option(..., help="Drive whose frames every backend runs."),
    version: str = typer.Option("v1.0-mini", help="Table folder name."),
    split: Optional[str] = typer.Option(None, help="Split to take frames from (default: all scenes)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Student checkpoint: the torch FP32 reference."),
    onnx_model: Optional[Path] = typer.Option(None, "--onnx", help="FP32 ONNX (ONNX Runtime)."),
    int8: Optional[Path] = typer.Option(None, help="INT8 Q/DQ ONNX from imkd calibrate (ONNX Runtime)."),
    fp16: Optional[Path] = typer.Option(None, help="FP16 ONNX from imkd calibrate (ONNX Runtime)."),
    engine: Optional[Path] = typer.Option(None, help="TensorRT engine (needs a GPU)."),
    backends: Optional[str] = typer.Option(None, help="Comma-separated subset to run: torch,onnxruntime,onnxruntime-int8,onnxruntime-fp16,tensorrt."),
    frames: int = typer.Option(8, min=1, help="Frames per round."),
    rounds: int = typer.Option(3, min=1, help="Rounds over the frames (backends interleaved A B A B)."),
    warmup: int = typer.Option(2, min=0, help="Warm-up calls per backend before timing."),
    log_path: Path = typer.Option(Path("benchmarks/bench_log.jsonl"), "--log", help="JSON lines log the result is appended to."),
    gate: Optional[Path] = typer.Option(None, help="benchmarks/baselines.json: fail (exit 1) when a latency ratio regresses beyond its margin."),
    threads: int = typer.Option(0, help="CPU threads for torch and ONNX Runtime alike (0: each library's default). Use 1 on a shared machine: torch's spinning thread pool collapses when a core is taken."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Latency of every backend on the same frames, side by side, with ratios against torch FP32."""
    from rich.table import Table

    from imkd_deploy.runtime.bench import append_log, check_gate, run_bench

    given = {"torch": checkpoint, "onnxruntime": onnx_model, "onnxruntime-int8": int8,
             "onnxruntime-fp16": fp16, "tensorrt": engine}
    wanted = [b.strip() for b in backends.split(",")] if backends else [k for k, v in given.items() if v]
    unknown = [b for b in wanted if b not in given]
    try:
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], list(given), n=1)
            raise UserError(f"unknown backend '{unknown[0]}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                            + f"; choose from {', '.join(given)}")
        missing = [b for b in wanted if not given[b]]
        if missing:
            raise UserError(f"backend {missing[0]} needs its model: pass --{ {'torch': 'checkpoint', 'onnxruntime': 'onnx', 'onnxruntime-int8': 'int8', 'onnxruntime-fp16': 'fp16', 'tensorrt': 'engine'}[missing[0]]}")
        models = {b: given[b] for b in wanted}
        from imkd_deploy.data.loader import NuScenesDrive
        from imkd_deploy.runtime.pipeline import Pipeline

        cfg = Pipeline.from_model(next(iter(models.values())), backend="torch" if wanted[0] == "torch" else None).cfg
        drive = NuScenesDrive(dataroot, version, cfg, split=split)
        picks = sorted({int(i) for i in np.linspace(0, len(drive) - 1, min(frames, len(drive)))})
        frame_list = [drive[i] for i in picks]
        result = run_bench(models, frame_list, warmup=warmup, rounds=rounds, console=out, threads=threads)
        if gate is not None:
            result.gate = check_gate(result, gate)
        append_log(result, log_path)
    except UserError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
    else:
        t = Table(title=f"latency, ms (p50; {result.frames} frames x {result.rounds} rounds, interleaved)")
        for col in ("backend", "preprocess", "network", "decode", "total", "p90 total", "x torch (total)", "runtime share"):
            t.add_column(col, justify="right" if col != "backend" else "left")
        for label, stats in result.latency.items():
            t.add_row(label, *(f"{stats[s]['p50']:.1f}" for s in ("preprocess", "network", "decode", "total")),
                      f"{stats['total']['p90']:.1f}", f"{result.ratios[label]['total']:.2f}",
                      f"{result.shares[label]['runtime_overhead']:.0%}")
        out.print(t)
        if "bevpool_of_network" in result.shares.get("torch", {}):
            out.print(f"BEVPool share of the torch network: {result.shares['torch']['bevpool_of_network']:.1%}")
        for w in result.warnings:
            out.print(f"[yellow]warning:[/] {w}")
        out.print(f"appended to {log_path}")
    if result.gate is not None:
        for row in result.gate["rows"]:
            m = "n/a" if row["measured"] is None else f"{row['measured']:.3f}"
            colour = {"PASSED": "green", "FAILED": "red"}.get(row["status"], "yellow")
            out.print(f"[{colour}]{row['status']}[/] | gate '{row['name']}' | measured {m} | baseline {row['ratio']:.3f} + {row['margin']:.0%}")
        if not result.gate["passed"]:
            raise typer.Exit(1)


# --------------------------------------------------------------------------- calibrate / build-engine
calibrate_app = typer.Typer(
    help="INT8 Q/DQ or FP16 ONNX from an FP32 export: `imkd calibrate --model M.onnx --set S --precision int8 --dataroot D`; "
         "`imkd calibrate make-set` writes the calibration-set manifest.",
    invoke_without_command=True,
)
app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.callback()
def calibrate_cmd(
    ctx: typer.Context,
    model: Optional[Path] = typer.Option(None, help="FP32 ONNX from imkd export (--ops onnx for TensorRT-RTX / CPU)."),
    set_path: Optional[Path] = typer.Option(None, "--set", help="Calibration manifest (INT8)."),
    precision: str = typer.Option("int8", help="int8: Q/DQ ONNX (symmetric int8 activations, per-channel weights); fp16: mixed precision."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Output ONNX (default: MODEL.int8.onnx / MODEL.fp16.onnx beside the model)."),
    dataroot: Optional[Path] = typer.Option(None, help="Drive holding the calibration frames (INT8)."),
    method: str = typer.Option("entropy", help="Activation range method: entropy | percentile | minmax."),
    sensitivity_target: Optional[float] = typer.Option(None, help="Run the sensitivity pass: keep layers FP32, worst first, until the relative output error is below this (e.g. 0.02)."),
) -> None:
    """Reduced-precision ONNX from a calibration set (cached by model, set and settings)."""
    from imkd_deploy.calibration.feeds import calibrate_from_drive

    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        out.print(ctx.get_help())
        raise typer.Exit(2)
    try:
        res = calibrate_from_drive(model, set_path, precision, out_path, dataroot, method, sensitivity_target)
    except UserError as exc:
        _fail(exc)
    out.print(res.summary())


@calibrate_app.command("make-set")
def calibrate_make_set(
    dataroot: Path = typer.Option(..., help="Drive to draw frames from."),
    version: str = typer.Option("v1.0-mini", help="Table folder name."),
    split: str = typer.Option("mini_train", help="Split to draw from (never the split you evaluate on)."),
    n: int = typer.Option(300, min=1, help="Frames; INT8 wants >= 100."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Manifest path (default calibration/<split>_<n>.txt)."),
) -> None:
    """Write a calibration-set manifest, stratified across scenes and over time."""
    from imkd_deploy.calibration.calib_set import make_set, samples_by_scene

    try:
        cset = make_set(samples_by_scene(dataroot, version, split), n, version, split)
        path = out_path or Path("calibration") / f"{split}_{len(cset)}.txt"
        cset.write(path)
    except UserError as exc:
        _fail(exc)
    for w in cset.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    out.print(f"saved {path}: {len(cset)} frames from {len(cset.scenes)} scenes (sha256 {cset.sha256[:12]})")
    out.print(f"\nnext: imkd calibrate --model export/MODEL.onnx --set {path} --dataroot {dataroot} --precision int8")


@app.command("build-engine")
def build_engine_cmd(
    model: Path = typer.Option(..., help="ONNX to build (FP32, or the INT8/FP16 ONNX from imkd calibrate)."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Engine path (default engines/<model>.engine); the sidecar is <engine>.json."),
    backend: str = typer.Option("tensorrt-rtx", help="tensorrt (NVIDIA TensorRT >= 10, on the target GPU) | tensorrt-rtx (builds ahead of time, no GPU needed)."),
    int8: bool = typer.Option(False, "--int8", help="Calibrate to INT8 Q/DQ first (or reuse the matching cache), then build."),
    set_path: Optional[Path] = typer.Option(None, "--set", help="Calibration manifest (with --int8; also sets the dynamic-shape profiles)."),
    dataroot: Optional[Path] = typer.Option(None, help="Drive holding the calibration frames."),
    precision: Optional[str] = typer.Option(None, help="fp16: convert to mixed-precision FP16 first; default: what the ONNX carries."),
    profile: Optional[list[str]] = typer.Option(None, help="NAME:min:opt:max dims, e.g. ranks_bev:1000:40000:90000 (repeatable). Default: from --set statistics."),
    workspace_mb: int = typer.Option(1024, help="Builder workspace limit, MiB."),
    compute_capability: Optional[list[str]] = typer.Option(None, help="TensorRT-RTX target(s), e.g. 8.6 (repeatable), or 'current': the GPU of this machine. TensorRT-RTX has no Hopper (9.0) target: use --backend tensorrt there."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Parse only: op coverage and which nodes need plugins."),
) -> None:
    """Build a TensorRT / TensorRT-RTX engine with a JSON sidecar (flavour, version, hashes, profiles)."""
    from imkd_deploy.calibration.feeds import calibrate_from_drive, model_config_of
    from imkd_deploy.engines.builder import BuildSettings, build_engine, dry_run as dry_run_fn, parse_profile

    try:
        profiles = dict(parse_profile(p) for p in (profile or []))
        source = model
        if precision not in (None, "fp32", "fp16", "int8"):
            raise UserError(f"--precision must be fp32 | fp16 | int8, got '{precision}'")
        if int8 or precision == "int8":
            res = calibrate_from_drive(model, set_path, "int8", None, dataroot, "entropy", None)
            out.print(res.report)
            source = res.out_path
        elif precision == "fp16":
            res = calibrate_from_drive(model, None, "fp16", None, None, "entropy", None)
            source = res.out_path
        if not profiles and set_path is not None and dataroot is not None:
            from imkd_deploy.calibration.calib_set import read_manifest
            from imkd_deploy.calibration.feeds import frame_feeds
            from imkd_deploy.engines.profiles import profiles_from_feeds

            cset = read_manifest(set_path)
            feed = frame_feeds(dataroot, cset, model_config_of(model))
            profiles = profiles_from_feeds(feed(e) for e in cset.entries[:64])
        settings = BuildSettings(backend=backend, workspace_mb=workspace_mb, profiles=profiles,
                                 compute_capabilities=tuple(compute_capability or ()), calibration_set=set_path)
        if dry_run:
            report = dry_run_fn(source, settings)
            out.print(report.summary())
            if report.parse_ok is False:
                raise typer.Exit(1)
            return
        engine_path = out_path or Path("engines") / f"{Path(source).stem.replace('.', '_')}.engine"
        result = build_engine(source, engine_path, settings)
    except UserError as exc:
        _fail(exc)
    out.print(result.summary())


# --------------------------------------------------------------------------- quickstart
@app.command("quickstart")
def quickstart_cmd(
    workdir: Path = typer.Option(Path("imkd-quickstart"), help="Where the drive, runs, exports, engines and results go. A rerun reuses finished steps."),
    scenes: int = typer.Option(10, min=3, help="Synthetic scenes (10 = the devkit's mini split: 8 train, 2 val)."),
    samples: int = typer.Option(12, min=2, help="Key frames per scene."),
    teacher_steps: int = typer.Option(200, min=1, help="Teacher training steps (the benchmarks use 400)."),
    student_steps: int = typer.Option(200, min=1, help="Student training steps (the benchmarks use 400)."),
    distill: str = typer.Option("all", help="IMKD levels for the student: none | radar | fused | all."),
    calib_frames: int = typer.Option(32, min=1, help="INT8 calibration frames (a real deployment wants >= 100)."),
    seed: int = typer.Option(0, help="Seed of the drive and of training."),
) -> None:
    """Every stage end to end on a synthetic drive, on a CPU, in minutes.

    Synthesise a drive, train the teacher, distil the student, eval, export, calibrate INT8,
    build an engine (when a TensorRT flavour is installed), infer, eval; a rerun reuses
    finished steps."""
    from rich.table import Table

    from imkd_deploy.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings(scenes=scenes, samples=samples, teacher_steps=teacher_steps,
                                  student_steps=student_steps, distill=distill, calib_frames=calib_frames, seed=seed)
    try:
        res = run_quickstart(workdir, settings, log=lambda m: out.print(f"[bold cyan]quickstart[/] {m}"))
    except UserError as exc:
        _fail(exc)
    t = Table(title=f"quickstart summary: synthetic mini_val, {res.seconds / 60:.1f} min in all")
    for col in ("model / backend", "precision", "NDS", "mAP", "network p50 ms", "frame p50 ms"):
        t.add_column(col, justify="left" if col in ("model / backend", "precision") else "right")
    for row in res.table:
        lat = row["latency_ms"]
        t.add_row(row["backend"], row["precision"], f"{row['nds']:.3f}", f"{row['map']:.3f}",
                  f"{lat['network']['p50']:.1f}" if lat else "-", f"{lat['total']['p50']:.1f}" if lat else "-")
    out.print(t)
    for note in res.notes:
        out.print(escape(note))
    w = res.workdir
    out.print(f"BEV picture: {res.picture}\nsummary: {w / 'summary.json'}")
    out.print("\nnext, try:\n"
              f"  imkd infer --model {w}/export/student_onnx.onnx --dataroot {w}/drive --split mini_val --eval --render {w}/render\n"
              f"  imkd bench --dataroot {w}/drive --split mini_val --checkpoint {w}/student/checkpoints/last.safetensors "
              f"--onnx {w}/export/student_onnx.onnx --int8 {w}/export/student_onnx.int8.onnx\n"
              f"  imkd train student --dataroot {w}/drive --out {w}/student_plain --distill none --max-steps {student_steps}\n"
              f"  imkd build-engine --model {w}/export/student_tensorrt.onnx --int8 --set {w}/calibration/mini_train_{calib_frames}.txt "
              f"--dataroot {w}/drive --dry-run")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
