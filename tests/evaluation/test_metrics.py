"""nuScenes metrics wrapper: golden values on ground truth, and the devkit's traps."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil

import pytest
from rich.console import Console

from imkd_deploy.errors import UserError
from imkd_deploy.evaluation.nuscenes_metrics import evaluate_submission, gt_submission, print_metrics

VERSION = "v1.0-mini"


@pytest.fixture(scope="module")
def drive(small_drive):
    return small_drive


@pytest.fixture(scope="module")
def gt(drive):
    return gt_submission(drive, VERSION, "mini_val")


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_ground_truth_as_submission_scores_perfectly(drive, gt, tmp_path):
    # History of the expected value: 2026-11 first version, synthetic drive seed 0 -> 1.0 / 1.0.
    m = evaluate_submission(_write(tmp_path / "gt.json", gt), drive, VERSION, "mini_val")
    assert m["mean_ap"] >= 0.99 and m["nd_score"] >= 0.99
    assert all(ap >= 0.99 for ap in m["mean_dist_aps"].values()), m["mean_dist_aps"]  # all 10 classes present
    assert m["tp_errors"]["trans_err"] < 1e-6 and m["num_pred_boxes"] == m["num_gt_boxes"] > 0
    on_disk = json.loads((tmp_path / "gt_eval" / "metrics_summary.json").read_text())
    assert on_disk["nd_score"] == pytest.approx(m["nd_score"])
    assert not list((tmp_path / "gt_eval").glob(".*"))  # no temp files left behind


def test_shifted_boxes_give_the_expected_errors(drive, gt, tmp_path):
    # Every box 1 m off in x: ATE is exactly 1 m; matches only at the 2 m and 4 m thresholds
    # (the devkit matches strictly below the threshold), so every class AP is about 0.5.
    shifted = copy.deepcopy(gt)
    for boxes in shifted["results"].values():
        for b in boxes:
            b["translation"][0] += 1.0
    m = evaluate_submission(_write(tmp_path / "shift.json", shifted), drive, VERSION, "mini_val")
    assert m["tp_errors"]["trans_err"] == pytest.approx(1.0, abs=1e-3)
    assert 0.4 < m["mean_ap"] < 0.6
    assert m["tp_errors"]["scale_err"] < 1e-6


def test_zero_boxes_give_zero_metrics(drive, gt, tmp_path):
    empty = {"meta": gt["meta"], "results": {t: [] for t in gt["results"]}}
    m = evaluate_submission(_write(tmp_path / "empty.json", empty), drive, VERSION, "mini_val")
    assert m["mean_ap"] == 0 and m["nd_score"] == 0 and m["num_pred_boxes"] == 0
    assert all(v == 1.0 for v in m["tp_errors"].values())


def test_missing_tokens_are_a_user_error(drive, gt, tmp_path):
    partial = copy.deepcopy(gt)
    dropped = sorted(partial["results"])[:2]
    for t in dropped:
        del partial["results"][t]
    with pytest.raises(UserError, match=rf"2 of the {len(gt['results'])} samples.*e\.g\. ({'|'.join(dropped)})"):
        evaluate_submission(_write(tmp_path / "partial.json", partial), drive, VERSION, "mini_val")


def test_extra_tokens_are_ignored(drive, gt, tmp_path):
    train = gt_submission(drive, VERSION, "mini_train")
    both = {"meta": gt["meta"], "results": {**gt["results"], **train["results"]}}
    m = evaluate_submission(_write(tmp_path / "both.json", both), drive, VERSION, "mini_val")
    assert m["mean_ap"] >= 0.99 and m["num_samples"] == len(gt["results"])


def test_wrong_version_bad_json_and_bad_boxes_are_user_errors(drive, gt, tmp_path):
    good = _write(tmp_path / "gt.json", gt)
    with pytest.raises(UserError, match="trainval"):
        evaluate_submission(good, drive, VERSION, "val")
    with pytest.raises(UserError, match="v1.0-trainval"):
        evaluate_submission(good, drive, "v1.0-trainval", "val")
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": {')
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        evaluate_submission(bad, drive, VERSION, "mini_val")
    wrong_class = copy.deepcopy(gt)
    next(b for boxes in wrong_class["results"].values() for b in boxes)["detection_name"] = "tram"
    with pytest.raises(UserError, match="tram"):
        evaluate_submission(_write(tmp_path / "tram.json", wrong_class), drive, VERSION, "mini_val")


def test_custom_version_split_named_like_a_devkit_split(drive, gt, tmp_path):
    """'val' from splits.json on a custom version is scored on its scenes, not refused."""
    custom = tmp_path / "nus"
    custom.mkdir()
    for entry in drive.iterdir():
        if entry.name != VERSION:
            os.symlink(entry, custom / entry.name)
    shutil.copytree(drive / VERSION, custom / "v1.0-synth")
    (custom / "v1.0-synth" / "splits.json").write_text(json.dumps({"val": ["scene-0103", "scene-0916"]}))
    m = evaluate_submission(_write(tmp_path / "gt.json", gt), custom, "v1.0-synth", "val")
    assert m["mean_ap"] >= 0.99 and m["num_samples"] == len(gt["results"])


def test_print_metrics_uses_the_devkit_layout(drive, gt, tmp_path):
    m = evaluate_submission(_write(tmp_path / "gt.json", gt), drive, VERSION, "mini_val")
    buf = io.StringIO()
    print_metrics(m, Console(file=buf, width=200))
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"mAP: {m['mean_ap']:.4f}"
    assert [ln.split(":")[0] for ln in lines[1:8]] == ["mATE", "mASE", "mAOE", "mAVE", "mAAE", "NDS", "Eval time"]
    header = lines.index("Per-class results:") + 1
    assert lines[header].split() == ["Object", "Class", "AP", "ATE", "ASE", "AOE", "AVE", "AAE"]
    assert lines[header + 1].split()[0] == "car" and len(lines) == header + 11


def test_same_numbers_as_the_devkit_on_a_valid_submission(drive, gt, tmp_path, capsys):
    """Our front door must not change the score: compare with DetectionEval used directly."""
    import numpy as np
    from nuscenes.eval.common.config import config_factory
    from nuscenes.eval.detection.evaluate import DetectionEval

    from imkd_deploy.data.loader import open_nuscenes

    rng = np.random.default_rng(0)
    noisy = copy.deepcopy(gt)
    for token, boxes in noisy["results"].items():
        kept = [b for b in boxes if rng.random() > 0.2]
        for b in kept:
            b["translation"] = [t + d for t, d in zip(b["translation"], rng.normal(0, 0.4, 3))]
            b["velocity"] = [v + d for v, d in zip(b["velocity"], rng.normal(0, 0.5, 2))]
            b["detection_score"] = float(rng.random())
        noisy["results"][token] = kept
    path = _write(tmp_path / "noisy.json", noisy)
    ours = evaluate_submission(path, drive, VERSION, "mini_val")
    ref = DetectionEval(open_nuscenes(drive, VERSION), config_factory("detection_cvpr_2019"), str(path), "mini_val",
                        str(tmp_path / "ref"), verbose=False).main(render_curves=False)
    capsys.readouterr()
    assert 0.3 < ours["mean_ap"] < 0.95
    assert ours["mean_ap"] == pytest.approx(ref["mean_ap"], abs=1e-12)
    assert ours["nd_score"] == pytest.approx(ref["nd_score"], abs=1e-12)
    for k, v in ref["tp_errors"].items():
        assert ours["tp_errors"][k] == pytest.approx(v, abs=1e-12), k


def test_loader_ground_truth_round_trips_through_the_submission_format(drive, gt, tmp_path):
    """Frame GT (ego frame: yaw, velocity) -> global submission -> devkit: a perfect score.
    This checks the loader's box conversion and ego_boxes_to_submission against the devkit."""
    import numpy as np

    from imkd_deploy.config import ModelConfig
    from imkd_deploy.data.loader import NuScenesDrive
    from imkd_deploy.evaluation.nuscenes_metrics import ego_boxes_to_submission

    ds = NuScenesDrive(drive, VERSION, ModelConfig(radar_sweeps=1), split="mini_val")
    results = {}
    for token in ds.sample_tokens:
        f = ds.frame(token)
        keep = f.gt_num_pts > 0
        results[token] = ego_boxes_to_submission(token, f.ego2global, f.gt_boxes[keep], f.gt_labels[keep],
                                                 np.ones(keep.sum()))
    m = evaluate_submission(_write(tmp_path / "loader_gt.json", {"meta": gt["meta"], "results": results}),
                            drive, VERSION, "mini_val")
    assert m["mean_ap"] >= 0.99 and m["nd_score"] >= 0.97
    for err in ("trans_err", "scale_err", "orient_err", "vel_err"):
        assert m["tp_errors"][err] < 1e-3, (err, m["tp_errors"])


