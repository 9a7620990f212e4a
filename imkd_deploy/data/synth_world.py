"""The synthetic world of one scene: a road, the ego driving it, and the objects around it.

Everything is a function of time so that every sensor can be sampled at its own timestamp
(LiDAR sweeps, radar sweeps and camera exposures all differ, as on the real car). The
world is flat (ground at global z = 0) and right-hand traffic:

    lateral offset from the road centreline (metres, + = left of the driving direction)
      -9 .. -6  sidewalk       -6 .. -3.5 parking lane   -3.5 .. 0  ego's lane
       0 .. 3.5 oncoming lane   3.5 .. 6  parking lane     6 .. 9   sidewalk

All per-object state is held in arrays (one row per object) and evaluated vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imkd_deploy.config import CLASS_NAMES

ROAD_HALF_WIDTH = 6.0      # carriageway incl. parking lanes
LANE_HALF_WIDTH = 3.5      # driving lanes only
SIDEWALK_OUTER = 9.0
EGO_LATERAL = -1.75        # centre of the ego's lane

# nuScenes category per detection class (the devkit maps these back to detection names).
CATEGORY = {
    "car": "vehicle.car",
    "truck": "vehicle.truck",
    "bus": "vehicle.bus.rigid",
    "trailer": "vehicle.trailer",
    "construction_vehicle": "vehicle.construction",
    "pedestrian": "human.pedestrian.adult",
    "motorcycle": "vehicle.motorcycle",
    "bicycle": "vehicle.bicycle",
    "traffic_cone": "movable_object.trafficcone",
    "barrier": "movable_object.barrier",
}

# Mean size (w, l, h) and per-instance spread (std) in metres, close to nuScenes statistics.
# The spread matters: it keeps depth ambiguous from one image (a small near car looks like
# a big far one), while the class stays learnable from shape and appearance.
SIZE_MEAN = {
    "car": (1.95, 4.6, 1.70), "truck": (2.5, 7.0, 3.0), "bus": (2.9, 11.0, 3.4),
    "trailer": (2.9, 12.0, 3.9), "construction_vehicle": (2.8, 6.5, 3.2),
    "pedestrian": (0.67, 0.73, 1.77), "motorcycle": (0.77, 2.1, 1.47),
    "bicycle": (0.60, 1.70, 1.30), "traffic_cone": (0.41, 0.41, 1.0),
    "barrier": (2.5, 0.50, 0.98),
}
SIZE_STD = {
    "car": (0.12, 0.35, 0.15), "truck": (0.2, 1.4, 0.4), "bus": (0.1, 1.0, 0.2),
    "trailer": (0.15, 2.0, 0.3), "construction_vehicle": (0.3, 1.0, 0.4),
    "pedestrian": (0.07, 0.1, 0.12), "motorcycle": (0.08, 0.15, 0.1),
    "bicycle": (0.06, 0.1, 0.1), "traffic_cone": (0.05, 0.05, 0.12),
    "barrier": (0.25, 0.05, 0.08),
}

ATTRIBUTES = (
    "vehicle.moving", "vehicle.parked", "vehicle.stopped",
    "pedestrian.moving", "pedestrian.standing", "pedestrian.sitting_lying_down",
    "cycle.with_rider", "cycle.without_rider",
)


@dataclass
class Road:
    """Centreline sampled every ``ds`` metres: arc length s, position and heading."""

    s: np.ndarray
    x: np.ndarray
    y: np.ndarray
    heading: np.ndarray     # unwrapped, so it interpolates smoothly

    def at(self, s: np.ndarray, lateral: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, heading) of the points at arc length s and lateral offset (+ left)."""
        s = np.clip(s, self.s[0], self.s[-1])
        hd = np.interp(s, self.s, self.heading)
        x = np.interp(s, self.s, self.x) - np.sin(hd) * lateral
        y = np.interp(s, self.s, self.y) + np.cos(hd) * lateral
        return x, y, hd


