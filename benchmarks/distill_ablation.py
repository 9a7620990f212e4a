"""IMKD ablation on a synthetic drive: the LiDAR teacher and the camera+radar student with
each distillation level switched on or off, scored with the nuScenes metrics on the val split.

    python benchmarks/distill_ablation.py --out benchmarks/results [--dataroot D]
        [--scenes 10 --samples 40] [--teacher-steps 1200 --student-steps 400] [--seed 0 --teacher-seed 0]
        [--variants none,radar,fused,all,all-nofusion,...] [--workdir /tmp/imkd_ablation]
        [--set fused_at=encoder ...]
        [--w-radar 0.5 --w-fused 0.5] [--name distill_ablation_w05]

Without ``--dataroot`` the drive is written by our own writer (``imkd data synth``, writer
seed ``--drive-seed``, default 0, whatever the student ``--seed``) into ``WORKDIR/drive``
(each writer option off its default adds ``-VALUE``, e.g. ``drive-30scenes-mixed-urban``,
and ``-seedN`` another writer seed). At the
default 10 scenes it is a v1.0-mini drive: the devkit's mini scene names put 8 scenes in
mini_train and 2 in mini_val. With ``--scenes`` above 10 it is a ``v1.0-synth`` drive whose
``splits.json`` puts every fifth scene in ``val`` and the rest in ``train`` (more training
data, and a val split large enough to shrink the score noise of two scenes). Every student
variant uses the same seed, steps, batch and teacher, so the only difference between rows is
the distillation setting. ``--w-radar``/``--w-fused`` set the
level-1/level-2 loss weights (DistillConfig.w_radar/w_fused) of every student that uses that
level; a student without the level keeps the config default, so its run (e.g. ``none``) is the
same as in a round at other weights and can be reused. Runs are kept under ``WORKDIR/runs``
and a finished run is not retrained (its metrics are re-read), so an interrupted ablation
continues where it stopped; a run directory trained with another config is trained afresh.
``--set KEY=VALUE`` sets any DistillConfig field for every student (e.g. ``fused_at=encoder``,
``lidar_weight=structure``, ``w_resp=1`` or ``w_resp_reg=1`` with the ``resp`` variant).
``--camera KEY=VALUE`` changes the students' camera branch (a ModelConfig field of CAMERA_FIELDS,
e.g. ``image_size=[128,352]`` and ``downsample=8``: nuscenes_r50's 16x44 feature grid from the
writer's half-size images); the LiDAR teacher has no camera, so it stays the one of a round
without the option and is reused. ``--lidar-sweeps N`` changes the LiDAR the teacher is trained
on, and so the LiDAR the students load for it. ``--teacher-seed`` keeps one
teacher while ``--seed`` varies the students; ``benchmarks/distill_seeds.py`` then combines
the per-seed result files into one table with paired differences. Results: ``OUT/NAME.json``
and ``.md`` (written atomically); the table is also printed.

Run it with OMP_NUM_THREADS=1 on a shared machine: torch's default thread count makes a
CPU step many times slower when other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imkd_deploy.atomic import atomic_write_text
from imkd_deploy.config import (FIELD_LEVELS, SCENE_CONDITIONS, ConfigError, DistillConfig, ModelConfig, RunConfig,
                                 TrainConfig, tiny)
from imkd_deploy.data.synth import SynthConfig, write_drive
from imkd_deploy.data.synth_conditions import NIGHT_EXPOSURE, NIGHT_LIGHTING
from imkd_deploy.data.synth_radar import RADAR_CLUTTER, RADAR_RCS
from imkd_deploy.export.metadata import file_sha256

TEACHER_STEPS = 1200
# ModelConfig fields of the camera branch alone: the teacher has no camera, so students that
# change them still share its BEV grid, LiDAR sweeps and cells with it.
CAMERA_FIELDS = ("image_size", "downsample", "depth_bins", "backbone", "backbone_width", "fpn_channels",
                 "context_channels")


@dataclass(frozen=True)
class Layout:
    """Which table version and which train / val splits of a drive the ablation uses."""
    version: str
    train: str
    val: str


MINI = Layout("v1.0-mini", "mini_train", "mini_val")
SYNTH = Layout("v1.0-synth", "train", "val")    # the writer's splits.json for a non-mini version


def layout_for_scenes(scenes: int) -> Layout:
    """The devkit's mini split names exactly 10 scenes; a larger synthetic drive needs its own."""
    if scenes < 10:
        raise ValueError(f"--scenes must be >= 10 (8 train + 2 val scenes), got {scenes}")
    return MINI if scenes == 10 else SYNTH


