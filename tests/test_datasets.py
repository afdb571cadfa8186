"""The dataset layer: readers of the distributed formats, the release's splits, check, prepare, CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from loda_cli import datasets
from loda_cli.datasets import (
    DatasetSpec,
    LabelItem,
    LabelSet,
    check_dataset,
    csv_spec,
    dataset_root,
    load_training_image,
    load_splits_json,
    make_splits,
    prepare_dataset,
    prepared_path,
    read_labels,
    resolve_dataset,
    splits_from_json,
    splits_to_json,
)
from loda_cli.errors import DatasetError, LodaError, UnsafePathError, UsageError
from tests.datasetfixtures import (
    make_csv_dataset,
    make_flive,
    make_kadid,
    make_koniq,
    make_live,
    make_livec,
    make_spaq,
    make_tid2013,
)

runner = CliRunner()


def cli(*args: str):
    from loda_cli.cli.main import app

    return runner.invoke(app, list(args))


# ---------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize(
    "alias, name",
    [("koniq", "koniq10k"), ("KonIQ10k", "koniq10k"), ("kadid", "kadid10k"), ("SPAQ", "spaq"),
     ("live", "live"), ("LIVEC", "livec"), ("tid", "tid2013"), ("Tid2013", "tid2013"),
     ("flive", "flive"), ("csv", "csv")],
)
def test_aliases_resolve_case_insensitively(alias, name):
    assert resolve_dataset(alias).name == name


def test_specs_carry_the_papers_protocol():
    expect = {
        "koniq10k": (3, "bilinear", False, False, "authentic", 10073),
        "kadid10k": (3, "bicubic", False, False, "synthetic", 10125),
        "spaq": (3, "bilinear", True, False, "authentic", 11125),
        "live": (5, "bicubic", False, True, "synthetic", 779),
        "livec": (5, "bicubic", False, False, "authentic", 1162),
        "tid2013": (10, "bicubic", False, False, "synthetic", 3000),
        "flive": (1, "bicubic", False, False, "authentic", None),
    }
    for name, (crops, interpolation, exif, lower, kind, count) in expect.items():
        spec = resolve_dataset(name)
        assert (spec.crops_per_image, spec.interpolation, spec.exif_transpose, spec.lower_better, spec.kind, spec.expected_count) == (
            crops, interpolation, exif, lower, kind, count
        ), name
        assert spec.homepage.startswith("http") and spec.layout


def test_unknown_name_suggests_the_closest():
    with pytest.raises(DatasetError, match="did you mean 'kadid'") as info:
        resolve_dataset("kadis")
    assert "koniq10k" in str(info.value)  # lists the known names
    assert isinstance(info.value, UsageError)


def test_synthetic_hook_is_listed():
    assert "synthetic" in datasets.dataset_names()


def test_import_leaves_torch_out():
    code = "import sys, loda_cli.datasets, loda_cli.cli.data; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Locating a dataset


def test_dataset_root_prefers_data_then_env(tmp_path, monkeypatch):
    spec = resolve_dataset("kadid")
    (tmp_path / "kadid10k").mkdir()
    monkeypatch.setenv("LODA_DATA", str(tmp_path))
    assert dataset_root(spec) == tmp_path / "kadid10k"
    assert dataset_root(spec, tmp_path) == tmp_path


def test_missing_dataset_gives_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LODA_DATA", str(tmp_path))
    with pytest.raises(DatasetError) as info:
        dataset_root(resolve_dataset("tid2013"))
    message = str(info.value)
    assert "\n" not in message
    assert "ponomarenko" in message and "mos_with_names.txt" in message and "--data" in message
    assert str(tmp_path / "tid2013") in message


# ---------------------------------------------------------------------------------------------
# Readers, each against the distributed format


def _assert_consistent(labels: LabelSet, n: int):
    assert len(labels) == n
    assert all(item.path.is_file() for item in labels.items)
    assert len(set(labels.names)) == n


def test_koniq_official_csv_is_on_1_to_5(tmp_path):
    root = make_koniq(tmp_path, n=12)
    labels = read_labels(resolve_dataset("koniq"), root)
    _assert_consistent(labels, 12)
    assert labels.scale == (1.0, 5.0) and not labels.lower_better and labels.kind == "authentic"
    assert labels.label_file.name == "koniq10k_scores_and_distributions.csv"
    assert all(1 <= m <= 5 for m in labels.mos)
    assert labels.items[0].path == root / "1024x768" / labels.items[0].name


def test_koniq_sets_csv_is_on_0_to_100(tmp_path):
    root = make_koniq(tmp_path, n=12, variant="sets")
    labels = read_labels(resolve_dataset("koniq"), root)
    _assert_consistent(labels, 12)
    assert labels.scale == (0.0, 100.0)
    assert max(labels.mos) > 5  # the values really are on 0-100, not read from MOS_zscore by accident
    official = read_labels(resolve_dataset("koniq"), make_koniq(tmp_path / "o", n=12))
    assert labels.names == official.names
    np.testing.assert_allclose(np.array(labels.mos) / 100, (np.array(official.mos) - 1) / 4, atol=1e-5)


def test_koniq_columns_are_found_by_name_not_position(tmp_path):
    (tmp_path / "koniq10k_scores_and_distributions.csv").write_text("MOS,SD,image_name\n3.5,0.2,a.jpg\n")
    labels = read_labels(resolve_dataset("koniq"), tmp_path)
    assert labels.items == [LabelItem("a.jpg", tmp_path / "1024x768" / "a.jpg", 3.5)]


def test_koniq_value_off_its_scale_is_an_error(tmp_path):
    (tmp_path / "koniq10k_scores_and_distributions.csv").write_text("image_name,MOS\na.jpg,3\nb.jpg,72.5\n")
    with pytest.raises(DatasetError, match=r"line 3.*72.5.*1-5"):
        read_labels(resolve_dataset("koniq"), tmp_path)


def test_kadid(tmp_path):
    root = make_kadid(tmp_path, n_refs=3, per_ref=5)
    labels = read_labels(resolve_dataset("kadid10k"), root)
    _assert_consistent(labels, 15)
    assert labels.items[0].name == "I01_01_01.png" and labels.items[0].ref == "I01.png"
    assert {item.ref for item in labels.items} == {"I01.png", "I02.png", "I03.png"}
    assert labels.kind == "synthetic" and labels.scale == (1.0, 5.0)


def test_spaq_xlsx(tmp_path):
    root = make_spaq(tmp_path, n=9)
    labels = read_labels(resolve_dataset("spaq"), root)
    _assert_consistent(labels, 9)
    assert labels.names[0] == "00001.jpg" and labels.items[0].path == root / "TestImage" / "00001.jpg"
    assert all(0 <= m <= 100 for m in labels.mos)


def test_live_drops_pristine_entries_and_maps_folders(tmp_path):
    root = make_live(tmp_path, per_folder=3, n_refs=4)
    labels = read_labels(resolve_dataset("live"), root)
    _assert_consistent(labels, 15)
    assert labels.names[:4] == ["jp2k/img1.bmp", "jp2k/img2.bmp", "jp2k/img3.bmp", "jpeg/img1.bmp"]
    assert labels.names[-1] == "fastfading/img3.bmp"
    assert labels.items[1].ref == "ref01.bmp"
    assert labels.lower_better and labels.direction == "lower is better"


def test_live_entry_count_must_be_982(tmp_path):
    import scipy.io

    scipy.io.savemat(tmp_path / "dmos_realigned.mat", {"dmos_new": np.zeros((1, 10)), "orgs": np.zeros((1, 10))})
    names = np.empty((1, 10), dtype=object)
    names[0, :] = ["a.bmp"] * 10
    scipy.io.savemat(tmp_path / "refnames_all.mat", {"refnames_all": names})
    with pytest.raises(DatasetError, match="982"):
        read_labels(resolve_dataset("live"), tmp_path)


def test_livec_drops_the_seven_training_images(tmp_path):
    root = make_livec(tmp_path, n=10)
    labels = read_labels(resolve_dataset("livec"), root)
    _assert_consistent(labels, 10)
    assert not any(name.startswith("t") for name in labels.names)
    assert labels.items[0].path == root / "Images" / "10.bmp"


def test_tid2013_crlf_and_mixed_case(tmp_path):
    root = make_tid2013(tmp_path, n_refs=3, per_ref=4)
    assert b"\r\n" in (root / "mos_with_names.txt").read_bytes()
    assert (root / "Distorted_images" / "I01_01_2.BMP").is_file()  # the upper-case file on disk
    labels = read_labels(resolve_dataset("tid"), root)
    _assert_consistent(labels, 12)
    assert labels.names[1] == "i01_01_2.bmp"  # the name as the label file writes it
    assert labels.items[1].path.name == "I01_01_2.BMP"
    assert [item.ref for item in labels.items[::4]] == ["I01", "I02", "I03"]


def test_tid2013_lower_case_folder(tmp_path):
    root = make_tid2013(tmp_path, n_refs=2, per_ref=2, folder="distorted_images", mixed_case=False)
    _assert_consistent(read_labels(resolve_dataset("tid2013"), root), 4)


def test_tid2013_malformed_line(tmp_path):
    (tmp_path / "mos_with_names.txt").write_bytes(b"5.1 i01_01_1.bmp\r\nfive i01_01_2.bmp\r\n")
    with pytest.raises(DatasetError, match=r"mos_with_names.txt, line 2: MOS 'five' is not a number"):
        read_labels(resolve_dataset("tid2013"), tmp_path)
    (tmp_path / "mos_with_names.txt").write_bytes(b"5.1 i01_01_1.bmp extra\r\n")
    with pytest.raises(DatasetError, match="line 1: expected 'mos name'"):
        read_labels(resolve_dataset("tid2013"), tmp_path)


def test_flive_crlf_relative_paths(tmp_path):
    root = make_flive(tmp_path, n=7)
    assert b"\r\n" in (root / "labels_image.csv").read_bytes()
    labels = read_labels(resolve_dataset("flive"), root)
    _assert_consistent(labels, 7)
    assert labels.names[1] == "blur_dataset/img_0001.jpg"
    assert labels.items[1].path == root / "blur_dataset" / "img_0001.jpg"


def test_csv_autodetects_columns(tmp_path):
    root = make_csv_dataset(tmp_path, n=8, path_column="image_name", mos_column="score")
    labels = read_labels(resolve_dataset("csv"), root)
    _assert_consistent(labels, 8)
    assert labels.kind == "authentic" and not labels.lower_better
    assert labels.scale == (min(labels.mos), max(labels.mos))
    # --data may also name the CSV file itself.
    assert read_labels(resolve_dataset("csv"), root / "labels.csv").names == labels.names


def test_csv_explicit_columns_direction_and_ref(tmp_path):
    root = make_csv_dataset(tmp_path, n=10, path_column="where", mos_column="quality", n_refs=3, lower_better=True)
    with pytest.raises(DatasetError, match="no path column"):
        read_labels(resolve_dataset("csv"), root)
    spec = csv_spec(path_column="where", mos_column="quality", lower_better=True, scale=(0, 10))
    labels = read_labels(spec, root)
    _assert_consistent(labels, 10)
    assert labels.lower_better and labels.scale == (0.0, 10.0)
    assert labels.kind == "synthetic" and labels.items[4].ref == "ref1"


def test_csv_refuses_paths_escaping_the_root(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    (root / "labels.csv").write_text("path,mos\nok.png,1\n../../etc/passwd,2\n")
    with pytest.raises(DatasetError, match=r"line 3: path '../../etc/passwd' is outside") as info:
        read_labels(resolve_dataset("csv"), root)
    assert isinstance(info.value, UnsafePathError)
    (root / "labels.csv").write_text(f"path,mos\n{tmp_path / 'elsewhere.png'},1\n")
    with pytest.raises(DatasetError, match="outside"):
        read_labels(resolve_dataset("csv"), root)
    (root / "labels.csv").write_text(f"path,mos\n{root / 'sub' / 'inside.png'},1\nsub/../b.png,2\n")
    labels = read_labels(resolve_dataset("csv"), root)
    assert [item.path for item in labels.items] == [root / "sub" / "inside.png", root / "b.png"]


# ---------------------------------------------------------------------------------------------
# Malformed label files


def test_missing_label_file_names_it(tmp_path):
    with pytest.raises(DatasetError, match=r"dmos.csv not found in .*images/"):
        read_labels(resolve_dataset("kadid"), tmp_path)


def test_missing_column_names_the_file_and_column(tmp_path):
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,var\nI01_01_01.png,I01.png,0.3\n")
    with pytest.raises(DatasetError, match=r"dmos.csv: no dmos column .*dist_img, ref_img, var"):
        read_labels(resolve_dataset("kadid"), tmp_path)


def test_non_numeric_mos_names_the_line(tmp_path):
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,dmos,var\na.png,I01.png,4.1,0\nb.png,I01.png,n/a,0\n")
    with pytest.raises(DatasetError, match=r"dmos.csv, line 3: dmos 'n/a' is not a number"):
        read_labels(resolve_dataset("kadid"), tmp_path)


def test_nan_mos_is_refused(tmp_path):
    (tmp_path / "labels_image.csv").write_text("name,mos\na.jpg,nan\n")
    with pytest.raises(DatasetError, match="line 2.*not a finite number"):
        read_labels(resolve_dataset("flive"), tmp_path)


def test_short_row_names_the_field(tmp_path):
    (tmp_path / "dmos.csv").write_text("dist_img,ref_img,dmos,var\na.png,I01.png\n")
    with pytest.raises(DatasetError, match="line 2: missing field 'dmos'"):
        read_labels(resolve_dataset("kadid"), tmp_path)


def test_empty_label_file(tmp_path):
    (tmp_path / "labels_image.csv").write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        read_labels(resolve_dataset("flive"), tmp_path)
    (tmp_path / "labels_image.csv").write_text("name,mos\n")
    with pytest.raises(DatasetError, match="no labelled images"):
        read_labels(resolve_dataset("flive"), tmp_path)


def test_spaq_non_numeric_mos(tmp_path):
    import openpyxl

    (tmp_path / "Annotations").mkdir()
    book = openpyxl.Workbook()
    book.active.append(["Image name", "MOS"])
    book.active.append(["00001.jpg", 50])
    book.active.append(["00002.jpg", "bad"])
    book.save(tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx")
    with pytest.raises(DatasetError, match="row 3: MOS 'bad' is not a number"):
        read_labels(resolve_dataset("spaq"), tmp_path)


def test_damaged_mat_and_xlsx(tmp_path):
    (tmp_path / "Data").mkdir()
    (tmp_path / "Data" / "AllImages_release.mat").write_bytes(b"not a mat file")
    (tmp_path / "Data" / "AllMOS_release.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="AllImages_release.mat"):
        read_labels(resolve_dataset("livec"), tmp_path)
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="xlsx"):
        read_labels(resolve_dataset("spaq"), tmp_path)


def test_mat_without_the_variable(tmp_path):
    import scipy.io

    (tmp_path / "Data").mkdir()
    scipy.io.savemat(tmp_path / "Data" / "AllImages_release.mat", {"other": np.zeros(3)})
    scipy.io.savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.zeros((1, 3))})
    with pytest.raises(DatasetError, match="no variable 'AllImages_release'.*other"):
        read_labels(resolve_dataset("livec"), tmp_path)


# ---------------------------------------------------------------------------------------------
# Splits


def _labels(n: int, refs: list[str] | None = None, kind: str = "authentic") -> LabelSet:
    items = [LabelItem(f"img{i}.png", Path(f"img{i}.png"), float(i), refs[i] if refs else None) for i in range(n)]
    return LabelSet("test", Path("."), Path("labels.csv"), items, (0.0, float(n)), False, kind)


def test_pinned_first_split_matches_the_stdlib_protocol():
    random.seed(3407)
    order = list(range(10))
    random.shuffle(order)
    expected_train = order[:8]
    splits = make_splits(_labels(10), resolve_dataset("koniq"), seed=3407)
    assert splits[0].train == expected_train
    assert splits[0].test == order[8:]


def test_random_instance_matches_module_level_cumulative_shuffles():
    random.seed(3407)
    order = list(range(37))
    expected = []
    for _ in range(10):
        random.shuffle(order)
        expected.append(order[: round(0.8 * 37)])
    splits = make_splits(_labels(37), resolve_dataset("livec"))
    assert [s.train for s in splits] == expected


def test_synthetic_shuffles_the_sorted_references_cumulatively():
    refs = [f"I{(i * 7) % 10:02d}" for i in range(40)]
    labels = _labels(40, refs, kind="synthetic")
    random.seed(3407)
    names = sorted(set(refs))
    expected = []
    for _ in range(10):
        random.shuffle(names)
        train_refs = set(names[:8])
        expected.append([i for i, r in enumerate(refs) if r in train_refs])
    assert [s.train for s in make_splits(labels, resolve_dataset("kadid"))] == expected


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 300), seed=st.integers(0, 10_000))
def test_authentic_splits_partition_the_indices(n, seed):
    for split in make_splits(_labels(n), None, seed=seed, n_splits=3):
        assert sorted(split.train + split.test) == list(range(n))
        assert len(split.train) == round(0.8 * n)


@settings(max_examples=40, deadline=None)
@given(refs=st.lists(st.sampled_from([f"r{i}" for i in range(12)]), min_size=4, max_size=120), seed=st.integers(0, 10_000))
def test_synthetic_splits_never_share_a_reference(refs, seed):
    if len(set(refs)) < 3:
        return
    labels = _labels(len(refs), refs, kind="synthetic")
    for split in make_splits(labels, None, seed=seed, n_splits=3):
        train_refs = {refs[i] for i in split.train}
        test_refs = {refs[i] for i in split.test}
        assert not train_refs & test_refs
        assert sorted(split.train + split.test) == list(range(len(refs)))
        assert split.train == sorted(split.train) and split.test == sorted(split.test)
        assert len(train_refs) == round(0.8 * len(set(refs)))


def test_fixture_datasets_split_by_reference(tmp_path):
    for spec_name, maker in (("kadid10k", make_kadid), ("tid2013", make_tid2013), ("live", make_live)):
        labels = read_labels(resolve_dataset(spec_name), maker(tmp_path / spec_name))
        for split in make_splits(labels, resolve_dataset(spec_name)):
            train_refs = {labels.items[i].ref for i in split.train}
            assert not train_refs & {labels.items[i].ref for i in split.test}


def test_same_seed_same_splits_and_splits_differ():
    labels = _labels(50)
    first = make_splits(labels, None, seed=3407)
    assert first == make_splits(labels, None, seed=3407)
    assert first != make_splits(labels, None, seed=3408)
    assert len({tuple(s.train) for s in first}) == 10


def test_train_fraction_is_a_nested_seeded_subset():
    labels = _labels(100)
    full = make_splits(labels, None)
    small = make_splits(labels, None, train_fraction=0.2)
    large = make_splits(labels, None, train_fraction=0.6)
    for f, s, l in zip(full, small, large):
        assert len(s.train) == 16 and len(l.train) == 48
        assert set(s.train) <= set(l.train) <= set(f.train)
        assert s.test == f.test and s.train == sorted(s.train)
    assert small == make_splits(labels, None, train_fraction=0.2)


def test_bad_split_arguments():
    with pytest.raises(UsageError):
        make_splits(_labels(10), None, train_fraction=0)
    with pytest.raises(UsageError):
        make_splits(_labels(10), None, n_splits=0)
    with pytest.raises(DatasetError, match="too few"):
        make_splits(_labels(1), None)
    with pytest.raises(DatasetError, match="too few"):
        make_splits(_labels(3, ["a", "a", "a"], kind="synthetic"), None)


def test_splits_json_round_trip(tmp_path):
    labels = _labels(20, [f"r{i % 5}" for i in range(20)], kind="synthetic")
    splits = make_splits(labels, None, n_splits=3)
    document = splits_to_json(labels, splits, "test", 3407)
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(document))
    loaded = load_splits_json(path)
    assert loaded["dataset"] == "test" and loaded["seed"] == 3407 and len(loaded["splits"]) == 3
    assert loaded["splits"][0]["train"][0] == labels.items[splits[0].train[0]].name
    assert splits_from_json(labels, loaded) == splits


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "JSON object"),
        ("{not json", "not a JSON splits file"),
        ('{"dataset": "x", "seed": "1", "splits": [{"train": [], "test": []}]}', "'seed'"),
        ('{"dataset": "x", "seed": 1, "splits": []}', "non-empty"),
        ('{"dataset": "x", "seed": 1, "splits": [{"train": ["a"]}]}', r"splits\[0\].test"),
        ('{"dataset": "x", "seed": 1, "splits": [{"train": ["a"], "test": ["a"]}]}', "both train and test"),
    ],
)
def test_malformed_splits_json(tmp_path, content, message):
    path = tmp_path / "splits.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_splits_json(path)


def test_splits_from_json_refuses_unknown_names():
    with pytest.raises(DatasetError, match="'zzz'"):
        splits_from_json(_labels(3), {"splits": [{"train": ["img0.png"], "test": ["zzz"]}]})


# ---------------------------------------------------------------------------------------------
# Check


def _damage(root: Path, labels: LabelSet) -> tuple[str, str]:
    missing, broken = labels.items[2], labels.items[5]
    missing.path.unlink()
    broken.path.write_bytes(broken.path.read_bytes()[:200])  # truncated: the header reads, the pixels don't
    return missing.name, broken.name


@pytest.mark.parametrize("workers", [1, 2])
def test_check_reports_missing_and_broken(tmp_path, workers):
    spec = resolve_dataset("koniq")
    root = make_koniq(tmp_path, n=10)
    clean = check_dataset(spec, root, workers=workers)
    assert clean.ok and clean.n_labels == 10 and not clean.count_matches
    missing, broken = _damage(root, read_labels(spec, root))
    seen = []
    report = check_dataset(spec, root, workers=workers, progress=lambda done, total: seen.append((done, total)))
    assert not report.ok
    assert report.missing == [missing]
    assert [name for name, _ in report.broken] == [broken]
    assert seen[-1] == (10, 10)
    assert report.summary() == "koniq10k: 1 missing, 1 broken of 10 labelled images"


def test_check_reports_a_bad_label_file(tmp_path):
    (tmp_path / "dmos.csv").write_text("nothing,useful\n1,2\n")
    report = check_dataset(resolve_dataset("kadid"), tmp_path)
    assert not report.ok and "no dist_img column" in report.label_error


# ---------------------------------------------------------------------------------------------
# Prepare


def test_prepare_resizes_resumes_and_reports(tmp_path):
    spec = resolve_dataset("kadid")
    root = make_kadid(tmp_path, n_refs=2, per_ref=3, size=(64, 48))
    labels = read_labels(spec, root)
    first = prepare_dataset(spec, root, workers=2)
    assert first.ok and first.written == 6 and first.skipped == 0
    for item in labels.items:
        cached = prepared_path(spec, root, item)
        assert cached.parent.parent == root / ".loda-prepared-384" / spec.interpolation
        with Image.open(cached) as image:
            assert image.format == "PNG" and image.size == (512, 384)
    assert not list((root / ".loda-prepared-384").rglob("*.tmp"))
    again = prepare_dataset(spec, root, workers=1)
    assert again.written == 0 and again.skipped == 6
    # A source replaced since is resized again, and training reads it afresh meanwhile.
    replaced = labels.items[1]
    Image.new("RGB", (64, 48), (128, 128, 128)).save(replaced.path)
    assert np.asarray(load_training_image(spec, root, replaced)).std() == 0
    assert prepare_dataset(spec, root, workers=1).written == 1
    with Image.open(prepared_path(spec, root, replaced)) as image:
        assert np.asarray(image).std() == 0
    labels.items[0].path.write_bytes(b"junk")
    prepared_path(spec, root, labels.items[0]).unlink()
    broken = prepare_dataset(spec, root, workers=1)
    assert [name for name, _ in broken.failed] == [labels.items[0].name]
    assert not prepared_path(spec, root, labels.items[0]).exists()


def test_prepare_matches_torchvision_resize_arithmetic(tmp_path):
    image = Image.new("RGB", (100, 333))
    assert datasets.resize_short_side(image, 384, "bicubic").size == (384, int(384 * 333 / 100))


def test_prepare_exif_transposes_spaq_first(tmp_path):
    spec = resolve_dataset("spaq")
    root = make_spaq(tmp_path, n=3, size=(64, 48), rotate_every=3)
    with Image.open(root / "TestImage" / "00001.jpg") as stored:
        assert stored.size == (48, 64)  # stored portrait, displayed landscape
    prepare_dataset(spec, root, workers=1)
    labels = read_labels(spec, root)
    for item in labels.items:
        with Image.open(prepared_path(spec, root, item)) as image:
            assert image.size == (512, 384)


def test_prepare_to_a_custom_cache_and_load_training_image(tmp_path):
    spec = resolve_dataset("tid2013")
    root = make_tid2013(tmp_path / "tid", n_refs=1, per_ref=2)
    cache = tmp_path / "cache"
    labels = read_labels(spec, root)
    on_the_fly = datasets.load_training_image(spec, root, labels.items[1], cache)
    prepare_dataset(spec, root, cache_dir=cache, workers=1)
    assert prepared_path(spec, root, labels.items[1], cache).is_file()
    from_cache = datasets.load_training_image(spec, root, labels.items[1], cache)
    assert from_cache.size == on_the_fly.size == (512, 384)
    assert np.array_equal(np.asarray(from_cache), np.asarray(on_the_fly))


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_check_lists_problems_and_exits_1(tmp_path):
    root = make_kadid(tmp_path, n_refs=2, per_ref=5)
    ok = cli("data", "check", "kadid", "--data", str(root), "--workers", "1")
    assert ok.exit_code == 0, ok.output
    missing, broken = _damage(root, read_labels(resolve_dataset("kadid"), root))
    result = cli("data", "check", "KADID", "--data", str(root), "--workers", "1")
    assert result.exit_code == 1
    assert missing in result.output and broken in result.output
    assert "kadid10k: 1 missing, 1 broken of 10 labelled images" in result.output


def test_cli_splits_json_reads_only_label_files(tmp_path):
    root = make_tid2013(tmp_path, n_refs=5, per_ref=2)
    for image in (root / "Distorted_images").iterdir():
        image.unlink()  # splits must not need the images
    result = cli("data", "splits", "tid", "--data", str(root), "--splits", "3", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) >= {"dataset", "seed", "splits"}
    assert document["dataset"] == "tid2013" and document["seed"] == 3407 and len(document["splits"]) == 3
    for split in document["splits"]:
        assert set(split) == {"train", "test"}
        assert len(split["train"]) == 8 and len(split["test"]) == 2
        assert {n[1:3] for n in split["train"]}.isdisjoint({n[1:3] for n in split["test"]})


def test_cli_splits_table_and_train_fraction(tmp_path):
    root = make_csv_dataset(tmp_path, n=20)
    result = cli("data", "splits", "csv", "--data", str(root / "labels.csv"), "--train-fraction", "0.5", "--json")
    assert result.exit_code == 0, result.output
    assert all(len(s["train"]) == 8 for s in json.loads(result.stdout)["splits"])
    table = cli("data", "splits", "csv", "--data", str(root))
    assert table.exit_code == 0 and "16" in table.stdout


def test_cli_unknown_dataset_suggests(tmp_path):
    result = cli("data", "splits", "konq", "--data", str(tmp_path))
    assert result.exit_code == 2
    assert "did you mean" in result.output and "koniq" in result.output


def test_cli_missing_dataset_folder_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LODA_DATA", str(tmp_path))
    result = cli("data", "check", "livec")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "LIVE In the Wild" in result.output and "--data" in result.output and "AllMOS_release.mat" in result.output


def test_cli_prepare_and_info(tmp_path):
    root = make_flive(tmp_path, n=4)
    result = cli("data", "prepare", "flive", "--data", str(root), "--workers", "1")
    assert result.exit_code == 0, result.output
    assert "4 resized" in result.output
    assert "4 already prepared" in cli("data", "prepare", "flive", "--data", str(root)).output
    info = cli("data", "info", "live")
    assert info.exit_code == 0
    assert "lower is better" in info.output and "dmos_realigned.mat" in info.output


def test_errors_are_loda_errors():
    assert issubclass(datasets.UnknownDatasetError, LodaError)
    assert issubclass(datasets.DatasetPathError, DatasetError)
    assert isinstance(resolve_dataset("csv"), DatasetSpec)


def _point_first_name_outside(name: str, root: Path, escape: str) -> None:
    """Rewrite the first image name of a dataset's label file (in its own format) to ``escape``."""
    import openpyxl
    import scipy.io

    if name in ("koniq", "kadid"):
        label = root / ("koniq10k_scores_and_distributions.csv" if name == "koniq" else "dmos.csv")
        lines = label.read_text().splitlines(keepends=True)
        first = lines[1].split(",")[0].strip('"')
        label.write_text(lines[0] + lines[1].replace(first, escape, 1) + "".join(lines[2:]))
    elif name == "tid2013":
        label = root / "mos_with_names.txt"
        lines = label.read_bytes().decode().split("\r\n")
        lines[0] = lines[0].split()[0] + " " + escape
        label.write_bytes("\r\n".join(lines).encode())
    elif name == "spaq":
        label = root / "Annotations" / "MOS and Image attribute scores.xlsx"
        book = openpyxl.load_workbook(label)
        book.worksheets[0].cell(row=2, column=1, value=escape)
        book.save(label)
    elif name == "livec":
        label = root / "Data" / "AllImages_release.mat"
        cell = scipy.io.loadmat(str(label))["AllImages_release"]
        cell[7, 0] = np.array([escape])
        scipy.io.savemat(label, {"AllImages_release": cell})


@pytest.mark.parametrize("name", ["koniq", "kadid", "spaq", "livec", "tid2013"])
@pytest.mark.parametrize("escape", ["../../outside.jpg", "/etc/passwd"])
def test_every_official_reader_keeps_label_paths_inside_the_dataset(tmp_path, name, escape):
    """A label file naming ``../`` or an absolute path is refused by every reader, not only the
    generic csv one: `loda data check` and `loda train` read nothing outside the dataset."""
    makers = {"koniq": make_koniq, "kadid": make_kadid, "spaq": make_spaq, "livec": make_livec,
              "tid2013": make_tid2013}
    root = tmp_path / "set"
    kwargs = {"kadid": dict(n_refs=2, per_ref=2), "tid2013": dict(n_refs=2, per_ref=2)}.get(name, dict(n=4))
    makers[name](root, **kwargs)
    assert read_labels(resolve_dataset(name), root).items  # the untouched set reads
    Image.new("RGB", (64, 64)).save(tmp_path / "outside.jpg")  # it exists, so only the rule refuses it
    _point_first_name_outside(name, root, escape)
    with pytest.raises(datasets.DatasetPathError, match="outside the dataset folder"):
        read_labels(resolve_dataset(name), root)
