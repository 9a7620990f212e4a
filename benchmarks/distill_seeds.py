"""Combine several ``distill_ablation.py`` result files (one per student seed) into one table:
each variant's NDS / mAP per seed, their mean and standard deviation, and the paired
difference to the plain student (same seed, same teacher), which cancels part of the seed noise,
with its 95% confidence interval (Student's t over the seeds): an interval that contains 0
means the seeds do not show a difference either way.

    python benchmarks/distill_seeds.py benchmarks/results/imkd_seed0.json ... \\
        --out benchmarks/results/imkd_seeds.md

Every file must come from the same drive, teacher, step counts and CPU; the student seed and the
distillation settings may differ (rows with other ``--set``/``--w-*`` settings get their own
line, paired with the plain student of their seed from any file). The table goes to ``--out`` (written atomically) and to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from scipy import stats

from imkd_deploy.atomic import atomic_write_text
from imkd_deploy.config import SCENE_CONDITIONS, DistillConfig, tiny

SAME = ("teacher_steps", "student_steps", "batch_size", "val_samples")


def _drive(meta: dict) -> tuple:
    """The drive a run read, wherever it was written: the writer is deterministic, so the folder
    name (which spells its options), the drive seed and the writer options identify it."""
    return Path(meta["drive"]).name, meta.get("drive_seed"), meta.get("writer")


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _delta(values: list[float]) -> str:
    if not values:
        return "—"
    points = [100 * v for v in values]
    sd = f" ± {statistics.stdev(points):.1f}" if len(points) > 1 else ""
    return f"{statistics.mean(points):+.1f}{sd} ({', '.join(f'{p:+.1f}' for p in points)})"


def _interval(values: list[float]) -> str:
    """95% t-interval of the mean paired difference, in points. Too few seeds give a wide
    interval rather than none, so a two-seed row cannot pass for a result."""
    if len(values) < 2:
        return "—"
    points = [100 * v for v in values]
    mean = statistics.mean(points)
    half = stats.t.ppf(0.975, len(points) - 1) * statistics.stdev(points) / len(points) ** 0.5
    return f"[{mean - half:+.1f}, {mean + half:+.1f}]"


def _label(row: dict, meta: dict) -> str:
    """Row name: the variant, plus the settings it trained with when a file sets any, so one
    table can hold e.g. ``all`` and ``all (fused_at=encoder)``. The teacher depends on none of
    them, the plain student only on those that act without a distillation level (``none
    (w_dense_reg=1)`` is another baseline, not the plain student)."""
    if row["variant"] == "teacher":
        return row["variant"]
    settings = meta.get("settings") or {}
    if row["variant"] == "none":
        settings = {k: v for k, v in settings.items() if DistillConfig(levels="none").acts_on(k)}
    extra = {**{k: v for k, v in (row.get("weights") or {}).items() if meta.get(k) is not None},
             **settings}
    return row["variant"] + (" (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")" if extra else "")


def summarise(files: list[Path]) -> str:
    runs = [json.loads(f.read_text()) for f in files]
    first = runs[0]["meta"]
    for f, r in zip(files, runs):
        diff = [k for k in SAME if r["meta"].get(k) != first.get(k)]
        if _drive(r["meta"]) != _drive(first):
            diff.append("drive")
        # students with another camera pair only with the plain student of that camera
        if (r["meta"].get("camera") or {}) != (first.get("camera") or {}):
            diff.append("camera")
        # Training is not bit-reproducible across CPUs (the round-19 teacher command gave val NDS
        # 0.6493 on an AMD EPYC, 0.6353 on an Intel Xeon), so a plain student trained on another
        # machine is another model. Files written before the field existed carry no CPU.
        if len({r["meta"].get("cpu"), first.get("cpu")} - {None}) > 1:
            diff.append("cpu")
        if diff:
            raise SystemExit(f"{f}: differs from {files[0]} in {diff}; combine only runs of one setting")
    # Files may hold teachers on other LiDAR sweeps. The plain student reads only the key
    # sweep (its depth targets), so it trains bit for bit the same at any sweep count
    # (test_plain_student_does_not_depend_on_the_lidar_sweeps) and pairs across them; the
    # teachers and their distilled students are told apart by their sweeps.
    def lidar_sweeps(meta: dict) -> int:
        return meta.get("lidar_sweeps") or tiny().lidar_sweeps      # None: tiny's default

    sweeps = {lidar_sweeps(r["meta"]) for r in runs}
    seeds = sorted({r["meta"]["seed"] for r in runs})
    rows: dict[str, dict[int, dict]] = {}
    for r in runs:
        for row in r["rows"]:
            label = _label(row, r["meta"])
            if len(sweeps) > 1 and row["variant"] != "none":
                label += f" [{lidar_sweeps(r['meta'])} LiDAR sweeps]"
            rows.setdefault(label, {})[r["meta"]["seed"]] = row
    conditions = [c for c in SCENE_CONDITIONS
                  if any(c in row.get("by_condition", {}) for by_seed in rows.values() for row in by_seed.values())]
    lines = [
        "# IMKD ablation over student seeds",
        "",
        f"Drive {first['drive']} ({first.get('train_samples', '?')} train / {first['val_samples']} val samples), "
        f"teacher {first['teacher_steps']} steps (teacher seed {first.get('teacher_seed', first['seed'])}), "
        f"students {first['student_steps']} steps, batch {first['batch_size']}, student seeds {seeds}"
        + (", students' camera " + ", ".join(f"{k}={v}" for k, v in first["camera"].items()) if first.get("camera") else "")
        + (f", {first['lidar_sweeps']} LiDAR sweeps" if len(sweeps) == 1 and first.get("lidar_sweeps") is not None else "")
        + ".",
        "Files: " + ", ".join(f"`{f.name}`" for f in files) + ".",
        "",
        "| Model | Distillation | NDS per seed | NDS mean ± sd | mAP mean ± sd | ΔNDS vs plain (paired) | ΔNDS 95% CI | ΔmAP vs plain (paired) | mATE / mAVE mean |"
        + "".join(f" NDS {c}: mean, Δ paired |" for c in conditions),
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(conditions),
    ]
    base = rows.get("none", {})
    for name, by_seed in rows.items():
        ordered = [by_seed[s] for s in seeds if s in by_seed]
        nds, mean_ap = [r["nds"] for r in ordered], [r["map"] for r in ordered]
        paired = [s for s in seeds if s in by_seed and s in base]
        reference = name == "none" or name.startswith("teacher")
        if reference:
            d_nds = d_map = ci_nds = ""
        else:
            diffs = [by_seed[s]["nds"] - base[s]["nds"] for s in paired]
            d_nds, ci_nds = _delta(diffs), _interval(diffs)
            d_map = _delta([by_seed[s]["map"] - base[s]["map"] for s in paired])
        def tp(key: str) -> float:
            return statistics.mean(r["tp_errors"][key] for r in ordered)

        cells = ""
        for c in conditions:
            have = [s for s in seeds if c in by_seed.get(s, {}).get("by_condition", {})]
            mean_c = statistics.mean(by_seed[s]["by_condition"][c]["nds"] for s in have) if have else None
            pairs = [s for s in have if c in base.get(s, {}).get("by_condition", {})]
            delta_c = "" if reference else ", " + _delta(
                [by_seed[s]["by_condition"][c]["nds"] - base[s]["by_condition"][c]["nds"] for s in pairs])
            cells += f" {mean_c:.3f}{delta_c} |" if mean_c is not None else " — |"
        # one slot per seed of the table, so rows run on fewer seeds stay readable
        per_seed = " / ".join(f"{by_seed[s]['nds']:.3f}" if s in by_seed else "—" for s in seeds)
        lines.append(f"| {name} | {ordered[0]['note']} | {per_seed} | {_mean_sd(nds)} | "
                     f"{_mean_sd(mean_ap)} | {d_nds} | {ci_nds} | {d_map} | {tp('trans_err'):.3f} / {tp('vel_err'):.3f} |{cells}")
    lines += ["", "Δ in points (x100): mean ± sd over seeds of (variant − plain student) at the same seed, "
              "then the per-seed values; the 95% CI is Student's t over the seeds. The teacher row repeats "
              "when every seed shares one teacher.", ""]
    # Files that agree on every SAME key can still hold teachers trained apart (a rebuilt work
    # directory): say so, since the distilled rows then learnt from different teachers.
    for label in (name for name in rows if name.startswith("teacher")):
        teachers = {s: row["nds"] for s, row in rows[label].items()}
        if len({round(v, 6) for v in teachers.values()}) > 1:
            lines += [f"The seeds' files hold different teachers{label[len('teacher'):]} (NDS "
                      + ", ".join(f"seed {s}: {v:.4f}" for s, v in sorted(teachers.items()))
                      + "): each distilled student learnt from its own file's teacher.", ""]
    if len(sweeps) > 1:
        lines += ["The files hold teachers on different LiDAR sweeps; each teacher and distilled row names "
                  "its sweeps. The plain student reads only the key sweep, so it is the same model at "
                  "any sweep count and pairs with all of them.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="distill_ablation.py result JSON files")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        p.error(f"no such result file: {', '.join(missing)} (distill_ablation.py writes OUT/NAME.json when a run ends)")
    table = summarise(args.files)
    if args.out is not None:
        atomic_write_text(args.out, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
