"""Plain dataclass configs, validated and JSON round-trippable.

One home for every size the model, the data pipeline and the training loop use: nothing
downstream hard-codes a channel count, a grid or an image size. Presets are functions
returning fresh instances (``PRESETS``), so a run can override fields and save the
resolved config next to its checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLASS_NAMES: tuple[str, ...] = (
    "car", "truck", "bus", "trailer", "construction_vehicle",
    "pedestrian", "motorcycle", "bicycle", "traffic_cone", "barrier",
)

CAMERA_CHANNELS: tuple[str, ...] = (
    "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_RIGHT",
    "CAM_BACK", "CAM_BACK_LEFT", "CAM_FRONT_LEFT",
)
RADAR_CHANNELS: tuple[str, ...] = (
    "RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT",
    "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT",
)
LIDAR_CHANNEL = "LIDAR_TOP"
# Scene conditions, told apart by the scene description ("Night, ...", "Rain, ..."), as on nuScenes.
SCENE_CONDITIONS: tuple[str, ...] = ("day", "rain", "night")


class ConfigError(ValueError):
    """A config field is unknown, of the wrong type, or out of range."""


def _check_keys(cls: type, data: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{cls.__name__}: unknown field '{key}'{hint}")


def _coerce(cls: type, name: str, value: Any, default: Any) -> Any:
    """JSON gives lists where the dataclass holds tuples; everything else must match type."""
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{cls.__name__}.{name}: expected bool, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{cls.__name__}.{name}: expected a number, got {value!r}")
        value = float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{cls.__name__}.{name}: expected int, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{cls.__name__}.{name}: expected str, got {value!r}")
    elif isinstance(default, tuple) and not isinstance(value, tuple):
        raise ConfigError(f"{cls.__name__}.{name}: expected a list, got {value!r}")
    return value


class _Serializable:
    """Mixin: to_dict / from_dict / JSON with strict field checking."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _check_keys(cls, data)
        defaults = cls()
        kwargs = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                continue
            default = getattr(defaults, f.name)
            value = data[f.name]
            if isinstance(default, _Serializable):
                if isinstance(value, _Serializable):
                    kwargs[f.name] = value
                    continue
                if not isinstance(value, dict):
                    raise ConfigError(f"{cls.__name__}.{f.name}: expected an object, got {value!r}")
                value = type(default).from_dict(value)
            else:
                value = _coerce(cls, f.name, value, default)
            kwargs[f.name] = value
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def replace(self, **overrides):
        merged = self.to_dict()
        merged.update(overrides)
        return type(self).from_dict(merged)

    def validate(self) -> None:  # overridden where fields constrain each other
        pass

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


