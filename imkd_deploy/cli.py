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

import typer
from rich.console import Console

from imkd_deploy.errors import UserError

console = Console(stderr=True)
out = Console()

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
    console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


# --------------------------------------------------------------------------- data
@data_app.command("synth")
def data_synth(
    out_dir: Path = typer.Argument(..., help="Dataroot to write (created; must be empty or absent)."),
    version: str = typer.Option("v1.0-mini", help="Table folder name. 'v1.0-mini' uses the devkit's mini scene names; any other version also writes splits.json."),
    scenes: int = typer.Option(10, min=1, help="Number of scenes (10 = the devkit's whole mini split)."),
    samples: int = typer.Option(40, min=2, help="Key frames (2 Hz) per scene."),
    image_size: str = typer.Option("800x450", help="Camera image size WxH (real nuScenes: 1600x900)."),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same drive, byte for byte."),
) -> None:
    """Write a synthetic recorded drive in the real nuScenes on-disk format (offline, deterministic)."""
    from imkd_deploy.data.synth import SynthConfig, write_drive

    try:
        w, h = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        _fail(UserError(f"--image-size must look like 800x450, got '{image_size}'"))
    try:
        summary = write_drive(out_dir, SynthConfig(version=version, num_scenes=scenes, samples_per_scene=samples, image_width=w, image_height=h, seed=seed))
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
) -> None:
    """nuScenes detection metrics (mAP, TP errors, NDS, per-class table) via nuscenes-devkit."""
    from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission, print_metrics

    if (results is None) == (checkpoint is None):
        _fail(UserError("give exactly one of --results R.json or --checkpoint CKPT"))
    try:
        if checkpoint is not None:
            from imkd_deploy.distill.evaluate import predict_split

            results = predict_split(checkpoint, dataroot, version, split)
        metrics = evaluate_submission(results, dataroot, version, split, out_dir=out_dir, plots=plots)
    except UserError as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(metrics))
    else:
        print_metrics(metrics, out)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
