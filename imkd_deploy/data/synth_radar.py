"""Continental ARS408-like radar returns: sparse, noisy, with RCS, Doppler, clutter, ghosts.

What makes radar differ from LiDAR, and what the simulation keeps:
- a few returns per object (more for big metal), on the surface facing the sensor, with
  0.2-0.5 m position noise; RCS by class/material;
- radial velocity only: (vx, vy) is the raw radial velocity vector relative to the moving
  sensor, (vx_comp, vy_comp) the same with ego motion removed (0 for static things);
- clutter from the static world and multipath ghosts behind real targets, some flagged
  invalid/ambiguous so the devkit's default filters have something to remove;
- z = 0 in the sensor frame, as real nuScenes radar (no elevation measurement).

``SynthConfig.radar_clutter="urban"`` adds what makes real radar hard to use alone: fixed
roadside reflectors (poles, signs, guard rails, kerbs, building corners) that return sweep
after sweep at the same place with car-like RCS, and the ARS408's azimuth accuracy, which
degrades from 0.3 deg on boresight to 1 deg at 45 deg and 5 deg at 60 deg.

``SynthConfig.radar_rcs="swerling"`` adds the aspect fluctuation of a complex target's RCS
(Swerling I): a car is many scatterers whose echoes add with random phase, so one return's
power is exponentially distributed about the mean RCS, a spread of 5.6 dB on top of the
class spread. With ``"class"`` (the default) the best RCS threshold between a car's and a
pedestrian's returns errs on 2% of them; with ``"swerling"`` on 13%.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imkd_deploy.config import CLASS_NAMES

FOV_HALF = np.deg2rad(60.0)
LONG_RANGE_HALF = np.deg2rad(9.0)
NEAR_RANGE, FAR_RANGE = 70.0, 200.0      # metres: wide near beam, narrow far beam
RANGE_SIGMA, AZIMUTH_SIGMA, VEL_SIGMA = 0.15, np.deg2rad(0.4), 0.1

# class: (mean returns per sweep at 20 m, RCS mean dBsm, RCS std)
RADAR_PROFILE = {
    "car": (2.5, 8.0, 4.0), "truck": (5.0, 18.0, 4.0), "bus": (6.0, 20.0, 4.0),
    "trailer": (5.0, 17.0, 4.0), "construction_vehicle": (5.0, 16.0, 4.0),
    "pedestrian": (0.7, -6.0, 3.0), "motorcycle": (1.2, 3.0, 3.0), "bicycle": (0.8, -2.0, 3.0),
    "traffic_cone": (0.4, -10.0, 3.0), "barrier": (1.2, 0.0, 4.0),
}
_LAMBDA = np.array([RADAR_PROFILE[c][0] for c in CLASS_NAMES])
_RCS_MEAN = np.array([RADAR_PROFILE[c][1] for c in CLASS_NAMES])
_RCS_STD = np.array([RADAR_PROFILE[c][2] for c in CLASS_NAMES])
CLUTTER_PER_SWEEP = 9.0
RADAR_CLUTTER = ("light", "urban")     # SynthConfig.radar_clutter: random clutter only | + fixed reflectors
RADAR_RCS = ("class", "swerling")      # SynthConfig.radar_rcs: class mean + spread | + Swerling I fluctuation
# Urban clutter: fixed reflectors per 100 m of road and side, their offset from the road
# centre (m), RCS (dBsm mean, std: poles and signs overlap cars), and the chance one returns in a sweep.
REFLECTORS_PER_100M, REFLECTOR_LATERAL, REFLECTOR_RCS, REFLECTOR_DETECTION = 20.0, (6.2, 16.0), (6.0, 5.0), 0.6
# ARS408 near-range azimuth accuracy (datasheet): |azimuth| -> 1-sigma error
_AZ_KNOTS, _AZ_SIGMA = np.deg2rad([0.0, 45.0, 60.0]), np.deg2rad([0.3, 1.0, 5.0])
GHOST_PROB = 0.12

# The 18 nuScenes radar fields, in file order.
RADAR_DTYPE = np.dtype([
    ("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("dyn_prop", "i1"), ("id", "<i2"), ("rcs", "<f4"),
    ("vx", "<f4"), ("vy", "<f4"), ("vx_comp", "<f4"), ("vy_comp", "<f4"),
    ("is_quality_valid", "i1"), ("ambig_state", "i1"), ("x_rms", "i1"), ("y_rms", "i1"),
    ("invalid_state", "i1"), ("pdh0", "i1"), ("vx_rms", "i1"), ("vy_rms", "i1"),
])
assert RADAR_DTYPE.itemsize == 43


@dataclass
class RadarSweep:
    points: np.ndarray      # (M,) RADAR_DTYPE, sensor frame
    object_id: np.ndarray   # (M,) box index, -1 for clutter and ghosts


def _in_fov(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    az, r = np.arctan2(y, x), np.hypot(x, y)
    return (np.abs(az) <= FOV_HALF) & (r <= np.where(np.abs(az) <= LONG_RANGE_HALF, FAR_RANGE, NEAR_RANGE)) & (r > 0.5)


def _occluded(boxes: np.ndarray) -> np.ndarray:
    """Boxes whose centre azimuth is covered by a nearer box's angular extent."""
    d = np.hypot(boxes[:, 0], boxes[:, 1])
    az = np.arctan2(boxes[:, 1], boxes[:, 0])
    half = np.arctan2(0.4 * np.hypot(boxes[:, 3], boxes[:, 4]), d)
    daz = np.abs(np.angle(np.exp(1j * (az[None, :] - az[:, None]))))   # [i, j]: blocker i, target j
    cover = (daz < half[:, None]) & (d[:, None] < d[None, :] - 1.0)
    return cover.any(0)


