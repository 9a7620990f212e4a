"""Trainer: loss goes down, checkpoints round-trip, resume == uninterrupted, DDP replicas agree."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fake_frames import fake_frames
from imkd_deploy.config import BEVGrid, ConfigError, DistillConfig, RunConfig, TrainConfig, tiny
from imkd_deploy.distill.checkpoint import load_checkpoint, load_model, save_checkpoint
from imkd_deploy.distill.trainer import fit, kd_factor, lr_factor, train
from imkd_deploy.errors import UserError
from imkd_deploy.export.metadata import file_sha256
from imkd_deploy.model.build import build_student


def small_cfg():
    """tiny, shrunk further so a CPU step takes a fraction of a second."""
    return tiny().replace(image_size=(64, 128), grid=BEVGrid((-24.0, 24.0), (-24.0, 24.0), (-5.0, 3.0), 1.5).to_dict(),
                          fpn_channels=16, context_channels=16, radar_channels=16, lidar_channels=16,
                          fused_channels=24, bev_encoder_channels=24, head_channels=24)


def run_cfg(levels="none", **train) -> RunConfig:
    tc = dict(max_steps=4, batch_size=2, warmup_steps=1, log_every=1, lr=2e-3)
    tc.update(train)
    return RunConfig(model=small_cfg(), distill=DistillConfig(levels=levels), train=TrainConfig(**tc))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def frames():
    return fake_frames(small_cfg(), 6, seed=1)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, frames):
    torch.set_num_threads(1)
    return train(run_cfg(max_steps=3), None, tmp_path_factory.mktemp("teacher"), role="teacher", frames=frames, progress=False)


def test_lr_schedule():
    tc = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, tc) == pytest.approx(0.1) and lr_factor(9, tc) == pytest.approx(1.0)
    assert lr_factor(55, tc) == pytest.approx(0.5) and lr_factor(100, tc) == pytest.approx(0.0, abs=1e-12)
    st = TrainConfig(max_steps=100, warmup_steps=10, schedule="step")
    assert [lr_factor(s, st) for s in (20, 80, 99)] == pytest.approx([1.0, 0.1, 0.01])


def test_kd_schedule():
    assert [kd_factor(s, 100, None) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert [kd_factor(s, 100, 0.5) for s in (0, 25, 50, 99)] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert kd_factor(50, 100, 1.0) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="kd_until"):
        DistillConfig(kd_until=1.5).validate()
    with pytest.raises(ConfigError, match="kd_until"):
        DistillConfig(kd_until="late").validate()
    with pytest.raises(ConfigError, match="resp_until"):
        DistillConfig(resp_until=0.0).validate()


def test_kd_and_resp_schedules_fade_distillation_in_the_total(tmp_path, frames, teacher_ckpt):
    torch.set_num_threads(1)
    rc = run_cfg("all")
    rc = rc.replace(distill=rc.distill.replace(kd_until=0.5, w_resp=1.0, resp_until=1.0).to_dict())
    fit(rc, None, tmp_path, teacher_ckpt, role="student", frames=frames, progress=False)
    m = metrics(tmp_path)
    assert [r["kd_scale"] for r in m] == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert [r["resp_scale"] for r in m] == pytest.approx([1.0, 0.5 + 0.5 ** 1.5, 0.5, 0.5 - 0.5 ** 1.5], abs=1e-12)
    for r in m:
        kd = r["radar_kd"] + r["fused_kd"]
        assert kd > 0 and r["resp_kd"] > 0
        assert r["total"] == pytest.approx(r["heatmap"] + r["reg"] + r["depth"] + r["kd_scale"] * kd
                                           + r["resp_scale"] * r["resp_kd"], rel=1e-5)


def test_student_trains_under_bf16_autocast(in_own_process, tmp_path, frames, teacher_ckpt):
    """CUDA runs train under bf16 autocast (amp=auto); amp=bf16 takes the same op paths on a CPU, so
    a custom op that mixes bf16 activations with fp32 parameters fails here, not on the GPU."""
    if not in_own_process:
        return
    torch.set_num_threads(1)
    rc = run_cfg("all", amp="bf16")
    result = fit(rc, None, tmp_path, teacher_ckpt, role="student", frames=frames, progress=False)
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2, 3, 4] and all(np.isfinite(r["total"]) and r["grad_norm"] > 0 for r in m)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in result.net.parameters())
    with pytest.raises(ConfigError, match="TrainConfig.amp"):
        TrainConfig(amp="fp8").validate()


def test_plain_student_does_not_depend_on_the_lidar_sweeps(tmp_path, frames):
    """The plain student reads LiDAR only for its depth targets, from the key sweep, so a teacher
    on more sweeps leaves it unchanged bit for bit; distill_seeds.py pairs it across sweeps on this."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    older = []
    for f in frames:
        # older sweeps: the object points 0.45 s back, shifted as a moving object would be
        past = f.lidar_points[f.lidar_points[:, 3] > 100].copy()
        past[:, :2] += rng.normal(0, 1.0, (1, 2))
        past[:, 4] = 0.45
        older.append(dataclasses.replace(f, lidar_points=np.concatenate([f.lidar_points, past])))
    weights = []
    for n, drive in ((5, frames), (10, older)):
        rc = run_cfg(max_steps=2)
        rc = rc.replace(model=rc.model.replace(lidar_sweeps=n).to_dict())
        net = fit(rc, None, tmp_path / f"ls{n}", role="student", frames=drive, progress=False).net
        weights.append(net.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def test_kd_skip_trains_and_needs_the_frames_conditions(tmp_path, frames, teacher_ckpt):
    torch.set_num_threads(1)
    rc = run_cfg("all", max_steps=2)
    rc = rc.replace(distill=rc.distill.replace(kd_skip="night").to_dict())
    with pytest.raises(ValueError, match=r"frame tok1_\d+ \(scene scene-fake\): DistillConfig.kd_skip needs the scene's condition"):
        fit(rc, None, tmp_path / "unknown", teacher_ckpt, frames=frames, progress=False)
    # every sample at night: two steps without a distillation term, detection still trains
    night = [dataclasses.replace(f, condition="night") for f in frames]
    fit(rc, None, tmp_path / "night", teacher_ckpt, frames=night, progress=False)
    m = metrics(tmp_path / "night")
    assert all(r["radar_kd"] == 0 and r["fused_kd"] == 0 and r["heatmap"] > 0 for r in m)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    rc = run_cfg()
    net = build_student(rc.model)
    path = save_checkpoint(tmp_path / "c.safetensors", role="student", step=7, run_config=rc, model=net,
                           train_state={"optimizer": {"state": {}, "param_groups": []}})
    model, ckpt = load_model(path)
    assert ckpt.step == 7 and ckpt.role == "student" and ckpt.run_config.to_dict() == rc.to_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.safetensors"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_student_loss_decreases(tmp_path, frames, teacher_ckpt):
    torch.set_num_threads(1)
    rc = run_cfg("all", max_steps=24, batch_size=2, warmup_steps=2, lr=3e-3)
    fit(rc, None, tmp_path, teacher_ckpt, role="student", frames=frames[:2], progress=False)
    m = metrics(tmp_path)
    assert {"heatmap", "reg", "depth", "radar_kd", "fused_kd", "total"} <= set(m[0])
    first, last = np.mean([r["total"] for r in m[:3]]), np.mean([r["total"] for r in m[-3:]])
    assert last < 0.6 * first, (first, last)


def test_resume_continues_the_run(tmp_path, frames, teacher_ckpt):
    torch.set_num_threads(1)
    rc = run_cfg("all")
    full = fit(rc, None, tmp_path / "full", teacher_ckpt, frames=frames, progress=False)
    fit(rc, None, tmp_path / "split", teacher_ckpt, frames=frames, progress=False, stop_after=2)
    assert load_checkpoint(tmp_path / "split/checkpoints/last.safetensors").step == 2
    resumed = fit(rc, None, tmp_path / "split", teacher_ckpt, frames=frames, progress=False)
    assert resumed.step == 4 and load_checkpoint(resumed.checkpoint).step == 4
    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["total"] == pytest.approx(rb["total"], rel=1e-5, abs=1e-6), (ra, rb)
    for (k, va), vb in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_refuses_a_changed_config(tmp_path, frames, teacher_ckpt):
    torch.set_num_threads(1)
    rc = run_cfg("all")
    fit(rc, None, tmp_path / "run", teacher_ckpt, frames=frames, progress=False, stop_after=2)
    changed = rc.replace(distill=rc.distill.replace(w_radar=0.25))
    with pytest.raises(UserError, match=r"distill.w_radar 1.0 -> 0.25"):
        fit(changed, None, tmp_path / "run", teacher_ckpt, frames=frames, progress=False)
    longer = rc.replace(train=rc.train.replace(max_steps=rc.train.max_steps + 1))
    assert fit(longer, None, tmp_path / "run", teacher_ckpt, frames=frames, progress=False).step == rc.train.max_steps + 1


def test_resume_refuses_a_teacher_retrained_into_the_same_path(tmp_path, frames, teacher_ckpt):
    torch.set_num_threads(1)
    teacher = tmp_path / "teacher.safetensors"
    shutil.copyfile(teacher_ckpt, teacher)
    rc = run_cfg("radar")
    fit(rc, None, tmp_path / "run", teacher, frames=frames, progress=False, stop_after=2)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    assert saved["teacher_sha256"] == file_sha256(teacher)
    # same path, other weights: a teacher retrained with another seed
    other = train(run_cfg(max_steps=1, seed=1), None, tmp_path / "teacher2", role="teacher", frames=frames, progress=False)
    shutil.copyfile(other, teacher)
    with pytest.raises(UserError, match="another teacher"):
        fit(rc, None, tmp_path / "run", teacher, frames=frames, progress=False)
    # a plain student does not use the teacher, so it records none and resumes whatever is passed
    plain = fit(run_cfg("none"), None, tmp_path / "plain", teacher, frames=frames, progress=False, stop_after=2)
    assert json.loads((tmp_path / "plain/config.json").read_text())["teacher_sha256"] is None
    shutil.copyfile(teacher_ckpt, teacher)
    assert fit(run_cfg("none"), None, tmp_path / "plain", teacher, frames=frames, progress=False).step == 4 > plain.step


def test_student_distillation_without_teacher_is_a_user_error(tmp_path, frames):
    with pytest.raises(UserError, match="needs a teacher"):
        fit(run_cfg("radar"), None, tmp_path, None, frames=frames, progress=False)


def test_teacher_trained_on_other_lidar_sweeps_is_a_user_error(tmp_path, frames, teacher_ckpt):
    rc = run_cfg("fused")
    rc = rc.replace(model=rc.model.replace(lidar_sweeps=rc.model.lidar_sweeps + 1).to_dict())
    with pytest.raises(UserError, match=rf"trained on {rc.model.lidar_sweeps - 1} LiDAR sweeps"):
        fit(rc, None, tmp_path, teacher_ckpt, frames=frames, progress=False)


def _ddp_worker(rank: int, world: int, port: int, out: str, teacher: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    frames = fake_frames(small_cfg(), 4, seed=1)
    rc = run_cfg("all", max_steps=2, batch_size=1)
    result = fit(rc, None, out, teacher, frames=frames, progress=False)
    torch.save({k: v.clone() for k, v in result.net.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_process_gloo_replicas_agree(tmp_path, teacher_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), str(teacher_ckpt)), nprocs=2, join=True)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    saved = load_checkpoint(tmp_path / "checkpoints/last.safetensors")
    assert saved.step == 2 and torch.equal(saved.model["head.shared.0.weight"], w0["head.shared.0.weight"])
    # the two ranks saw different samples: the logged loss is their average, one record a step
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
