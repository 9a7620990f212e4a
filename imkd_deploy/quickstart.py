"""`imkd quickstart`: every stage end to end on a synthetic drive, on a CPU, in minutes.

Each step is keyed by a hash of everything that determines its output (its settings and
the content hashes of the files it reads). A rerun reuses a step whose key matches and says
so; a changed input reruns that step and everything downstream of it. Keys and outputs
live in ``WORKDIR/steps.json``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from imkd_deploy.atomic import atomic_write_text
from imkd_deploy.errors import UserError
from imkd_deploy.export.metadata import file_sha256

VERSION = "v1.0-mini"


@dataclass
class QuickstartSettings:
    """Sized so the whole run takes a few minutes on a 2-core CPU; every field is a CLI option."""

    scenes: int = 10                 # the devkit's mini split: 8 train + 2 val scenes
    samples: int = 12                # key frames per scene
    image_size: str = "800x450"
    seed: int = 0
    teacher_steps: int = 200
    student_steps: int = 200
    batch_size: int = 2
    distill: str = "all"
    calib_frames: int = 32
    calib_method: str = "percentile"  # ORT's entropy search costs ~40 s a model here; percentile ~5 s
    threads: int = 0                 # torch intra-op threads; 0 = torch's default


@dataclass
class StepRecord:
    key: str
    outputs: dict
    seconds: float
    reused: bool = False


@dataclass
class QuickstartResult:
    workdir: Path
    steps: dict[str, StepRecord] = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)     # one row per backend/precision
    picture: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _drive_hash(dataroot: Path) -> str:
    """The drive's tables: enough to know it is the same drive (sensor files follow from them)."""
    h = hashlib.sha256()
    for table in sorted((dataroot / VERSION).glob("*.json")):
        h.update(table.name.encode())
        h.update(file_sha256(table).encode())
    return h.hexdigest()[:16]


class StepRunner:
    def __init__(self, workdir: Path, log: Callable[[str], None]):
        self.workdir = workdir
        self.path = workdir / "steps.json"
        self.log = log
        self.records: dict[str, StepRecord] = {}
        self._old: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self._old = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self._old = {}

    def run(self, index: int, total: int, name: str, key: str, fn: Callable[[], dict],
            outputs_exist: Callable[[dict], bool]) -> StepRecord:
        old = self._old.get(name)
        if old and old.get("key") == key and outputs_exist(old["outputs"]):
            rec = StepRecord(key, old["outputs"], old["seconds"], reused=True)
            self.log(f"[{index}/{total}] {name}: reused (key {key} matches; took {old['seconds']:.0f} s before)")
        else:
            why = "no earlier run" if not old else ("inputs changed" if old.get("key") != key else "outputs missing")
            self.log(f"[{index}/{total}] {name}: running ({why}) ...")
            t0 = time.perf_counter()
            outputs = fn()
            rec = StepRecord(key, outputs, time.perf_counter() - t0)
            self.log(f"[{index}/{total}] {name}: done in {rec.seconds:.1f} s")
        self.records[name] = rec
        self._old[name] = {"key": rec.key, "outputs": rec.outputs, "seconds": rec.seconds}
        atomic_write_text(self.path, json.dumps(self._old, indent=2, sort_keys=True))
        return rec


def _files_exist(*names: str) -> Callable[[dict], bool]:
    return lambda outputs: all(outputs.get(n) and Path(outputs[n]).exists() for n in names)


def tensorrt_flavour() -> str | None:
    """The TensorRT flavour that can build engines here, if any."""
    from imkd_deploy.engines.flavour import load_tensorrt

    for backend in ("tensorrt", "tensorrt-rtx"):
        try:
            load_tensorrt(backend)
            return backend
        except Exception:
            continue
    return None


