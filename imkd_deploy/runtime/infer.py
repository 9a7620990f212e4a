"""`imkd infer`: a pipeline over recorded drives, robust to bad frames and interruptions.

- Bad frames (corrupt/missing JPEG, missing or empty radar, NaN points, any load error) are
  reported by name and skipped; they appear in the submission with no boxes, so the file
  still covers the split and scores them as misses.
- A journal (``OUT.journal.jsonl``, one line per finished frame, flushed) lets ``--resume``
  continue an interrupted run; the final JSON is assembled in drive order from the journal,
  so it is byte-identical to an uninterrupted run.
- ``shard=(i, n)`` (or torchrun's RANK/WORLD_SIZE) gives process i every n-th scene and writes
  ``OUT.part-i-of-n.json``; :func:`merge_parts` joins them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imkd_deploy.errors import UserError
from imkd_deploy.export.metadata import file_sha256
from imkd_deploy.runtime.boxes import write_submission
from imkd_deploy.runtime.pipeline import Pipeline, latency_table

log = logging.getLogger(__name__)


@dataclass
class InferSummary:
    out: Path
    frames: int
    processed: int
    resumed: int
    skipped: dict[str, str] = field(default_factory=dict)    # sample_token -> reason
    latency_ms: dict = field(default_factory=dict)
    seconds: float = 0.0
    backend: str = ""
    metrics: dict | None = None
    rendered: list[Path] = field(default_factory=list)


def frame_problems(frame) -> list[str]:
    """Why a frame cannot be trusted; empty when it is fine."""
    problems = list(frame.degraded)
    if frame.radar_points is None or len(frame.radar_points) == 0:
        problems.append("no radar returns in any of the 5 radars")
    elif not np.isfinite(frame.radar_points).all():
        problems.append("radar points contain NaN/inf")
    if frame.lidar_points is not None and len(frame.lidar_points) and not np.isfinite(frame.lidar_points).all():
        problems.append("lidar points contain NaN/inf")
    return problems


def shard_from_env() -> tuple[int, int] | None:
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    return None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


def part_path(out: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None:
        return out
    i, n = shard
    return out.with_name(f"{out.stem}.part-{i}-of-{n}{out.suffix}")


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal.jsonl")


def _read_journal(path: Path) -> tuple[dict | None, dict[str, dict]]:
    """(header, sample_token -> record) of a journal; ({}, {}) when there is none."""
    header, done = None, {}
    if not path.is_file():
        return header, done
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break   # a line cut by the interruption: that frame is simply redone
            if "header" in rec:
                header = rec["header"]
            else:
                done[rec["sample_token"]] = rec
    return header, done


def infer_drive(model: Path, dataroot: Path, version: str, out: Path, *, split: str | None = None,
                scenes: list[str] | None = None, shard: tuple[int, int] | None = None, resume: bool = False,
                score_threshold: float = 0.05, backend: str | None = None, render_dir: Path | None = None,
                progress: bool = True, max_frames: int | None = None, console=None) -> InferSummary:
    from imkd_deploy.data.loader import NuScenesDrive

    t_start = time.perf_counter()
    pipeline = Pipeline.from_model(model, backend=backend, score_threshold=score_threshold)
    drive = NuScenesDrive(dataroot, version, pipeline.cfg, split=split, scenes=scenes)
    shard = shard or shard_from_env()
    nusc = drive.nusc
    scene_names = [nusc.get("scene", nusc.get("sample", t)["scene_token"])["name"] for t in drive.sample_tokens]
    indices = list(range(len(drive)))
    if shard is not None:
        names = sorted(set(scene_names))
        mine = set(names[shard[0]::shard[1]])
        indices = [i for i in indices if scene_names[i] in mine]
    if max_frames is not None:
        indices = indices[:max_frames]
    tokens = [drive.sample_tokens[i] for i in indices]
    target = part_path(Path(out), shard)
    journal = journal_path(target)
    # what the journal's frames were computed with: resuming under anything else would mix runs
    header = {"model_sha256": file_sha256(Path(model)), "backend": pipeline.backend.name,
              "score_threshold": score_threshold, "dataroot": str(Path(dataroot).resolve()), "version": version}
    if resume:
        old_header, done = _read_journal(journal)
        if done and old_header != header:
            raise UserError(f"{journal} was written by another model or other settings; rerun without --resume "
                            "(or with the same --model, --backend and --score-threshold)")
        wanted = set(tokens)
        done = {t: r for t, r in done.items() if t in wanted}
    else:
        journal.unlink(missing_ok=True)
        done = {}
    summary = InferSummary(target, len(tokens), 0, len(done), backend=pipeline.backend.name)
    timings = []
    todo = [(i, t) for i, t in zip(indices, tokens) if t not in done]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]infer[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[fps]:.1f} frames/s"), TimeRemainingColumn()]
    journal.parent.mkdir(parents=True, exist_ok=True)
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar, open(journal, "a") as jf:
        if not done:
            jf.write(json.dumps({"header": header}) + "\n")
        task = bar.add_task(pipeline.backend.name, total=len(todo), fps=0.0)
        t_loop = time.perf_counter()
        for n, (i, token) in enumerate(todo, 1):
            record = {"sample_token": token, "entries": [], "status": "ok"}
            try:
                frame = drive[i]
                problems = frame_problems(frame)
                if problems:
                    raise ValueError("; ".join(problems))
                result = pipeline(frame)
                record["entries"] = result.entries
                timings.append(result.timings)
                if render_dir is not None:
                    from imkd_deploy.data.render import render_detections

                    summary.rendered.append(render_detections(frame, result.detections, Path(render_dir) / f"{token}.png"))
            except UserError:
                raise
            except Exception as exc:   # one bad frame never ends the drive
                reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
                record["status"] = f"skipped: {reason}"
                summary.skipped[token] = reason
                log.warning("frame %s (scene %s) skipped: %s", token, scene_names[i], reason)
            jf.write(json.dumps(record) + "\n")
            jf.flush()
            summary.processed += 1
            bar.update(task, advance=1, fps=n / max(time.perf_counter() - t_loop, 1e-9))
    for token, rec in done.items():
        if rec["status"] != "ok":
            summary.skipped[token] = rec["status"].removeprefix("skipped: ")
    records = {**done, **_read_journal(journal)[1]}
    results = {t: records[t]["entries"] for t in tokens}
    if not any(results.values()):
        log.warning("no detections in any frame: the submission has zero boxes")
    meta = {"use_camera": True, "use_lidar": False, "use_radar": True, "use_map": False, "use_external": False}
    write_submission(target, results, meta)
    journal.unlink(missing_ok=True)
    summary.latency_ms = latency_table(timings)
    summary.seconds = time.perf_counter() - t_start
    return summary


def merge_parts(parts: list[Path], out: Path) -> Path:
    """Join shard outputs into one submission (tokens must not overlap)."""
    results: dict[str, list] = {}
    meta = None
    for part in parts:
        try:
            data = json.loads(Path(part).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read shard {part}: {exc}") from None
        overlap = set(results) & set(data["results"])
        if overlap:
            raise UserError(f"shard {part} repeats {len(overlap)} sample tokens of an earlier part (e.g. {next(iter(overlap))})")
        results.update(data["results"])
        meta = meta or data.get("meta")
    return write_submission(out, results, meta)
