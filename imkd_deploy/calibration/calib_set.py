"""Calibration-set manifests: `calibration/NAME.txt`, (scene name, sample token) pairs.

A manifest is small, tracked in git and hashed by content (header facts + entries, never
comments or timestamps), so caches and engines can say exactly which frames calibrated
them. Format:

    # imkd calibration set v1
    # version: v1.0-mini
    # split: mini_train
    # created: 2026-11-24T10:00:00+00:00
    scene-0061 3e8750f331d7499e9b5123e9eb70f2e2
    ...
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from imkd_deploy.atomic import atomic_write_text
from imkd_deploy.errors import UserError


MANIFEST_FORMAT = "imkd calibration set v1"
MIN_INT8_FRAMES = 100          # below this, INT8 ranges are noisy (TensorRT / Ultralytics guidance: 100-500)


@dataclass(frozen=True)
class CalibEntry:
    scene_name: str
    sample_token: str


@dataclass
class CalibrationSet:
    version: str                                  # nuScenes table folder, e.g. v1.0-mini
    split: str                                    # the split the frames come from
    entries: tuple[CalibEntry, ...]
    created: str = ""
    warnings: list[str] = field(default_factory=list, compare=False)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def sha256(self) -> str:
        body = "\n".join([MANIFEST_FORMAT, self.version, self.split] + [f"{e.scene_name} {e.sample_token}" for e in self.entries])
        return hashlib.sha256(body.encode()).hexdigest()

    @property
    def scenes(self) -> list[str]:
        return sorted({e.scene_name for e in self.entries})

    def to_text(self) -> str:
        header = [f"# {MANIFEST_FORMAT}", f"# version: {self.version}", f"# split: {self.split}"]
        if self.created:
            header.append(f"# created: {self.created}")
        header.append(f"# frames: {len(self.entries)} from {len(self.scenes)} scenes; sha256 {self.sha256}")
        return "\n".join(header + [f"{e.scene_name} {e.sample_token}" for e in self.entries]) + "\n"

    def write(self, path: Path) -> Path:
        return atomic_write_text(path, self.to_text())


def read_manifest(path: Path) -> CalibrationSet:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration set not found: {path} (make one with `imkd calibrate make-set`)")
    lines = path.read_text().splitlines()
    if not lines or lines[0].strip() != f"# {MANIFEST_FORMAT}":
        raise UserError(f"{path}: not a calibration manifest (first line must be '# {MANIFEST_FORMAT}')")
    header: dict[str, str] = {}
    entries = []
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep:
                header.setdefault(key.strip(), value.strip())
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{path}:{lineno}: expected 'SCENE_NAME SAMPLE_TOKEN', got '{line}'")
        entries.append(CalibEntry(parts[0], parts[1]))
    for key in ("version", "split"):
        if key not in header:
            raise UserError(f"{path}: header lacks '# {key}: ...'")
    if not entries:
        raise UserError(f"{path}: calibration manifest lists no frames")
    warnings = [small_set_warning(len(entries))] if len(entries) < MIN_INT8_FRAMES else []
    return CalibrationSet(header["version"], header["split"], tuple(entries), header.get("created", ""), warnings)


def small_set_warning(n: int) -> str:
    return (f"calibration set has {n} frames; INT8 ranges want >= {MIN_INT8_FRAMES} "
            "(accuracy may drop; pass a larger --n)")


def make_set(samples_by_scene: Mapping[str, Sequence[str]], n: int, version: str, split: str) -> CalibrationSet:
    """Pick `n` frames stratified across scenes (proportional to length) and evenly over time.

    `samples_by_scene` maps scene name -> sample tokens in time order. Warnings (set too
    small for INT8, fewer frames than asked) are kept in `.warnings` for the caller to report;
    calibrate() logs them.
    """
    if n <= 0:
        raise UserError(f"calibration set size must be > 0, got {n}")
    scenes = [(name, list(tokens)) for name, tokens in sorted(samples_by_scene.items()) if len(tokens)]
    total = sum(len(t) for _, t in scenes)
    if total == 0:
        raise UserError(f"split '{split}' of {version} has no samples to calibrate on")
    warnings = []
    if n > total:
        warnings.append(f"asked for {n} calibration frames but split '{split}' has only {total}; using all {total}")
        n = total
    quota = _allocate(np.array([len(t) for _, t in scenes]), n)
    entries = []
    for (name, tokens), k in zip(scenes, quota):
        if k == 0:
            continue
        # centre of k equal time strata: never only the first frames, which are often static
        picks = np.floor((np.arange(k) + 0.5) * len(tokens) / k).astype(int)
        entries.extend(CalibEntry(name, tokens[i]) for i in picks)
    if n < MIN_INT8_FRAMES:
        warnings.append(small_set_warning(n))
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return CalibrationSet(version, split, tuple(entries), created, warnings)


def _allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """Largest-remainder split of n over scenes by size; every scene gets a frame when n allows."""
    share = n * sizes / sizes.sum()
    quota = np.floor(share).astype(int)
    order = np.argsort(-(share - quota), kind="stable")
    quota[order[: n - quota.sum()]] += 1
    if n >= len(sizes):
        # short scenes still get one frame, taken from the scene with the most frames per share
        for i in np.flatnonzero(quota == 0):
            donor = int(np.argmax(quota - share))
            if quota[donor] <= 1:
                donor = int(np.argmax(quota))
            quota[donor] -= 1
            quota[i] = 1
    elif n < len(sizes):
        # fewer frames than scenes: evenly spaced scenes, one frame each
        quota = np.zeros(len(sizes), int)
        quota[np.floor((np.arange(n) + 0.5) * len(sizes) / n).astype(int)] = 1
    return np.minimum(quota, sizes)


def samples_by_scene(dataroot: Path, version: str, split: str) -> dict[str, list[str]]:
    """Scene name -> key-frame tokens in time order, for a devkit split or `<version>/splits.json`."""
    import json

    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.splits import create_splits_scenes

    table_dir = Path(dataroot) / version
    if not table_dir.is_dir():
        raise UserError(f"{table_dir}: no nuScenes tables (check --dataroot and --version)")
    splits = create_splits_scenes()
    custom = table_dir / "splits.json"
    if split not in splits and custom.is_file():
        splits.update(json.loads(custom.read_text()))
    if split not in splits:
        raise UserError(f"unknown split '{split}' for {version} (devkit splits or {custom})")
    wanted = set(splits[split])
    nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    out: dict[str, list[str]] = {}
    for scene in nusc.scene:
        if scene["name"] not in wanted:
            continue
        tokens, token = [], scene["first_sample_token"]
        while token:
            tokens.append(token)
            token = nusc.get("sample", token)["next"]
        out[scene["name"]] = tokens
    if not out:
        raise UserError(f"split '{split}' names no scene present in {table_dir}")
    return out
