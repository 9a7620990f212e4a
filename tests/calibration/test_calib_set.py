from __future__ import annotations

import numpy as np
import pytest

from imkd_deploy.calibration.calib_set import CalibEntry, CalibrationSet, make_set, read_manifest
from imkd_deploy.errors import UserError


def _drive(lengths):
    return {f"scene-{i:04d}": [f"tok{i}_{t:03d}" for t in range(n)] for i, n in enumerate(lengths)}


def test_make_set_is_proportional_and_spread_over_time():
    drive = _drive([40, 20, 10])
    cset = make_set(drive, 14, "v1.0-mini", "mini_train")
    per_scene = {s: [e.sample_token for e in cset.entries if e.scene_name == s] for s in drive}
    assert [len(v) for v in per_scene.values()] == [8, 4, 2]
    idx = [int(t.split("_")[1]) for t in per_scene["scene-0000"]]
    assert idx == sorted(idx) and idx[0] > 0 and idx[-1] < 39      # strata centres, not the ends
    assert np.ptp(idx) >= 30                                        # covers the whole scene
    assert len(set(e.sample_token for e in cset.entries)) == 14


def test_make_set_warns_small_and_short():
    cset = make_set(_drive([5, 5]), 50, "v1.0-mini", "mini_train")
    assert len(cset) == 10
    assert any("only 10" in w for w in cset.warnings)
    assert any(">= 100" in w for w in cset.warnings)
    big = make_set(_drive([100, 100]), 150, "v1.0-trainval", "train")
    assert big.warnings == [] and len(big) == 150


def test_fewer_frames_than_scenes_spreads_over_scenes():
    cset = make_set(_drive([3] * 10), 4, "v", "s")
    assert len(cset) == 4 and len(cset.scenes) == 4


def test_manifest_round_trip_and_content_hash(tmp_path):
    cset = make_set(_drive([6, 6]), 4, "v1.0-mini", "mini_val")
    path = cset.write(tmp_path / "set.txt")
    back = read_manifest(path)
    assert back.entries == cset.entries and back.version == "v1.0-mini" and back.split == "mini_val"
    assert back.sha256 == cset.sha256
    later = CalibrationSet(cset.version, cset.split, cset.entries, created="2030-01-01")
    assert later.sha256 == cset.sha256                       # the timestamp is not content
    changed = CalibrationSet(cset.version, cset.split, cset.entries[:-1] + (CalibEntry("scene-0001", "other"),))
    assert changed.sha256 != cset.sha256


def test_bad_manifests_name_the_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("scene-1 tok\n")
    with pytest.raises(UserError, match="bad.txt.*not a calibration manifest"):
        read_manifest(bad)
    bad.write_text("# imkd calibration set v1\n# version: v\n# split: s\nscene-1\n")
    with pytest.raises(UserError, match="bad.txt:4"):
        read_manifest(bad)
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path / "missing.txt")
