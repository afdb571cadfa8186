"""The shipped built-in model: it is what resolves offline with an empty $LODA_HOME, it ranks
clean images above strongly distorted ones, and `loda score` says on stderr that it is using it.

Every test here runs the real checkpoint in weights/ (no stand-in model)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loda_cli import synthetic
from loda_cli.cli.main import app

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "weights"
# The model tests need the shipped model; until weights/ holds one they are reported as skipped
# (never passed). scripts/eval_builtin.py --manifest writes the manifest next to the checkpoint.
needs_model = pytest.mark.skipif(
    not (WEIGHTS / "manifest.json").is_file(),
    reason="weights/ holds no built-in model yet (issue 7)",
)


def _generated_photos() -> list[tuple[str, np.ndarray]]:
    # Seeds the training set never used, so these are unseen images.
    rng = np.random.default_rng(424242)
    return [
        ("leaves", synthetic.dead_leaves(384, 512, rng)),
        ("texture", synthetic.texture(384, 512, rng)),
    ]


def _distorted_versions(image: np.ndarray) -> dict[str, np.ndarray]:
    versions = {"blur4": ("gaussian_blur", 4), "noise4": ("white_noise", 4), "jpeg5": ("jpeg", 5)}
    return {
        key: synthetic.apply_distortion(image, kind, level, np.random.default_rng(7))
        for key, (kind, level) in versions.items()
    }


@needs_model
def test_manifest_lists_the_builtin_model_with_its_checksum_and_metrics():
    from loda_cli.weights import file_sha256, read_metadata

    manifest = json.loads((WEIGHTS / "manifest.json").read_text())
    (entry,) = [m for m in manifest["models"] if m.get("builtin")]
    path = WEIGHTS / entry["file"]
    assert entry["name"] == "loda-builtin" and entry["dataset"] == "synthetic"
    assert file_sha256(path) == entry["sha256"]
    assert sum(p.stat().st_size for p in WEIGHTS.iterdir() if p.is_file()) < 15 * 1024 * 1024
    meta = read_metadata(path)
    assert meta["kind"] == "full" and meta["synthetic_only"] is True
    assert "not a paper model" in meta["description"]
    assert meta["train"]["seed"] == entry["seed"]
    assert "loda train synthetic --preset builtin" in entry["reproduce"]
    for key in ("heldout_synthetic_srcc", "real_photo_pairs_original_wins", "real_photo_pairs_laplacian_baseline"):
        assert isinstance(entry["metrics"][key], float)


@needs_model
def test_builtin_model_resolves_with_an_empty_home():
    from loda_cli.weights import resolve_model

    resolved = resolve_model(None)
    assert resolved.builtin and resolved.name == "loda-builtin"
    assert resolved.path == WEIGHTS / "loda-builtin.safetensors"


@needs_model
def test_sharp_originals_outrank_blurred_noisy_and_compressed_versions(tmp_path):
    from loda_cli.scoring import Scorer

    expected = {}
    for name, image in _generated_photos():
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        for kind, distorted in _distorted_versions(image).items():
            Image.fromarray(distorted).save(tmp_path / f"{name}_{kind}.png")
            expected[f"{name}_{kind}"] = name
    scorer = Scorer(None, device="cpu", cache=False, workers=0)
    assert scorer.loaded.builtin
    scores = {Path(row.path).stem: row.score for row in scorer.score_files([tmp_path])}
    assert len(scores) == 2 + len(expected) and all(s is not None for s in scores.values())
    for distorted, original in expected.items():
        assert scores[original] > scores[distorted], (original, distorted, scores)


@needs_model
def test_loda_score_without_model_uses_builtin_and_says_so_on_stderr(tmp_path, isolated_home):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, image in _generated_photos():
        Image.fromarray(image).save(photos / f"{name}.jpg", quality=92)
        blurred = synthetic.apply_distortion(image, "gaussian_blur", 4, np.random.default_rng(0))
        Image.fromarray(blurred).save(photos / f"{name}_blurred.jpg", quality=92)
    out = tmp_path / "scores.csv"
    result = CliRunner().invoke(app, ["score", str(photos), "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.stderr
    assert "built-in model" in result.stderr and "not a paper model" in result.stderr
    assert "built-in" not in result.stdout
    with open(out, newline="") as fh:
        rows = [row for row in csv.DictReader(line for line in fh if not line.startswith("#"))]
    assert len(rows) == 4 and all(row["error"] == "" for row in rows)
    scores = {Path(row["path"]).stem: float(row["score"]) for row in rows}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    for name, _ in _generated_photos():
        assert scores[name] > scores[f"{name}_blurred"]
    # Without --out the ranked scores go to stdout, and the notice still only to stderr.
    result = CliRunner().invoke(app, ["score", str(photos), "--no-cache"])
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 4 and "built-in" in result.stderr


def _eval_script():
    spec = importlib.util.spec_from_file_location("eval_builtin", REPO / "scripts" / "eval_builtin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_model
def test_real_photos_outrank_their_strongly_distorted_versions():
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    evaluation = _eval_script()
    pairs = evaluation.real_photo_pairs()
    assert len(pairs) == 3
    scorer = evaluation.make_scorer(None)
    assert scorer.loaded.builtin
    accuracy, total, misses = evaluation.pair_accuracy(
        pairs, lambda images: evaluation.score_arrays(scorer, images)
    )
    laplacian, _, _ = evaluation.pair_accuracy(
        pairs, lambda images: [evaluation.laplacian_variance(im) for im in images]
    )
    assert total == 3 * len(evaluation.PAIR_TYPES) * len(evaluation.PAIR_LEVELS)
    assert accuracy >= 0.9, misses
    # The sharpness statistic is fooled by noise; the model must not be.
    assert accuracy > laplacian


# --- the generator changes the built-in training set relies on ------------------------------


def test_photo_crops_are_deterministic_varied_views():
    photos = synthetic.training_photos()
    if not photos:
        pytest.skip("scikit-image is not installed")
    a = synthetic.photo_crops(len(photos) + 2, short_side=64, seed=1)
    b = synthetic.photo_crops(len(photos) + 2, short_side=64, seed=1)
    c = synthetic.photo_crops(len(photos) + 2, short_side=64, seed=2)
    assert [name for name, _ in a] == [name for name, _ in b]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a, b))
    assert any(not np.array_equal(x, y) for (_, x), (_, y) in zip(a, c))
    assert len({name for name, _ in a}) == len(a)
    for _, crop in a:
        assert crop.dtype == np.uint8 and min(crop.shape[:2]) == 64
        # Grey sources get a colour cast: no crop is exactly grey.
        assert not (np.array_equal(crop[..., 0], crop[..., 1]) and np.array_equal(crop[..., 1], crop[..., 2]))


def test_parallel_generation_writes_the_same_set_as_one_process(tmp_path):
    refs = synthetic.procedural_references(5, 24, 32, seed=3)
    kwargs = {"per_reference": 2, "levels": (1, 5), "mix_probability": 0.5}
    one = synthetic.write_dataset(tmp_path / "one", refs, 9, workers=1, **kwargs)
    two = synthetic.write_dataset(tmp_path / "two", refs, 9, workers=2, **kwargs)
    assert one.read_text() == two.read_text()
    for row in list(csv.DictReader(one.open()))[:12]:
        assert (one.parent / row["path"]).read_bytes() == (two.parent / row["path"]).read_bytes()


def test_heldout_breakdown_separates_ordering_within_and_across_references():
    ev = _eval_script()
    samples = [(ref, kind, level) for ref in ("a", "b")
               for kind, level in (("pristine", 0), ("blur", 1), ("blur", 3), ("noise", 1), ("noise", 3))]
    labels = [1.0, 0.8, 0.4, 0.8, 0.4] * 2
    # Orders each reference's versions perfectly, but reference b scores 0.5 lower throughout.
    scores = [0.9, 0.7, 0.3, 0.7, 0.3, 0.4, 0.2, -0.2, 0.2, -0.2]
    out = ev.breakdown(scores, labels, samples)
    assert out["srcc_within_reference_mean"] == pytest.approx(1.0)
    assert out["pristine_score_range"] == pytest.approx([0.4, 0.9])
    assert set(out["srcc_by_type"]) == {"blur", "noise"}
    assert out["srcc_by_type"]["blur"] < 1.0  # the offset between references costs across-content order


def test_level_reader_ceilings_and_the_colour_only_types():
    evaluation = _eval_script()
    # Colour-only types keep the luminance (up to rounding and the odd clipped pixel).
    _, image = synthetic.procedural_references(1, 96, 128, seed=5)[0]

    def luma(x):
        return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    for kind in evaluation.LUMINANCE_FREE_TYPES:
        for level in (1, 5):
            out = synthetic.apply_distortion(image, kind, level, np.random.default_rng(0))
            assert np.abs(luma(out) - luma(image)).mean() < 0.5, (kind, level)
    refs = synthetic.procedural_references(2, 32, 48, seed=1)
    samples, labels = [], []
    for sample in synthetic.generate_samples(refs, 7, types=["gaussian_blur", "desaturate", "white_noise"]):
        samples.append((sample.ref_id, sample.distortion, sample.level))
        labels.append(sample.label)
    ceilings = evaluation.level_reader_ceilings(labels, samples)
    assert ceilings["level_reader"] > 0.9
    # Taking a third of the distorted images for pristine costs a lot of rank agreement.
    assert ceilings["level_reader_blind_to_colour_only_types"] < ceilings["level_reader"] - 0.1


@needs_model
def test_the_shipped_model_is_what_the_preset_trains():
    """A preset edit without a retrained (or, for scoring-only settings, re-calibrated) model
    would make the README's reproduce command write something else than weights/ holds."""
    from loda_cli.cli.train import BUILTIN_COMMAND, BUILTIN_PRESET
    from loda_cli.weights import read_metadata

    meta = read_metadata(WEIGHTS / "loda-builtin.safetensors")
    trained = meta["train"]
    for key, value in BUILTIN_PRESET.items():
        if key == "model":
            assert {k: trained["model"][k] for k in value} == value
        else:
            assert trained[key] == value, key
    assert trained["seed"] == 3407 and trained["split"] == 0
    assert meta["preprocess"]["num_crops"] == BUILTIN_PRESET["num_crops"]
    assert BUILTIN_COMMAND in meta["description"]
    manifest = json.loads((WEIGHTS / "manifest.json").read_text())["models"][0]
    assert manifest["reproduce"] == BUILTIN_COMMAND