def layout_of(dataroot: Path) -> Layout:
    """The layout of an existing drive: v1.0-mini, or v1.0-synth with its splits.json."""
    if (dataroot / MINI.version).is_dir():
        return MINI
    if (dataroot / SYNTH.version / "splits.json").is_file():
        return SYNTH
    raise ValueError(f"{dataroot}: neither {MINI.version}/ nor {SYNTH.version}/splits.json found; "
                     "the ablation needs a drive written by `imkd data synth`")


@dataclass(frozen=True)
class Variant:
    name: str            # row label and run-directory name
    role: str            # teacher | student
    levels: str          # DistillConfig.levels
    intensity_fusion: bool = True
    note: str = ""


VARIANTS = {
    "teacher": Variant("teacher", "teacher", "none", note="LiDAR pillars (with intensity), trained on GT"),
    "none": Variant("none", "student", "none", note="camera+radar, detection + depth losses only"),
    "radar": Variant("radar", "student", "radar", note="+ level 1: LiDAR->radar, intensity-aware"),
    "fused": Variant("fused", "student", "fused", note="+ level 2: LiDAR->fused, intensity-guided"),
    "resp": Variant("resp", "student", "resp", note="response distillation only: heatmaps (--set w_resp=W), regression maps (--set w_resp_reg=W)"),
    "radar-resp": Variant("radar-resp", "student", "radar+resp", note="level 1 with the response terms: each level's share of IMKD"),
    "fused-resp": Variant("fused-resp", "student", "fused+resp", note="level 2 with the response terms"),
    "all": Variant("all", "student", "all", note="levels 1+2, intensity-gated fusion (level 3): IMKD"),
    "all-nofusion": Variant("all-nofusion", "student", "all", intensity_fusion=False,
                            note="levels 1+2, fusion gate without the radar intensity prior"),
}


# The writer's options the ablation passes on (SynthConfig field -> choices, help), in drive-name
# order. A value other than SynthConfig's default names the drive folder (``-VALUE``) and appears
# in the reproduce command, so a new writer option is one line here.
WRITER_OPTIONS = {
    "conditions": ((*SCENE_CONDITIONS, "mixed"),
                   "scene conditions of the synthetic drive (mixed: nuScenes-like rain and night share)"),
    "radar_clutter": (RADAR_CLUTTER, "radar clutter of the synthetic drive (urban: fixed roadside reflectors, "
                                     "wide-angle azimuth error)"),
    "radar_rcs": (RADAR_RCS, "radar RCS of the synthetic drive (swerling: Swerling I aspect fluctuation on every return)"),
    "night_lighting": (NIGHT_LIGHTING, "night camera of the synthetic drive (lamps: moving vehicles' lamps and the "
                                       "ego's low beams)"),
    "night_exposure": (NIGHT_EXPOSURE, "night exposure of the synthetic drive (auto: metered, longer shutter then gain)"),
}
WRITER_DEFAULTS = {k: getattr(SynthConfig(), k) for k in WRITER_OPTIONS}


def ensure_drive(dataroot: Path | None, workdir: Path, scenes: int, samples: int, seed: int,
                 **writer: str) -> tuple[Path, Layout]:
    """``writer``: WRITER_OPTIONS values (the others SynthConfig's defaults)."""
    if dataroot is not None:
        return dataroot, layout_of(dataroot)
    writer = {**WRITER_DEFAULTS, **writer}
    layout = layout_for_scenes(scenes)
    drive = workdir / ("drive" + ("" if scenes == 10 else f"-{scenes}scenes")
                       + "".join(f"-{v}" for k, v in writer.items() if v != WRITER_DEFAULTS[k])
                       + (f"-seed{seed}" if seed else ""))
    if not (drive / layout.version).is_dir():
        print(f"writing a synthetic drive: {scenes} scenes x {samples} samples, {writer['conditions']} -> {drive}",
              flush=True)
        write_drive(drive, SynthConfig(num_scenes=scenes, samples_per_scene=samples, seed=seed,
                                       version=layout.version, **writer))
    return drive, layout