def run_quickstart(workdir: Path, settings: QuickstartSettings | None = None,
                   log: Callable[[str], None] = print, progress: bool = True) -> QuickstartResult:
    import torch

    from imkd_deploy.distill.trainer import resolve_run_config, train
    from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission

    s = settings or QuickstartSettings()
    if s.threads:
        torch.set_num_threads(s.threads)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    runner = StepRunner(workdir, log)
    result = QuickstartResult(workdir)
    t_start = time.perf_counter()
    total = 9
    drive = workdir / "drive"

    # 1. synthetic drive
    def synth() -> dict:
        from imkd_deploy.data.synth import SynthConfig, write_drive

        if drive.exists():
            import shutil

            shutil.rmtree(drive)
        w, h = (int(v) for v in s.image_size.split("x"))
        write_drive(drive, SynthConfig(version=VERSION, num_scenes=s.scenes, samples_per_scene=s.samples,
                                       image_width=w, image_height=h, seed=s.seed))
        return {"dataroot": str(drive), "tables": _drive_hash(drive)}

    k_synth = _key("synth", s.scenes, s.samples, s.image_size, s.seed, VERSION)
    rec = runner.run(1, total, "synth drive", k_synth, synth, _files_exist("dataroot"))
    drive_key = rec.outputs["tables"]

    # 2. teacher
    def train_role(role: str, steps: int, out: Path, teacher: Path | None = None) -> dict:
        run_cfg = resolve_run_config("tiny", distill=s.distill if role == "student" else None, max_steps=steps,
                                     seed=s.seed, batch_size=s.batch_size)
        ckpt = train(run_cfg, drive, out, teacher, role=role, version=VERSION, split="mini_train",
                     resume=False, progress=progress)
        return {"checkpoint": str(ckpt), "sha256": file_sha256(ckpt)}

    k_teacher = _key("teacher", drive_key, s.teacher_steps, s.batch_size, s.seed)
    teacher = runner.run(2, total, "train teacher (LiDAR)", k_teacher,
                         lambda: train_role("teacher", s.teacher_steps, workdir / "teacher"), _files_exist("checkpoint"))

    # 3. student, distilled from the teacher
    k_student = _key("student", drive_key, teacher.outputs["sha256"], s.student_steps, s.batch_size, s.seed, s.distill)
    student = runner.run(3, total, f"train student (camera+radar, distill {s.distill})", k_student,
                         lambda: train_role("student", s.student_steps, workdir / "student",
                                            Path(teacher.outputs["checkpoint"])), _files_exist("checkpoint"))
    ckpt = Path(student.outputs["checkpoint"])

    # 4. eval the torch model
    def eval_torch() -> dict:
        from imkd_deploy.distill.evaluate import predict_split
        from imkd_deploy.runtime.pipeline import Pipeline

        path = predict_split(ckpt, drive, VERSION, "mini_val", out=workdir / "results" / "torch_fp32.json")
        metrics = evaluate_submission(path, drive, VERSION, "mini_val")
        lat = _latency(Pipeline.from_model(ckpt), drive)
        teacher_res = predict_split(Path(teacher.outputs["checkpoint"]), drive, VERSION, "mini_val",
                                    out=workdir / "results" / "teacher.json")
        tm = evaluate_submission(teacher_res, drive, VERSION, "mini_val")
        return {"results": str(path), "nds": metrics["nd_score"], "map": metrics["mean_ap"], "latency": lat,
                "teacher_nds": tm["nd_score"], "teacher_map": tm["mean_ap"]}

    ev = runner.run(4, total, "eval (torch, mini_val)", _key("eval", student.outputs["sha256"], drive_key),
                    eval_torch, _files_exist("results"))

    # 5. export: the fast ONNX Runtime form, and the TensorRT-parsable form for engines
    def export() -> dict:
        from imkd_deploy.export.onnx_export import export_checkpoint

        out = {}
        for ops in ("onnx", "tensorrt"):
            res = export_checkpoint(ckpt, workdir / "export" / f"student_{ops}.onnx", ops, dataroot=drive, version=VERSION)
            if not res.passed:
                raise UserError(f"export --ops {ops}: parity against torch failed: " + "; ".join(r.line() for r in res.parity if not r.passed))
            out[ops] = str(res.path)
            out[f"{ops}_parity"] = max(r.max_abs for r in res.parity)
        return out

    ex = runner.run(5, total, "export ONNX (--ops onnx, --ops tensorrt) + parity", _key("export", student.outputs["sha256"]),
                    export, _files_exist("onnx", "tensorrt"))

    # 6. INT8 calibration (both exports share the calibration set)
    calib_manifest = workdir / "calibration" / f"mini_train_{s.calib_frames}.txt"

    def calibrate() -> dict:
        from imkd_deploy.calibration.calib_set import make_set, samples_by_scene
        from imkd_deploy.calibration.feeds import calibrate_from_drive

        cset = make_set(samples_by_scene(drive, VERSION, "mini_train"), s.calib_frames, VERSION, "mini_train")
        cset.write(calib_manifest)
        for w in cset.warnings:
            runner.log(f"warning: {w}")
        out = {"set": str(calib_manifest), "set_sha256": cset.sha256}
        for ops in ("onnx", "tensorrt"):
            res = calibrate_from_drive(Path(ex.outputs[ops]), calib_manifest, "int8", None, drive, s.calib_method,
                                       cache_dir=workdir / "calibration" / "cache")
            out[f"{ops}_int8"] = str(res.out_path)
        return out

    cal = runner.run(6, total, f"calibrate INT8 ({s.calib_frames} frames, {s.calib_method})",
                     _key("calibrate", file_sha256(Path(ex.outputs["onnx"])), file_sha256(Path(ex.outputs["tensorrt"])),
                          drive_key, s.calib_frames, s.calib_method), calibrate, _files_exist("onnx_int8", "tensorrt_int8"))

    # 7. engine, when a TensorRT flavour is installed (TensorRT-RTX builds without a GPU)
    flavour = tensorrt_flavour()

    def build() -> dict:
        from imkd_deploy.calibration.calib_set import read_manifest
        from imkd_deploy.calibration.feeds import frame_feeds
        from imkd_deploy.config import ModelConfig
        from imkd_deploy.engines.builder import BuildSettings, build_engine
        from imkd_deploy.engines.profiles import profiles_from_feeds
        from imkd_deploy.export.metadata import read_metadata

        if flavour is None:
            return {"skipped": "no TensorRT flavour installed (pip install -e '.[rtx]' or '.[tensorrt]')"}
        model = Path(cal.outputs["tensorrt_int8"])
        cset = read_manifest(calib_manifest)
        feed = frame_feeds(drive, cset, ModelConfig.from_dict(read_metadata(Path(ex.outputs["tensorrt"]))["config"]))
        profiles = profiles_from_feeds(feed(e) for e in cset.entries)
        res = build_engine(model, workdir / "engines" / "student_int8.engine",
                           BuildSettings(backend=flavour, profiles=profiles, calibration_set=calib_manifest))
        return {"engine": str(res.engine_path), "sidecar": str(res.sidecar_path), "backend": res.backend,
                "version": res.trt_version, "size_mb": res.size_bytes / 1e6, "build_s": res.seconds}

    eng = runner.run(7, total, f"build engine ({flavour or 'no TensorRT'}, INT8)",
                     _key("engine", file_sha256(Path(cal.outputs["tensorrt_int8"])), flavour),
                     build, lambda o: "skipped" in o or _files_exist("engine")(o))

    # 8. infer on mini_val with every CPU backend (an engine needs a GPU to run)
    def infer_all() -> dict:
        from imkd_deploy.runtime.infer import infer_drive

        out = {}
        for label, model in (("onnxruntime_fp32", ex.outputs["onnx"]), ("onnxruntime_int8", cal.outputs["onnx_int8"])):
            summary = infer_drive(Path(model), drive, VERSION, workdir / "results" / f"{label}.json", split="mini_val",
                                  progress=progress)
            out[label] = {"results": str(summary.out), "latency": summary.latency_ms, "skipped": len(summary.skipped)}
        return out

    inf = runner.run(8, total, "infer mini_val (ONNX Runtime FP32 + INT8)",
                     _key("infer", cal.key, ex.key, drive_key), infer_all,
                     lambda o: all(Path(v["results"]).exists() for v in o.values()))

    # 9. eval every backend's submission + one BEV picture
    def eval_all() -> dict:
        out = {}
        for label, rec in inf.outputs.items():
            m = evaluate_submission(Path(rec["results"]), drive, VERSION, "mini_val")
            out[label] = {"nds": m["nd_score"], "map": m["mean_ap"]}
        out["picture"] = str(_picture(Path(ex.outputs["onnx"]), drive, workdir / "bev.png"))
        return out

    fin = runner.run(9, total, "eval + picture", _key("final", inf.key), eval_all, _files_exist("picture"))

    result.steps = runner.records
    result.table = [
        {"backend": "torch (teacher, LiDAR)", "precision": "fp32", "nds": ev.outputs["teacher_nds"],
         "map": ev.outputs["teacher_map"], "latency_ms": None},
        {"backend": "torch", "precision": "fp32", "nds": ev.outputs["nds"], "map": ev.outputs["map"],
         "latency_ms": ev.outputs["latency"]},
    ]
    for label, prec in (("onnxruntime_fp32", "fp32"), ("onnxruntime_int8", "int8")):
        result.table.append({"backend": "onnxruntime", "precision": prec, "nds": fin.outputs[label]["nds"],
                             "map": fin.outputs[label]["map"], "latency_ms": inf.outputs[label]["latency"]})
    if "engine" in eng.outputs:
        result.notes.append(f"engine {eng.outputs['engine']} ({eng.outputs['backend']} {eng.outputs['version']}, "
                            f"{eng.outputs['size_mb']:.1f} MB): runs on an NVIDIA GPU (`imkd infer --model ...engine`)")
    else:
        result.notes.append(f"engine: {eng.outputs['skipped']}")
    result.picture = Path(fin.outputs["picture"])
    result.seconds = time.perf_counter() - t_start
    atomic_write_text(workdir / "summary.json", json.dumps(
        {"table": result.table, "notes": result.notes, "seconds": result.seconds, "settings": asdict(s),
         "steps": {k: asdict(v) for k, v in result.steps.items()}}, indent=2, default=str))
    return result


def _latency(pipeline, drive: Path, frames: int = 6) -> dict:
    """p50 per stage over a few val frames (the infer step measures the ONNX backends)."""
    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.runtime.pipeline import latency_table

    ds = NuScenesDrive(drive, VERSION, pipeline.cfg, split="mini_val")
    pipeline(ds[0])                                             # warm-up
    timings = [pipeline(ds[i]).timings for i in range(1, min(frames + 1, len(ds)))]
    return latency_table(timings)


def _picture(model: Path, drive: Path, out_png: Path) -> Path:
    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.data.render import render_detections
    from imkd_deploy.runtime.pipeline import Pipeline

    pipe = Pipeline.from_model(model, score_threshold=0.3)
    ds = NuScenesDrive(drive, VERSION, pipe.cfg, split="mini_val", load_lidar=True)
    frame = ds[len(ds) // 2]
    return render_detections(frame, pipe(frame).detections, out_png,
                             title=f"{frame.scene_name} {frame.sample_token}: ONNX Runtime detections (score > 0.3) over GT")
