"""`imkd data synth`: write a synthetic recorded drive in the real nuScenes on-disk format.

    summary = write_drive(Path("data/synth"), SynthConfig(num_scenes=3, samples_per_scene=6))

Timing (what is written per 0.5 s interval between key frames, default config):
- LiDAR: key sweep + ``lidar_sweeps - 1`` sweeps in between (5 = 10 Hz; the real sensor
  spins at 20 Hz, halved to keep the writer fast; raise it to 10 for 20 Hz).
- Radar: each of the 5 radars writes ``radar_sweeps`` sweeps (6 = 12 Hz, the real ARS408
  runs at ~13 Hz), free-running with its own phase.
- Cameras: key frames only (12 Hz sweeps are not needed by the model), each exposed when
  the LiDAR spin passes its yaw, as on the real rig.

Scene names: with a version ending in "mini" the devkit's mini split names are used, in
the order below so that any 2+ scenes hold a val scene and any 3+ at least two train ones;
any other version names scenes ``scene-0001`` ... and writes ``splits.json`` (every fifth
scene, starting with the second, is val; ``all`` lists every scene).

Determinism: scene i draws from ``np.random.default_rng([seed, i])`` and every sensor frame
from its own ``default_rng([seed, i, sensor, frame])``; nothing depends on time or dict order.
The dataroot appears atomically: it is written into ``OUT.tmp-*`` and renamed at the end.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imkd_deploy.config import CAMERA_CHANNELS, CLASS_NAMES, LIDAR_CHANNEL, RADAR_CHANNELS, SCENE_CONDITIONS
from imkd_deploy.data import synth_tables as T
from imkd_deploy.data.synth_camera import CameraView, make_view, render_camera, render_night
from imkd_deploy.data.synth_conditions import NIGHT_EXPOSURE, NIGHT_LIGHTING, attenuate_lidar, condition_of, degrade_image
from imkd_deploy.data.synth_ground import LABEL_INTENSITY, GroundMap, rasterise_road
from imkd_deploy.data.synth_lidar import cast_lidar
from imkd_deploy.data.synth_radar import RADAR_CLUTTER, RADAR_RCS, make_reflectors, simulate_radar
from imkd_deploy.data.synth_rig import Sensor, build_rig, matrix_quaternion, yaw_quaternion
from imkd_deploy.data.synth_world import ATTRIBUTES, CATEGORY, World, make_world
from imkd_deploy.errors import UserError

# Mini split order: val scenes interleaved early (see the module docstring).
MINI_SCENE_ORDER = ("scene-0061", "scene-0103", "scene-0553", "scene-0916", "scene-0655",
                    "scene-0757", "scene-0796", "scene-1077", "scene-1094", "scene-1100")
MINI_VAL = ("scene-0103", "scene-0916")
LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")
KEY_PERIOD = 0.5                      # seconds between key frames (2 Hz)
ANNOTATION_RANGE = 60.0               # metres from the ego within which objects are annotated
PHYSICAL_SHRINK = 0.04                # metres: surfaces sit this far inside the annotated box
BASE_TIMESTAMP = 1_531_800_000_000_000


@dataclass
class SynthConfig:
    version: str = "v1.0-mini"
    num_scenes: int = 10
    samples_per_scene: int = 40
    image_width: int = 800
    image_height: int = 450
    seed: int = 0
    lidar_sweeps: int = 5             # LiDAR sample_data per key interval, key included (5 = 10 Hz)
    radar_sweeps: int = 6             # per radar per key interval, key included (6 = 12 Hz)
    object_density: float = 1.0       # scales the per-100 m object counts
    jpeg_quality: int = 90
    conditions: str = "day"           # day | rain | night for every scene, or mixed (synth_conditions.MIXED_CYCLE)
    radar_clutter: str = "light"      # light: random clutter only | urban: + fixed roadside reflectors, wide-angle azimuth error
    radar_rcs: str = "class"          # class: RCS about the class mean | swerling: + Swerling I aspect fluctuation
    night_lighting: str = "street"    # street: ambient light only | lamps: + vehicle lamps and the ego's low beams
    night_exposure: str = "fixed"     # fixed: the dark night frame | auto: metered (longer shutter, then gain)
    workers: int = 0                  # scene-parallel processes; 0 = auto (one per core for big drives), 1 = in process

    def validate(self) -> None:
        if self.num_scenes < 1:
            raise UserError(f"num_scenes must be >= 1, got {self.num_scenes}")
        if self.samples_per_scene < 2:
            raise UserError(f"samples_per_scene must be >= 2, got {self.samples_per_scene}")
        if self.image_width < 32 or self.image_height < 32:
            raise UserError(f"image size must be at least 32x32, got {self.image_width}x{self.image_height}")
        if self.lidar_sweeps < 1 or self.radar_sweeps < 1:
            raise UserError("lidar_sweeps and radar_sweeps must be >= 1 (the key frame counts)")
        if self.conditions not in (*SCENE_CONDITIONS, "mixed"):
            raise UserError(f"conditions must be one of {', '.join((*SCENE_CONDITIONS, 'mixed'))}, got {self.conditions!r}")
        if self.radar_clutter not in RADAR_CLUTTER:
            raise UserError(f"radar_clutter must be one of {', '.join(RADAR_CLUTTER)}, got {self.radar_clutter!r}")
        if self.radar_rcs not in RADAR_RCS:
            raise UserError(f"radar_rcs must be one of {', '.join(RADAR_RCS)}, got {self.radar_rcs!r}")
        if self.night_lighting not in NIGHT_LIGHTING:
            raise UserError(f"night_lighting must be one of {', '.join(NIGHT_LIGHTING)}, got {self.night_lighting!r}")
        if self.night_exposure not in NIGHT_EXPOSURE:
            raise UserError(f"night_exposure must be one of {', '.join(NIGHT_EXPOSURE)}, got {self.night_exposure!r}")
        if self.workers < 0:
            raise UserError(f"workers must be >= 0 (0 = one per CPU core), got {self.workers}")
        if self.is_mini and self.num_scenes > len(MINI_SCENE_ORDER):
            raise UserError(f"version {self.version!r} has the devkit's {len(MINI_SCENE_ORDER)} mini scene names; "
                            f"asked for {self.num_scenes} scenes. Use a custom version (e.g. v1.0-synth) for more.")
        if not self.version or "/" in self.version or self.version.startswith("."):
            raise UserError(f"version must be a plain folder name, got {self.version!r}")

    @property
    def is_mini(self) -> bool:
        return self.version.endswith("mini")

    def scene_names(self) -> list[str]:
        if self.is_mini:
            return list(MINI_SCENE_ORDER[: self.num_scenes])
        return [f"scene-{i + 1:04d}" for i in range(self.num_scenes)]

    def splits(self) -> dict[str, list[str]]:
        names = self.scene_names()
        if self.is_mini:
            return {"mini_train": [n for n in names if n not in MINI_VAL], "mini_val": [n for n in names if n in MINI_VAL]}
        val = [n for i, n in enumerate(names) if i % 5 == 1]
        # "all": a drive of another writer seed is unseen end to end, so scoring every scene of
        # it gives a held-out test five times the size of val.
        return {"train": [n for n in names if n not in val], "val": val, "all": names}


@dataclass
class SynthSummary:
    out_dir: Path
    version: str
    scenes: int
    samples: int
    sample_data: dict[str, int]              # per channel
    annotations: dict[str, int]              # per detection class
    files: int
    bytes: int
    seconds: float
    splits: dict[str, list[str]] = field(default_factory=dict)

    def pretty(self) -> str:
        per_mod = {"camera": 0, "lidar": 0, "radar": 0}
        for ch, n in self.sample_data.items():
            per_mod["camera" if ch.startswith("CAM") else "lidar" if ch.startswith("LIDAR") else "radar"] += n
        ann = ", ".join(f"{k} {v}" for k, v in self.annotations.items())
        split = "; ".join(f"{k}: {len(v)} scenes" for k, v in self.splits.items())
        return "\n".join([
            f"wrote {self.out_dir} ({self.version})",
            f"  scenes {self.scenes}, samples {self.samples} ({split})",
            f"  sample_data: camera {per_mod['camera']}, lidar {per_mod['lidar']}, radar {per_mod['radar']}",
            f"  annotations {sum(self.annotations.values())}: {ann}",
            f"  files {self.files}, {self.bytes / 2**20:.1f} MiB on disk, {self.seconds:.1f} s",
        ])


def write_drive(out_dir: Path, config: SynthConfig | None = None) -> SynthSummary:
    """Write the whole drive into ``out_dir`` (absent or empty), atomically."""
    cfg = config or SynthConfig()
    cfg.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not empty; choose a new folder or remove it first")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tables = _write_all(tmp, cfg)
        T.write_tables(tmp / cfg.version, tables)
        if not cfg.is_mini:
            (tmp / cfg.version / "splits.json").write_text(json.dumps(cfg.splits(), indent=1))
        files, size = 0, 0
        for root, _, names in os.walk(tmp):
            files += len(names)
            size += sum(os.path.getsize(os.path.join(root, n)) for n in names)
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summarise(out_dir, cfg, tables, files, size, time.perf_counter() - start)


def _summarise(out_dir: Path, cfg: SynthConfig, tables: dict[str, list[dict]], files: int, size: int,
               seconds: float) -> SynthSummary:
    channel = {s["token"]: s["channel"] for s in tables["sensor"]}
    calib = {c["token"]: channel[c["sensor_token"]] for c in tables["calibrated_sensor"]}
    per_channel = {ch: 0 for ch in (LIDAR_CHANNEL, *RADAR_CHANNELS, *CAMERA_CHANNELS)}
    for sd in tables["sample_data"]:
        per_channel[calib[sd["calibrated_sensor_token"]]] += 1
    category = {c["token"]: c["name"] for c in tables["category"]}
    instance_cat = {i["token"]: category[i["category_token"]] for i in tables["instance"]}
    det_name = {v: k for k, v in CATEGORY.items()}
    annotations = {c: 0 for c in CLASS_NAMES}
    for a in tables["sample_annotation"]:
        annotations[det_name[instance_cat[a["instance_token"]]]] += 1
    return SynthSummary(out_dir, cfg.version, len(tables["scene"]), len(tables["sample"]), per_channel,
                        annotations, files, size, seconds, cfg.splits())


def _write_all(root: Path, cfg: SynthConfig) -> dict[str, list[dict]]:
    """Write every scene (in worker processes when asked) and merge their rows in scene order."""
    tables: dict[str, list[dict]] = {name: [] for name in T.TABLES}
    tables.update(T.static_tables(cfg.seed))
    tables["sensor"] = [{"token": T.token(cfg.seed, "sensor", ch), "channel": ch, "modality": s.modality}
                        for ch, s in build_rig(cfg.image_width, cfg.image_height).items()]
    for ch in (LIDAR_CHANNEL, *RADAR_CHANNELS, *CAMERA_CHANNELS):
        (root / "samples" / ch).mkdir(parents=True)
        (root / "sweeps" / ch).mkdir(parents=True)
    (root / "maps").mkdir()
    jobs = [(root, cfg, i, name) for i, name in enumerate(cfg.scene_names())]
    # Auto: small drives stay in process (starting workers costs ~1 s each); big ones use every core.
    big = cfg.num_scenes * cfg.samples_per_scene >= 60
    workers = cfg.workers or (min(os.cpu_count() or 1, len(jobs)) if big else 1)
    if workers <= 1 or len(jobs) == 1:
        results = [_write_scene(job) for job in jobs]
    else:
        # spawn, not fork: the caller may hold threads (torch, BLAS) that fork would break.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(_write_scene, jobs))
    for scene_tables in results:
        for name, rows in scene_tables.items():
            tables[name].extend(rows)
    return tables


@functools.lru_cache(maxsize=2)
def _rig_and_views(width: int, height: int) -> tuple[dict[str, Sensor], dict[str, CameraView]]:
    rig = build_rig(width, height)
    return rig, {ch: make_view(rig[ch].intrinsic, rig[ch].to_ego(), width, height) for ch in CAMERA_CHANNELS}


def _write_scene(job: tuple[Path, SynthConfig, int, str]) -> dict[str, list[dict]]:
    root, cfg, index, name = job
    rig, views = _rig_and_views(cfg.image_width, cfg.image_height)
    tables: dict[str, list[dict]] = {t: [] for t in T.TABLES if t not in ("attribute", "category", "visibility", "sensor")}
    SceneWriter(root, cfg, index, name, rig, views, tables).write()
    return tables


def build_scene(cfg: SynthConfig, index: int) -> tuple[World, GroundMap, np.random.Generator]:
    """Scene ``index``'s world and ground raster, and its generator for further draws."""
    rng = np.random.default_rng([cfg.seed, index])
    world = make_world(rng, (cfg.samples_per_scene - 1) * KEY_PERIOD, cfg.object_density)
    return world, rasterise_road(world.road, rng), rng