def make_road(rng: np.random.Generator, length: float, ds: float = 0.5) -> Road:
    """Straights and circular turns (radius 22-60 m, 30-90 deg) until ``length`` metres."""
    curv: list[np.ndarray] = []
    total = 0.0
    straight = True
    while total < length:
        if straight:
            seg = rng.uniform(25.0, 70.0)
            k = 0.0
        else:
            radius = rng.uniform(22.0, 60.0)
            seg = radius * np.deg2rad(rng.uniform(30.0, 90.0))
            k = rng.choice([-1.0, 1.0]) / radius
        n = max(1, int(round(seg / ds)))
        curv.append(np.full(n, k))
        total += n * ds
        straight = not straight
    k = np.concatenate(curv)
    heading = np.concatenate([[0.0], np.cumsum(k * ds)])
    mid = 0.5 * (heading[1:] + heading[:-1])
    x = np.concatenate([[0.0], np.cumsum(np.cos(mid) * ds)])
    y = np.concatenate([[0.0], np.cumsum(np.sin(mid) * ds)])
    s = np.arange(len(heading)) * ds
    # Rotate/shift the road so scenes do not all start at the origin heading east.
    yaw0 = rng.uniform(-np.pi, np.pi)
    c, sn = np.cos(yaw0), np.sin(yaw0)
    x0, y0 = rng.uniform(300.0, 1500.0, size=2)
    return Road(s, x0 + c * x - sn * y, y0 + sn * x + c * y, heading + yaw0)


