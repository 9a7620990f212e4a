"""benchmarks/distill_seeds.py: the seed table pairs each distilled student with the plain
student of its own seed, and keeps rows run on fewer seeds aligned to their seeds."""

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distill_seeds.py"
_spec = importlib.util.spec_from_file_location("distill_seeds", _SCRIPT)
distill_seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(distill_seeds)


def _row(variant: str, nds: float, mean_ap: float) -> dict:
    return {"variant": variant, "role": "student", "note": f"{variant} note", "nds": nds, "map": mean_ap,
            "tp_errors": {"trans_err": 0.5, "vel_err": 0.9}}


def _write(tmp: Path, name: str, seed: int, rows: list[dict], student_steps: int = 1600, **meta_extra) -> Path:
    meta = {"drive": "/d", "teacher_steps": 1200, "student_steps": student_steps, "batch_size": 2,
            "val_samples": 80, "train_samples": 320, "seed": seed, "teacher_seed": 0, **meta_extra}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def _table_row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_paired_deltas_and_seed_alignment(tmp_path):
    files = [
        _write(tmp_path, "s0", 0, [_row("none", 0.400, 0.300), _row("all", 0.420, 0.310), _row("radar", 0.390, 0.320)]),
        _write(tmp_path, "s1", 1, [_row("none", 0.450, 0.350), _row("all", 0.440, 0.370)]),
    ]
    table = distill_seeds.summarise(files)
    cells = _table_row(table, "all")
    # all - none per seed: +2.0 and -1.0 points; mean +0.5, sd 2.1
    assert cells[2] == "0.420 / 0.440"
    assert cells[5] == "+0.5 ± 2.1 (+2.0, -1.0)"
    # t(0.975, 1 dof) = 12.706: half width 12.706 * 2.121 / sqrt(2) = 19.06 points
    assert cells[6] == "[-18.6, +19.6]"
    assert cells[7] == "+1.5 ± 0.7 (+1.0, +2.0)"
    radar = _table_row(table, "radar")
    assert radar[2] == "0.390 / —"  # only seed 0 ran level 1; its slot for seed 1 stays empty
    assert radar[5] == "-1.0 (-1.0)"
    assert radar[6] == "—"  # one pair gives no interval


def test_a_plain_student_with_a_loss_setting_is_its_own_row_paired_with_the_plain_student(tmp_path):
    # kd_until acts on no plain student: that row stays the plain student; w_dense_reg (a detection
    # loss) makes another baseline, which must not replace it in the pairing
    files = [_write(tmp_path, "s0", 0, [_row("none", 0.400, 0.300), _row("all", 0.420, 0.310)], settings={"kd_until": 0.5}),
             _write(tmp_path, "d0", 0, [_row("none", 0.410, 0.320)], settings={"w_dense_reg": 1})]
    table = distill_seeds.summarise(files)
    assert _table_row(table, "none")[2] == "0.400"
    dense = _table_row(table, "none (w_dense_reg=1)")
    assert dense[2] == "0.410" and dense[5] == "+1.0 (+1.0)"
    assert _table_row(table, "all (kd_until=0.5)")[5] == "+2.0 (+2.0)"


def test_says_when_the_seeds_files_hold_different_teachers(tmp_path):
    teacher = {**_row("teacher", 0.634, 0.60), "role": "teacher"}
    same = [_write(tmp_path, f"s{s}", s, [teacher, _row("none", 0.4, 0.3)]) for s in (0, 1)]
    assert "different teachers" not in distill_seeds.summarise(same)
    rebuilt = _write(tmp_path, "s2", 2, [{**teacher, "nds": 0.6325}, _row("none", 0.4, 0.3)])
    table = distill_seeds.summarise(same + [rebuilt])
    assert _table_row(table, "teacher")[2] == "0.634 / 0.634 / 0.632"
    assert "different teachers (NDS seed 0: 0.6340, seed 1: 0.6340, seed 2: 0.6325)" in table


def test_refuses_runs_of_different_budgets(tmp_path):
    a = _write(tmp_path, "a", 0, [_row("none", 0.4, 0.3)])
    b = _write(tmp_path, "b", 1, [_row("none", 0.4, 0.3)], student_steps=400)
    with pytest.raises(SystemExit, match="b.json.*student_steps"):
        distill_seeds.summarise([a, b])