class SceneWriter:
    """Generates one scene's world and writes its sensor files and table rows."""

    def __init__(self, root: Path, cfg: SynthConfig, index: int, name: str, rig: dict[str, Sensor],
                 views: dict[str, CameraView], tables: dict[str, list[dict]]):
        self.root, self.cfg, self.index, self.name, self.rig = root, cfg, index, name, rig
        self.views, self.tables = views, tables
        self.static_tables = T.static_tables(cfg.seed)
        self.world, self.ground, rng = build_scene(cfg, index)
        self.condition = condition_of(cfg.conditions, index)
        self.reflector_boxes = self.reflector_rcs = None
        if cfg.radar_clutter == "urban":
            # own generator: the light-clutter drive stays byte-identical
            ego_s = self.world.ego.s(np.array([0.0, self.world.duration]))
            ref = make_reflectors(self.world.road, (float(ego_s[0]) - 60.0, float(ego_s[1]) + 100.0),
                                  np.random.default_rng([cfg.seed, index, 101]))
            # zero-size static boxes, so every sweep moves them into its sensor frame like the objects
            self.reflector_boxes = np.zeros((len(ref), 9))
            self.reflector_boxes[:, :2] = ref[:, :2]
            self.reflector_rcs = ref[:, 2]
        sun_az, sun_el = rng.uniform(-np.pi, np.pi), rng.uniform(np.deg2rad(25), np.deg2rad(65))
        self.sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.cos(sun_el) * np.sin(sun_az), np.sin(sun_el)])
        self.t0 = BASE_TIMESTAMP + index * 3_600_000_000 + int(rng.integers(0, 1_000_000))
        day = 1 + index % 28
        self.logfile = f"n015-2018-07-{day:02d}-11-{index % 60:02d}-{(index * 7) % 60:02d}+0800"
        self.tok = lambda *k: T.token(cfg.seed, name, *k)
        self.calib = {ch: self.tok("calib", ch) for ch in rig}
        self.sensor_tokens = {ch: T.token(cfg.seed, "sensor", ch) for ch in rig}
        o = self.world.objects
        self.static = (o.v == 0) & ~o.follow
        self.rider = np.isin(o.attribute, [ATTRIBUTES.index("cycle.with_rider")])
        # What the sensors see: the annotated box shrunk a little, so that surface hits with
        # centimetre noise still fall inside the annotation, as on real labelled data.
        self.shrink = np.array([2 * PHYSICAL_SHRINK, 2 * PHYSICAL_SHRINK, PHYSICAL_SHRINK])

    @property
    def description(self) -> str:
        # nuScenes descriptions name the condition ("Night, ...", "Rain, ..."); tools filter on it
        text = f"synthetic drive {self.name}, seed {self.cfg.seed}"
        return text if self.condition == "day" else f"{self.condition.capitalize()}, {text}"

    # ---------------------------------------------------------------- timing
    def _timeline(self) -> dict[str, list[tuple[float, int, bool]]]:
        """Per channel: (time s, sample index it belongs to, is key) in time order."""
        n_keys = self.cfg.samples_per_scene
        out: dict[str, list[tuple[float, int, bool]]] = {}
        for ch, sensor in self.rig.items():
            per = 1 if sensor.modality == "camera" else self.cfg.lidar_sweeps if sensor.modality == "lidar" else self.cfg.radar_sweeps
            rows = []
            for k in range(n_keys):
                tk = k * KEY_PERIOD + sensor.time_offset
                if k > 0:
                    # Sweeps between key k-1 and key k belong to sample k (the one that follows).
                    rows += [(tk - KEY_PERIOD + j * KEY_PERIOD / per, k, False) for j in range(1, per)]
                rows.append((tk, k, True))
            out[ch] = rows
        return out

    def _us(self, t: float) -> int:
        return self.t0 + int(round(t * 1e6))

    # ---------------------------------------------------------------- frames
    def _ego(self, t: float) -> tuple[np.ndarray, float, np.ndarray]:
        pos, yaw = self.world.ego_pose(t)
        m = np.eye(4)
        m[:3, :3] = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        m[:3, 3] = pos
        return pos, yaw, m

    def _to_sensor(self, boxes: np.ndarray, pos: np.ndarray, yaw: float, sensor: Sensor | None) -> np.ndarray:
        """Global (N, 9) boxes -> a sensor's frame (the ego frame for None); velocity rotated too.

        Every frame here is level (flat world, yaw-only mounts), so this is a 2D rigid motion.
        """
        mount = sensor.translation if sensor is not None else np.zeros(3)
        s_yaw = yaw + (np.arctan2(sensor.rotation[1, 0], sensor.rotation[0, 0]) if sensor is not None else 0.0)
        c, s = np.cos(yaw), np.sin(yaw)
        s_pos = pos + np.array([c * mount[0] - s * mount[1], s * mount[0] + c * mount[1], mount[2]])
        c, s = np.cos(s_yaw), np.sin(s_yaw)
        out = boxes.copy()
        dx, dy = boxes[:, 0] - s_pos[0], boxes[:, 1] - s_pos[1]
        out[:, 0], out[:, 1], out[:, 2] = c * dx + s * dy, -s * dx + c * dy, boxes[:, 2] - s_pos[2]
        out[:, 6] = boxes[:, 6] - s_yaw
        out[:, 7], out[:, 8] = c * boxes[:, 7] + s * boxes[:, 8], -s * boxes[:, 7] + c * boxes[:, 8]
        return out

    def _physical(self, boxes: np.ndarray) -> np.ndarray:
        out = boxes.copy()
        out[:, 3:6] -= self.shrink
        out[:, 2] -= PHYSICAL_SHRINK / 2
        return out

    def _lidar(self, t: float, rng: np.random.Generator):
        pos, yaw, ego2global = self._ego(t)
        sensor = self.rig[LIDAR_CHANNEL]
        boxes = self._to_sensor(self._physical(self.world.boxes(t)), pos, yaw, sensor)
        lidar2global = ego2global @ sensor.to_ego()

        def ground_intensity(p: np.ndarray) -> np.ndarray:
            gx = lidar2global[0, 0] * p[:, 0] + lidar2global[0, 1] * p[:, 1] + lidar2global[0, 3]
            gy = lidar2global[1, 0] * p[:, 0] + lidar2global[1, 1] * p[:, 1] + lidar2global[1, 3]
            mean_std = LABEL_INTENSITY[self.ground.lookup(gx, gy)]
            # Grazing rays return less: far ground is dimmer than the rings near the car.
            cos_inc = np.abs(p[:, 2]) / np.maximum(np.linalg.norm(p, axis=1), 1e-6)
            value = mean_std[:, 0] + rng.standard_normal(len(p)) * mean_std[:, 1]
            return np.maximum(value * (0.5 + cos_inc), 0)

        sweep = cast_lidar(boxes[:, :7], self.world.objects.cls, sensor.translation[2], ground_intensity, rng)
        sweep.points, sweep.object_id = attenuate_lidar(sweep.points, sweep.object_id, self.condition, rng)
        return sweep

    def _radar(self, ch: str, t: float, rng: np.random.Generator):
        pos, yaw, _ = self._ego(t)
        sensor = self.rig[ch]
        boxes = self._to_sensor(self._physical(self.world.boxes(t)), pos, yaw, sensor)
        v_ego, yaw_rate = self.world.ego_velocity(t)
        # Sensor velocity = ego velocity + yaw rate x mount lever arm, in the sensor frame.
        c, s = np.cos(yaw), np.sin(yaw)
        lever = np.array([c * sensor.translation[0] - s * sensor.translation[1], s * sensor.translation[0] + c * sensor.translation[1]])
        v = v_ego + yaw_rate * np.array([-lever[1], lever[0]])
        s_yaw = yaw + np.arctan2(sensor.rotation[1, 0], sensor.rotation[0, 0])
        c, s = np.cos(s_yaw), np.sin(s_yaw)
        v_s = np.array([c * v[0] + s * v[1], -s * v[0] + c * v[1]])
        reflectors = None
        if self.reflector_boxes is not None:
            reflectors = np.column_stack([self._to_sensor(self.reflector_boxes, pos, yaw, sensor)[:, :2], self.reflector_rcs])
        return simulate_radar(boxes, self.world.objects.cls, self.static, v_s, rng, reflectors,
                              swerling=self.cfg.radar_rcs == "swerling")

    def _camera(self, ch: str, t: float, rng: np.random.Generator) -> np.ndarray:
        pos, yaw, ego2global = self._ego(t)
        boxes = self._to_sensor(self.world.boxes(t), pos, yaw, None)
        c, s = np.cos(-yaw), np.sin(-yaw)
        sun_ego = np.array([c * self.sun[0] - s * self.sun[1], s * self.sun[0] + c * self.sun[1], self.sun[2]])
        o = self.world.objects
        view = self.views[ch]
        args = (view, ego2global, self.ground, boxes[:, :7], o.cls, o.colour, self.rider, sun_ego)
        light = None
        if self.condition == "night" and self.cfg.night_lighting == "lamps":
            img, light = render_night(*args, lamps_on=~self.static)   # parked vehicles are dark
        else:
            img = render_camera(*args)
        sky = (view.ground_weight == 0) & (img == view.backdrop).all(-1) if self.condition == "night" else None
        return degrade_image(img, self.condition, rng, sky, light, auto_exposure=self.cfg.night_exposure == "auto")

    # ---------------------------------------------------------------- write
    def write(self) -> None:
        n_keys = self.cfg.samples_per_scene
        sample_toks = [self.tok("sample", k) for k in range(n_keys)]
        key_lidar_t = [k * KEY_PERIOD for k in range(n_keys)]
        self._write_scene_rows(sample_toks, key_lidar_t)
        key_lidar, key_lidar_vis, key_radar = self._write_streams(sample_toks)
        self._annotate(sample_toks, key_lidar_t, key_lidar, key_lidar_vis, key_radar)

    def _write_scene_rows(self, sample_toks: list[str], key_lidar_t: list[float]) -> None:
        """log, map (+ its PNG), calibrated_sensor, scene and sample rows."""
        tok, tables = self.tok, self.tables
        n_keys = len(sample_toks)
        scene_tok, log_tok = tok("scene"), tok("log")
        tables["log"].append({"token": log_tok, "logfile": self.logfile, "vehicle": "n015",
                              "date_captured": self.logfile[5:15], "location": LOCATIONS[self.index % len(LOCATIONS)]})
        map_file = f"maps/{tok('map')}.png"
        (self.root / map_file).write_bytes(self.ground.preview_png())
        tables["map"].append({"token": tok("map"), "log_tokens": [log_tok], "category": "semantic_prior", "filename": map_file})
        for ch, sensor in self.rig.items():
            tables["calibrated_sensor"].append({
                "token": self.calib[ch], "sensor_token": self.sensor_tokens[ch],
                "translation": [float(v) for v in sensor.translation],
                "rotation": matrix_quaternion(sensor.rotation),
                "camera_intrinsic": sensor.intrinsic.tolist() if sensor.intrinsic is not None else [],
            })
        tables["scene"].append({"token": scene_tok, "log_token": log_tok, "nbr_samples": n_keys,
                                "first_sample_token": sample_toks[0], "last_sample_token": sample_toks[-1],
                                "name": self.name, "description": self.description})
        for k in range(n_keys):
            tables["sample"].append({"token": sample_toks[k], "timestamp": self._us(key_lidar_t[k]),
                                     "prev": sample_toks[k - 1] if k else "", "next": sample_toks[k + 1] if k + 1 < n_keys else "",
                                     "scene_token": scene_tok})

    def _write_streams(self, sample_toks: list[str]):
        """Every sensor's files, ego poses and sample_data rows; returns what annotation needs."""
        cfg, tok, tables = self.cfg, self.tok, self.tables
        n_keys = len(sample_toks)
        timeline = self._timeline()
        key_lidar: dict[int, np.ndarray] = {}
        key_radar: dict[int, list[np.ndarray]] = {k: [] for k in range(n_keys)}
        key_lidar_vis: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for s_i, ch in enumerate(self.rig):
            rows = timeline[ch]
            sd_toks = [tok("sd", ch, j) for j in range(len(rows))]
            modality = self.rig[ch].modality
            for j, (t, k, is_key) in enumerate(rows):
                ts = self._us(t)
                folder = "samples" if is_key else "sweeps"
                ext = {"camera": "jpg", "lidar": "pcd.bin", "radar": "pcd"}[modality]
                rel = f"{folder}/{ch}/{self.logfile}__{ch}__{ts}.{ext}"
                rng = np.random.default_rng([cfg.seed, self.index, s_i, j])
                pos, yaw, ego2global = self._ego(t)
                if modality == "lidar":
                    sweep = self._lidar(t, rng)
                    T.write_lidar(self.root / rel, sweep.points)
                    if is_key:
                        key_lidar[k] = sweep.points
                        key_lidar_vis[k] = (sweep.rays_hit, sweep.rays_visible)
                elif modality == "radar":
                    sweep = self._radar(ch, t, rng)
                    T.write_radar(self.root / rel, sweep.points)
                    if is_key:
                        key_radar[k].append(_radar_to_global(sweep.points, ego2global @ self.rig[ch].to_ego()))
                else:
                    T.write_jpeg(self.root / rel, self._camera(ch, t, rng), cfg.jpeg_quality)
                pose_tok = tok("ego_pose", ch, j)
                tables["ego_pose"].append({"token": pose_tok, "timestamp": ts, "rotation": yaw_quaternion(yaw),
                                           "translation": [float(v) for v in pos]})
                tables["sample_data"].append({
                    "token": sd_toks[j], "sample_token": sample_toks[k], "ego_pose_token": pose_tok,
                    "calibrated_sensor_token": self.calib[ch], "timestamp": ts, "fileformat": "jpg" if ext == "jpg" else "pcd",
                    "is_key_frame": is_key, "height": cfg.image_height if modality == "camera" else 0,
                    "width": cfg.image_width if modality == "camera" else 0, "filename": rel,
                    "prev": sd_toks[j - 1] if j else "", "next": sd_toks[j + 1] if j + 1 < len(rows) else "",
                })
        return key_lidar, key_lidar_vis, key_radar

    def _annotate(self, sample_toks, key_t, key_lidar, key_lidar_vis, key_radar) -> None:
        tok, tables, o = self.tok, self.tables, self.world.objects
        lidar = self.rig[LIDAR_CHANNEL]
        cat_tok = {c["name"]: c["token"] for c in self.static_tables["category"]}
        att_tok = {a["name"]: a["token"] for a in self.static_tables["attribute"]}
        rows_by_obj: dict[int, list[dict]] = {}
        for k, t in enumerate(key_t):
            pos, yaw, ego2global = self._ego(t)
            boxes = self.world.boxes(t)
            near = np.nonzero(np.hypot(boxes[:, 0] - pos[0], boxes[:, 1] - pos[1]) <= ANNOTATION_RANGE)[0]
            lidar_global = _points_to_global(key_lidar[k][:, :3], ego2global @ lidar.to_ego())
            n_lidar = count_in_boxes(lidar_global, boxes[near])
            n_radar = count_in_boxes(np.concatenate(key_radar[k]) if key_radar[k] else np.zeros((0, 3)), boxes[near])
            hit, vis = key_lidar_vis[k]
            frac = np.where(hit[near] > 0, vis[near] / np.maximum(hit[near], 1), 0.0)
            vis_tok = T.visibility_token(frac)
            for j, i in enumerate(near):
                b = boxes[i]
                ann_tok = tok("ann", int(i), k)
                att = [att_tok[ATTRIBUTES[o.attribute[i]]]] if o.attribute[i] >= 0 else []
                rows_by_obj.setdefault(int(i), []).append({
                    "token": ann_tok, "sample_token": sample_toks[k], "instance_token": tok("instance", int(i)),
                    "visibility_token": str(vis_tok[j]), "attribute_tokens": att,
                    "translation": [float(b[0]), float(b[1]), float(b[2])], "size": [float(v) for v in b[3:6]],
                    "rotation": yaw_quaternion(float(b[6])), "prev": "", "next": "",
                    "num_lidar_pts": int(n_lidar[j]), "num_radar_pts": int(n_radar[j]),
                })
        for i in sorted(rows_by_obj):
            rows = rows_by_obj[i]
            for a, b in zip(rows[:-1], rows[1:]):
                a["next"], b["prev"] = b["token"], a["token"]
            tables["sample_annotation"].extend(rows)
            name = CLASS_NAMES[o.cls[i]]
            tables["instance"].append({"token": tok("instance", i), "category_token": cat_tok[CATEGORY[name]],
                                       "nbr_annotations": len(rows), "first_annotation_token": rows[0]["token"],
                                       "last_annotation_token": rows[-1]["token"]})


