"""benchmarks/distill_ablation.py: a 10-scene drive is scored on the mini split, a larger one on
the v1.0-synth train/val splits the writer records, with the scene conditions of each split."""

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distill_ablation.py"
_spec = importlib.util.spec_from_file_location("distill_ablation", _SCRIPT)
distill_ablation = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = distill_ablation   # dataclasses look their module up there
_spec.loader.exec_module(distill_ablation)


def test_layout_follows_the_scene_count():
    assert distill_ablation.layout_for_scenes(10) == distill_ablation.MINI
    assert distill_ablation.layout_for_scenes(25) == distill_ablation.SYNTH
    with pytest.raises(ValueError, match="--scenes must be >= 10"):
        distill_ablation.layout_for_scenes(9)


def test_larger_drive_gets_train_and_val_splits(tmp_path):
    drive, layout = distill_ablation.ensure_drive(None, tmp_path, scenes=11, samples=2, seed=0, conditions="mixed",
                                                  night_exposure="auto")
    assert layout == distill_ablation.SYNTH
    assert drive.name == "drive-11scenes-mixed-auto"     # options at their defaults name nothing
    assert (drive / "v1.0-synth" / "splits.json").is_file()
    # every fifth scene (1 and 6 of 0..10) in val; the mixed cycle makes them one day, one night
    assert distill_ablation.drive_conditions(drive, layout) == {
        "train": {"day": 6, "rain": 2, "night": 1}, "val": {"day": 1, "night": 1}}
    # an existing drive passed as --dataroot is recognised by its layout
    assert distill_ablation.ensure_drive(drive, tmp_path, 10, 40, 0)[1] == distill_ablation.SYNTH
    with pytest.raises(ValueError, match="neither v1.0-mini/ nor v1.0-synth/splits.json"):
        distill_ablation.layout_of(tmp_path)