def student_model(camera: dict | None = None, lidar_sweeps: int | None = None) -> ModelConfig:
    """The students' model: ``tiny`` with the ``--camera`` fields replaced (validated)."""
    return teacher_model(lidar_sweeps).replace(**(camera or {}))


def teacher_model(lidar_sweeps: int | None = None) -> ModelConfig:
    """``tiny``, with ``--lidar-sweeps``: students load the LiDAR their teacher was trained on
    (the trainer refuses a mismatch), so both change together."""
    return tiny() if lidar_sweeps is None else tiny().replace(lidar_sweeps=lidar_sweeps)


def run_config(variant: Variant, steps: int, batch: int, seed: int, lr: float | None,
               weights: dict[str, float] | None = None, settings: dict | None = None,
               camera: dict | None = None, lidar_sweeps: int | None = None) -> RunConfig:
    """``weights`` maps "radar"/"fused" to that level's loss weight; a weight whose level the
    variant does not train is left at the default so the run config (and its reuse key) stays
    the same across rounds that only change weights. ``camera`` replaces camera-branch fields
    of the students' model; the teacher keeps ``tiny``'s. ``lidar_sweeps`` changes both."""
    run = RunConfig(model=student_model(camera, lidar_sweeps) if variant.role == "student"
                    else teacher_model(lidar_sweeps))
    train = run.train.replace(max_steps=steps, batch_size=batch, seed=seed, ckpt_every=steps,
                              **({"lr": lr} if lr is not None else {}))
    distill = run.distill.replace(levels=variant.levels, intensity_fusion=variant.intensity_fusion)
    if variant.role == "student":
        overrides = {f"w_{level}": w for level, w in (weights or {}).items() if distill.enabled(level)}
        distill = DistillConfig.from_dict({**distill.to_dict(), **overrides, **(settings or {})})
    return run.replace(train=train.to_dict(), distill=distill.to_dict())


def _same_run(saved: dict | None, run: RunConfig) -> bool:
    """Whether a saved run config equals ``run``; fields added to the configs since it was
    saved count as their defaults (JSON also turns tuples into lists, hence the round trip)."""
    if saved is None:
        return False
    try:
        return RunConfig.from_dict(saved).to_dict() == run.to_dict()
    except ConfigError:     # a config this code can no longer read is not the same run
        return False


def _same_data(saved: dict, drive: Path, layout: Layout) -> bool:
    """Whether a run's config.json (written by fit) trained on this drive's train split."""
    root = saved.get("dataroot")
    return (root is not None and Path(root).resolve() == drive.resolve()
            and saved.get("version") == layout.version and saved.get("split") == layout.train)


def _same_teacher(saved: dict, teacher_ckpt: Path | None) -> bool:
    """Whether a run's config.json was distilled from this teacher checkpoint (the trainer's
    rule); the teacher is hashed only when the run records a hash to compare with."""
    from imkd_deploy.distill.trainer import distilled_from_other_teacher

    if not saved.get("teacher_sha256"):
        return True
    sha = file_sha256(teacher_ckpt) if teacher_ckpt is not None and Path(teacher_ckpt).is_file() else None
    return not distilled_from_other_teacher(saved, sha)