@dataclass
class EgoMotion:
    """Ego speed v(t) = v0 + a*sin(w t + p) along the road, in the right lane."""

    s0: float
    v0: float
    amp: float
    omega: float
    phase: float

    def s(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return self.s0 + self.v0 * t - self.amp / self.omega * (np.cos(self.omega * t + self.phase) - np.cos(self.phase))

    def speed(self, t: np.ndarray) -> np.ndarray:
        return self.v0 + self.amp * np.sin(self.omega * np.asarray(t, dtype=np.float64) + self.phase)


@dataclass
class Objects:
    """One row per object. Motion: s(t) = s0 + v*t, or for lane followers s_ego(t) + s0 + wobble."""

    cls: np.ndarray          # (N,) int index into CLASS_NAMES
    size: np.ndarray         # (N, 3) w, l, h
    s0: np.ndarray           # (N,)
    v: np.ndarray            # (N,) along-road speed (m/s, signed)
    lateral: np.ndarray      # (N,)
    yaw_offset: np.ndarray   # (N,) relative to the road heading
    follow: np.ndarray       # (N,) bool, moves with the ego's speed profile
    wobble: np.ndarray       # (N, 3) amplitude, angular freq, phase of the follow gap
    attribute: np.ndarray    # (N,) index into ATTRIBUTES, -1 for none
    colour: np.ndarray       # (N, 3) uint8 RGB base colour of the instance

    def __len__(self) -> int:
        return len(self.cls)


@dataclass
class World:
    road: Road
    ego: EgoMotion
    objects: Objects
    duration: float

    def ego_pose(self, t: float) -> tuple[np.ndarray, float]:
        """Ego translation (3,) and yaw at time t (seconds from the scene start)."""
        x, y, hd = self.road.at(self.ego.s(np.array([t])), EGO_LATERAL)
        return np.array([x[0], y[0], 0.0]), float(hd[0])

    def ego_velocity(self, t: float) -> tuple[np.ndarray, float]:
        """Ego velocity (global xy, m/s) and yaw rate (rad/s), by central difference."""
        (p0, y0), (p1, y1) = self.ego_pose(t - 0.01), self.ego_pose(t + 0.01)
        return (p1 - p0)[:2] / 0.02, (y1 - y0) / 0.02

    def object_s(self, t: float) -> np.ndarray:
        o = self.objects
        wob = o.wobble[:, 0] * np.sin(o.wobble[:, 1] * t + o.wobble[:, 2])
        return np.where(o.follow, self.ego.s(np.array(t)) + o.s0 + wob, o.s0 + o.v * t)

    def boxes(self, t: float) -> np.ndarray:
        """(N, 9) global boxes at time t: x, y, z, w, l, h, yaw, vx, vy."""
        o = self.objects
        out = np.empty((len(o), 9))
        x, y, hd = self.road.at(self.object_s(t), o.lateral)
        xa, ya, _ = self.road.at(self.object_s(t - 0.05), o.lateral)
        xb, yb, _ = self.road.at(self.object_s(t + 0.05), o.lateral)
        out[:, 0], out[:, 1] = x, y
        out[:, 2] = o.size[:, 2] / 2
        out[:, 3:6] = o.size
        out[:, 6] = np.angle(np.exp(1j * (hd + o.yaw_offset)))
        out[:, 7], out[:, 8] = (xb - xa) / 0.1, (yb - ya) / 0.1
        return out


def _sizes(rng: np.random.Generator, name: str, n: int) -> np.ndarray:
    mean, std = np.array(SIZE_MEAN[name]), np.array(SIZE_STD[name])
    return np.clip(mean + rng.standard_normal((n, 3)) * std, 0.6 * mean, 1.5 * mean)


# Instance colour palettes (RGB): cars, clothes and bicycles vary per instance; the other
# classes have a fixed look, so appearance carries class information as in real images.
CAR_PALETTE = np.array([
    [200, 200, 205], [30, 30, 35], [160, 20, 25], [20, 50, 130], [235, 235, 235],
    [120, 125, 130], [90, 60, 40], [40, 100, 60], [210, 180, 40],
], dtype=np.uint8)
CLOTHES_PALETTE = np.array([
    [60, 70, 120], [150, 40, 40], [220, 220, 215], [40, 40, 45], [200, 170, 60], [70, 120, 80],
    [120, 90, 140], [190, 110, 60],
], dtype=np.uint8)
BIKE_PALETTE = np.array([[20, 110, 60], [180, 30, 30], [30, 30, 35], [210, 210, 210], [30, 80, 170]], dtype=np.uint8)
PALETTE = {"car": CAR_PALETTE, "pedestrian": CLOTHES_PALETTE, "bicycle": BIKE_PALETTE}
CLASS_COLOUR = {
    "truck": [225, 225, 220], "bus": [40, 120, 200], "trailer": [180, 180, 175],
    "construction_vehicle": [240, 175, 20], "motorcycle": [25, 25, 30],
    "traffic_cone": [255, 110, 20], "barrier": [230, 230, 225],
}


def make_world(rng: np.random.Generator, duration: float, density: float = 1.0) -> World:
    """A road, an ego motion covering ``duration`` seconds, and objects of all 10 classes.

    Static objects are spread over the stretch of road the ego drives (plus look-ahead),
    at ``density`` times a town-like count per 100 m; at least one of every class is placed
    where the ego passes it, so every scene holds all 10 classes.
    """
    ego = EgoMotion(s0=90.0, v0=rng.uniform(7.0, 9.5), amp=rng.uniform(0.5, 2.0),
                    omega=2 * np.pi / rng.uniform(8.0, 20.0), phase=rng.uniform(0, 2 * np.pi))
    s_end = float(ego.s(np.array(duration)))
    road = make_road(rng, s_end + 160.0)
    span = (ego.s0 - 25.0, s_end + 40.0)
    per100 = max(span[1] - span[0], 1.0) / 100.0 * density
    rows: list[dict] = []

    def count(mean_per_100: float) -> int:
        return max(1, int(rng.poisson(mean_per_100 * per100)))

    def add(name: str, n: int, **kw) -> None:
        size = _sizes(rng, name, n)
        if name in PALETTE:
            colour = PALETTE[name][rng.integers(0, len(PALETTE[name]), n)]
        else:
            colour = np.tile(np.array(CLASS_COLOUR[name], np.uint8), (n, 1))
        # Per-instance brightness jitter, so colour alone never pins down an instance.
        colour = np.clip(colour * rng.uniform(0.8, 1.15, (n, 1)), 0, 255).astype(np.uint8)
        base = dict(s0=np.zeros(n), v=np.zeros(n), lateral=np.zeros(n), yaw_offset=np.zeros(n),
                    follow=np.zeros(n, bool), wobble=np.zeros((n, 3)), attribute=np.full(n, -1))
        base.update({k: np.broadcast_to(np.asarray(v), base[k].shape).copy() for k, v in kw.items()})
        rows.append(dict(cls=np.full(n, CLASS_NAMES.index(name)), size=size, colour=colour, **base))

    def along(n: int, lo: float = span[0], hi: float = span[1]) -> np.ndarray:
        return np.sort(rng.uniform(lo, hi, n))

    def side(n: int) -> np.ndarray:
        return rng.choice([-1.0, 1.0], n)

    att = ATTRIBUTES.index
    parked = att("vehicle.parked")
    # Traffic in the ego lane keeps station at distinct gaps (wobbling a few metres), so it
    # never runs into the ego or into itself; oncoming traffic is one platoon at one speed.
    slots = rng.permutation(np.array([-34.0, -18.0, 15.0, 30.0, 45.0]))
    n = int(rng.integers(1, 4))
    add("car", n, s0=slots[:n], lateral=EGO_LATERAL, follow=True,
        wobble=np.stack([rng.uniform(0.5, 3.0, n), rng.uniform(0.2, 0.6, n), rng.uniform(0, 6.3, n)], 1),
        attribute=att("vehicle.moving"))
    add("motorcycle", 1, s0=slots[n], lateral=EGO_LATERAL, follow=True,
        wobble=np.array([[2.0, 0.4, rng.uniform(0, 6.3)]]), attribute=att("cycle.with_rider"))
    v_on = rng.uniform(6.0, 11.0)
    oncoming = ["truck", "bus"] + ["car"] * count(2.5)
    lo, hi = ego.s0 + 5.0, s_end + v_on * duration
    s_on = rng.uniform(lo, max(lo, hi - 22.0 * len(oncoming)), len(oncoming))
    s_on = np.sort(s_on) + 22.0 * np.arange(len(oncoming))
    for name, s in zip(rng.permutation(oncoming), s_on):
        add(str(name), 1, s0=s, v=-v_on, lateral=-EGO_LATERAL, yaw_offset=np.pi, attribute=att("vehicle.moving"))
    # Parked vehicles fill both parking lanes (overlaps are resolved below).
    n = count(10.0)
    sd = side(n)
    add("car", n, s0=along(n), lateral=sd * rng.uniform(4.5, 4.9, n),
        yaw_offset=np.pi * rng.integers(0, 2, n), attribute=parked)
    n = count(0.6)
    add("truck", n, s0=along(n), lateral=side(n) * 4.8, attribute=parked)
    add("bus", 1, s0=along(1), lateral=-4.7, attribute=att("vehicle.stopped"))
    n = count(0.7)
    add("trailer", n, s0=along(n), lateral=side(n) * 4.9, attribute=parked)
    n = count(0.7)
    add("construction_vehicle", n, s0=along(n), lateral=side(n) * rng.uniform(10.5, 13.0, n),
        yaw_offset=rng.uniform(-np.pi, np.pi, n), attribute=parked)
    n = count(0.8)
    add("motorcycle", n, s0=along(n), lateral=side(n) * 4.6, yaw_offset=np.pi / 2,
        attribute=att("cycle.without_rider"))
    # Pedestrians walk either way along the sidewalks or stand; cyclists ride the lane edge.
    n = count(9.0)
    walking = rng.random(n) < 0.65
    dirn = side(n)
    add("pedestrian", n, s0=along(n), v=np.where(walking, dirn * rng.uniform(0.8, 1.6, n), 0.0),
        lateral=side(n) * rng.uniform(6.4, 8.6, n),
        yaw_offset=np.where(walking, (dirn < 0) * np.pi, rng.uniform(-np.pi, np.pi, n)),
        attribute=np.where(walking, att("pedestrian.moving"), att("pedestrian.standing")))
    n = count(1.5)
    riding = rng.random(n) < 0.6
    add("bicycle", n, s0=along(n), v=np.where(riding, rng.uniform(3.0, 5.5, n), 0.0),
        lateral=np.where(riding, -3.15, side(n) * rng.uniform(6.3, 6.6, n)),
        yaw_offset=np.where(riding, 0.0, np.pi / 2 + rng.normal(0, 0.2, n)),
        attribute=np.where(riding, att("cycle.with_rider"), att("cycle.without_rider")))
    # Cones stand in short rows in a parking lane; barriers line the sidewalk edge.
    for _ in range(count(1.2)):
        k = int(rng.integers(3, 7))
        add("traffic_cone", k, s0=rng.uniform(ego.s0 - 5.0, s_end + 20.0) + np.arange(k) * rng.uniform(2.0, 4.0),
            lateral=rng.choice([-1.0, 1.0]) * rng.uniform(4.2, 5.2), yaw_offset=rng.uniform(-np.pi, np.pi, k))
    for _ in range(count(0.8)):
        k = int(rng.integers(2, 5))
        add("barrier", k, s0=rng.uniform(ego.s0 - 5.0, s_end + 20.0) + np.arange(k) * 2.9,
            lateral=rng.choice([-1.0, 1.0]) * 5.85, yaw_offset=np.pi / 2)

    fields = rows[0].keys()
    objects = Objects(**{k: np.concatenate([r[k] for r in rows]) for k in fields})
    objects = _drop_static_overlaps(objects)
    return World(road=road, ego=ego, objects=objects, duration=duration)


def _drop_static_overlaps(o: Objects) -> Objects:
    """Resolve overlapping static objects: slide each along the road to a free spot, else drop it.

    Overlap is tested in road coordinates (s, lateral), where parked things are axis-aligned
    up to their yaw offset; moving traffic uses separate lanes and is always kept. The first
    object of every class goes first and may slide further, so every class survives.
    """
    static = (o.v == 0) & ~o.follow
    quarter = np.abs(np.sin(o.yaw_offset)) > 0.7          # turned across the road
    ext_s = np.where(quarter, o.size[:, 0], o.size[:, 1]) / 2 + 0.4
    ext_l = np.where(quarter, o.size[:, 1], o.size[:, 0]) / 2 + 0.2
    first = np.zeros(len(o), bool)
    first[np.unique(o.cls, return_index=True)[1]] = True
    order = np.concatenate([np.nonzero(first)[0], np.nonzero(~first)[0]])
    s0 = o.s0.copy()
    keep = np.ones(len(o), bool)
    kept: list[int] = []
    for i in order:                      # ~60 objects: a loop over objects, not points
        if not static[i]:
            continue
        reach = 60.0 if first[i] else 10.0
        shifts = np.concatenate([[0.0], np.stack([np.arange(2.5, reach + 1, 2.5), -np.arange(2.5, reach + 1, 2.5)], 1).ravel()])
        k = np.array(kept, dtype=np.int64)
        cand = s0[i] + shifts
        free = ~((np.abs(s0[k][None] - cand[:, None]) < ext_s[k][None] + ext_s[i])
                 & (np.abs(o.lateral[k] - o.lateral[i]) < ext_l[k] + ext_l[i])[None]).any(1)
        if free.any():
            s0[i] = cand[np.argmax(free)]
            kept.append(i)
        else:
            keep[i] = False
    fields = {f: getattr(o, f) for f in o.__dataclass_fields__}
    fields["s0"] = s0
    return Objects(**{f: v[keep] for f, v in fields.items()})
