"""`imkd data inspect` counts against the raw tables; `imkd data render` writes a real PNG."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from rich.console import Console

from imkd_deploy.config import CLASS_NAMES
from imkd_deploy.data.inspect import inspect_drive
from imkd_deploy.data.render import render_sample
from imkd_deploy.errors import UserError

VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def drive(small_drive):
    return small_drive


def _table(root, name):
    return json.loads((root / VERSION / f"{name}.json").read_text())


def test_inspect_counts_equal_the_table_counts(drive):
    from nuscenes.eval.detection.utils import category_to_detection_name

    report = inspect_drive(drive, VERSION)
    assert report.scenes == len(_table(drive, "scene")) == 3
    assert report.samples == len(_table(drive, "sample")) == 18
    assert report.annotations == len(_table(drive, "sample_annotation"))
    # Channel of each sample_data row, joined by hand through calibrated_sensor -> sensor.
    channel = {s["token"]: s["channel"] for s in _table(drive, "sensor")}
    cs_channel = {c["token"]: channel[c["sensor_token"]] for c in _table(drive, "calibrated_sensor")}
    expected = Counter((cs_channel[sd["calibrated_sensor_token"]], sd["is_key_frame"])
                       for sd in _table(drive, "sample_data"))
    assert len(report.sweeps) == 12  # 6 cameras, 5 radars, 1 LiDAR
    for ch, counts in report.sweeps.items():
        assert counts["key"] == expected[(ch, True)] == 18, ch
        assert counts["non_key"] == expected[(ch, False)], ch
    assert report.sweeps["LIDAR_TOP"]["non_key"] > 0 and report.sweeps["RADAR_FRONT"]["non_key"] > 0
    category = {c["token"]: c["name"] for c in _table(drive, "category")}
    instance_cat = {i["token"]: category[i["category_token"]] for i in _table(drive, "instance")}
    per_class = Counter(category_to_detection_name(instance_cat[a["instance_token"]]) or "other"
                        for a in _table(drive, "sample_annotation"))
    assert report.annotations_per_class == {**{c: per_class.get(c, 0) for c in CLASS_NAMES},
                                            "other": per_class.get("other", 0)}
    assert all(report.annotations_per_class[c] > 0 for c in CLASS_NAMES)
    assert report.splits == {"mini_train": 2, "mini_val": 1}
    # Points per box, by class and over all boxes, from the annotation rows themselves.
    anns = _table(drive, "sample_annotation")
    cls = [category_to_detection_name(instance_cat[a["instance_token"]]) or "other" for a in anns]
    for name in ("car", "pedestrian", "all"):
        mine = [a for a, c in zip(anns, cls) if name in ("all", c)]
        got = report.points_per_box[name]
        assert got["lidar"] == pytest.approx(np.mean([a["num_lidar_pts"] for a in mine]))
        assert got["radar"] == pytest.approx(np.mean([a["num_radar_pts"] for a in mine]))
        assert got["radar_hit"] == pytest.approx(np.mean([a["num_radar_pts"] > 0 for a in mine]))
    assert report.points_per_box["car"]["radar"] > report.points_per_box["pedestrian"]["radar"] > 0


def test_inspect_prints_and_serialises(drive):
    report = inspect_drive(drive, VERSION)
    assert json.loads(json.dumps(report.to_dict()))["samples"] == 18
    buf = io.StringIO()
    report.print(Console(file=buf, width=120))
    text = buf.getvalue()
    assert "CAM_BACK_LEFT" in text and "construction_vehicle" in text and "18 samples" in text
    assert "radar pts/box" in text and "nuScenes v1.0-mini for comparison: 58.8 LiDAR and 0.85 radar" in text


def test_inspect_cli_json(drive):
    from typer.testing import CliRunner

    from imkd_deploy.cli import app

    result = CliRunner().invoke(app, ["data", "inspect", "--dataroot", str(drive), "--version", VERSION, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["annotations_per_class"] == inspect_drive(drive, VERSION).annotations_per_class


def test_inspect_wrong_version_names_the_versions_there(drive):
    with pytest.raises(UserError, match="versions there: v1.0-mini"):
        inspect_drive(drive, "v1.0-trainval")


def test_render_writes_a_png_with_cameras_boxes_and_radar(drive, tmp_path):
    from PIL import Image

    out = render_sample(drive, VERSION, tmp_path / "sub" / "frame.png", index=2)
    assert out == tmp_path / "sub" / "frame.png"
    assert [p.name for p in out.parent.iterdir()] == ["frame.png"]   # atomic: no temp file left
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[1] > 1500 and img.shape[0] > 400
    red = (img[..., 0] > 200) & (img[..., 1] < 60) & (img[..., 2] < 60)      # radar points
    assert red.sum() > 20
    assert len(np.unique(img.reshape(-1, 3)[::37], axis=0)) > 200              # real camera content


def test_render_bad_index_and_token(drive, tmp_path):
    with pytest.raises(UserError, match="out of range"):
        render_sample(drive, VERSION, tmp_path / "x.png", index=99)
    with pytest.raises(UserError, match="not in"):
        render_sample(drive, VERSION, tmp_path / "x.png", sample_token="nope")
