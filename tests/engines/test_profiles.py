"""Optimization profiles from calibration feeds: real preprocessed example frames of the tiny config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imkd_deploy.config import tiny
from imkd_deploy.engines.builder import BuildSettings
from imkd_deploy.engines.profiles import DYNAMIC_GROUPS, profiles_from_feeds
from imkd_deploy.errors import UserError
from imkd_deploy.export.onnx_export import example_inputs


@pytest.fixture(scope="module")
def feeds():
    return [example_inputs(tiny(), seed=k) for k in range(5)]


def test_profiles_follow_the_feed_statistics(feeds):
    prof = profiles_from_feeds(feeds, margin=0.25)
    assert set(prof) == {n for names in DYNAMIC_GROUPS.values() for n in names}
    points = [f["ranks_bev"].shape[0] for f in feeds]
    cells = [f["interval_starts"].shape[0] for f in feeds]
    pillars = sorted(f["radar_pillars"].shape[0] for f in feeds)
    assert len(set(pillars)) > 1                       # the seeds really vary the radar
    for name in DYNAMIC_GROUPS["points"]:
        assert prof[name] == ((min(points),), (int(np.median(points)),), (math.ceil(max(points) * 1.25),))
    for name in DYNAMIC_GROUPS["intervals"]:
        assert prof[name] == ((min(cells),), (int(np.median(cells)),), (math.ceil(max(cells) * 1.25),))
    # pillars: min 1 (sparse radar frames must run), opt the median count, max with the margin
    assert prof["radar_pillars"] == ((1, 9), (pillars[2], 9), (math.ceil(pillars[-1] * 1.25), 9))
    assert prof["radar_coords"] == ((1,), (pillars[2],), (math.ceil(pillars[-1] * 1.25),))
    BuildSettings(profiles=prof).validate()
    for feed in feeds:                                  # every calibration frame fits its profile
        for name, (lo, _, hi) in prof.items():
            assert all(a <= d <= b for a, d, b in zip(lo, feed[name].shape, hi)), name


def test_margin_zero_and_even_count_median(feeds):
    prof = profiles_from_feeds(feeds[:4], margin=0.0)
    counts = sorted(f["radar_coords"].shape[0] for f in feeds[:4])
    assert prof["radar_coords"] == ((1,), (counts[1],), (counts[-1],))  # lower median: an observed size


def test_inconsistent_or_empty_feeds_are_errors(feeds):
    bad = dict(feeds[0])
    bad["ranks_feat"] = bad["ranks_feat"][:-3]
    with pytest.raises(UserError, match=r"feed #1: the points inputs must share their first dimension"):
        profiles_from_feeds([feeds[0], bad])
    wide = dict(feeds[0])
    wide["radar_pillars"] = np.zeros((5, 11), np.float32)
    wide["radar_coords"] = np.zeros(5, np.int64)
    with pytest.raises(UserError, match=r"radar_pillars has trailing shape \(11,\)"):
        profiles_from_feeds([feeds[0], wide])
    with pytest.raises(UserError, match="no feeds"):
        profiles_from_feeds([])
    with pytest.raises(UserError, match="lacks the inputs"):
        profiles_from_feeds([{"images": feeds[0]["images"]}])
    with pytest.raises(UserError, match="margin"):
        profiles_from_feeds(feeds, margin=-0.1)