def _points_to_global(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    return p @ m[:3, :3].T + m[:3, 3]


def _radar_to_global(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Global xyz of the radar points the devkit's default filters keep."""
    keep = (points["invalid_state"] == 0) & (points["dyn_prop"] <= 6) & (points["ambig_state"] == 3)
    xyz = np.stack([points["x"], points["y"], points["z"]], 1)[keep].astype(np.float64)
    return _points_to_global(xyz, m)


def count_in_boxes(points: np.ndarray, boxes: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Points (K, 3) inside each box (N, >=7: x, y, z, w, l, h, yaw), same frame, optional margin."""
    if len(points) == 0 or len(boxes) == 0:
        return np.zeros(len(boxes), np.int64)
    out = np.zeros(len(boxes), np.int64)
    reach = 0.5 * np.linalg.norm(boxes[:, 3:6], axis=1) + margin
    for j, b in enumerate(boxes):        # one vectorised test per box (tens of boxes)
        d = points - b[:3]
        cand = np.abs(d[:, 0]) <= reach[j]
        cand &= np.abs(d[:, 1]) <= reach[j]
        dd = d[cand]
        c, s = np.cos(b[6]), np.sin(b[6])
        lx, ly = c * dd[:, 0] + s * dd[:, 1], -s * dd[:, 0] + c * dd[:, 1]
        inside = (np.abs(lx) <= b[4] / 2 + margin) & (np.abs(ly) <= b[3] / 2 + margin) & (np.abs(dd[:, 2]) <= b[5] / 2 + margin)
        out[j] = int(inside.sum())
    return out
