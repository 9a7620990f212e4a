"""nuScenes-format drive -> ``Frame`` (see frame.py for every convention), backed by the devkit.

The devkit parses the tables (slow: seconds on trainval), so one ``NuScenes`` object is
cached per (dataroot, version, table mtimes). Sensor files are read by this package's own
vectorised readers (image.py, radar.py, lidar.py). Per-sensor calibration and per-pose
matrices are cached by token: a rig's calibration is parsed once however many frames use it.

A missing or corrupt sensor file never stops a run: it is logged with its path, recorded in
``Frame.degraded``, and the sensor contributes a black image or no points.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from imkd_deploy.config import CAMERA_CHANNELS, CLASS_NAMES, LIDAR_CHANNEL, RADAR_CHANNELS, SCENE_CONDITIONS, ModelConfig
from imkd_deploy.data.frame import Frame
from imkd_deploy.data.image import ImageReadError, load_camera_image, placeholder_image
from imkd_deploy.data.lidar import LIDAR_POINT_DIM, lidar_sweep_points, read_lidar_bin
from imkd_deploy.data.radar import RADAR_POINT_DIM, RadarFilters, SensorFileError, radar_sweep_points, read_radar_pcd
from imkd_deploy.errors import UserError

log = logging.getLogger(__name__)

_CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}


# --------------------------------------------------------------------------- geometry
def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) in nuScenes order w, x, y, z -> rotation matrices (..., 3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def yaw_to_quat(yaw: np.ndarray) -> np.ndarray:
    """Rotations about +z -> quaternions (..., 4) w, x, y, z."""
    yaw = np.asarray(yaw, dtype=np.float64)
    zeros = np.zeros_like(yaw)
    return np.stack([np.cos(yaw / 2), zeros, zeros, np.sin(yaw / 2)], -1)


def pose_matrix(translation, rotation) -> np.ndarray:
    """A nuScenes record's translation + w,x,y,z rotation -> 4x4 (child frame -> parent frame)."""
    m = np.eye(4)
    m[:3, :3] = quat_to_matrix(rotation)
    m[:3, 3] = translation
    return m


def invert_rigid(m: np.ndarray) -> np.ndarray:
    inv = np.eye(4)
    inv[:3, :3] = m[:3, :3].T
    inv[:3, 3] = -m[:3, :3].T @ m[:3, 3]
    return inv


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """Boxes (G, >=7) x, y, z, w, l, h, yaw -> corners (G, 8, 3); first 4 are the bottom face."""
    boxes = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    # nuScenes: l along the box's x axis, w along y.
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sy = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * 0.5
    sz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) * 0.5
    local = np.stack([boxes[:, 4:5] * sx, boxes[:, 3:4] * sy, boxes[:, 5:6] * sz], -1)  # (G, 8, 3)
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return np.stack([x, y, local[..., 2]], -1) + boxes[:, None, :3]


def points_in_boxes(points: np.ndarray, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """(P, >=3) points x (G, >=7) boxes -> (P, G) bool, box enlarged by ``margin`` metres a side."""
    boxes = np.asarray(boxes, dtype=np.float64)
    d = np.asarray(points, dtype=np.float64)[:, None, :3] - boxes[None, :, :3]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    lx = d[..., 0] * c + d[..., 1] * s
    ly = -d[..., 0] * s + d[..., 1] * c
    return ((np.abs(lx) <= boxes[:, 4] / 2 + margin) & (np.abs(ly) <= boxes[:, 3] / 2 + margin)
            & (np.abs(d[..., 2]) <= boxes[:, 5] / 2 + margin))


# --------------------------------------------------------------------------- devkit tables
_NUSC_CACHE: OrderedDict[tuple, object] = OrderedDict()
_NUSC_CACHE_SIZE = 2


def _versions_in(dataroot: Path) -> list[str]:
    if not dataroot.is_dir():
        return []
    return sorted(p.name for p in dataroot.iterdir() if (p / "sample.json").is_file())


def open_nuscenes(dataroot: str | Path, version: str):
    """The devkit ``NuScenes`` for a dataroot, cached; a missing/broken table is a UserError."""
    dataroot = Path(dataroot).expanduser().resolve()
    table_dir = dataroot / version
    if not table_dir.is_dir():
        found = _versions_in(dataroot)
        hint = f"; versions there: {', '.join(found)}" if found else (
            "" if dataroot.is_dir() else " (the dataroot does not exist)")
        raise UserError(f"no nuScenes tables at {table_dir}{hint}")
    # Key on the tables' mtimes so a rewritten drive at the same path is reloaded.
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in table_dir.glob("*.json")))
    key = (str(dataroot), version, stamp)
    if key in _NUSC_CACHE:
        _NUSC_CACHE.move_to_end(key)
        return _NUSC_CACHE[key]
    from nuscenes.nuscenes import NuScenes

    try:
        nusc = NuScenes(version=version, dataroot=str(dataroot), verbose=False)
    except (AssertionError, FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"nuScenes tables at {table_dir} do not load: {exc}") from None
    _NUSC_CACHE[key] = nusc
    while len(_NUSC_CACHE) > _NUSC_CACHE_SIZE:
        _NUSC_CACHE.popitem(last=False)
    return nusc