@dataclass
class BEVGrid(_Serializable):
    """The bird's-eye-view grid, ego frame, metres. Cells are square."""

    x_range: tuple[float, float] = (-51.2, 51.2)
    y_range: tuple[float, float] = (-51.2, 51.2)
    z_range: tuple[float, float] = (-5.0, 3.0)
    cell: float = 0.8

    @property
    def nx(self) -> int:
        return int(round((self.x_range[1] - self.x_range[0]) / self.cell))

    @property
    def ny(self) -> int:
        return int(round((self.y_range[1] - self.y_range[0]) / self.cell))

    def validate(self) -> None:
        for name in ("x_range", "y_range", "z_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ConfigError(f"BEVGrid.{name}: lower bound must be below upper, got {(lo, hi)}")
        if self.cell <= 0:
            raise ConfigError(f"BEVGrid.cell must be > 0, got {self.cell}")


@dataclass
class ModelConfig(_Serializable):
    """Student and teacher share this config (same BEV encoder and head)."""

    name: str = "tiny"
    # camera branch
    image_size: tuple[int, int] = (96, 256)          # (H, W) network input after resize+crop
    num_cams: int = 6
    backbone: str = "resnet_tiny"                    # resnet_tiny | resnet18 | resnet50
    backbone_width: int = 16                         # stem width; resnet18/50 use 64
    fpn_channels: int = 32
    downsample: int = 16                             # image stride of the depth/context features
    depth_bins: tuple[float, float, float] = (2.0, 58.0, 2.0)   # (min, max, step) metres
    context_channels: int = 32                       # C of the camera BEV
    # BEV
    grid: BEVGrid = field(default_factory=lambda: BEVGrid((-32.0, 32.0), (-32.0, 32.0), (-5.0, 3.0), 1.0))
    # radar branch
    radar_sweeps: int = 3
    radar_channels: int = 32
    # lidar teacher branch: 5 sweeps of the writer's 10 Hz LiDAR span 0.4 s, about
    # nuscenes_r50's 10 sweeps at 20 Hz; a shorter window leaves the teacher blind to motion
    lidar_sweeps: int = 5
    lidar_channels: int = 32
    # fused BEV, encoder and head
    fused_channels: int = 64
    bev_encoder_channels: int = 64
    head_channels: int = 64
    num_classes: int = len(CLASS_NAMES)
    # image normalisation (RGB, 0..255 input)
    image_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    image_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def num_depth_bins(self) -> int:
        lo, hi, step = self.depth_bins
        return int(round((hi - lo) / step))

    @property
    def feature_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.downsample, w // self.downsample

    def validate(self) -> None:
        h, w = self.image_size
        if h % self.downsample or w % self.downsample:
            raise ConfigError(
                f"ModelConfig.image_size {self.image_size} must be divisible by downsample {self.downsample}"
            )
        if self.backbone not in ("resnet_tiny", "resnet18", "resnet50"):
            raise ConfigError(f"ModelConfig.backbone: unknown '{self.backbone}' (resnet_tiny|resnet18|resnet50)")
        lo, hi, step = self.depth_bins
        if not (0 < lo < hi and step > 0):
            raise ConfigError(f"ModelConfig.depth_bins must be (min>0, max>min, step>0), got {self.depth_bins}")
        if self.num_classes != len(CLASS_NAMES):
            raise ConfigError(f"ModelConfig.num_classes must be {len(CLASS_NAMES)} (nuScenes detection classes)")
        if self.radar_sweeps < 1 or self.lidar_sweeps < 1:
            raise ConfigError(f"ModelConfig.radar_sweeps and lidar_sweeps must be >= 1 (the key sweep counts), "
                              f"got {self.radar_sweeps} and {self.lidar_sweeps}")
        self.grid.validate()


# The distillation levels each DistillConfig field acts on (fields not named act on every run).
# A field set for a run without any of its levels changes nothing, which a user should be told.
FIELD_LEVELS = {
    **dict.fromkeys(("w_radar", "lambda_on", "lambda_off", "lidar_weight"), ("radar",)),
    **dict.fromkeys(("w_fused", "heatmap_eps", "fused_at", "fused_gate"), ("fused",)),
    **dict.fromkeys(("feature_norm", "kd_channels", "adapter", "kd_until"), ("radar", "fused")),
    **dict.fromkeys(("w_resp", "w_resp_reg", "resp_until", "resp_reg_skip", "resp_reg_gate", "resp_gate"), ("resp",)),
    "kd_skip": ("radar", "fused", "resp"),
}


@dataclass
class DistillConfig(_Serializable):
    """IMKD loss weights. ``levels`` selects the ablation: none|radar|fused|all (or a+b)."""

    levels: str = "all"
    w_depth: float = 1.0
    w_radar: float = 1.0         # level 1: LiDAR -> radar, intensity-aware
    w_fused: float = 1.0         # level 2: LiDAR -> fused, intensity-guided
    w_resp: float = 0.0          # optional response distillation on heatmaps
    w_resp_reg: float = 0.0      # ... and on the regression maps around GT centres (scale: the reg loss's)
    w_dense_reg: float = 0.0     # GT regression L1 at every cell of the GT Gaussians, not the centre only (scale: the reg loss's)
    lambda_on: float = 1.0       # level-1 weight where radar hits a cell
    lambda_off: float = 0.2      # ... and where it does not
    heatmap_eps: float = 0.05    # level-2 floor on the GT heatmap weight
    intensity_fusion: bool = True  # level 3: the intensity prior feeds the fusion gate
    fused_at: str = "fused"      # level-2 student side: "fused" (fusion output) | "encoder" (BEV-encoder output)
    lidar_weight: str = "intensity"  # level-1 I_L: "intensity" (all returns) | "structure" (above-ground only)
    feature_norm: bool = False   # standardise each channel (per sample, over BEV) before the feature MSE
    kd_channels: float = 1.0     # share of the student's channels the level-1/2 adapters read; the rest stay free
    adapter: str = "linear"      # level-1/2 adapters: "linear" (1x1 conv) | "conv" (3x3 conv-BN-ReLU, then 1x1)
    kd_until: float | None = None  # None: constant level-1/2 weights; a share s of the run: they fall (cosine) to 0 at s*max_steps
    resp_until: float | None = None  # the same schedule for w_resp and w_resp_reg, on its own
    resp_reg_skip: str = ""      # head outputs the regression KD leaves out, "+"-separated (offset|height|dims|rot|vel)
    resp_reg_gate: bool = False  # regression KD of a head output only at cells where the teacher beats the student on the GT
    resp_gate: bool = False      # heatmap KD of a class only at cells where the teacher's heatmap is nearer the GT's than the student's
    fused_gate: bool = False     # level 2's object weight only at cells where the teacher's box beats the student's on the GT
    kd_skip: str = ""            # scene conditions ("+"-separated day|rain|night) whose samples get no distillation at all

    @property
    def skip_conditions(self) -> frozenset[str]:
        """``kd_skip`` as a set of scene conditions."""
        return frozenset(self.kd_skip.split("+")) - {""}

    def enabled(self, level: str) -> bool:
        parts = set(self.levels.split("+"))
        if "none" in parts:
            return False
        return "all" in parts or level in parts

    def acts_on(self, field: str) -> bool:
        """Whether ``field`` can change a run of these levels (FIELD_LEVELS)."""
        return field not in FIELD_LEVELS or any(self.enabled(level) for level in FIELD_LEVELS[field])

    def idle_settings(self) -> dict[str, object]:
        """Fields set away from their defaults that none of the enabled levels reads."""
        default = DistillConfig()
        return {f: getattr(self, f) for f in FIELD_LEVELS if getattr(self, f) != getattr(default, f) and not self.acts_on(f)}

    def validate(self) -> None:
        parts = set(self.levels.split("+"))
        bad = parts - {"none", "radar", "fused", "resp", "all"}
        if bad:
            raise ConfigError(f"DistillConfig.levels: unknown level(s) {sorted(bad)}; use none|radar|fused|all")
        if self.fused_at not in ("fused", "encoder"):
            raise ConfigError(f"DistillConfig.fused_at: '{self.fused_at}' (fused|encoder)")
        if self.lidar_weight not in ("intensity", "structure"):
            raise ConfigError(f"DistillConfig.lidar_weight: '{self.lidar_weight}' (intensity|structure)")
        if self.adapter not in ("linear", "conv"):
            raise ConfigError(f"DistillConfig.adapter: '{self.adapter}' (linear|conv)")
        if not 0.0 < self.kd_channels <= 1.0:
            raise ConfigError(f"DistillConfig.kd_channels: {self.kd_channels} (a share in (0, 1])")
        from imkd_deploy.model.head import HEAD_OUTPUTS   # here: the head module imports this one
        unknown = sorted(set(self.resp_reg_skip.split("+")) - {""} - set(HEAD_OUTPUTS))
        if unknown:
            raise ConfigError(f"DistillConfig.resp_reg_skip: unknown head output(s) {unknown}; use {'|'.join(HEAD_OUTPUTS)}")
        unknown = sorted(self.skip_conditions - set(SCENE_CONDITIONS))
        if unknown:
            raise ConfigError(f"DistillConfig.kd_skip: unknown scene condition(s) {unknown}; use {'|'.join(SCENE_CONDITIONS)}")
        for name in ("kd_until", "resp_until"):
            share = getattr(self, name)
            if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0):
                raise ConfigError(f"DistillConfig.{name}: {share} (None, or a share of the run in (0, 1])")


