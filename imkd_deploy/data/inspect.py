"""`imkd data inspect`: what a nuScenes-format drive holds, counted from its tables."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imkd_deploy.config import CLASS_NAMES
from imkd_deploy.data.loader import open_nuscenes, split_scene_names, valid_splits

# nuScenes v1.0-mini's mean LiDAR and radar points per annotation, as the devkit's maintainers
# give them (nuscenes-devkit issue 219): what a synthetic drive's sensor density is read against.
NUSCENES_MINI_POINTS_PER_BOX = {"lidar": 58.8, "radar": 0.85}


@dataclass
class InspectReport:
    dataroot: str
    version: str
    scenes: int
    samples: int
    annotations: int                                  # every sample_annotation row
    instances: int
    sweeps: dict[str, dict[str, int]]                 # channel -> {"key": n, "non_key": n}
    annotations_per_class: dict[str, int]             # the 10 detection classes, then "other"
    # class (and "all") -> mean num_lidar_pts, mean num_radar_pts, share of boxes with a radar point
    points_per_box: dict[str, dict[str, float]] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)   # split -> scenes of it present here
    scene_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def print(self, console) -> None:
        from rich.table import Table

        console.print(f"[bold]{self.dataroot}[/] ({self.version}): {self.scenes} scenes, {self.samples} samples, "
                      f"{self.annotations} annotations of {self.instances} instances")
        if self.splits:
            console.print("splits (scenes present): " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        sensors = Table(title="sample_data per sensor channel")
        for col in ("channel", "key frames", "sweeps (non-key)", "total"):
            sensors.add_column(col, justify="left" if col == "channel" else "right")
        for channel, c in self.sweeps.items():
            sensors.add_row(channel, str(c["key"]), str(c["non_key"]), str(c["key"] + c["non_key"]))
        console.print(sensors)
        classes = Table(title="annotations per detection class, and the key-frame points inside them")
        for col in ("class", "boxes", "LiDAR pts/box", "radar pts/box", "boxes with radar"):
            classes.add_column(col, justify="left" if col == "class" else "right")
        for name, n in [*self.annotations_per_class.items(), ("all", self.annotations)]:
            p = self.points_per_box.get(name)
            cells = [f"{p['lidar']:.1f}", f"{p['radar']:.2f}", f"{p['radar_hit']:.0%}"] if p else ["-"] * 3
            classes.add_row(name, str(n), *cells, style="dim" if name == "other" else "bold" if name == "all" else None)
        console.print(classes)
        ref = NUSCENES_MINI_POINTS_PER_BOX
        console.print(f"nuScenes v1.0-mini for comparison: {ref['lidar']} LiDAR and {ref['radar']} radar points a box")


def inspect_drive(dataroot, version) -> InspectReport:
    """Counts of scenes, samples, sample_data per channel (key / non-key) and boxes per class."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    nusc = open_nuscenes(dataroot, version)
    sweeps: dict[str, dict[str, int]] = {}
    channel_of = {cs["token"]: nusc.get("sensor", cs["sensor_token"])["channel"] for cs in nusc.calibrated_sensor}
    for sd in nusc.sample_data:
        counts = sweeps.setdefault(channel_of[sd["calibrated_sensor_token"]], {"key": 0, "non_key": 0})
        counts["key" if sd["is_key_frame"] else "non_key"] += 1
    names = np.array([category_to_detection_name(a["category_name"]) or "other" for a in nusc.sample_annotation], dtype=str)
    per_class = Counter(names.tolist())
    lidar = np.array([a["num_lidar_pts"] for a in nusc.sample_annotation], dtype=float)
    radar = np.array([a["num_radar_pts"] for a in nusc.sample_annotation], dtype=float)
    masks = {**{c: names == c for c in (*CLASS_NAMES, "other")}, "all": np.ones(len(names), bool)}
    points = {c: {"lidar": float(lidar[m].mean()), "radar": float(radar[m].mean()),
                  "radar_hit": float((radar[m] > 0).mean())} for c, m in masks.items() if m.any()}
    scene_names = [s["name"] for s in nusc.scene]
    present = set(scene_names)
    splits = {name: sum(s in present for s in split_scene_names(dataroot, version, name))
              for name in valid_splits(dataroot, version)}
    return InspectReport(
        dataroot=str(Path(dataroot)), version=version, scenes=len(nusc.scene), samples=len(nusc.sample),
        annotations=len(nusc.sample_annotation), instances=len(nusc.instance),
        sweeps=dict(sorted(sweeps.items())),
        annotations_per_class={**{c: per_class.get(c, 0) for c in CLASS_NAMES}, "other": per_class.get("other", 0)},
        points_per_box=points,
        splits={k: v for k, v in splits.items() if v}, scene_names=scene_names,
    )