def train_and_score(variant: Variant, run: RunConfig, drive: Path, layout: Layout, runs: Path, frames, val_frames,
                    teacher_ckpt: Path | None) -> dict:
    """Train (or reuse a finished run), then decode the val split and score it."""
    from imkd_deploy.distill.evaluate import predict_split, results_path
    from imkd_deploy.distill.trainer import fit
    from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission

    out = runs / variant.name
    saved_cfg = out / "config.json"
    saved = json.loads(saved_cfg.read_text()) if saved_cfg.is_file() else None
    # A run of this variant on another drive (or split) in the same --workdir, or distilled from
    # a teacher since retrained into the same path: the run config alone would not tell them apart.
    stale = saved is not None and ("was trained on another drive or split" if not _same_data(saved, drive, layout)
                                   else "was distilled from another teacher" if not _same_teacher(saved, teacher_ckpt)
                                   else None)
    if stale:
        print(f"[{variant.name}] {out} {stale}; training afresh", flush=True)
        shutil.rmtree(out)
        saved = None
    done = out / "ablation_metrics.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if _same_run(record.get("run"), run):
            print(f"[{variant.name}] reusing {done}", flush=True)
            val_results = results_path(Path(record["checkpoint"]), layout.val)
            if "by_condition" not in record and val_results.is_file():
                record["by_condition"] = condition_scores(val_results, drive, layout)
                atomic_write_text(done, json.dumps(record, indent=2))
            return record
    if saved is not None and not _same_run(saved.get("run"), run):
        # fit() would resume it and only a changed max_steps is allowed there, which continues
        # a finished run instead of training a fresh one with its own LR schedule
        print(f"[{variant.name}] {out} holds a run with another config; training afresh", flush=True)
        shutil.rmtree(out)
    t0 = time.perf_counter()
    result = fit(run, drive, out, teacher_ckpt if variant.role == "student" else None, role=variant.role,
                 version=layout.version, split=layout.train, resume=True, progress=False, frames=frames)
    train_s = time.perf_counter() - t0
    results = predict_split(result.checkpoint, drive, layout.version, layout.val, frames=val_frames)
    metrics = evaluate_submission(results, drive, layout.version, layout.val)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
    record = {
        "variant": variant.name, "role": variant.role, "levels": variant.levels,
        "intensity_fusion": variant.intensity_fusion, "note": variant.note,
        "weights": used_weights(variant, run),
        "nds": metrics["nd_score"], "map": metrics["mean_ap"],
        "tp_errors": metrics["tp_errors"], "class_ap": metrics["mean_dist_aps"],
        "train_seconds": round(train_s, 1), "steps": run.train.max_steps,
        "final_losses": {k: v for k, v in last.items() if k not in ("step", "lr", "elapsed_s", "grad_norm")},
        "checkpoint": str(result.checkpoint), "run": run.to_dict(),
        "by_condition": condition_scores(results, drive, layout),
    }
    atomic_write_text(done, json.dumps(record, indent=2))
    print(f"[{variant.name}] NDS {record['nds']:.4f} mAP {record['map']:.4f} ({train_s:.0f} s training)", flush=True)
    return record


def drive_conditions(drive: Path, layout: Layout) -> dict[str, dict[str, int]]:
    """Scenes per condition in each split, e.g. {"mini_val": {"day": 1, "night": 1}}."""
    from imkd_deploy.data.loader import open_nuscenes, scenes_by_condition, split_scene_names

    nusc = open_nuscenes(drive, layout.version)
    return {split: {c: len(n) for c, n in
                    scenes_by_condition(nusc, split_scene_names(drive, layout.version, split)).items()}
            for split in (layout.train, layout.val)}


def condition_scores(results: Path, drive: Path, layout: Layout) -> dict[str, dict]:
    """NDS / mAP of each scene condition (day, rain, night) of the val split, when it holds more than one."""
    from imkd_deploy.data.loader import open_nuscenes, scenes_by_condition, split_scene_names
    from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission

    groups = scenes_by_condition(open_nuscenes(drive, layout.version),
                                 split_scene_names(drive, layout.version, layout.val))
    if len(groups) < 2:
        return {}
    scores = {}
    for condition, names in groups.items():
        m = evaluate_submission(results, drive, layout.version, layout.val, scenes=names,
                                out_dir=results.parent / f"{results.stem}_eval_{condition}")
        scores[condition] = {"nds": m["nd_score"], "map": m["mean_ap"], "scenes": names}
    return scores


def used_weights(variant: Variant, run: RunConfig) -> dict[str, float]:
    """The distillation loss weights the student actually trains with (empty for teacher/none)."""
    if variant.role == "teacher":
        return {}
    d = run.distill
    return {f"w_{level}": getattr(d, f"w_{level}") for level in ("radar", "fused") if d.enabled(level)}


def _weights_cell(r: dict) -> str:
    # Records from before the weight options have no "weights" key; recompute from their run.
    w = r.get("weights")
    if w is None:
        d = r["run"]["distill"]
        w = {} if r["role"] == "teacher" else {
            f"w_{lv}": d[f"w_{lv}"] for lv in ("radar", "fused")
            if "none" not in d["levels"].split("+") and ({"all", lv} & set(d["levels"].split("+")))}
    return ", ".join(f"{k[2:]} {v:g}" for k, v in w.items()) or "—"