# Predefined devkit splits and the version suffix each needs (mirrors eval/common/loaders.load_gt).
_SPLIT_VERSION = {"train": "trainval", "val": "trainval", "train_detect": "trainval",
                  "train_track": "trainval", "test": "test", "mini_train": "mini", "mini_val": "mini"}


def custom_splits(dataroot: str | Path, version: str) -> dict[str, list[str]]:
    """``<dataroot>/<version>/splits.json`` ({name: [scene names]}), or {} when absent."""
    path = Path(dataroot) / version / "splits.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f"{path} must map split names to lists of scene names")
    return data


def valid_splits(dataroot: str | Path, version: str) -> list[str]:
    predefined = [s for s, suffix in _SPLIT_VERSION.items() if version.endswith(suffix)]
    return predefined + sorted(set(custom_splits(dataroot, version)) - set(predefined))


def split_scene_names(dataroot: str | Path, version: str, split: str) -> list[str]:
    """Scene names of a split: the devkit's hard-coded ones, or from splits.json.

    A predefined split with the wrong version (e.g. mini_val on v1.0-trainval) or an unknown
    name is a UserError that lists the valid names.
    """
    custom = custom_splits(dataroot, version)
    if split in _SPLIT_VERSION and split not in custom:
        suffix = _SPLIT_VERSION[split]
        if not version.endswith(suffix):
            raise UserError(
                f"split '{split}' needs a version ending in '{suffix}', got '{version}'. "
                f"Valid splits for {version}: {', '.join(valid_splits(dataroot, version)) or 'none'}")
        from nuscenes.utils.splits import create_splits_scenes

        return list(create_splits_scenes()[split])
    if split in custom:
        return [str(s) for s in custom[split]]
    import difflib

    valid = valid_splits(dataroot, version)
    close = difflib.get_close_matches(split, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown split '{split}' for {version}; valid: {', '.join(valid) or 'none'}.{hint}")


def scene_sample_tokens(nusc, scene: dict) -> list[str]:
    """A scene's sample tokens in time order (following the next chain)."""
    tokens, tok = [], scene["first_sample_token"]
    while tok:
        tokens.append(tok)
        tok = nusc.get("sample", tok)["next"]
    return tokens


def scene_condition(scene: dict) -> str:
    """day, rain or night from a scene's description, as nuScenes users split val: the
    devkit has no such field, and its descriptions name night and rain ("Night, ...")."""
    words = scene["description"].lower()
    return "night" if "night" in words else "rain" if "rain" in words else "day"


def scenes_by_condition(nusc, scene_names: list[str]) -> dict[str, list[str]]:
    """The given scenes grouped by ``scene_condition``; conditions without scenes are left out."""
    by_name = {s["name"]: s for s in nusc.scene}
    out = {c: [n for n in scene_names if n in by_name and scene_condition(by_name[n]) == c] for c in SCENE_CONDITIONS}
    return {c: names for c, names in out.items() if names}


def condition_scene_names(dataroot: str | Path, version: str, split: str, condition: str) -> list[str]:
    """The scenes of ``split`` whose description makes them ``condition`` (day, rain, night)."""
    if condition not in SCENE_CONDITIONS:
        raise UserError(f"condition must be one of {', '.join(SCENE_CONDITIONS)}, got '{condition}'")
    groups = scenes_by_condition(open_nuscenes(dataroot, version), split_scene_names(dataroot, version, split))
    if condition not in groups:
        held = ", ".join(f"{len(n)} {c}" for c, n in groups.items()) or "none of its scenes"
        raise UserError(f"split '{split}' of {Path(dataroot) / version} has no {condition} scene "
                        f"(scene descriptions name 'night' or 'rain'; it holds {held})")
    return groups[condition]


def split_sample_tokens(nusc, dataroot: str | Path, version: str, split: str | None,
                        scenes: list[str] | None = None) -> list[str]:
    """Sample tokens (scene table order, then time order) of a split and/or explicit scenes."""
    by_name = {s["name"]: s for s in nusc.scene}
    wanted: list[str] = list(by_name) if split is None else split_scene_names(dataroot, version, split)
    if scenes is not None:
        unknown = [s for s in scenes if s not in by_name]
        if unknown:
            raise UserError(f"scene(s) {unknown[:3]} not in {Path(dataroot) / version} "
                            f"({len(by_name)} scenes, e.g. {next(iter(by_name), 'none')})")
        chosen = set(scenes)
        wanted = [s for s in wanted if s in chosen]
    wanted_set = set(wanted)
    present = [s for s in by_name if s in wanted_set]  # table order, as the devkit iterates
    if not present:
        what = f"split '{split}'" + (" restricted to the given scenes" if scenes is not None else "")
        raise UserError(f"none of the {len(wanted)} scenes of {what} are in {Path(dataroot) / version}"
                        f" (it has {', '.join(list(by_name)[:4])}{'...' if len(by_name) > 4 else ''})")
    return [t for name in present for t in scene_sample_tokens(nusc, by_name[name])]


# --------------------------------------------------------------------------- the drive
class NuScenesDrive:
    """Indexable frames of a nuScenes-format drive, for training, calibration and inference.

    ``split`` is a devkit split (mini_val, train, ...) or a name from splits.json; ``scenes``
    restricts to scene names. Sweep counts come from the model config (``radar_sweeps``,
    ``lidar_sweeps``; the key sweep counts as one). Frames hold numpy only.
    """

    def __init__(self, dataroot, version, model_cfg: ModelConfig, *, split: str | None = None,
                 scenes: list[str] | None = None, load_lidar: bool = False,
                 radar_filters: RadarFilters | None = None, verbose=False):
        self.dataroot = Path(dataroot).expanduser()
        self.version = version
        self.cfg = model_cfg
        self.load_lidar = load_lidar
        self.radar_filters = radar_filters or RadarFilters()
        self.camera_channels = tuple(CAMERA_CHANNELS[: model_cfg.num_cams])
        self.nusc = open_nuscenes(self.dataroot, version)
        self.sample_tokens: list[str] = split_sample_tokens(self.nusc, self.dataroot, version, split, scenes)
        self._calib: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        if verbose:
            log.info("%s %s split=%s: %d samples, %d radar / %d lidar sweeps, images %s",
                     self.dataroot, version, split, len(self.sample_tokens), model_cfg.radar_sweeps,
                     model_cfg.lidar_sweeps if load_lidar else 0, model_cfg.image_size)

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def __getitem__(self, i: int) -> Frame:
        return self.frame(self.sample_tokens[i])

    # ---- geometry (calibration cached per rig; ego poses are cheap and far too many to keep)
    def _calibration(self, cs_token: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(sensor -> ego 4x4, camera intrinsics or None) of a calibrated_sensor record."""
        if cs_token not in self._calib:
            cs = self.nusc.get("calibrated_sensor", cs_token)
            k = np.asarray(cs["camera_intrinsic"], dtype=np.float64) if cs.get("camera_intrinsic") else None
            self._calib[cs_token] = (pose_matrix(cs["translation"], cs["rotation"]), k)
        return self._calib[cs_token]

    def _sensor_pose(self, cs_token: str) -> np.ndarray:
        return self._calibration(cs_token)[0]

    def _ego_pose(self, pose_token: str) -> np.ndarray:
        rec = self.nusc.get("ego_pose", pose_token)
        return pose_matrix(rec["translation"], rec["rotation"])

    def _key_from_sensor(self, sd: dict, global2key: np.ndarray) -> np.ndarray:
        """sensor -> its own ego pose -> global -> the key ego frame."""
        return global2key @ self._ego_pose(sd["ego_pose_token"]) @ self._sensor_pose(sd["calibrated_sensor_token"])

    def _sweeps(self, sd_token: str, n: int):
        sd = self.nusc.get("sample_data", sd_token)
        for _ in range(n):
            yield sd
            if not sd["prev"]:
                return
            sd = self.nusc.get("sample_data", sd["prev"])

    # ---- one frame
    def frame(self, sample_token: str) -> Frame:
        try:
            sample = self.nusc.get("sample", sample_token)
        except KeyError:
            raise UserError(f"sample token '{sample_token}' is not in {self.dataroot / self.version}") from None
        degraded: list[str] = []

        def problem(msg: str) -> None:
            log.warning("sample %s: %s", sample_token, msg)
            degraded.append(msg)

        if LIDAR_CHANNEL not in sample["data"]:
            raise UserError(f"sample {sample_token} has no {LIDAR_CHANNEL} sample_data: its ego frame is undefined")
        key_sd = self.nusc.get("sample_data", sample["data"][LIDAR_CHANNEL])
        ego2global = self._ego_pose(key_sd["ego_pose_token"])
        global2key = invert_rigid(ego2global)
        key_time = key_sd["timestamp"]

        images, intrinsics, cam2ego, img_aug = self._cameras(sample, global2key, problem)
        radar = self._radar(sample, global2key, key_time, problem)
        lidar = self._lidar(sample, global2key, key_time, problem) if self.load_lidar else None
        boxes, labels, num_pts = ground_truth_boxes(self.nusc, sample, global2key)
        scene = self.nusc.get("scene", sample["scene_token"])
        return Frame(
            sample_token=sample_token,
            scene_name=scene["name"], condition=scene_condition(scene),
            timestamp=int(sample["timestamp"]),
            images=images, intrinsics=intrinsics, cam2ego=cam2ego, ego2global=ego2global.copy(),
            img_aug=img_aug, radar_points=radar, lidar_points=lidar,
            gt_boxes=boxes, gt_labels=labels, gt_num_pts=num_pts,
            camera_channels=self.camera_channels, degraded=degraded,
        )

    def _cameras(self, sample: dict, global2key: np.ndarray, problem):
        out_hw = tuple(self.cfg.image_size)
        n = len(self.camera_channels)
        images = np.empty((n, out_hw[0], out_hw[1], 3), np.uint8)
        intrinsics, cam2ego, img_aug = np.empty((n, 3, 3)), np.empty((n, 4, 4)), np.empty((n, 3, 3))
        for i, channel in enumerate(self.camera_channels):
            if channel not in sample["data"]:
                raise UserError(f"sample {sample['token']} has no {channel} sample_data")
            sd = self.nusc.get("sample_data", sample["data"][channel])
            # The rig's static calibration, not the camera's own ego pose: BEVPool's index arrays
            # are then computed once per rig and cached (ARCHITECTURE.md), as deployed BEVDet/
            # BEVFusion stacks do. The cost is the ego motion between the camera's and the key
            # LiDAR's timestamps (tens of ms), which the network absorbs like calibration noise.
            cam2ego[i] = self._sensor_pose(sd["calibrated_sensor_token"])
            orig_size = (int(sd.get("width") or 0), int(sd.get("height") or 0))
            path = self.dataroot / sd["filename"]
            try:
                images[i], img_aug[i] = load_camera_image(path, orig_size, out_hw)
            except ImageReadError as exc:
                problem(f"{channel}: {exc}; using a black image")
                if orig_size[0] <= 0:
                    orig_size = (out_hw[1], out_hw[0])
                images[i], img_aug[i] = placeholder_image(orig_size, out_hw)
            k = self._calibration(sd["calibrated_sensor_token"])[1]
            if k is None:
                raise UserError(f"{channel} calibrated_sensor {sd['calibrated_sensor_token']} has no camera_intrinsic")
            intrinsics[i] = img_aug[i] @ k
        return images, intrinsics, cam2ego, img_aug

    def _radar(self, sample: dict, global2key: np.ndarray, key_time: int, problem) -> np.ndarray:
        chunks = []
        for channel in RADAR_CHANNELS:
            if channel not in sample["data"]:
                problem(f"{channel}: no sample_data in this sample")
                continue
            for sd in self._sweeps(sample["data"][channel], self.cfg.radar_sweeps):
                try:
                    read = read_radar_pcd(self.dataroot / sd["filename"])
                except SensorFileError as exc:
                    problem(f"{channel}: {exc}; sweep skipped")
                    continue
                if read.problem:
                    problem(f"{channel}: {read.problem}")
                dt = (key_time - sd["timestamp"]) * 1e-6
                chunks.append(radar_sweep_points(read.points, self._key_from_sensor(sd, global2key), dt,
                                                 self.radar_filters))
        return np.concatenate(chunks) if chunks else np.zeros((0, RADAR_POINT_DIM), np.float32)

    def _lidar(self, sample: dict, global2key: np.ndarray, key_time: int, problem) -> np.ndarray:
        chunks = []
        for sd in self._sweeps(sample["data"][LIDAR_CHANNEL], self.cfg.lidar_sweeps):
            try:
                pts, issue = read_lidar_bin(self.dataroot / sd["filename"])
            except SensorFileError as exc:
                problem(f"{LIDAR_CHANNEL}: {exc}; sweep skipped")
                continue
            if issue:
                problem(f"{LIDAR_CHANNEL}: {issue}")
            dt = (key_time - sd["timestamp"]) * 1e-6
            chunks.append(lidar_sweep_points(pts, self._key_from_sensor(sd, global2key), dt))
        return np.concatenate(chunks) if chunks else np.zeros((0, LIDAR_POINT_DIM), np.float32)


def ground_truth_boxes(nusc, sample: dict, global2key: np.ndarray):
    """A sample's annotations of the 10 detection classes in the key ego frame.

    Returns boxes (G, 9) float32 x, y, z, w, l, h, yaw, vx, vy; labels (G,) int64;
    lidar+radar point counts (G,) int64. An unknown velocity (a one-frame track, NaN in the
    devkit) becomes 0, as mmdet3d does, so losses stay finite.
    """
    from nuscenes.eval.detection.utils import category_to_detection_name

    anns, labels = [], []
    for ann_token in sample["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        name = category_to_detection_name(ann["category_name"])
        if name is not None:
            anns.append(ann)
            labels.append(_CLASS_INDEX[name])
    if not anns:
        return np.zeros((0, 9), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    trans = np.array([a["translation"] for a in anns], dtype=np.float64)
    size = np.array([a["size"] for a in anns], dtype=np.float64)
    rot = quat_to_matrix(np.array([a["rotation"] for a in anns]))
    vel = np.array([nusc.box_velocity(a["token"]) for a in anns], dtype=np.float64)
    vel = np.nan_to_num(vel, nan=0.0)
    r, t = global2key[:3, :3], global2key[:3, 3]
    rot_key = r[None] @ rot
    boxes = np.empty((len(anns), 9), np.float32)
    boxes[:, :3] = trans @ r.T + t
    boxes[:, 3:6] = size
    boxes[:, 6] = np.arctan2(rot_key[:, 1, 0], rot_key[:, 0, 0])
    boxes[:, 7:9] = (vel @ r.T)[:, :2]
    num_pts = np.array([a["num_lidar_pts"] + a["num_radar_pts"] for a in anns], dtype=np.int64)
    return boxes, np.array(labels, np.int64), num_pts


__all__ = [
    "NuScenesDrive", "RadarFilters", "open_nuscenes", "split_scene_names", "split_sample_tokens",
    "valid_splits", "ground_truth_boxes", "quat_to_matrix", "yaw_to_quat", "pose_matrix",
    "invert_rigid", "box_corners", "points_in_boxes",
]
