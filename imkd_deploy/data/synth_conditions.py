"""Scene conditions of the synthetic drive: day, rain and night, and what each does to a sensor.

nuScenes records ~12% of its scenes at night and ~20% in rain. They are where a camera
detector loses most and where active sensors (LiDAR, radar) keep working, i.e. where a
camera+radar student has the most to learn from a LiDAR teacher. The models here act on
the rendered or ray-cast output, so a day scene is bit-identical with or without them.

- night: the camera gets ~6% of the daylight signal (street lighting, auto-exposure at its
  limit), amplified sensor noise and low-light blur; LiDAR and radar are unchanged. With
  ``SynthConfig.night_lighting="lamps"`` the night camera also sees the light sources of a
  real night drive: the head and tail lamps of moving vehicles (parked ones are dark) and
  what the ego's low beams light ahead of it, reflective stripes brightest. Without it (the
  default, ``"street"``) street lighting is all there is, so a night image shows little more
  than silhouettes: nothing a real camera at night relies on. With
  ``SynthConfig.night_exposure="auto"`` the camera meters each night frame as a real one does:
  the shutter stays open up to AE_EXPOSURE times longer (more signal over the same read
  noise), then gain lifts the frame's mean to AE_TARGET, amplifying the noise with it and
  saturating the lamps (the longer shutter's motion blur is not drawn). The default
  (``"fixed"``) keeps the dark frame: mean ~9 of 255, its signal about its noise.
- rain: the camera sees haze (contrast lost to a grey veil), blur and a darker overcast
  sky; LiDAR returns are attenuated with range (two-way extinction, ~0.004 /m: moderate
  rain), some drop out, and wet asphalt returns half its dry intensity; radar is unchanged.
"""

from __future__ import annotations

import cv2
import numpy as np

# ``conditions="mixed"``: scene i gets MIXED_CYCLE[i % 10]. With the devkit's mini split
# order (synth.MINI_SCENE_ORDER) the 8 train scenes hold 1 night and 2 rain scenes, close to
# nuScenes' shares, and the 2 val scenes one day and one night scene, so val scores both.
MIXED_CYCLE = ("day", "day", "rain", "night", "day", "day", "night", "rain", "day", "day")

NIGHT_GAIN, NIGHT_NOISE, NIGHT_BLUR = 0.06, 8.0, 1.0           # signal kept, noise sigma (0..255), blur sigma (px at 800 wide)
NIGHT_SKY = np.array([8.0, 10.0, 16.0], np.float32)            # before the gain's noise: an unlit sky
NIGHT_LIGHTING = ("street", "lamps")                            # SynthConfig.night_lighting
NIGHT_EXPOSURE = ("fixed", "auto")                              # SynthConfig.night_exposure
AE_EXPOSURE, AE_TARGET, AE_MAX_GAIN = 4.0, 60.0, 4.0            # longest shutter (x fixed's), metered frame mean (0..255), gain cap
# The ego's low beams, ego frame (origin at the rear axle): lamps at the front bumper, full
# light (a fraction of daylight) out to HEAD_RANGE m then the inverse square, a beam of
# azimuth sigma HEAD_SPREAD rad. Reflective stripes send RETRO times the light back.
HEAD_POS = np.array([3.4, 0.0, 0.7])
HEAD_GAIN, HEAD_RANGE, HEAD_SPREAD, RETRO = 0.8, 8.0, 0.45, 3.0
RAIN_VEIL, RAIN_GREY, RAIN_GAIN, RAIN_BLUR, RAIN_NOISE = 0.35, 150.0, 0.85, 1.4, 2.5
RAIN_EXTINCTION = 0.004                                         # 1/m, LiDAR (905 nm) in moderate rain
WET_GROUND = 0.5                                                # intensity factor of wet road returns


def condition_of(mode: str, index: int) -> str:
    """The condition of scene ``index`` for ``SynthConfig.conditions`` (day | rain | night | mixed)."""
    return MIXED_CYCLE[index % len(MIXED_CYCLE)] if mode == "mixed" else mode