def _surface_points(boxes: np.ndarray, n: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random points on the faces of each box that face the sensor (2D, sensor at the origin)."""
    box = np.repeat(np.arange(len(boxes)), n)
    b = boxes[box]
    c, s = np.cos(b[:, 6]), np.sin(b[:, 6])
    # A random point in the footprint, then walk from the sensor towards it: the entry point
    # into the footprint is where that ray meets the visible surface.
    lx, ly = rng.uniform(-0.5, 0.5, len(b)) * b[:, 4], rng.uniform(-0.5, 0.5, len(b)) * b[:, 3]
    px, py = b[:, 0] + c * lx - s * ly, b[:, 1] + s * lx + c * ly
    dist = np.hypot(px, py)
    ux, uy = px / dist, py / dist
    ox, oy = -(c * b[:, 0] + s * b[:, 1]), -(-s * b[:, 0] + c * b[:, 1])
    dx, dy = c * ux + s * uy, -s * ux + c * uy
    with np.errstate(divide="ignore", invalid="ignore"):
        tx1, tx2 = (-b[:, 4] / 2 - ox) / dx, (b[:, 4] / 2 - ox) / dx
        ty1, ty2 = (-b[:, 3] / 2 - oy) / dy, (b[:, 3] / 2 - oy) / dy
    t_in = np.maximum(np.nan_to_num(np.minimum(tx1, tx2), nan=-np.inf), np.nan_to_num(np.minimum(ty1, ty2), nan=-np.inf))
    t_in = np.clip(t_in, 0.0, dist)
    return np.stack([ux * t_in, uy * t_in], 1), box


def make_reflectors(road, s_span: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """(K, 3) global x, y and RCS (dBsm) of a scene's fixed roadside reflectors (urban clutter)."""
    length = max(s_span[1] - s_span[0], 1.0)
    n = int(rng.poisson(2 * REFLECTORS_PER_100M * length / 100.0))
    s = rng.uniform(s_span[0], s_span[1], n)
    lateral = rng.choice([-1.0, 1.0], n) * rng.uniform(*REFLECTOR_LATERAL, n)
    x, y, _ = road.at(s, lateral)
    return np.stack([x, y, rng.normal(REFLECTOR_RCS[0], REFLECTOR_RCS[1], n)], 1)


def simulate_radar(boxes: np.ndarray, cls: np.ndarray, static: np.ndarray,
                   sensor_vel: np.ndarray, rng: np.random.Generator,
                   reflectors: np.ndarray | None = None, swerling: bool = False) -> RadarSweep:
    """One sweep. boxes: (N, 9) in the sensor frame incl. velocity (vx, vy) in that frame.

    ``sensor_vel`` is the sensor's own velocity (2,) in its frame (ego motion + yaw rate);
    ``static`` marks objects that do not move (their Doppler is pure ego motion).
    ``reflectors``: (K, 3) x, y, RCS of the fixed roadside reflectors in the sensor frame
    (urban clutter); with them, azimuth noise also grows toward the edge of the field of view.
    ``swerling``: each return's power fluctuates as Swerling I about its mean RCS (objects,
    their ghosts and the reflectors; diffuse clutter already has a 5 dB spread).
    """
    vis = _in_fov(boxes[:, 0], boxes[:, 1])
    d = np.hypot(boxes[:, 0], boxes[:, 1])
    lam = _LAMBDA[cls] * np.clip(20.0 / np.maximum(d, 1.0), 0.4, 2.0) * np.where(_occluded(boxes), 0.15, 1.0)
    n = np.where(vis, rng.poisson(lam), 0)
    xy, box = _surface_points(boxes, n, rng)

    # Clutter: static world returns (kerbs, poles, buildings) spread over the field of view.
    n_cl = int(rng.poisson(CLUTTER_PER_SWEEP))
    az = rng.uniform(-FOV_HALF, FOV_HALF, n_cl)
    r = rng.uniform(3.0, NEAR_RANGE, n_cl)
    cl_xy = np.stack([r * np.cos(az), r * np.sin(az)], 1)
    urban = reflectors is not None

    # Measurement noise in range and azimuth.
    def noisy(p: np.ndarray) -> np.ndarray:
        rr = np.hypot(p[:, 0], p[:, 1]) + rng.normal(0, RANGE_SIGMA, len(p))
        a = np.arctan2(p[:, 1], p[:, 0])
        if urban:
            aa = a + rng.normal(0, 1, len(p)) * np.interp(np.abs(a), _AZ_KNOTS, _AZ_SIGMA)
        else:   # the light drive's draws, unchanged
            aa = a + rng.normal(0, AZIMUTH_SIGMA, len(p))
        return np.stack([rr * np.cos(aa), rr * np.sin(aa)], 1)

    obj_xy = noisy(xy)
    ref_rcs = np.zeros(0)
    if urban:
        seen = _in_fov(reflectors[:, 0], reflectors[:, 1]) & (rng.random(len(reflectors)) < REFLECTOR_DETECTION)
        cl_xy = np.concatenate([cl_xy, noisy(reflectors[seen, :2])])
        ref_rcs = reflectors[seen, 2] + rng.normal(0, 2.0, int(seen.sum()))     # aspect flicker
    n_ref = len(ref_rcs)
    obj_v = boxes[box][:, 7:9]
    # Ghosts: multipath echoes of real returns, same azimuth, 1.3-2x the range, same Doppler.
    ghost = rng.random(len(obj_xy)) < GHOST_PROB
    gh_xy = obj_xy[ghost] * rng.uniform(1.3, 2.0, (int(ghost.sum()), 1))
    xy_all = np.concatenate([obj_xy, gh_xy, cl_xy])
    v_all = np.concatenate([obj_v, obj_v[ghost], np.zeros((n_cl + n_ref, 2))])
    ids = np.concatenate([box, np.full(len(gh_xy) + n_cl + n_ref, -1)])
    m = len(xy_all)

    u = xy_all / np.maximum(np.hypot(xy_all[:, 0], xy_all[:, 1]), 1e-6)[:, None]
    vr_comp = (v_all * u).sum(1) + rng.normal(0, VEL_SIGMA, m)
    vr = ((v_all - sensor_vel[None]) * u).sum(1) + rng.normal(0, VEL_SIGMA, m)

    pts = np.zeros(m, RADAR_DTYPE)
    pts["x"], pts["y"] = xy_all[:, 0], xy_all[:, 1]
    pts["id"] = np.arange(m)
    rcs_obj = _RCS_MEAN[cls[box]] + rng.normal(0, 1, len(box)) * _RCS_STD[cls[box]]
    pts["rcs"] = np.round(np.concatenate([rcs_obj, rcs_obj[ghost] - rng.uniform(6, 12, len(gh_xy)),
                                          rng.normal(-3.0, 5.0, n_cl), ref_rcs]) * 2) / 2      # 0.5 dBsm steps
    pts["vx"], pts["vy"] = vr * u[:, 0], vr * u[:, 1]
    pts["vx_comp"], pts["vy_comp"] = vr_comp * u[:, 0], vr_comp * u[:, 1]
    # dyn_prop: 0 moving, 1 stationary, 2 oncoming, 3 stationary candidate.
    is_static = np.concatenate([static[box], np.zeros(len(gh_xy), bool), np.ones(n_cl + n_ref, bool)])
    dyn = np.where(vr_comp < -0.5, 2, 0)
    dyn = np.where(is_static, np.where(rng.random(m) < 0.8, 1, 3), dyn)
    pts["dyn_prop"] = dyn
    pts["is_quality_valid"] = 1
    # Valid returns are unambiguous (3); a share of clutter and ghosts is flagged invalid or
    # ambiguous, as the sensor does, and the devkit's default filters drop those.
    flagged = np.concatenate([rng.random(len(box)) < 0.02, rng.random(len(gh_xy)) < 0.5, rng.random(n_cl) < 0.3,
                              rng.random(n_ref) < 0.05])
    kind = rng.integers(0, 3, m)
    pts["invalid_state"] = np.where(flagged & (kind == 0), rng.choice([1, 2, 6, 14], m), 0)
    pts["ambig_state"] = np.where(flagged & (kind == 1), 1, np.where(flagged & (kind == 2), 4, 3))
    pts["x_rms"], pts["y_rms"] = rng.integers(1, 4, m), rng.integers(3, 8, m)
    pts["vx_rms"], pts["vy_rms"] = rng.integers(4, 8, m), rng.integers(4, 8, m)
    pts["pdh0"] = np.where(ids < 0, rng.integers(2, 6, m), 1)
    if swerling:    # drawn last, so every other field equals the class-RCS sweep's
        fluct = 10 * np.log10(rng.exponential(1.0, m))
        fluct[len(box) + len(gh_xy):len(box) + len(gh_xy) + n_cl] = 0.0
        pts["rcs"] = np.round((pts["rcs"] + fluct) * 2) / 2
    return RadarSweep(pts, ids)