def test_scoring_some_scenes_of_a_split(drive, tmp_path):
    # scene-0553's boxes are 1 m off, scene-0061's exact: each scene scores on its own boxes only
    from imkd_deploy.data.loader import open_nuscenes, scene_sample_tokens
    train = gt_submission(drive, VERSION, "mini_train")
    nusc = open_nuscenes(drive, VERSION)
    shifted = set(scene_sample_tokens(nusc, next(s for s in nusc.scene if s["name"] == "scene-0553")))
    for token in shifted:
        for b in train["results"][token]:
            b["translation"][0] += 1.0
    path = _write(tmp_path / "train.json", train)
    exact = evaluate_submission(path, drive, VERSION, "mini_train", scenes=["scene-0061"], out_dir=tmp_path / "a")
    off = evaluate_submission(path, drive, VERSION, "mini_train", scenes=["scene-0553"], out_dir=tmp_path / "b")
    assert exact["nd_score"] >= 0.99 and exact["tp_errors"]["trans_err"] < 1e-6
    assert off["tp_errors"]["trans_err"] == pytest.approx(1.0, abs=1e-3)
    assert off["num_samples"] == len(shifted) and off["scenes"] == ["scene-0553"]
    with pytest.raises(UserError, match="scene-9999"):
        evaluate_submission(path, drive, VERSION, "mini_train", scenes=["scene-9999"], out_dir=tmp_path / "c")


def test_eval_cli_scores_one_condition_and_names_a_missing_one(drive, gt, tmp_path):
    from typer.testing import CliRunner

    from imkd_deploy.cli import app
    path = _write(tmp_path / "gt.json", gt)
    args = ["eval", "--dataroot", str(drive), "--version", VERSION, "--results", str(path), "--json"]
    day = CliRunner().invoke(app, args + ["--condition", "day"])
    assert day.exit_code == 0, day.output
    assert json.loads(day.output)["nd_score"] >= 0.99 and (tmp_path / "gt_eval_day" / "metrics_summary.json").is_file()
    night = CliRunner().invoke(app, args + ["--condition", "night"])
    assert night.exit_code != 0 and "has no night scene" in night.output and "1 day" in night.output
