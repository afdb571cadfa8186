"""The synthetic distortion set: contracts of every distortion, references, labels, datasets."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from loda_cli import synthetic
from loda_cli.errors import DatasetError, UsageError
from loda_cli.synthetic import dataset as synthetic_dataset
from loda_cli.synthetic import distortions, references
from loda_cli.synthetic import (
    DISTORTIONS,
    LEVEL_PARAMETERS,
    LEVELS,
    REFERENCE_KINDS,
    SyntheticSample,
    apply_distortion,
    apply_random_mix,
    bundled_photos,
    dead_leaves,
    effective_level,
    generate_samples,
    gradient,
    load_reference_folder,
    make_reference,
    psnr,
    quality_label,
    strength_from_psnr,
    texture,
    write_dataset,
)

H, W = 96, 128
NAMES = sorted(DISTORTIONS)
# Distortions whose output does not depend on the generator at all.
DETERMINISTIC = {
    "gaussian_blur", "lens_blur", "jpeg", "jpeg2000", "saturate", "desaturate",
    "color_diffusion", "quantization", "brighten", "darken", "pixelate", "sharpen",
}  # fmt: skip
REQUIRED = {
    "gaussian_blur", "lens_blur", "motion_blur", "white_noise", "color_noise", "impulse_noise",
    "multiplicative_noise", "jpeg", "saturate", "desaturate", "color_shift", "quantization",
    "brighten", "darken", "mean_shift", "contrast_change", "pixelate", "jitter",
    "non_eccentricity", "sharpen",
}  # fmt: skip


@pytest.fixture(scope="module")
def leaves() -> np.ndarray:
    return dead_leaves(H, W, np.random.default_rng(2024))


# --- registry ---------------------------------------------------------------------------------


def test_registry_holds_the_required_types():
    assert len(DISTORTIONS) >= 18
    assert REQUIRED <= set(DISTORTIONS)
    assert set(DISTORTIONS) | set(synthetic.UNAVAILABLE) >= REQUIRED | {"jpeg2000"}
    for name in DISTORTIONS:
        assert len(LEVEL_PARAMETERS[name]) == len(LEVELS) == 5


def test_jpeg2000_is_registered_exactly_when_pillow_supports_it():
    from PIL import features

    assert ("jpeg2000" in DISTORTIONS) == bool(features.check("jpg_2000"))


def test_jpeg2000_is_excluded_with_a_logged_reason_without_codec(monkeypatch, caplog):
    monkeypatch.setattr(distortions.features, "check", lambda name: False)
    with caplog.at_level("INFO", logger="loda_cli.synthetic"):
        usable, unavailable = distortions._available(distortions._CANDIDATES)
    assert "jpeg2000" not in usable and "jpeg" in usable
    assert "JPEG 2000" in unavailable["jpeg2000"]
    assert "jpeg2000" in caplog.text
    monkeypatch.setattr(distortions, "UNAVAILABLE", unavailable)
    monkeypatch.setattr(distortions, "DISTORTIONS", usable)
    with pytest.raises(UsageError, match="unavailable"):
        apply_distortion(np.zeros((4, 4, 3), np.uint8), "jpeg2000", 1, np.random.default_rng())


# --- every distortion -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_change(name, leaves):
    for level in LEVELS:
        out = DISTORTIONS[name](leaves, level, np.random.default_rng(0))
        assert out.shape == leaves.shape and out.dtype == np.uint8
        assert not np.array_equal(out, leaves), f"{name} level {level} changed nothing"


@pytest.mark.parametrize("name", NAMES)
def test_input_is_not_modified(name, leaves):
    before = leaves.copy()
    DISTORTIONS[name](leaves, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(leaves, before)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name, leaves):
    a = DISTORTIONS[name](leaves, 3, np.random.default_rng(11))
    b = DISTORTIONS[name](leaves, 3, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    # Some types draw only a coin flip (contrast up or down), so look at a few other seeds.
    others = [DISTORTIONS[name](leaves, 3, np.random.default_rng(s)) for s in range(12, 16)]
    if name in DETERMINISTIC:
        for c in others:
            np.testing.assert_array_equal(a, c)
    else:
        assert any(not np.array_equal(a, c) for c in others), f"{name} ignores its generator"


@pytest.mark.parametrize("name", NAMES)
def test_psnr_falls_as_level_rises(name, leaves):
    values = [psnr(DISTORTIONS[name](leaves, level, np.random.default_rng(7)), leaves)
              for level in LEVELS]  # fmt: skip
    for weaker, stronger in zip(values, values[1:]):
        assert stronger <= weaker + 0.1, f"{name}: PSNR by level {values}"
    assert values[-1] < values[0] - 3.0, f"{name}: levels barely differ {values}"


@pytest.mark.parametrize("name", NAMES)
def test_tiny_images_keep_their_shape(name):
    for shape in [(1, 1, 3), (2, 7, 3), (9, 3, 3)]:
        img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        out = DISTORTIONS[name](img, 5, np.random.default_rng(0))
        assert out.shape == shape and out.dtype == np.uint8


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    level=st.sampled_from(LEVELS),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_image_any_level_property(name, level, h, w, seed):
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = apply_distortion(img, name, level, np.random.default_rng(seed))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def test_grey_stays_grey_under_chroma_free_distortions():
    grey = np.full((16, 16, 3), 90, np.uint8)
    for name in ("saturate", "desaturate", "color_diffusion"):
        out = apply_distortion(grey, name, 5, np.random.default_rng())
        np.testing.assert_array_equal(out, grey)


def test_bad_arguments_raise_usage_errors(leaves):
    rng = np.random.default_rng(0)
    with pytest.raises(UsageError, match="did you mean 'gaussian_blur'"):
        apply_distortion(leaves, "gausian_blur", 1, rng)
    for level in (0, 6, 2.5, True):
        with pytest.raises(UsageError, match="level"):
            apply_distortion(leaves, "jpeg", level, rng)
    with pytest.raises(UsageError, match="HxWx3 uint8"):
        apply_distortion(leaves.astype(np.float32), "jpeg", 1, rng)
    with pytest.raises(UsageError, match="HxWx3 uint8"):
        apply_distortion(leaves[..., 0], "jpeg", 1, rng)
    with pytest.raises(UsageError, match="Generator"):
        apply_distortion(leaves, "white_noise", 1, 42)


# --- mixes ------------------------------------------------------------------------------------


def test_random_mix_is_deterministic_and_reports_what_it_did(leaves):
    out1, comps1 = apply_random_mix(leaves, np.random.default_rng(3))
    out2, comps2 = apply_random_mix(leaves, np.random.default_rng(3))
    np.testing.assert_array_equal(out1, out2)
    assert comps1 == comps2
    assert 1 <= len(comps1) <= 3
    assert len({name for name, _ in comps1}) == len(comps1)
    assert all(name in DISTORTIONS and level in LEVELS for name, level in comps1)
    assert out1.shape == leaves.shape and out1.dtype == np.uint8


def test_random_mix_with_fixed_n_and_types(leaves):
    _, comps = apply_random_mix(
        leaves, np.random.default_rng(0), n=2, types=["jpeg", "white_noise"], levels=[4]
    )
    assert sorted(comps) == [("jpeg", 4), ("white_noise", 4)]
    with pytest.raises(UsageError):
        apply_random_mix(leaves, np.random.default_rng(0), n=3, types=["jpeg", "darken"])


# --- references -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", REFERENCE_KINDS)
def test_reference_kinds(kind):
    a = make_reference(H, W, np.random.default_rng(5), kind)
    b = make_reference(H, W, np.random.default_rng(5), kind)
    c = make_reference(H, W, np.random.default_rng(6), kind)
    assert a.shape == (H, W, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 10, "a reference needs content to distort"


def test_make_reference_picks_a_kind_and_rejects_unknown_ones():
    assert make_reference(8, 8, np.random.default_rng(0)).shape == (8, 8, 3)
    with pytest.raises(UsageError, match="did you mean 'texture'"):
        make_reference(8, 8, np.random.default_rng(0), "textur")
    with pytest.raises(UsageError):
        make_reference(0, 8, np.random.default_rng(0), "texture")


def test_dead_leaves_covers_the_canvas_with_many_discs():
    img = dead_leaves(H, W, np.random.default_rng(1))
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 200
    assert dead_leaves(1, 1, np.random.default_rng(0)).shape == (1, 1, 3)
    assert texture(1, 5, np.random.default_rng(0)).shape == (1, 5, 3)
    assert gradient(3, 1, np.random.default_rng(0)).shape == (3, 1, 3)


def test_texture_has_a_falling_spectrum():
    img = texture(128, 128, np.random.default_rng(0)).astype(float).mean(axis=2)
    power = np.abs(np.fft.fft2(img - img.mean())) ** 2
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128)))
    low = power[(f > 0.01) & (f < 0.05)].mean()
    high = power[(f > 0.3)].mean()
    assert low > 100 * high


def test_procedural_references_are_stable_prefixes():
    three = synthetic.procedural_references(3, 16, 16, seed=1)
    two = synthetic.procedural_references(2, 16, 16, seed=1)
    assert [r for r, _ in three] == ["procedural_000", "procedural_001", "procedural_002"]
    for (ia, a), (ib, b) in zip(two, three):
        assert ia == ib
        np.testing.assert_array_equal(a, b)


def test_bundled_photos_are_colour_images():
    photos = bundled_photos()
    pytest.importorskip("skimage")
    assert len(photos) >= 3
    for photo in photos:
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8
    small = bundled_photos(short_side=64)
    assert all(min(p.shape[:2]) == 64 for p in small)


def test_bundled_photos_without_scikit_image(monkeypatch):
    monkeypatch.setattr(references.importlib.util, "find_spec", lambda name: None)
    assert bundled_photos() == []


def test_load_reference_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "sub" / "a.jpg")  # greyscale JPEG
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "c.PNG")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    refs = load_reference_folder(tmp_path)
    assert [r for r, _ in refs] == ["b", "c", "sub/a"]
    for _, img in refs:
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(refs[0][1], rgb)
    small = load_reference_folder(tmp_path, short_side=10)
    assert small[0][1].shape == (10, 15, 3)
    assert [r for r, _ in load_reference_folder(tmp_path, recursive=False)] == ["b", "c"]


def test_load_reference_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_reference_folder(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no readable image"):
        load_reference_folder(tmp_path)


# --- labels -----------------------------------------------------------------------------------


def test_psnr_by_hand():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[0, 0, 0] = 48  # MSE = 48^2 / 48 = 48
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 48))
    with pytest.raises(UsageError):
        psnr(a, b[:2])


def test_quality_label_formula():
    assert quality_label(0, 0.0) == 1.0
    assert quality_label(0, strength_from_psnr(math.inf)) == 1.0
    assert quality_label(5, 1.0) == 0.0
    assert quality_label(2, 0.5) == pytest.approx(1 - 0.6 * 2 / 5 - 0.4 * 0.5)
    assert strength_from_psnr(45) == 0.0 and strength_from_psnr(15) == 1.0
    assert strength_from_psnr(30) == pytest.approx(0.5)
    assert effective_level([("jpeg", 3)]) == 3
    assert effective_level([("jpeg", 3), ("darken", 4)]) == 5.0
    with pytest.raises(UsageError):
        quality_label(6, 0.0)
    with pytest.raises(UsageError):
        quality_label(1, 1.5)


@settings(max_examples=100, deadline=None)
@given(
    st.floats(0, 5), st.floats(0, 5), st.floats(0, 1), st.floats(0, 1),
)  # fmt: skip
def test_quality_label_is_monotone(level_a, level_b, strength_a, strength_b):
    if level_a <= level_b and strength_a <= strength_b:
        assert quality_label(level_a, strength_a) >= quality_label(level_b, strength_b)
    assert 0.0 <= quality_label(level_a, strength_a) <= 1.0


# --- generate_samples -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refs() -> list[tuple[str, np.ndarray]]:
    return [
        ("leaves", dead_leaves(48, 64, np.random.default_rng(0))),
        ("tex", texture(48, 64, np.random.default_rng(1))),
    ]


def _summary(samples):
    return [(s.ref_id, s.distortion, s.level, round(s.label, 9)) for s in samples]


def test_generate_samples_is_deterministic(refs):
    a = list(generate_samples(refs, seed=5, per_reference=4, mix_probability=0.5))
    b = list(generate_samples(refs, seed=5, per_reference=4, mix_probability=0.5))
    assert _summary(a) == _summary(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.image, y.image)
    c = list(generate_samples(refs, seed=6, per_reference=4, mix_probability=0.5))
    assert _summary(a) != _summary(c)


def test_generate_samples_does_not_depend_on_reference_order(refs):
    forward = {(s.ref_id, s.distortion, s.level): s for s in generate_samples(refs, 1, 3)}
    backward = {(s.ref_id, s.distortion, s.level): s for s in generate_samples(refs[::-1], 1, 3)}
    assert forward.keys() == backward.keys()
    for key, sample in forward.items():
        np.testing.assert_array_equal(sample.image, backward[key].image)


def test_generate_samples_counts_and_fields(refs):
    samples = list(generate_samples(refs, seed=0, per_reference=3, levels=(1, 3, 5)))
    assert len(samples) == 2 * (1 + 3 * 3)
    pristine = [s for s in samples if s.distortion == "pristine"]
    assert len(pristine) == 2 and all(s.label == 1.0 and s.level == 0 for s in pristine)
    for s in samples:
        assert isinstance(s, SyntheticSample)
        assert s.image.shape == (48, 64, 3) and s.image.dtype == np.uint8
        assert 0.0 <= s.label <= 1.0
    default = list(generate_samples(refs[:1], seed=0, include_pristine=False))
    assert len(default) == len(DISTORTIONS) * 5
    assert {s.distortion for s in default} == set(DISTORTIONS)


def test_labels_fall_with_level(refs):
    by_pick: dict[tuple[str, str], list[SyntheticSample]] = {}
    for s in generate_samples(refs, seed=2, include_pristine=False):
        by_pick.setdefault((s.ref_id, s.distortion), []).append(s)
    for key, samples in by_pick.items():
        labels = [s.label for s in sorted(samples, key=lambda s: s.level)]
        assert all(b < a for a, b in zip(labels, labels[1:])), (key, labels)
        assert labels[0] < 1.0


def test_mixes_are_recorded_and_labelled_lower(refs):
    samples = list(generate_samples(refs, seed=3, per_reference=6, mix_probability=1.0,
                                    include_pristine=False))  # fmt: skip
    for s in samples:
        assert 2 <= len(s.components) <= 3
        assert s.distortion == "+".join(name for name, _ in s.components)
        assert s.components[0][1] == s.level
        assert s.label <= quality_label(s.level, 0.0)


def test_generate_samples_validates_eagerly(refs):
    with pytest.raises(UsageError, match="unknown distortion"):
        generate_samples(refs, 0, types=["blurr"])
    with pytest.raises(UsageError, match="level"):
        generate_samples(refs, 0, levels=(0, 1))
    with pytest.raises(UsageError, match="duplicate"):
        generate_samples([refs[0], refs[0]], 0)
    with pytest.raises(UsageError, match="seed"):
        generate_samples(refs, -1)
    with pytest.raises(UsageError, match="mix_probability"):
        generate_samples(refs, 0, mix_probability=2)
    with pytest.raises(UsageError):
        generate_samples([("x", np.zeros((4, 4)))], 0)


def test_generate_samples_cycles_types_when_asking_for_more(refs):
    samples = list(generate_samples(refs[:1], 0, per_reference=5, types=["jpeg", "darken"],
                                    levels=(2,), include_pristine=False))  # fmt: skip
    names = [s.distortion for s in samples]
    assert len(names) == 5 and set(names) == {"jpeg", "darken"}



def test_always_types_go_to_every_reference_before_the_random_picks(refs):
    samples = list(generate_samples(refs, 3, per_reference=2, levels=(2,), include_pristine=False,
                                    always_types=["jpeg", "darken"]))  # fmt: skip
    by_ref: dict[str, list[str]] = {}
    for s in samples:
        by_ref.setdefault(s.ref_id, []).append(s.distortion)
    for names in by_ref.values():
        assert names[:2] == ["jpeg", "darken"] and len(names) == 4
        assert not {"jpeg", "darken"} & set(names[2:])  # the picks come from the other types
    everything = list(generate_samples(refs[:1], 0, levels=(1,), include_pristine=False,
                                       always_types=["jpeg"]))  # fmt: skip
    assert sorted(s.distortion for s in everything) == sorted(DISTORTIONS)
    with pytest.raises(UsageError, match="always_types"):
        generate_samples(refs, 0, always_types=["jpg"])
    with pytest.raises(UsageError, match="always_types"):
        generate_samples(refs, 0, always_types=["jpeg", "jpeg"])

# --- write_dataset ----------------------------------------------------------------------------


def test_write_dataset_writes_a_csv_dataset(tmp_path, refs):
    labels_path = write_dataset(tmp_path / "set", refs, seed=4, per_reference=2, levels=(1, 5))
    assert labels_path == tmp_path / "set" / "labels.csv"
    with labels_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "mos", "ref", "distortions"]
    assert len(rows) == 2 * (1 + 2 * 2)
    recorded = synthetic.read_distortions(labels_path)
    expected = list(generate_samples(refs, seed=4, per_reference=2, levels=(1, 5)))
    for row, sample in zip(rows, expected):
        assert "\\" not in row["path"] and not row["path"].startswith("/")
        image = np.asarray(Image.open(tmp_path / "set" / row["path"]))
        np.testing.assert_array_equal(image, sample.image)  # PNG is lossless
        assert float(row["mos"]) == pytest.approx(sample.label, abs=1e-6)
        assert row["ref"] == sample.ref_id
        assert recorded[row["path"]] == sample.components  # () for the pristine image
    manifest = json.loads((tmp_path / "set" / "synthetic.json").read_text())
    assert manifest["seed"] == 4 and manifest["images"] == len(rows)


def test_write_dataset_refuses_to_overwrite_and_sanitises_names(tmp_path, refs):
    odd = [("../weird name/ä", refs[0][1])]
    path = write_dataset(tmp_path, odd, 0, per_reference=1, levels=(1,), image_format="jpeg")
    rows = list(csv.DictReader(path.open(newline="")))
    assert rows[0]["ref"] == "../weird name/ä"
    for row in rows:
        target = (tmp_path / row["path"]).resolve()
        assert target.is_relative_to(tmp_path.resolve()) and target.suffix == ".jpg"
    with pytest.raises(UsageError, match="already exists"):
        write_dataset(tmp_path, odd, 0, per_reference=1)
    write_dataset(tmp_path, odd, 0, per_reference=1, levels=(2,), overwrite=True)
    with pytest.raises(UsageError, match="image_format"):
        write_dataset(tmp_path / "x", odd, 0, image_format="gif")


def test_write_dataset_keeps_references_with_similar_names_apart(tmp_path, refs):
    similar = [("a b", refs[0][1]), ("a_b", refs[1][1]), ("A_B", refs[0][1])]
    path = write_dataset(tmp_path, similar, 0, per_reference=1, levels=(1,))
    rows = list(csv.DictReader(path.open(newline="")))
    assert len({row["path"].lower() for row in rows}) == len(rows) == 3 * 2
    assert len({row["path"].split("/")[1].lower() for row in rows}) == 3


# --- the ``synthetic`` dataset ----------------------------------------------------------------


def test_synthetic_dataset_reads_a_written_set(tmp_path):
    from loda_cli import datasets

    five = synthetic.procedural_references(5, 16, 16, seed=0)
    write_dataset(tmp_path, five, seed=1, per_reference=2, levels=(1, 4))
    spec = datasets.resolve_dataset("synthetic")
    assert spec.kind == "synthetic" and spec.scale == (0.0, 1.0) and not spec.lower_better
    for root in (tmp_path, tmp_path / "labels.csv"):
        labels = datasets.read_labels(spec, root)
        assert labels.dataset == "synthetic" and labels.kind == "synthetic"
        assert len(labels) == 5 * (1 + 2 * 2)
        assert {item.ref for item in labels.items} == {ref_id for ref_id, _ in five}
        assert all(item.path.is_file() for item in labels.items)
        assert max(labels.mos) == 1.0
    for split in datasets.make_splits(labels, spec, n_splits=3):
        train_refs = {labels.items[i].ref for i in split.train}
        test_refs = {labels.items[i].ref for i in split.test}
        assert not train_refs & test_refs


def _tiny_reference_folder(folder):
    folder.mkdir()
    for i in range(2):
        image = dead_leaves(24, 32, np.random.default_rng(i))
        Image.fromarray(image).save(folder / f"ref{i}.png")


def test_synthetic_dataset_generates_from_a_reference_folder_once(tmp_path):
    from loda_cli import datasets

    folder = tmp_path / "refs"
    _tiny_reference_folder(folder)
    spec = datasets.resolve_dataset("synthetic")
    # What is about to be generated is said before, with the count it turns out to be.
    pending = synthetic.pending_generation(folder)
    assert "2 reference photos" in pending and f"about {2 * (1 + 5 * len(DISTORTIONS))} images" in pending
    labels = datasets.read_labels(spec, folder)
    assert len(labels) == 2 * (1 + 5 * len(DISTORTIONS))
    assert synthetic.pending_generation(folder) is None
    assert synthetic.pending_generation(folder / synthetic.GENERATED_DIR) is None  # a written set
    assert {item.ref for item in labels.items} == {"ref0", "ref1"}
    generated = folder / synthetic.GENERATED_DIR / "labels.csv"
    stamp = generated.stat().st_mtime_ns
    # The generated images are hidden from the reference scan, and a second read reuses them.
    assert [r for r, _ in load_reference_folder(folder)] == ["ref0", "ref1"]
    assert len(datasets.read_labels(spec, folder)) == len(labels)
    assert generated.stat().st_mtime_ns == stamp
    # A changed reference regenerates the set.
    Image.fromarray(texture(24, 32, np.random.default_rng(9))).save(folder / "ref1.png")
    assert synthetic.pending_generation(folder) is not None
    datasets.read_labels(spec, folder)
    assert generated.stat().st_mtime_ns != stamp


def test_loda_data_says_before_it_generates_the_synthetic_set(tmp_path):
    from typer.testing import CliRunner

    from loda_cli.cli.main import app

    folder = tmp_path / "refs"
    _tiny_reference_folder(folder)
    result = CliRunner().invoke(app, ["data", "check", "synthetic", "--data", str(folder), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "generating the synthetic set once from 2 reference photos" in result.output
    again = CliRunner().invoke(app, ["data", "check", "synthetic", "--data", str(folder), "--workers", "1"])
    assert again.exit_code == 0 and "generating" not in again.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "the built-in references (about 3.3 GB" in synthetic.pending_generation(empty)


def test_synthetic_dataset_from_an_empty_folder_uses_built_in_references(tmp_path, monkeypatch):
    from loda_cli import datasets

    calls = []

    def tiny_defaults(short_side, seed):
        calls.append((short_side, seed))
        return [("builtin", gradient(16, 16, np.random.default_rng(seed)))]

    monkeypatch.setattr(synthetic_dataset, "default_references", tiny_defaults)
    (tmp_path / "empty").mkdir()
    labels = datasets.read_labels(datasets.resolve_dataset("synthetic"), tmp_path / "empty")
    assert calls == [(384, 3407)]
    assert {item.ref for item in labels.items} == {"builtin"}


def test_default_references_mix_photos_and_procedural_images():
    refs = synthetic.default_references(short_side=32, procedural=2)
    ids = [ref_id for ref_id, _ in refs]
    assert ids[-2:] == ["procedural_000", "procedural_001"]
    assert len(set(ids)) == len(ids)
    assert all(min(image.shape[:2]) == 32 for _, image in refs)


def test_synthetic_dataset_defaults_to_a_folder_in_loda_home(tmp_path, monkeypatch):
    from loda_cli import datasets
    from loda_cli.home import loda_home

    monkeypatch.setenv("LODA_DATA", str(tmp_path / "nothing-here"))
    root = datasets.dataset_root(datasets.resolve_dataset("synthetic"))
    assert root == loda_home() / "synthetic" and root.is_dir()
    # Other datasets still say where to put them.
    with pytest.raises(DatasetError, match="not found"):
        datasets.dataset_root(datasets.resolve_dataset("kadid"))
