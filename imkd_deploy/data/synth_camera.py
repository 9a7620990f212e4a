"""Camera images: sky, textured ground with lane paint, and shaded class-styled cuboids.

Ground: the camera is level at a fixed height, so the ego-frame ground point behind every
pixel below the horizon is fixed per camera; each frame only moves those points to the
global frame and looks the ground raster up (one gather per image).

Objects: each class is drawn as a few sub-cuboids (body, cabin, wheels, rider, ...) with
horizontal bands (windows, reflective stripes) on their side faces. Faces are back-face
culled, clipped at the near plane, projected and filled with cv2.fillPoly far-to-near
(painter's algorithm), shaded by a per-scene sun. Sizes vary per instance, so one image
cannot tell a small near car from a big far one; shape and colour still tell the class.

Night with lamps (``render_night``): the same faces, plus the lit head and tail lamps of
moving vehicles, fill a second, float image with the light at each pixel (ambient street
light, the ego's low beams, lamp glow) in the same painter's order, so an occluded lamp
stays hidden; ``synth_conditions.degrade_image`` multiplies the render by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from imkd_deploy.config import CLASS_NAMES
from imkd_deploy.data.synth_conditions import NIGHT_GAIN, RETRO, headlight
from imkd_deploy.data.synth_ground import GroundMap

SKY_TOP, SKY_HORIZON = np.array([95, 140, 205], np.float32), np.array([200, 215, 230], np.float32)
FOG_RGB = np.array([185, 195, 205], np.float32)
FOG_DIST = 220.0
NEAR = 0.15
GLASS, DARK, SKIN, TROUSERS = (45, 55, 68), (28, 28, 30), (205, 165, 135), (45, 45, 58)
RED, WHITE = (200, 30, 30), (235, 235, 235)

# Sub-cuboids per class in box-local fractions: x along length [-.5, .5], y along width
# [-.5, .5], z up [0, 1]; colour None = the instance colour (scaled by ``tint``), and
# ``bands`` = (z0, z1, rgb) stripes on the vertical faces, in fractions of the part's height.
_P = {
    "car": [(-.47, .47, -.5, .5, 0, .22, DARK, 1, ()), (-.5, .5, -.5, .5, .18, .58, None, 1, ()),
            (-.3, .22, -.45, .45, .58, 1, None, 1, ((.12, .92, GLASS),))],
    "truck": [(-.5, .5, -.45, .45, 0, .18, DARK, 1, ()), (-.5, .22, -.5, .5, .18, 1, None, 1, ()),
              (.25, .5, -.5, .5, .18, .78, None, .65, ((.5, .92, GLASS),))],
    "bus": [(-.48, .48, -.48, .48, 0, .1, DARK, 1, ()), (-.5, .5, -.5, .5, .08, 1, None, 1, ((.45, .85, GLASS),))],
    "trailer": [(-.5, .5, -.45, .45, 0, .24, DARK, 1, ()), (-.5, .5, -.5, .5, .24, 1, None, 1, ((.06, .11, RED),))],
    "construction_vehicle": [(-.5, .5, -.5, .5, 0, .16, DARK, 1, ()), (-.5, .25, -.5, .5, .16, .6, None, 1, ()),
                             (-.45, 0, -.45, .45, .6, 1, None, 1, ((.25, .85, GLASS),)),
                             (0, .5, -.1, .1, .55, .75, None, .7, ())],
    "pedestrian": [(-.3, .3, -.3, .3, 0, .48, TROUSERS, 1, ()), (-.5, .5, -.5, .5, .48, .86, None, 1, ()),
                   (-.25, .25, -.22, .22, .87, 1, SKIN, 1, ())],
    "motorcycle": [(-.5, .5, -.2, .2, 0, .4, DARK, 1, ()), (-.2, .3, -.3, .3, .38, .58, None, 1.6, ()),
                   (-.3, .1, -.5, .5, .55, .9, (55, 55, 65), 1, ()), (-.2, 0, -.22, .22, .9, 1, (230, 230, 230), 1, ())],
    "bicycle": [(-.5, .5, -.12, .12, 0, .55, None, 1, ()), (-.2, .2, -.5, .5, .5, .88, (70, 70, 90), 1, ()),
                (-.1, .1, -.2, .2, .88, 1, SKIN, 1, ())],
    "traffic_cone": [(-.5, .5, -.5, .5, 0, .06, DARK, 1, ()), (-.3, .3, -.3, .3, .06, 1, None, 1, ((.45, .65, WHITE),))],
    "barrier": [(-.5, .5, -.45, .45, 0, .12, (90, 90, 90), 1, ()), (-.5, .5, -.5, .5, .12, 1, None, 1, ((.35, .65, RED),))],
}
# Cycles without a rider drop their rider parts (the last two).
_RIDER_PARTS = {"motorcycle": 2, "bicycle": 2}
# Reflective stripes (cones, barriers, trailers' rear bumpers) send the low beams back.
_REFLECTIVE = {WHITE, RED}
# Lamps of a lit vehicle at night: (part index, face: 0 rear | 1 front, u0, u1 across the face
# from one side, z0, z1 up the part), mirrored to the other side unless centred (u0 + u1 = 1).
_HEAD, _TAIL = (250, 245, 225), (235, 30, 25)
LAMP_LIGHT = {_HEAD: 2.5, _TAIL: 1.0}   # fraction of daylight: head lamps saturate, tail lamps glow red
_LAMPS = {
    "car": [(1, 1, .06, .24, .55, .85, _HEAD), (1, 0, .04, .2, .6, .85, _TAIL)],
    "truck": [(2, 1, .06, .22, .05, .2, _HEAD), (1, 0, .04, .14, .02, .1, _TAIL)],
    "bus": [(1, 1, .06, .2, .06, .14, _HEAD), (1, 0, .05, .15, .06, .14, _TAIL)],
    "trailer": [(1, 0, .04, .14, .14, .22, _TAIL)],
    "construction_vehicle": [(1, 1, .1, .25, .7, .9, _HEAD), (1, 0, .05, .18, .6, .85, _TAIL)],
    "motorcycle": [(1, 1, .3, .7, .3, .8, _HEAD), (1, 0, .3, .7, .3, .8, _TAIL)],
    "bicycle": [(0, 1, .2, .8, .75, .95, _HEAD), (0, 0, .2, .8, .75, .95, _TAIL)],
}
# Faces of a unit cube, corners indexed by bits (x, y, z); vertical faces list bottom, bottom, top, top.
_FACES = np.array([[0, 2, 6, 4], [1, 3, 7, 5], [0, 1, 5, 4], [2, 3, 7, 6], [0, 1, 3, 2], [4, 6, 7, 5]])
_FACE_NORMALS = np.array([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], np.float64)
_VERTICAL = np.array([True, True, True, True, False, False])
_CUBE = np.array([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], np.float64)


@dataclass
class CameraView:
    """Per-camera constants: the ego-frame ground point behind every pixel, fog and sky."""

    k: np.ndarray
    cam2ego: np.ndarray
    width: int
    height: int
    ground_xy: np.ndarray      # (H, W, 2) float32 ego-frame ground point (camera xy above the horizon)
    ground_weight: np.ndarray  # (H, W) float32: 1 - fog on the ground, 0 in the sky
    backdrop: np.ndarray       # (H, W, 3) uint8: sky above the horizon, fog colour below
    tan_half_fov: tuple[float, float]   # horizontal, vertical: for frustum culling
    night_light: np.ndarray    # (H, W) float32: light of the background at night with the ego's low beams on


def make_view(k: np.ndarray, cam2ego: np.ndarray, width: int, height: int) -> CameraView:
    v, u = np.mgrid[0:height, 0:width]
    pix = np.stack([u.ravel() + 0.5, v.ravel() + 0.5, np.ones(u.size)], 0)
    d = cam2ego[:3, :3] @ (np.linalg.inv(k) @ pix)             # ego-frame ray per pixel
    down = d[2] < -1e-4
    t = np.where(down, -cam2ego[2, 3] / np.where(down, d[2], -1.0), 0.0)
    dist = np.hypot(d[0], d[1]) * t
    t = np.minimum(t, 2 * FOG_DIST / np.maximum(np.hypot(d[0], d[1]), 1e-6))   # fully fogged beyond
    xy = cam2ego[:2, 3][:, None] + d[:2] * t
    elev = d[2] / np.linalg.norm(d, axis=0)
    w = np.clip(elev / 0.5, 0, 1)[:, None]
    sky = SKY_HORIZON * (1 - w) + SKY_TOP * w
    backdrop = np.where(down[:, None], FOG_RGB[None], sky)
    weight = np.where(down, 1 - np.clip(dist / FOG_DIST, 0, 1) ** 0.7, 0.0)
    tan_h = max(k[0, 2], width - k[0, 2]) / k[0, 0]
    tan_v = max(k[1, 2], height - k[1, 2]) / k[1, 1]
    road = np.concatenate([xy, np.zeros((1, xy.shape[1]))]).T
    night = NIGHT_GAIN + np.where(down, headlight(road), 0.0)
    return CameraView(k, cam2ego, width, height, xy.T.reshape(height, width, 2).astype(np.float32),
                      weight.reshape(height, width).astype(np.float32),
                      np.round(backdrop).reshape(height, width, 3).astype(np.uint8), (tan_h, tan_v),
                      night.reshape(height, width).astype(np.float32))


def _background(view: CameraView, ego2global: np.ndarray, ground: GroundMap) -> np.ndarray:
    """Sky + ground: one affine map to raster pixels, one cv2.remap, one per-pixel blend."""
    h = ground.labels.shape[0]
    inv = 1.0 / ground.resolution
    e = ego2global
    m = np.array([[e[0, 0] * inv, e[0, 1] * inv, (e[0, 3] - ground.origin[0]) * inv - 0.5],
                  [-e[1, 0] * inv, -e[1, 1] * inv, h - 0.5 - (e[1, 3] - ground.origin[1]) * inv]], np.float32)
    pix = cv2.transform(view.ground_xy, m)
    rgb = cv2.remap(ground.image, pix, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                    borderValue=tuple(int(c) for c in ground.outside_rgb))
    return cv2.blendLinear(rgb, view.backdrop, view.ground_weight, 1.0 - view.ground_weight)


class _Polygons(NamedTuple):
    corners: np.ndarray   # (F, 4, 3) ego frame
    rgb: np.ndarray       # (F, 3) float32, before shading
    normals: np.ndarray   # (F, 3)
    parent: np.ndarray    # (F,) id of the face a polygon lies on (its own id for a face)
    order: np.ndarray     # (F,) drawing order among a face's polygons: 0 the face, then bands, then lamps
    reflective: np.ndarray  # (F,) bool, reflective stripes
    glow: np.ndarray      # (F,) light of a lit lamp (fraction of daylight), 0 elsewhere


def _on_faces(fc: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    """(n, k, 4, 3) patches of the vertical faces ``fc`` (n, k, 4, 3), corners 0, 1 along the
    bottom edge, 3 above 0 and 2 above 1: u across the face, v up it (u = 0 and 1 are exactly
    the face's edges, so a full-width band shares them)."""
    def edges(v):
        return fc[:, :, 0] + (fc[:, :, 3] - fc[:, :, 0]) * v, fc[:, :, 1] + (fc[:, :, 2] - fc[:, :, 1]) * v

    (l0, r0), (l1, r1) = edges(v0), edges(v1)
    return np.stack([l0 * (1 - u0) + r0 * u0, l0 * (1 - u1) + r0 * u1, l1 * (1 - u1) + r1 * u1, l1 * (1 - u0) + r1 * u0], 2)


def _part_polygons(boxes: np.ndarray, cls: np.ndarray, colour: np.ndarray, rider: np.ndarray,
                   lamps_on: np.ndarray | None = None) -> _Polygons:
    """3D polygons (ego frame) of every part face, band and (for ``lamps_on`` objects) lit lamp."""
    corners, rgb, normals, parent, order, reflective, glow = [], [], [], [], [], [], []

    def add(c, col, nrm, par, o, refl=False, g=0.0):
        corners.append(c.reshape(-1, 4, 3))
        rgb.append(col)
        normals.append(nrm.reshape(-1, 3))
        parent.append(par)
        order.append(np.full(len(par), float(o)))
        reflective.append(np.full(len(par), refl))
        glow.append(np.full(len(par), g))

    part_id = 0
    for name_i, name in enumerate(CLASS_NAMES):
        sel = np.nonzero(cls == name_i)[0]
        for p_i, (x0, x1, y0, y1, z0, z1, col, tint, bands) in enumerate(_P[name]):
            use = sel
            if name in _RIDER_PARTS and p_i >= len(_P[name]) - _RIDER_PARTS[name]:
                use = sel[rider[sel]]
            if not len(use):
                continue
            b = boxes[use]
            lo = np.array([x0, y0, z0])
            ext = np.array([x1 - x0, y1 - y0, z1 - z0])
            local = (lo + _CUBE * ext)[None] * b[:, None, [4, 3, 5]]           # (n, 8, 3), x along length
            local[..., 2] -= b[:, None, 5] / 2
            c, s = np.cos(b[:, 6])[:, None], np.sin(b[:, 6])[:, None]
            world = np.stack([c * local[..., 0] - s * local[..., 1] + b[:, None, 0],
                              s * local[..., 0] + c * local[..., 1] + b[:, None, 1],
                              local[..., 2] + b[:, None, 2]], -1)
            fc = world[:, _FACES]                                              # (n, 6, 4, 3)
            fn = _FACE_NORMALS                                                 # yaw-only rotation of the 6 normals
            nrm = np.stack([c * fn[:, 0] - s * fn[:, 1], s * fn[:, 0] + c * fn[:, 1],
                            np.broadcast_to(fn[:, 2], (len(b), 6))], -1)     # (n, 6, 3)
            base = colour[use].astype(np.float32) * tint if col is None else np.tile(np.array(col, np.float32), (len(b), 1))
            n = len(b)
            ids = np.arange(part_id, part_id + n)
            add(fc, np.repeat(base, 6, 0), nrm, np.repeat(ids, 6) * 6 + np.tile(np.arange(6), n), 0)
            vertical_ids = np.repeat(ids, 4) * 6 + np.tile(np.nonzero(_VERTICAL)[0], n)
            for bi, (f0, f1, bcol) in enumerate(bands):
                # Bands on the 4 vertical faces: corners 0,1 are bottom, 2,3 top for those faces.
                add(_on_faces(fc[:, _VERTICAL], 0.0, 1.0, f0, f1), np.tile(np.array(bcol, np.float32), (n * 4, 1)),
                    nrm[:, _VERTICAL], vertical_ids, bi + 1, refl=bcol in _REFLECTIVE)
            if lamps_on is not None:
                lit = np.nonzero(lamps_on[use])[0]
                for lp, face, u0, u1, v0, v1, lcol in _LAMPS.get(name, ()):
                    if lp != p_i or not len(lit):
                        continue
                    spans = [(u0, u1)] if abs(u0 + u1 - 1) < 1e-9 else [(u0, u1), (1 - u1, 1 - u0)]
                    for u0_, u1_ in spans:
                        add(_on_faces(fc[lit, face:face + 1], u0_, u1_, v0, v1),
                            np.tile(np.array(lcol, np.float32), (len(lit), 1)), nrm[lit, face],
                            ids[lit] * 6 + face, len(bands) + 1, g=LAMP_LIGHT[lcol])
            part_id += n
    if not corners:
        return _Polygons(np.zeros((0, 4, 3)), np.zeros((0, 3), np.float32), np.zeros((0, 3)), np.zeros(0, np.int64),
                         np.zeros(0), np.zeros(0, bool), np.zeros(0))
    return _Polygons(*(np.concatenate(x) for x in (corners, rgb, normals, parent, order, reflective, glow)))


def _footprints(boxes: np.ndarray) -> np.ndarray:
    """(N, 4, 3) ground rectangles 8% larger than each box, just above the ground."""
    c, s = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    lx = np.array([-0.54, 0.54, 0.54, -0.54])[None] * boxes[:, 4:5]
    ly = np.array([-0.54, -0.54, 0.54, 0.54])[None] * boxes[:, 3:4]
    return np.stack([boxes[:, 0:1] + c * lx - s * ly, boxes[:, 1:2] + s * lx + c * ly, np.full_like(lx, 0.01)], -1)


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman against z >= NEAR for one small polygon (camera frame)."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[2] >= NEAR, b[2] >= NEAR
        if ina:
            out.append(a)
        if ina != inb:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out)


