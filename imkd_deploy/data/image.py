"""Camera images: decode, resize+crop to the network input, and the exact pixel transform.

Convention: integer pixel coordinates are pixel CENTRES (OpenCV and nuScenes intrinsics).
``cv2.resize`` maps a source pixel centre u to (u + 0.5) * s - 0.5, so the pixel transform
that goes with it carries a half-pixel term; dropping it (as BEVDet does) shifts every
projection by (s - 1) / 2 pixels. The transform ``A`` is a 3x3 affine matrix on homogeneous
pixels, so the updated intrinsics are simply ``A @ K``.

Resize policy (BEVDet style): scale so the image covers the target (for nuScenes-shaped
images that means the width fits), keep the BOTTOM rows (the ground, where objects are) and
centre the crop horizontally. This works for any source size, not just 1600x900.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# JPEG DCT-domain downscaling (libjpeg) is several times faster than a full decode + resize.
_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


@dataclass(frozen=True)
class ResizeCrop:
    """How one source image size maps onto the network input (all sizes in pixels)."""

    src_size: tuple[int, int]        # (W, H) of the image being resized (after any JPEG reduction)
    reduction: int                   # JPEG decode reduction already applied to the source (1, 2, 4, 8)
    resized_size: tuple[int, int]    # (W, H) after cv2.resize
    crop: tuple[int, int]            # (left, top) offset of the kept window in the resized image
    out_size: tuple[int, int]        # (W, H) of the network input

    @property
    def matrix(self) -> np.ndarray:
        """3x3 transform from ORIGINAL (unreduced) pixel coordinates to network pixels."""
        (sw, sh), (rw, rh), (left, top) = self.src_size, self.resized_size, self.crop
        # Per-axis scales relative to the original image: resize scale / decode reduction.
        sx = rw / sw / self.reduction
        sy = rh / sh / self.reduction
        return np.array(
            [[sx, 0.0, 0.5 * sx - 0.5 - left],
             [0.0, sy, 0.5 * sy - 0.5 - top],
             [0.0, 0.0, 1.0]],
            dtype=np.float64,
        )


def plan_resize_crop(src_w: int, src_h: int, out_hw: tuple[int, int], reduction: int = 1) -> ResizeCrop:
    """Plan the resize+crop of a (src_w x src_h) image (already JPEG-reduced by ``reduction``)."""
    out_h, out_w = out_hw
    if src_w <= 0 or src_h <= 0:
        raise ValueError(f"image size must be positive, got {src_w}x{src_h}")
    scale = max(out_w / src_w, out_h / src_h)
    rw = max(out_w, int(round(src_w * scale)))
    rh = max(out_h, int(round(src_h * scale)))
    return ResizeCrop((src_w, src_h), reduction, (rw, rh), ((rw - out_w) // 2, rh - out_h), (out_w, out_h))


def choose_reduction(orig_w: int, orig_h: int, out_hw: tuple[int, int]) -> int:
    """Largest JPEG decode reduction that still leaves the final resize a downscale."""
    out_h, out_w = out_hw
    if orig_w <= 0 or orig_h <= 0:
        return 1
    scale = max(out_w / orig_w, out_h / orig_h)
    best = 1
    for r in (2, 4, 8):
        if scale * r <= 1.0:  # the resize after the reduced decode must not upsample
            best = r
    return best


def apply_resize_crop(image: np.ndarray, plan: ResizeCrop) -> np.ndarray:
    """Resize then crop ``image`` (H, W, C) as planned; returns a contiguous array."""
    h, w = image.shape[:2]
    if (w, h) != plan.src_size:
        raise ValueError(f"image is {w}x{h}, plan was made for {plan.src_size[0]}x{plan.src_size[1]}")
    rw, rh = plan.resized_size
    # Bilinear aliases little down to half size and is ~3x faster than INTER_AREA; both map
    # pixel centres the same way, so the transform does not depend on the choice.
    interp = cv2.INTER_AREA if rw < 0.5 * w or rh < 0.5 * h else cv2.INTER_LINEAR
    resized = image if (rw, rh) == (w, h) else cv2.resize(image, (rw, rh), interpolation=interp)
    (left, top), (ow, oh) = plan.crop, plan.out_size
    return np.ascontiguousarray(resized[top:top + oh, left:left + ow])


class ImageReadError(Exception):
    """A camera file is missing or does not decode."""


def load_camera_image(path: str | Path, orig_size: tuple[int, int], out_hw: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Decode a JPEG straight to the network input size.

    ``orig_size`` is the (W, H) the tables declare (used to pick a fast reduced decode).
    Returns (RGB uint8 (H, W, 3), 3x3 transform from original pixels). Raises ImageReadError.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"cannot read {path}: {exc.strerror or exc}") from None
    reduction = choose_reduction(*orig_size, out_hw)
    bgr = cv2.imdecode(data, _REDUCED_FLAGS[reduction]) if data.size else None
    if bgr is None:
        raise ImageReadError(f"{path} is not a decodable image ({data.size} bytes)")
    if reduction > 1 and (bgr.shape[1], bgr.shape[0]) != (math.ceil(orig_size[0] / reduction),
                                                          math.ceil(orig_size[1] / reduction)):
        # The file's real size disagrees with the tables: decode in full so the geometry is right.
        reduction = 1
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    plan = plan_resize_crop(bgr.shape[1], bgr.shape[0], out_hw, reduction)
    rgb = cv2.cvtColor(apply_resize_crop(bgr, plan), cv2.COLOR_BGR2RGB)
    return rgb, plan.matrix


def placeholder_image(orig_size: tuple[int, int], out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A black input image with the transform the real image would have had."""
    plan = plan_resize_crop(orig_size[0], orig_size[1], out_hw)
    return np.zeros((out_hw[0], out_hw[1], 3), np.uint8), plan.matrix
