"""Training: the loss and schedule, a tiny end-to-end run, determinism, resume, DDP (gloo)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loda_cli.cli.main import app
from loda_cli.config import LoDaConfig, TrainConfig
from loda_cli.train import cosine_lr, plcc_loss, state_path, train
from loda_cli.weights import read_metadata
from tests.datasetfixtures import make_kadid

runner = CliRunner()
TINY = {"vit": "test_vit", "vit_kwargs": {"img_size": 224, "depth": 2}, "cnn": "test_resnet"}


@pytest.fixture(scope="module")
def kadid(tmp_path_factory):
    return make_kadid(tmp_path_factory.mktemp("kadid"), n_refs=6, per_ref=8, size=(96, 72))


@pytest.fixture(scope="module")
def small_kadid(tmp_path_factory):
    return make_kadid(tmp_path_factory.mktemp("small_kadid"), n_refs=5, per_ref=5, size=(64, 48))


def _cfg(root, out, **kw) -> TrainConfig:
    base = dict(dataset="kadid", data=str(root), epochs=2, batch_size=8, lr=3e-3, workers=0,
                crops_per_image=2, test_crops=3, num_crops=3, model=LoDaConfig(**TINY), pretrained=False,
                out=str(out), precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_plcc_loss_matches_its_definition():
    torch.manual_seed(0)
    p, y = torch.randn(64), torch.randn(64)
    ps = (p - p.mean()) / p.std(unbiased=False)
    ys = (y - y.mean()) / y.std(unbiased=False)
    plcc = float((ps * ys).mean())
    l0 = float(((ps - ys) ** 2).mean() / 4)
    assert l0 == pytest.approx((1 - plcc) / 2, abs=1e-6)
    l1 = float(((plcc * ps - ys) ** 2).mean() / 4)
    assert float(plcc_loss(p, y)) == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert float(plcc_loss(y * 3 + 1, y)) == pytest.approx(0.0, abs=1e-6)
    # Invariant to the scale and offset of the predictions: only their order and linear fit matter.
    assert float(plcc_loss(p * 5 - 2, y)) == pytest.approx(float(plcc_loss(p, y)), abs=1e-6)


def test_cosine_schedule():
    assert cosine_lr(0, 100, 3e-4) == pytest.approx(3e-4)
    assert cosine_lr(50, 100, 3e-4) == pytest.approx(1.5e-4)
    assert cosine_lr(100, 100, 3e-4) == pytest.approx(0.0, abs=1e-12)
    values = [cosine_lr(s, 100, 1.0) for s in range(101)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_tiny_training_learns_and_the_checkpoint_scores(kadid, tmp_path):
    events = []
    out = train(_cfg(kadid, tmp_path / "tiny.safetensors"), events.append)
    losses = [e.data["loss"] for e in events if e.kind == "step"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    metrics = [e.data["metrics"] for e in events if e.kind == "epoch"][-1]
    assert metrics["srcc"] > 0.6, metrics  # chance is 0
    from loda_cli.weights import read_metadata

    meta = read_metadata(out)
    assert meta["dataset"]["name"] == "kadid10k" and meta["metrics"]["srcc"] == metrics["srcc"]
    assert meta["calibration"]["label_min"] == 1.0 and meta["train"]["seed"] == 3407
    assert (tmp_path / "tiny.safetensors.log.jsonl").read_text().count("\n") == 2
    # The checkpoint drives `loda score`, and its scores follow quality on the dataset's images.
    scores = tmp_path / "s.csv"
    r = runner.invoke(app, ["score", str(kadid / "images"), "-m", str(out), "-o", str(scores), "-q",
                            "--crops", "1", "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    import csv

    from loda_cli.metrics import srcc

    rows = {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(open(scores))}
    dmos = {line.split(",")[0]: float(line.split(",")[2]) for line in (kadid / "dmos.csv").read_text().splitlines()[1:]}
    names = sorted(dmos)
    assert srcc([rows[n] for n in names], [dmos[n] for n in names]) > 0.6


def test_same_seed_same_checkpoint_and_resume_is_exact(small_kadid, tmp_path):
    kadid = small_kadid
    small = dict(crops_per_image=1, test_crops=2, num_crops=1)
    a = train(_cfg(kadid, tmp_path / "a.safetensors", **small))
    ta = load_file(str(a))

    # A run killed after its first epoch, then resumed, ends exactly where the straight run did:
    # that is also the determinism check (same seed, same checkpoint, bit for bit).
    cfg = _cfg(kadid, tmp_path / "c.safetensors", **small)
    first = []
    cfg.max_steps = 1  # stopped inside epoch 1: nothing to resume from yet
    train(cfg, first.append)
    assert not state_path(Path(cfg.out)).is_file()
    cfg.max_steps = [e.data["steps_per_epoch"] for e in first if e.kind == "start"][0]
    train(cfg)
    assert state_path(Path(cfg.out)).is_file()
    cfg.max_steps, cfg.resume = None, True
    events = []
    c = train(cfg, events.append)
    assert [e.data["start_epoch"] for e in events if e.kind == "start"] == [1]
    tc = load_file(str(c))
    assert all(torch.equal(ta[k], tc[k]) for k in ta)

    # A finished run resumed with other scoring crops trains nothing, and re-calibrates to what
    # a fresh run with those crops writes.
    fresh = train(_cfg(kadid, tmp_path / "d.safetensors", **(small | {"num_crops": 2})))
    cfg.num_crops = 2
    events = []
    again = train(cfg, events.append)
    assert not [e for e in events if e.kind == "step"]
    assert load_file(str(again)).keys() == load_file(str(fresh)).keys()
    assert all(torch.equal(load_file(str(fresh))[k], v) for k, v in load_file(str(again)).items())
    assert read_metadata(again)["calibration"] == read_metadata(fresh)["calibration"]
    assert read_metadata(again)["preprocess"]["num_crops"] == 2

    cfg.lr = 1.0  # a different configuration must not resume silently
    from loda_cli.errors import UsageError

    with pytest.raises(UsageError, match=r"different configuration \(lr\)"):
        train(cfg)


def test_train_cli_and_bad_input(small_kadid, tmp_path):
    kadid = small_kadid
    out = tmp_path / "cli.safetensors"
    r = runner.invoke(app, ["train", "kadid", "--data", str(kadid), "--vit", "test_vit", "--vit-depth", "1",
                            "--cnn", "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
                            "--max-steps", "2", "--workers", "0", "--precision", "fp32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "checkpoint:" in r.output
    assert "\n\n" not in r.output  # off a terminal no bar is drawn, nor an empty line where it was
    r = runner.invoke(app, ["train", "kadid", "--data", str(tmp_path / "nowhere")])
    assert r.exit_code != 0 and "--data" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["train", "kadidd"])
    assert r.exit_code == 2 and "did you mean" in r.output
    r = runner.invoke(app, ["train", "kadid", "--data", str(kadid), "--preset", "nope"])
    assert r.exit_code == 2


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "-1", "--lr -1.0: must be above 0"), ("--weight-decay", "-1", "must be 0 or more"),
    ("--grad-accum", "0", "--grad-accum 0: must be at least 1"), ("--workers", "-1", "must be 0 or more"),
    ("--epochs", "0", "--epochs 0: must be at least 1"), ("--crops-per-image", "0", "must be at least 1"),
    ("--warmup", "2", "from 0 up to 1"), ("--vit-depth", "0", "--vit-depth 0: must be at least 1"),
])
def test_train_refuses_values_no_run_can_use_before_it_starts(small_kadid, option, value, message):
    r = runner.invoke(app, ["train", "kadid", "--data", str(small_kadid), "--no-pretrained", option, value])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output


def test_train_checks_its_out_before_training(small_kadid, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out, message in ((afile / "x.safetensors", "is not a folder"), (tmp_path, "is a folder")):
        r = runner.invoke(app, ["train", "kadid", "--data", str(small_kadid), "--no-pretrained", "--out", str(out)])
        assert r.exit_code == 2 and message in r.output, r.output


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_with_gloo_two_processes(small_kadid, tmp_path):
    kadid = small_kadid
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "loda_cli", "train", "kadid", "--data", str(kadid), "--vit", "test_vit", "--vit-depth", "1",
           "--cnn", "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "8", "--workers", "0",
           "--max-steps", "3", "--precision", "fp32", "--out", str(out), "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from loda_cli.weights import load_checkpoint, read_metadata

    assert read_metadata(out)["train"]["steps"] == 3
    model, _ = load_checkpoint(out)
    with torch.no_grad():
        raw = model(torch.zeros(1, 3, 224, 224))
    assert math.isfinite(float(raw))


# --- beyond the paper: grouped batches, warm-up, the auxiliary distortion head (built-in model) ---


def test_warmup_then_cosine():
    assert cosine_lr(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 1.0, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)


def test_grouped_plcc_loss_adds_the_within_group_term():
    from loda_cli.train import grouped_plcc_loss

    torch.manual_seed(0)
    y = torch.rand(24)
    # Perfect within every group and across the batch: no loss.
    assert float(grouped_plcc_loss(2 * y + 1, y, 8)) == pytest.approx(0.0, abs=1e-6)
    # Right across groups but reversed inside each: the group term sees it, the batch term less.
    offsets = torch.arange(3).repeat_interleave(8).float() * 10
    target = offsets + y
    pred = offsets - y
    assert float(grouped_plcc_loss(pred, target, 8)) == pytest.approx(float(plcc_loss(pred, target)) + 0.5, abs=1e-4)


def test_grouped_crops_hold_one_reference_cut_in_one_place():
    import numpy as np

    from loda_cli.data import GroupedTrainCrops
    from loda_cli.datasets import LabelItem

    rng = np.random.default_rng(0)
    refs = {r: rng.integers(0, 200, (60, 80, 3), dtype=np.uint8) for r in "abc"}
    counts = {"a": 7, "b": 5, "c": 2}
    items = [LabelItem(f"{r}{i}", Path(f"{r}{i}.png"), float(i), r) for r, n in counts.items() for i in range(n)]
    # Every image of a reference is the reference itself plus its index, so a crop says where it
    # was cut and which image it came from.
    load = lambda item: refs[item.ref] + np.uint8(item.name[1:])  # noqa: E731  (no overflow: < 200 + 7)
    ds = GroupedTrainCrops(items, [it.mos for it in items], load, crops_per_image=2, group_size=4, crop_size=32,
                           aux=[np.full(3, i, np.float32) for i in range(len(items))])
    seen = {it.name: 0 for it in items}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        assert len(ds) == 2 * (2 + 2 + 1)  # ceil(7/4) + ceil(5/4) + ceil(2/4), twice
        for g in range(len(ds)):
            crops, labels, aux = ds[g]
            assert crops.shape == (4, 3, 32, 32) and labels.shape == (4,) and aux.shape == (4, 3)
            members = [items[i] for i in ds.groups[g]]
            assert len({m.ref for m in members}) == 1
            base = crops[0].int() - int(members[0].name[1:])
            for crop, m in zip(crops, members):  # same place, same flips: differ only by the index
                assert torch.equal(crop.int() - int(m.name[1:]), base)
            for m, lab in zip(members, labels):
                assert float(lab) == m.mos
            if epoch == 0:
                for i in ds.groups[g]:
                    seen[items[i].name] += 1
    assert all(n >= 2 for n in seen.values())  # each image at least crops_per_image times an epoch


def test_grouped_training_with_the_auxiliary_head(tmp_path):
    import numpy as np

    from loda_cli import synthetic
    from loda_cli.weights import load_model

    rng = np.random.default_rng(1)
    refs = [(f"r{i}", synthetic.make_reference(64, 80, rng)) for i in range(6)]
    synthetic.write_dataset(tmp_path / "syn", refs, seed=1, per_reference=2, levels=(1, 3, 5))
    cfg = _cfg(tmp_path / "syn", tmp_path / "g.safetensors", dataset="synthetic", batch_size=8, group_size=4,
               warmup=0.2, aux_weight=0.5, channels_last=True, epochs=1)
    events = []
    out = train(cfg, events.append)
    assert [e for e in events if e.kind == "step"]
    loaded = load_model(str(out))  # the auxiliary head is training-only: not in the checkpoint
    assert not any("aux" in k for k in load_file(str(out)))
    assert loaded.model is not None
    with pytest.raises(Exception, match="group"):
        train(_cfg(tmp_path / "syn", tmp_path / "h.safetensors", dataset="synthetic", batch_size=6, group_size=4))


def test_gradient_clipping_caps_every_step_and_is_logged(tmp_path):
    import numpy as np

    from loda_cli import synthetic

    rng = np.random.default_rng(2)
    refs = [(f"r{i}", synthetic.make_reference(64, 80, rng)) for i in range(6)]
    synthetic.write_dataset(tmp_path / "syn", refs, seed=1, per_reference=2, levels=(1, 3, 5))
    records = {}
    for clip in (0.0, 1e-6):
        cfg = _cfg(tmp_path / "syn", tmp_path / f"c{clip}.safetensors", dataset="synthetic", batch_size=8,
                   group_size=4, epochs=1, clip_grad=clip)
        events = []
        train(cfg, events.append)
        records[clip] = [e.data for e in events if e.kind == "epoch"][-1]
        assert records[clip]["train_loss"] > 0
    assert "clipped_steps" not in records[0.0]  # the paper's protocol: no clipping, nothing logged
    tiny = records[1e-6]
    assert tiny["clipped_steps"] == tiny["step"]  # every real gradient is far above 1e-6
    assert tiny["grad_norm_max"] > 1e-6
    from loda_cli.errors import UsageError

    with pytest.raises(UsageError, match="--clip-grad"):
        train(_cfg(tmp_path / "syn", tmp_path / "bad.safetensors", dataset="synthetic", clip_grad=-1.0))


def test_unfused_attention_computes_the_same_scores_and_gradients():
    from loda_cli.config import TINY_CONFIG_KW
    from loda_cli.model import LoDa
    from loda_cli.train import unfuse_attention

    torch.manual_seed(0)
    # eval(): no dropout, so both passes see the same arithmetic; gradients flow all the same.
    fused = LoDa(LoDaConfig(**TINY_CONFIG_KW), pretrained=False).eval()
    plain = LoDa(LoDaConfig(**TINY_CONFIG_KW), pretrained=False).eval()
    plain.load_state_dict(fused.state_dict())
    assert unfuse_attention(plain) == len(plain.vit.blocks)
    assert unfuse_attention(plain) == 0  # already plain
    x = torch.randn(4, 3, 224, 224)
    y = torch.tensor([0.1, 0.9, 0.4, 0.6])
    losses = []
    for model in (fused, plain):
        loss = plcc_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-3, msg=name)


def _train_csv(root, out, *extra):
    return runner.invoke(app, ["train", "csv", "--data", str(root), "--vit", "test_vit", "--vit-depth", "1",
                               "--cnn", "test_resnet", "--no-pretrained", "--epochs", "1", "--batch-size", "8",
                               "--workers", "1", "--precision", "fp32", "--out", str(out), *extra])


def test_bad_datasets_fail_in_one_line_before_training(tmp_path):
    """A missing image and repeated rows are refused before the first step; an unreadable image
    is one line naming it, also when a DataLoader worker reads it, never a traceback."""
    from tests.datasetfixtures import make_csv_dataset

    root = make_csv_dataset(tmp_path / "set", n=12, size=(64, 48))
    labels = (root / "labels.csv").read_text()
    out = tmp_path / "m.safetensors"

    (root / "labels.csv").write_text(labels + "imgs/gone.png,5\n")
    r = _train_csv(root, out)
    assert r.exit_code == 1 and "images are missing (first:" in r.output and "gone.png" in r.output, r.output
    assert "Traceback" not in r.output and "epoch" not in r.output and not out.exists()

    first = labels.splitlines()[1]
    (root / "labels.csv").write_text(labels + first.split(",")[0] + ",9.5\n")
    r = _train_csv(root, out)
    assert r.exit_code == 1 and "is listed more than once" in r.output and "training and the test set" in r.output
    r = runner.invoke(app, ["data", "splits", "csv", "--data", str(root)])
    assert r.exit_code == 1 and "listed more than once" in r.output
    # The same file spelled another way is the same image.
    (root / "labels.csv").write_text(labels + "./" + first.split(",")[0] + ",9.5\n")
    r = runner.invoke(app, ["data", "splits", "csv", "--data", str(root)])
    assert r.exit_code == 1 and "listed more than once" in r.output, r.output

    (root / "labels.csv").write_text(labels)
    victim = root / labels.splitlines()[1].split(",")[0]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated
    r = _train_csv(root, out)
    assert r.exit_code == 1 and "cannot read this image" in r.output and victim.name in r.output, r.output
    assert "Traceback" not in r.output and "Caught" not in r.output
    assert len(r.output.strip().splitlines()[-1]) < 400


def test_backbone_weights_from_local_files_offline(tmp_path, monkeypatch):
    """The offline error says to give a local weights file: `loda train` takes one per backbone."""
    import timm
    from safetensors.torch import save_file

    from loda_cli.weights import read_metadata
    from tests.datasetfixtures import make_csv_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: only the files can help
    files = {}
    for kind, name in (("vit", "test_vit"), ("cnn", "test_resnet")):
        state = timm.create_model(name, pretrained=False).state_dict()
        files[kind] = tmp_path / f"{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, files[kind])
    root = make_csv_dataset(tmp_path / "set", n=12, size=(64, 48))
    out = tmp_path / "m.safetensors"
    base = ["train", "csv", "--data", str(root), "--vit", "test_vit", "--cnn", "test_resnet", "--epochs", "1",
            "--max-steps", "1", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--out", str(out), "-q"]
    r = runner.invoke(app, base)
    assert r.exit_code != 0 and "--vit-weights FILE" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*base, "--vit-weights", str(files["vit"]), "--cnn-weights", str(files["cnn"])])
    assert r.exit_code == 0, r.output
    assert read_metadata(out)["backbones"]["pretrained"] is True
    r = runner.invoke(app, [*base, "--vit-weights", str(tmp_path / "nope.safetensors")])
    assert r.exit_code == 2 and "--vit-weights: no such file" in r.output