def render_camera(view: CameraView, ego2global: np.ndarray, ground: GroundMap, boxes_ego: np.ndarray,
                  cls: np.ndarray, colour: np.ndarray, rider: np.ndarray, sun_ego: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image. boxes_ego: (N, 7) x, y, z, w, l, h, yaw in the ego frame."""
    return _render(view, ego2global, ground, boxes_ego, cls, colour, rider, sun_ego, None)[0]


def render_night(view: CameraView, ego2global: np.ndarray, ground: GroundMap, boxes_ego: np.ndarray,
                 cls: np.ndarray, colour: np.ndarray, rider: np.ndarray, sun_ego: np.ndarray,
                 lamps_on: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``render_camera`` with the lamps of the ``lamps_on`` (N,) objects drawn, and the light
    at each pixel at night: (H, W) float32, a fraction of daylight (``degrade_image``'s ``light``)."""
    return _render(view, ego2global, ground, boxes_ego, cls, colour, rider, sun_ego, lamps_on)


def _render(view: CameraView, ego2global: np.ndarray, ground: GroundMap, boxes_ego: np.ndarray, cls: np.ndarray,
            colour: np.ndarray, rider: np.ndarray, sun_ego: np.ndarray,
            lamps_on: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    img = _background(view, ego2global, ground)
    light = None if lamps_on is None else view.night_light.copy()

    ego2cam = np.linalg.inv(view.cam2ego)
    cam_pos = view.cam2ego[:3, 3]
    # Frustum culling with bounding spheres: only boxes that can reach the image are drawn.
    rel = (ego2cam[:3, :3] @ boxes_ego[:, :3].T).T + ego2cam[:3, 3]
    r = 0.5 * np.linalg.norm(boxes_ego[:, 3:6], axis=1)
    th, tv = view.tan_half_fov
    near = ((rel[:, 2] > -r) & (np.linalg.norm(rel, axis=1) < FOG_DIST)
            & (np.abs(rel[:, 0]) - r * np.sqrt(1 + th**2) <= rel[:, 2] * th)
            & (np.abs(rel[:, 1]) - r * np.sqrt(1 + tv**2) <= rel[:, 2] * tv))
    if not near.any():
        return img, light
    b = boxes_ego[near]
    poly = _part_polygons(b, cls[near], colour[near], rider[near], None if lamps_on is None else lamps_on[near])
    corners, nrm, parent, order = poly.corners, poly.normals, poly.parent, poly.order
    centre = corners.mean(1)
    facing = ((cam_pos[None] - centre) * nrm).sum(1) > 1e-6
    shade = 0.5 + 0.5 * np.clip(nrm @ sun_ego, 0, None) + 0.12 * (nrm[:, 2] > 0.5)
    shade[poly.glow > 0] = 1.0              # a lamp shines with its own light
    # Painter's order: a face's bands share its depth and are drawn right after it.
    depth = np.linalg.norm(centre - cam_pos, axis=1)
    face_depth = np.zeros(parent.max() + 1)
    base = order == 0
    face_depth[parent[base]] = depth[base]
    key_depth = face_depth[parent]
    idx = np.nonzero(facing)[0]
    idx = idx[np.lexsort((order[idx], -key_depth[idx]))]
    # Contact shadows go first: a dark footprint under every object grounds it visually.
    footprints = _footprints(b)
    polys = np.concatenate([footprints, corners[idx]])
    cols = np.concatenate([np.tile(np.array([40, 40, 42], np.float32), (len(b), 1)), poly.rgb[idx] * shade[idx, None]])
    cols = np.clip(cols, 0, 255).astype(np.uint8)
    if light is not None:
        lit = NIGHT_GAIN + headlight(centre[idx], nrm[idx]) * np.where(poly.reflective[idx], RETRO, 1.0)
        poly_light = np.concatenate([NIGHT_GAIN + headlight(footprints.mean(1)),
                                     np.where(poly.glow[idx] > 0, poly.glow[idx], lit)])
    cam = np.einsum("ij,fkj->fki", ego2cam[:3, :3], polys) + ego2cam[:3, 3]

    # Vectorised culling: drop polygons behind the camera or off-image; only those that
    # cross the near plane need clipping (one small loop over those few).
    z = cam[..., 2]
    front, behind = (z >= NEAR).all(1), (z < NEAR).all(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.einsum("ij,fkj->fki", view.k[:2], cam / z[..., None])
    off = (uv[..., 0].max(1) < 0) | (uv[..., 1].max(1) < 0) | (uv[..., 0].min(1) > view.width) | (uv[..., 1].min(1) > view.height)
    draw = ~behind & ~(front & off)
    for f in np.nonzero(draw)[0]:
        if front[f]:
            pts = uv[f]
        else:
            c = _clip_near(cam[f])
            pts = (view.k[:2] @ (c / c[:, 2:3]).T).T
        pts = np.round(np.clip(pts, -1e5, 1e5) * 16).astype(np.int32)
        cv2.fillPoly(img, [pts], tuple(int(v) for v in cols[f]), cv2.LINE_AA, 4)
        if light is not None:
            cv2.fillPoly(light, [pts], float(poly_light[f]), cv2.LINE_AA, 4)
    return img, light