def test_students_of_another_camera_are_not_paired_with_the_plain_student(tmp_path):
    old = _write(tmp_path, "old", 0, [_row("none", 0.4, 0.3)])       # saved before --camera: no key
    plain = _write(tmp_path, "s1", 1, [_row("none", 0.4, 0.3)])
    meta = json.loads(plain.read_text())
    meta["meta"]["camera"] = {}
    plain.write_text(json.dumps(meta))
    assert "| none |" in distill_seeds.summarise([old, plain])
    meta["meta"]["camera"] = {"image_size": [128, 352], "downsample": 8}
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="wide.json.*camera"):
        distill_seeds.summarise([old, wide])
    assert "students' camera image_size=[128, 352], downsample=8." in distill_seeds.summarise([wide])
    meta["meta"]["lidar_sweeps"] = 10
    ls10 = tmp_path / "ls10.json"
    ls10.write_text(json.dumps(meta))
    assert "downsample=8, 10 LiDAR sweeps." in distill_seeds.summarise([ls10])


def test_teachers_on_other_lidar_sweeps_keep_their_rows_and_share_the_plain_student(tmp_path):
    teacher5, teacher10 = ({**_row("teacher", nds, 0.6), "role": "teacher"} for nds in (0.630, 0.640))
    plain = [_write(tmp_path, f"s{s}_none", s, [teacher5, _row("none", 0.49 - 0.004 * s, 0.36)]) for s in (0, 1)]
    kd = []
    for s, nds in ((0, 0.480), (1, 0.470)):
        path = _write(tmp_path, f"s{s}_ls10", s, [teacher10, _row("all", nds, 0.35)])
        run = json.loads(path.read_text())
        run["meta"]["lidar_sweeps"] = 10
        path.write_text(json.dumps(run))
        kd.append(path)
    table = distill_seeds.summarise(plain + kd)
    assert _table_row(table, "teacher [5 LiDAR sweeps]")[2] == "0.630 / 0.630"
    assert _table_row(table, "teacher [10 LiDAR sweeps]")[2] == "0.640 / 0.640"
    # all - none: 0.480 - 0.490 and 0.470 - 0.486
    assert _table_row(table, "all [10 LiDAR sweeps]")[5] == "-1.3 ± 0.4 (-1.0, -1.6)"
    assert "different teachers" not in table and "different LiDAR sweeps" in table


def test_the_same_drive_written_in_another_workdir_pairs_but_another_drive_does_not(tmp_path):
    writer = {"scenes": 30, "night_exposure": "auto"}

    def run(name: str, seed: int, drive: str, **meta_extra) -> Path:
        return _write(tmp_path, name, seed, [_row("none", 0.4, 0.3)],
                      **{"drive": drive, "drive_seed": 0, "writer": writer, **meta_extra})

    a = run("a", 0, "/tmp/w1/drive-30scenes-auto")
    moved = run("moved", 1, "/tmp/w2/drive-30scenes-auto")
    assert "| none |" in distill_seeds.summarise([a, moved])
    for name, drive, extra in (("other", "/tmp/w2/drive-30scenes", {}),
                               ("reseeded", "/tmp/w2/drive-30scenes-auto", {"drive_seed": 1})):
        with pytest.raises(SystemExit, match=f"{name}.json.*drive"):
            distill_seeds.summarise([a, run(name, 2, drive, **extra)])


def test_refuses_runs_trained_on_another_cpu(tmp_path):
    def run(name: str, seed: int, cpu: str | None) -> Path:
        return _write(tmp_path, name, seed, [_row("none", 0.4, 0.3)], **({} if cpu is None else {"cpu": cpu}))

    epyc = run("epyc", 0, "AMD EPYC, torch AVX512")
    assert "| none |" in distill_seeds.summarise([epyc, run("epyc1", 1, "AMD EPYC, torch AVX512")])
    assert "| none |" in distill_seeds.summarise([epyc, run("unknown", 1, None)])  # older files: no field
    with pytest.raises(SystemExit, match="xeon.json.*cpu"):
        distill_seeds.summarise([epyc, run("xeon", 1, "Intel Xeon, torch AVX512")])