def headlight(points: np.ndarray, normals: np.ndarray | None = None) -> np.ndarray:
    """The light the ego's low beams add at ego-frame ``points`` (..., 3), as a fraction of
    daylight; with ``normals`` (..., 3) a surface gets the cosine of its incidence angle
    (the road, lit by a beam aimed down at it, does not)."""
    d = points - HEAD_POS
    dist = np.maximum(np.linalg.norm(d, axis=-1), 1e-6)
    azimuth = np.arctan2(np.abs(d[..., 1]), d[..., 0])
    out = HEAD_GAIN * np.minimum(1.0, (HEAD_RANGE / dist) ** 2) * np.exp(-(azimuth / HEAD_SPREAD) ** 2) * (d[..., 0] > 0)
    if normals is not None:
        out = out * np.clip(-(normals * d).sum(-1) / dist, 0.0, 1.0)
    return out


def degrade_image(img: np.ndarray, condition: str, rng: np.random.Generator, sky: np.ndarray | None = None,
                  light: np.ndarray | None = None, auto_exposure: bool = False) -> np.ndarray:
    """A rendered (H, W, 3) uint8 image as the camera records it in ``condition``.

    ``sky``: (H, W) bool, the pixels that show the sky (black at night). ``light``: (H, W)
    float32, the light at each pixel as a fraction of daylight (``synth_camera.render_night``);
    without it the night light is NIGHT_GAIN everywhere. ``auto_exposure``: meter the night
    frame (longer shutter, then gain) instead of recording it at the fixed exposure."""
    if condition == "day":
        return img
    scale = img.shape[1] / 800.0                       # blur in pixels of an 800-wide image
    x = img.astype(np.float32)
    if condition == "night":
        x = x * NIGHT_GAIN if light is None else x * light[..., None]
        if sky is not None:
            x[sky] = NIGHT_SKY
        x = cv2.GaussianBlur(x, (0, 0), NIGHT_BLUR * scale)
        if auto_exposure:   # a longer shutter gathers more signal; the read noise stays
            x = _metered(x, AE_EXPOSURE)
        # shot noise grows with the signal, read noise does not
        sigma = np.sqrt(NIGHT_NOISE**2 + 0.5 * x)
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma
        if auto_exposure:   # gain brightens signal and noise alike, and saturates the lamps
            x = _metered(x, AE_MAX_GAIN)
    else:
        x = (x * (1.0 - RAIN_VEIL) + RAIN_GREY * RAIN_VEIL) * RAIN_GAIN
        x = cv2.GaussianBlur(x, (0, 0), RAIN_BLUR * scale)
        x = x + rng.standard_normal(x.shape, dtype=np.float32) * RAIN_NOISE
    return np.clip(x, 0, 255).round().astype(np.uint8)


def _metered(x: np.ndarray, cap: float) -> np.ndarray:
    """``x`` scaled towards the frame mean AE_TARGET, by a factor between 1 and ``cap``."""
    return x * np.clip(AE_TARGET / max(float(x.mean()), 1e-3), 1.0, cap)


def attenuate_lidar(points: np.ndarray, object_id: np.ndarray, condition: str,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """LiDAR (K, 5) sensor-frame points (x, y, z, intensity, ring) and their box ids in ``condition``.

    Rain: a return survives with the two-way transmission exp(-2 a r) (the weak ones fall
    below the detector threshold) and keeps that fraction of its intensity; road returns
    (``object_id == -1``) lose half more to the water film."""
    if condition != "rain" or not len(points):
        return points, object_id
    transmission = np.exp(-2.0 * RAIN_EXTINCTION * np.linalg.norm(points[:, :3], axis=1))
    keep = rng.random(len(points)) < transmission
    out = points[keep].copy()
    out[:, 3] *= transmission[keep] * np.where(object_id[keep] < 0, WET_GROUND, 1.0)
    return out, object_id[keep]
