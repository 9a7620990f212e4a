"""Optimization profiles for the engine's dynamic inputs, from calibration-set statistics.

Only the leading dimension of three groups of inputs varies between frames, and every input
of a group shares it (one exported symbolic dim per group):

    points     ranks_depth, ranks_feat, ranks_bev    frustum points inside the BEV grid
    intervals  interval_starts, interval_lengths     occupied BEV cells
    pillars    radar_pillars, radar_coords           non-empty radar pillars

A profile is (min, opt, max) per input: min = the smallest length seen, opt = the median
(TensorRT tunes its kernels for opt), max = the largest seen plus a margin for frames
the calibration set did not cover. The points/intervals lengths depend only on the rig, so
their range is narrow; the pillar count depends on the scene, so its min is 1: a frame with
a single radar return must still run (zero pillars is not a valid engine shape).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from imkd_deploy.engines.builder import Profile
from imkd_deploy.errors import UserError

DYNAMIC_GROUPS: dict[str, tuple[str, ...]] = {
    "points": ("ranks_depth", "ranks_feat", "ranks_bev"),
    "intervals": ("interval_starts", "interval_lengths"),
    "pillars": ("radar_pillars", "radar_coords"),
}
_MIN_FLOOR = {"pillars": 1}


def group_lengths(feed: Mapping[str, np.ndarray], index: int = 0) -> dict[str, int]:
    """{group: shared leading length} of one network feed; a group whose inputs disagree is an error."""
    lengths = {}
    for group, names in DYNAMIC_GROUPS.items():
        missing = [n for n in names if n not in feed]
        if missing:
            raise UserError(f"feed #{index} lacks the inputs {missing}: not an imkd student feed")
        seen = {n: int(np.shape(feed[n])[0]) for n in names}
        if len(set(seen.values())) != 1:
            raise UserError(f"feed #{index}: the {group} inputs must share their first dimension, got {seen}")
        lengths[group] = next(iter(seen.values()))
    return lengths


def profiles_from_feeds(feeds: Iterable[Mapping[str, np.ndarray]], margin: float = 0.25) -> dict[str, Profile]:
    """{input: (min, opt, max) shapes} for every dynamic input, from the lengths the feeds show.

    Trailing dimensions (radar_pillars' feature width) are copied from the feeds and must
    not vary. Feed the calibration set's preprocessed frames (`imkd_deploy.runtime.preprocess`).
    """
    if not margin >= 0:
        raise UserError(f"profile margin must be >= 0, got {margin}")
    per_group: dict[str, list[int]] = {g: [] for g in DYNAMIC_GROUPS}
    trailing: dict[str, tuple[int, ...]] = {}
    for i, feed in enumerate(feeds):
        for group, n in group_lengths(feed, i).items():
            per_group[group].append(n)
        for names in DYNAMIC_GROUPS.values():
            for name in names:
                rest = tuple(int(d) for d in np.shape(feed[name])[1:])
                if trailing.setdefault(name, rest) != rest:
                    raise UserError(f"feed #{i}: {name} has trailing shape {rest}, earlier feeds {trailing[name]}")
    if not per_group["points"]:
        raise UserError("no feeds given: profiles need at least one calibration frame")

    profiles: dict[str, Profile] = {}
    for group, names in DYNAMIC_GROUPS.items():
        lo, opt, hi = length_range(per_group[group], margin, floor=_MIN_FLOOR.get(group))
        for name in names:
            rest = trailing[name]
            profiles[name] = ((lo, *rest), (opt, *rest), (hi, *rest))
    return profiles


def length_range(lengths: list[int], margin: float, floor: int | None = None) -> tuple[int, int, int]:
    """(min, opt, max) of observed lengths; `floor` replaces the observed min (the pillar count)."""
    arr = np.asarray(lengths, dtype=np.int64)
    lo = int(arr.min()) if floor is None else floor
    # The median of an even count is a half-integer: take the lower observed size.
    opt = max(int(np.percentile(arr, 50, method="lower")), lo)
    hi = max(int(math.ceil(int(arr.max()) * (1.0 + margin))), opt)
    return lo, opt, hi