def test_runs_of_another_drive_are_not_reused(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    saved = {"dataroot": str(drive), "version": "v1.0-mini", "split": "mini_train"}
    same = distill_ablation._same_data
    assert same(saved, drive, distill_ablation.MINI)
    assert same({**saved, "dataroot": str(tmp_path / "." / "drive")}, drive, distill_ablation.MINI)
    assert not same({**saved, "dataroot": str(tmp_path / "drive-mixed")}, drive, distill_ablation.MINI)
    assert not same(saved, drive, distill_ablation.SYNTH)       # same folder, other version and split
    assert not same({"version": "v1.0-mini", "split": "mini_train"}, drive, distill_ablation.MINI)


def test_students_of_a_retrained_teacher_are_not_reused(tmp_path):
    teacher = tmp_path / "last.safetensors"
    teacher.write_bytes(b"teacher A")
    saved = {"teacher_sha256": distill_ablation.file_sha256(teacher)}
    same = distill_ablation._same_teacher
    assert same(saved, teacher)
    teacher.write_bytes(b"teacher B")              # retrained into the same path
    assert not same(saved, teacher)
    assert not same(saved, tmp_path / "missing.safetensors")
    assert same({"teacher_sha256": None}, teacher)   # a plain student
    assert same({}, teacher)                         # saved before the hash was recorded


def test_reproduce_command_names_the_drive_and_every_override():
    meta = {"drive": "/w/drive-30scenes-mixed", "drive_seed": 3, "teacher_steps": 3600, "student_steps": 4800,
            "batch_size": 2, "seed": 1, "teacher_seed": 0, "threads": 1, "lr": None, "w_radar": 0.5, "w_fused": None,
            "settings": {"adapter": "conv", "kd_channels": 0.5}, "name": "s1_all30",
            "writer": {"scenes": 30, "samples": 40, "conditions": "mixed", "radar_clutter": "light"}}
    rows = [{"variant": "teacher", "role": "teacher"}, {"variant": "none", "role": "student"},
            {"variant": "all", "role": "student"}]
    assert distill_ablation.reproduce_command(meta, rows) == (
        "python benchmarks/distill_ablation.py --out benchmarks/results --scenes 30 --samples 40 --conditions mixed "
        "--drive-seed 3 --teacher-steps 3600 --student-steps 4800 --seed 1 --teacher-seed 0 "
        "--variants none,all --w-radar 0.5 --set adapter=conv --set kd_channels=0.5 --name s1_all30")
    read = {**meta, "writer": None, "drive_seed": None, "threads": 2, "lr": 0.001, "batch_size": 4,
            "teacher_seed": 1, "w_radar": None, "settings": {}, "name": "distill_ablation"}
    assert distill_ablation.reproduce_command(read, rows[:1]) == (
        "python benchmarks/distill_ablation.py --out benchmarks/results --dataroot /w/drive-30scenes-mixed "
        "--teacher-steps 3600 --student-steps 4800 --batch-size 4 --lr 0.001 --seed 1 --variants \"\" --threads 2")
    swerling = {**meta, "writer": {**meta["writer"], "radar_clutter": "urban", "radar_rcs": "swerling"}}
    assert "--radar-clutter urban --radar-rcs swerling --drive-seed 3 " in distill_ablation.reproduce_command(swerling, rows)
    lamps = {**meta, "writer": {**swerling["writer"], "night_lighting": "lamps"}}
    assert "--radar-rcs swerling --night-lighting lamps --drive-seed 3 " in distill_ablation.reproduce_command(lamps, rows)
    auto = {**meta, "writer": {**lamps["writer"], "night_exposure": "auto"}}
    assert "--night-lighting lamps --night-exposure auto --drive-seed 3 " in distill_ablation.reproduce_command(auto, rows)


def test_camera_overrides_reach_the_students_and_not_the_teacher(capsys):
    camera = {"image_size": [128, 352], "downsample": 8}
    student = distill_ablation.run_config(distill_ablation.VARIANTS["all"], 10, 2, 0, None, camera=camera)
    teacher = distill_ablation.run_config(distill_ablation.VARIANTS["teacher"], 10, 2, 0, None, camera=camera)
    assert tuple(student.model.image_size) == (128, 352) and student.model.downsample == 8
    assert student.model.feature_size == (16, 44)          # nuscenes_r50's feature grid
    # the teacher's run config, and so its reuse key, is that of a round without --camera
    assert teacher.to_dict() == distill_ablation.run_config(distill_ablation.VARIANTS["teacher"], 10, 2, 0, None).to_dict()
    assert student.model.grid == teacher.model.grid
    meta = {"drive": "/w/d", "drive_seed": None, "teacher_steps": 3600, "student_steps": 4800, "batch_size": 2,
            "seed": 0, "threads": 1, "settings": {}, "camera": camera, "writer": None}
    assert distill_ablation.reproduce_command(meta, [{"variant": "none", "role": "student"}]).endswith(
        "--variants none --camera image_size=[128,352] --camera downsample=8")
    for bad, says in ((["grid=1"], "expected KEY=VALUE with KEY one of image_size"),
                      (["image_size=[100,352]"], "must be divisible by downsample")):
        with pytest.raises(SystemExit):
            distill_ablation.main(["--out", "/tmp/unused", "--camera", *bad])
        assert says in capsys.readouterr().err


def test_lidar_sweeps_reach_the_teacher_and_the_students_loader(capsys):
    teacher = distill_ablation.run_config(distill_ablation.VARIANTS["teacher"], 10, 2, 0, None, lidar_sweeps=10)
    student = distill_ablation.run_config(distill_ablation.VARIANTS["all"], 10, 2, 0, None,
                                          camera={"downsample": 8}, lidar_sweeps=10)
    assert teacher.model.lidar_sweeps == 10 and student.model.lidar_sweeps == 10 and student.model.downsample == 8
    # without the option both are tiny's, so earlier rounds' teachers and students are reused
    default = distill_ablation.run_config(distill_ablation.VARIANTS["teacher"], 10, 2, 0, None)
    assert default.model.lidar_sweeps == 5 and teacher.to_dict() != default.to_dict()
    meta = {"drive": "/w/d", "drive_seed": None, "teacher_steps": 3600, "student_steps": 4800, "batch_size": 2,
            "seed": 0, "threads": 1, "settings": {}, "camera": {}, "lidar_sweeps": 10, "writer": None}
    assert distill_ablation.reproduce_command(meta, [{"variant": "none", "role": "student"}]).endswith(
        "--variants none --lidar-sweeps 10")
    assert "--lidar-sweeps" not in distill_ablation.reproduce_command({**meta, "lidar_sweeps": None}, [])
    with pytest.raises(SystemExit):
        distill_ablation.main(["--out", "/tmp/unused", "--lidar-sweeps", "0"])
    assert "lidar_sweeps must be >= 1" in capsys.readouterr().err


def test_results_name_the_cpu_and_its_simd_level():
    import torch

    name = distill_ablation.cpu_name()
    assert name.endswith(f", torch {torch.backends.cpu.get_cpu_capability()}") and len(name) > len(", torch ") + 4


def test_one_level_variants_keep_the_response_terms():
    """radar-resp / fused-resp: one feature level with the --set response terms, to measure each
    level's share of IMKD (the "radar"/"fused" variants drop the response terms with the level)."""
    gated = {"w_resp_reg": 1.0, "resp_reg_gate": True}
    for name, on, off in (("radar-resp", "radar", "fused"), ("fused-resp", "fused", "radar")):
        d = distill_ablation.run_config(distill_ablation.VARIANTS[name], 10, 2, 0, None, settings=gated).distill
        assert d.enabled(on) and d.enabled("resp") and not d.enabled(off)
        assert d.w_resp_reg == 1.0 and d.resp_reg_gate
    plain = distill_ablation.run_config(distill_ablation.VARIANTS["radar"], 10, 2, 0, None, settings=gated).distill
    assert not plain.enabled("resp")


def test_a_setting_no_variant_uses_is_an_error(capsys):
    """`--variants radar --set w_resp_reg=1` once ran level 1 alone while meant with the term."""
    for variants, setting, level in (("radar", "w_resp_reg=1", "resp"), ("none,resp", "kd_until=0.5", "radar/fused"),
                                     ("fused", "lambda_off=0.5", "radar")):
        with pytest.raises(SystemExit):
            distill_ablation.main(["--out", "/tmp/unused", "--variants", variants, "--set", setting])
        err = capsys.readouterr().err
        assert f"--set {setting.split('=')[0]}=...: acts on level(s) {level}, which none of the variants {variants}" in err
    # one variant that uses it is enough, and fields of every run (w_depth) pass anywhere: these stop
    # only at the next check, the scene count
    for variants, setting in (("radar,radar-resp", "w_resp_reg=1"), ("none", "w_depth=0.5"), ("resp", "kd_skip=night")):
        with pytest.raises(SystemExit):
            distill_ablation.main(["--out", "/tmp/unused", "--variants", variants, "--set", setting, "--scenes", "9"])
        assert "--scenes must be >= 10" in capsys.readouterr().err