@dataclass
class TrainConfig(_Serializable):
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 2
    max_steps: int = 400
    warmup_steps: int = 20
    schedule: str = "cosine"      # cosine | step
    grad_clip: float = 5.0
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    num_workers: int = 0
    amp: str = "auto"             # auto: bf16 autocast on CUDA, none on CPU | bf16 | off

    def validate(self) -> None:
        if self.schedule not in ("cosine", "step"):
            raise ConfigError(f"TrainConfig.schedule: '{self.schedule}' (cosine|step)")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"TrainConfig.amp: '{self.amp}' (auto|bf16|off)")


@dataclass
class RunConfig(_Serializable):
    """Everything a training run resolves to; saved into its run dir and its checkpoints."""

    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def tiny() -> ModelConfig:
    """Same code as nuscenes_r50, small enough to train on a 2-core CPU in minutes."""
    return ModelConfig()


def nuscenes_r50() -> ModelConfig:
    """The reference nuScenes configuration (BEVDepth/CRN-style R50 256x704)."""
    return ModelConfig(
        name="nuscenes_r50",
        image_size=(256, 704),
        backbone="resnet50",
        backbone_width=64,
        fpn_channels=256,
        downsample=16,
        depth_bins=(1.0, 60.0, 0.5),
        context_channels=80,
        grid=BEVGrid((-51.2, 51.2), (-51.2, 51.2), (-5.0, 3.0), 0.8),
        radar_sweeps=6,
        radar_channels=64,
        lidar_sweeps=10,
        lidar_channels=64,
        fused_channels=160,
        bev_encoder_channels=160,
        head_channels=64,
    )


PRESETS = {"tiny": tiny, "nuscenes_r50": nuscenes_r50}


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name, or a JSON file holding a ModelConfig (or a RunConfig's 'model')."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]()
    path = Path(key)
    if not path.exists():
        close = difflib.get_close_matches(key, list(PRESETS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"config '{key}' is neither a preset ({', '.join(PRESETS)}) nor a file.{hint}")
    data = json.loads(path.read_text())
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    return ModelConfig.from_dict(data)