def reproduce_command(meta: dict, records: list[dict]) -> str:
    """The command line that reruns these rows: the drive (its writer arguments, or the
    --dataroot it was read from), the schedule, the seeds, the variants and any overrides."""
    cmd = ["python benchmarks/distill_ablation.py --out benchmarks/results"]
    writer = meta.get("writer")
    if writer is not None:
        cmd.append(f"--scenes {writer['scenes']} --samples {writer['samples']}")
        cmd += [f"--{k.replace('_', '-')} {writer[k]}" for k, default in WRITER_DEFAULTS.items()
                if writer.get(k, default) != default]
        cmd.append(f"--drive-seed {meta['drive_seed']}")
    elif "writer" in meta:          # read from --dataroot (results saved before "writer" cannot tell)
        cmd.append(f"--dataroot {meta['drive']}")
    cmd.append(f"--teacher-steps {meta['teacher_steps']} --student-steps {meta['student_steps']}")
    if meta.get("batch_size", TrainConfig().batch_size) != TrainConfig().batch_size:
        cmd.append(f"--batch-size {meta['batch_size']}")
    if meta.get("lr") is not None:
        cmd.append(f"--lr {meta['lr']:g}")
    cmd.append(f"--seed {meta['seed']}")
    if meta.get("teacher_seed", meta["seed"]) != meta["seed"]:
        cmd.append(f"--teacher-seed {meta['teacher_seed']}")
    students = [r["variant"] for r in records if r["role"] == "student"]
    cmd.append(f"--variants {','.join(students)}" if students else '--variants ""')
    if meta.get("threads", 1) != 1:      # thread count changes CPU reduction order, so the digits
        cmd.append(f"--threads {meta['threads']}")
    cmd += [f"--w-{lv} {meta[f'w_{lv}']:g}" for lv in ("radar", "fused") if meta.get(f"w_{lv}") is not None]
    cmd += [f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in meta.get("settings", {}).items()]
    cmd += [f"--camera {k}={json.dumps(v, separators=(',', ':')) if not isinstance(v, str) else v}"
            for k, v in (meta.get("camera") or {}).items()]
    if meta.get("lidar_sweeps") is not None:
        cmd.append(f"--lidar-sweeps {meta['lidar_sweeps']}")
    if meta.get("name", "distill_ablation") != "distill_ablation":
        cmd.append(f"--name {meta['name']}")
    return " ".join(cmd)


def markdown_table(records: list[dict], meta: dict) -> str:
    base = next((r for r in records if r["variant"] == "none"), None)
    camera = ", ".join(f"{k}={v}" for k, v in (meta.get("camera") or {}).items())
    camera = f" (students' camera: {camera})" if camera else ""
    if meta.get("lidar_sweeps") is not None:
        camera += f", {meta['lidar_sweeps']} LiDAR sweeps"
    lines = [
        f"# IMKD distillation ablation (synthetic drive, {meta.get('splits', {}).get('val', 'mini_val')})",
        "",
        f"Drive: {meta['drive']} ({meta['train_samples']} train / {meta['val_samples']} val samples); "
        f"teacher {meta['teacher_steps']} steps, every student {meta['student_steps']} steps, batch "
        f"{meta['batch_size']}, seed {meta['seed']} (teacher seed {meta.get('teacher_seed', meta['seed'])}), `tiny` preset{camera}, "
        f"CPU ({meta['threads']} thread)."
        + "".join(f" {split} scenes: " + ", ".join(f"{n} {c}" for c, n in count.items()) + "."
                  for split, count in meta.get("conditions", {}).items()),
        "",
    ]
    conditions = [c for c in SCENE_CONDITIONS if any(c in r.get("by_condition", {}) for r in records)]
    cond_head = "".join(f" NDS / mAP {c} |" for c in conditions)
    lines += [
        f"| Model | Distillation | KD weights | NDS | mAP | ΔNDS vs plain student |{cond_head} mATE | mASE | mAOE | mAVE | mAAE |",
        "|---|---|---|---|---|---|" + "---|" * len(conditions) + "---|---|---|---|---|",
    ]
    for r in records:
        delta = "" if base is None or r["role"] == "teacher" else f"{100 * (r['nds'] - base['nds']):+.1f}"
        tp = r["tp_errors"]
        by = r.get("by_condition", {})
        cond = "".join(f" {by[c]['nds']:.3f} / {by[c]['map']:.3f} |" if c in by else " |" for c in conditions)
        lines.append(f"| {r['variant']} | {r['note']} | {_weights_cell(r)} | {r['nds']:.4f} | {r['map']:.4f} | {delta} |{cond} "
                     + " | ".join(f"{tp[k]:.3f}" for k in ("trans_err", "scale_err", "orient_err", "vel_err", "attr_err"))
                     + " |")
    lines += ["", "KD weights: the level-1 (radar) / level-2 (fused) distillation loss weights the student trained "
              f"with. ΔNDS in NDS points (x100). Reproduce: `{reproduce_command(meta, records)}`.", ""]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU and the SIMD level torch's kernels use: runs on another CPU round floats
    differently, so a teacher rebuilt there from the same bytes is not the same teacher."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, torch {torch.backends.cpu.get_cpu_capability()}"


def key_values(p: argparse.ArgumentParser, flag: str, items: list[str], fields, what: str) -> dict:
    """``KEY=VALUE`` options as a dict; values parse as JSON (true, 0.5, [128,352]), else stay text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            p.error(f"{flag} {item}: expected KEY=VALUE with KEY {what}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results folder (distill_ablation.json / .md)")
    p.add_argument("--dataroot", type=Path, default=None,
                   help="an existing drive, v1.0-mini or v1.0-synth with splits.json (default: synthesise one)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "imkd_ablation",
                   help="where the synthetic drive and the runs go")
    p.add_argument("--scenes", type=int, default=10,
                   help="synthetic scenes: 10 gives the mini split (8 train + 2 val); more give a v1.0-synth drive "
                        "with every fifth scene in val")
    p.add_argument("--samples", type=int, default=40, help="key frames per synthetic scene")
    p.add_argument("--drive-seed", type=int, default=0, help="writer seed of the synthetic drive")
    for key, (choices, help_) in WRITER_OPTIONS.items():
        p.add_argument(f"--{key.replace('_', '-')}", default=WRITER_DEFAULTS[key], choices=choices, help=help_)
    # The teacher trains 3x longer than a student: at 400 steps it is still far from converged
    # (val NDS 0.395 vs 0.493 at 1200), and a weak teacher has little to pass on.
    p.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS)
    p.add_argument("--student-steps", type=int, default=TrainConfig().max_steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    p.add_argument("--lr", type=float, default=None, help="override TrainConfig.lr for every run")
    p.add_argument("--seed", type=int, default=0, help="seed of every student (and of the teacher unless --teacher-seed)")
    p.add_argument("--teacher-seed", type=int, default=None,
                   help="train (or reuse) the teacher with this seed, so student seeds can share one teacher")
    p.add_argument("--variants", default="none,radar,fused,all,all-nofusion",
                   help=f"student rows, comma-separated, from {','.join(v for v in VARIANTS if v != 'teacher')}")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--w-radar", type=float, default=None,
                   help="level-1 distillation weight for students that use it (default: DistillConfig.w_radar)")
    p.add_argument("--w-fused", type=float, default=None,
                   help="level-2 distillation weight for students that use it (default: DistillConfig.w_fused)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a DistillConfig field for every student, e.g. --set fused_at=encoder (repeatable)")
    p.add_argument("--camera", action="append", default=[], metavar="KEY=VALUE",
                   help="a camera-branch ModelConfig field of every student, e.g. --camera image_size=[128,352] "
                        f"(repeatable; one of {', '.join(CAMERA_FIELDS)})")
    p.add_argument("--lidar-sweeps", type=int, default=None,
                   help=f"LiDAR sweeps of the teacher and the students' loader (default: tiny's {tiny().lidar_sweeps}; "
                        "10 = 0.9 s of the writer's 10 Hz LiDAR). A new teacher: give it its own --workdir, since a "
                        "run directory trained with another config is trained afresh")
    p.add_argument("--name", default="distill_ablation", help="results file stem: OUT/NAME.json and OUT/NAME.md")
    args = p.parse_args(argv)

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS or n == "teacher"]
    if unknown:
        p.error(f"unknown variant(s) {unknown}")
    for flag, w in (("--w-radar", args.w_radar), ("--w-fused", args.w_fused)):
        if w is not None and not w >= 0:
            p.error(f"{flag} must be >= 0, got {w}")
    settings = key_values(p, "--set", args.settings, DistillConfig.__dataclass_fields__, "a DistillConfig field")
    for key in ("levels", "intensity_fusion"):
        if key in settings:
            p.error(f"--set {key}=...: the variant sets {key}; choose variants with --variants")
    # `--variants radar --set w_resp_reg=1` would train level 1 alone: "radar" has no response level
    for key in settings:
        if names and not any(DistillConfig(levels=VARIANTS[n].levels).acts_on(key) for n in names):
            p.error(f"--set {key}=...: acts on level(s) {'/'.join(FIELD_LEVELS[key])}, which none of the variants "
                    f"{','.join(names)} has (radar-resp / fused-resp: one feature level with the response terms)")
    try:
        DistillConfig.from_dict({**DistillConfig().to_dict(), **settings})
    except ConfigError as exc:
        p.error(f"--set: {exc}")
    camera = key_values(p, "--camera", args.camera, CAMERA_FIELDS, f"one of {', '.join(CAMERA_FIELDS)}")
    try:
        student_cfg = student_model(camera, args.lidar_sweeps)
    except ConfigError as exc:
        p.error(f"--camera/--lidar-sweeps: {exc}")
    torch.set_num_threads(args.threads)

    from imkd_deploy.data.loader import NuScenesDrive

    args.workdir.mkdir(parents=True, exist_ok=True)
    writer = {k: getattr(args, k) for k in WRITER_OPTIONS}
    try:
        drive, layout = ensure_drive(args.dataroot, args.workdir, args.scenes, args.samples, args.drive_seed,
                                     **writer)
    except ValueError as exc:      # a scene count or --dataroot the ablation cannot use
        p.error(str(exc))
    # Decode every frame once (JPEGs, sweeps) and share it between the six runs.
    t0 = time.perf_counter()
    # at the students' image size: the teacher reads no images
    train_drive = NuScenesDrive(drive, layout.version, student_cfg, split=layout.train, load_lidar=True)
    frames = [train_drive[i] for i in range(len(train_drive))]
    val_drive = NuScenesDrive(drive, layout.version, student_cfg, split=layout.val, load_lidar=True)
    val_frames = [val_drive[i] for i in range(len(val_drive))]
    print(f"loaded {len(frames)} train / {len(val_frames)} val frames in {time.perf_counter() - t0:.0f} s", flush=True)

    runs = args.workdir / "runs"
    teacher_seed = args.seed if args.teacher_seed is None else args.teacher_seed
    teacher_run = run_config(VARIANTS["teacher"], args.teacher_steps, args.batch_size, teacher_seed, args.lr,
                             lidar_sweeps=args.lidar_sweeps)
    records = [train_and_score(VARIANTS["teacher"], teacher_run, drive, layout, runs, frames, val_frames, None)]
    teacher_ckpt = Path(records[0]["checkpoint"])
    weights = {lv: w for lv, w in (("radar", args.w_radar), ("fused", args.w_fused)) if w is not None}
    for name in names:
        run = run_config(VARIANTS[name], args.student_steps, args.batch_size, args.seed, args.lr, weights, settings,
                         camera, args.lidar_sweeps)
        records.append(train_and_score(VARIANTS[name], run, drive, layout, runs, frames, val_frames, teacher_ckpt))

    # resolved: workdirs that share one drive through a link record the same drive
    meta = {"drive": str(drive.resolve()), "train_samples": len(frames), "val_samples": len(val_frames),
            "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "batch_size": args.batch_size,
            "seed": args.seed, "teacher_seed": teacher_seed, "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu": cpu_name(), "name": args.name, "w_radar": args.w_radar, "w_fused": args.w_fused,
            "settings": settings, "camera": camera, "lidar_sweeps": args.lidar_sweeps, "conditions": drive_conditions(drive, layout),
            "version": layout.version, "splits": {"train": layout.train, "val": layout.val},
            "drive_seed": None if args.dataroot is not None else args.drive_seed,
            "writer": None if args.dataroot is not None else {"scenes": args.scenes, "samples": args.samples, **writer},
            "lr": args.lr}
    table = markdown_table(records, meta)
    atomic_write_text(args.out / f"{args.name}.json", json.dumps({"meta": meta, "rows": records}, indent=2))
    atomic_write_text(args.out / f"{args.name}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
