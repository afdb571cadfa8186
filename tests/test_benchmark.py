"""`loda benchmark` accuracy: splits, medians, planning, dry runs, rendering, and every table preset
end to end on tiny backbones and generated datasets in the distributed formats (two splits, one
epoch). The end-to-end tests share one folder of datasets, checkpoints and results, so later
tables reuse earlier checkpoints exactly as a real reproduction does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loda_cli import benchmark as bm
from loda_cli.cli.main import app
from loda_cli.errors import CheckpointError, UsageError

from . import datasetfixtures as fx
from .conftest import TINY_KW

runner = CliRunner()
SPLITS = [0, 1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    threads' spin-waiting makes them several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize("text, expected", [
    ("10", list(range(10))), ("1", [0]), ("0-9", list(range(10))), ("3-5", [3, 4, 5]),
    ("0,3,5", [0, 3, 5]), ("5,0,3,3", [0, 3, 5]), ("0-2,7", [0, 1, 2, 7]), (" 2 - 3 ", [2, 3]),
])
def test_parse_splits(text, expected):
    assert bm.parse_splits(text) == expected


@pytest.mark.parametrize("text", ["0", "", "a", "3-1", "1,,2", "-1", "1.5"])
def test_parse_splits_rejects_nonsense(text):
    with pytest.raises(UsageError):
        bm.parse_splits(text)


def test_format_splits_round_trips():
    for splits in ([0], [0, 1, 2, 5], [1, 3, 4, 5, 9], list(range(10))):
        assert bm.parse_splits(bm.format_splits(splits)) == splits
    assert bm.format_splits([0, 1, 2, 5]) == "0-2,5"


def test_median_is_the_papers():
    assert bm.median([0.9, 0.1, 0.5]) == 0.5
    assert bm.median([0.1, 0.2, 0.4, 0.9]) == pytest.approx(0.3)  # even count: mean of the middle two
    assert bm.median([None, 0.7, float("nan")]) == 0.7
    assert bm.median([]) is None


def test_kadid_groups_cover_every_type_once():
    for grouping in (bm.DISTORTION_GROUPS, bm.KADID_CATEGORIES):
        members = [t for group in grouping.values() for t in group]
        assert sorted(members) == list(range(1, 26))
    assert len(bm.DISTORTION_GROUPS) == 9  # "nine typical types" (paper, Section 4.5)
    assert bm.kadid_type("images/I07_13_04.png") == 13
    assert bm.kadid_type("I81_25_05.PNG") == 25
    assert bm.kadid_type("I07.png") is None


def test_distortion_breakdown_per_group():
    names, raw, mos = [], [], []
    for ref in range(1, 4):
        for kind in range(1, 26):
            for level in range(1, 6):
                names.append(f"I{ref:02d}_{kind:02d}_{level:02d}.png")
                quality = 5.0 - level + 0.1 * ref
                mos.append(quality)
                # Perfect ranking everywhere except the blurs, where it is reversed.
                raw.append(-quality if kind in (1, 2, 3, 5) else quality)
    out = bm.distortion_breakdown(names, raw, mos)
    assert out["groups"]["noise"]["n"] == 5 * 15 and out["groups"]["noise"]["srcc"] == pytest.approx(1.0)
    assert out["groups"]["blur"]["srcc"] == pytest.approx(-1.0)
    assert out["types"]["13 impulse noise"]["n"] == 15
    assert set(out["kadid_categories"]) == set(bm.KADID_CATEGORIES)
    tiny = bm.distortion_breakdown(names[:2], raw[:2], mos[:2])
    assert tiny["groups"]["blur"] == {"n": 2, "srcc": None, "plcc": None}
    with pytest.raises(UsageError):
        bm.distortion_breakdown(["a.jpg", "b.jpg", "c.jpg"], [1, 2, 3], [1, 2, 3])


def test_paper_numbers_are_complete():
    for number, spec in bm.TABLES.items():
        for variant in spec.variants:
            for column in spec.columns():
                for metric in spec.metrics:
                    assert bm.PAPER[number][(variant.key, column)][metric] > 0, (number, variant.key, column)
    assert bm.PAPER[1][("loda", "kadid10k")] == {"srcc": 0.931, "plcc": 0.936}
    assert bm.PAPER[2][("loda", "koniq10k->livec")] == {"srcc": 0.811}


def test_presets_share_checkpoints(tmp_path):
    settings = bm.BenchmarkSettings(checkpoints=tmp_path, results=tmp_path / "r")
    names = {n: {r.checkpoint.name for r in bm.plan_table(n, SPLITS, settings).runs} for n in bm.TABLES}
    assert len(bm.plan_table(1, range(10), settings).runs) == 70
    assert "loda-kadid10k-split0.safetensors" in names[1] & names[3] & names[4] & names[6] & names[7]
    assert names[2] <= names[1]  # cross-dataset tests Table 1's checkpoints
    assert "loda-kadid10k-split1-full.safetensors" in names[6] & names[7]  # Table 7's ViT row
    assert "loda-koniq10k-split0-frac0.2.safetensors" in names[5]
    assert "loda-spaq-split0-vit-tiny.safetensors" in names[4]
    assert "loda-koniq10k-split0-vit-clip.safetensors" in names[3]
    assert len(bm.plan_table(2, SPLITS, settings).runs) == 8
    assert len(bm.plan_table(6, SPLITS, settings, variants=["lora"], datasets=["kadid"]).runs) == 2
    with pytest.raises(UsageError):
        bm.plan_table(8, SPLITS, settings)
    with pytest.raises(UsageError):
        bm.plan_table(6, SPLITS, settings, variants=["dora"])
    with pytest.raises(UsageError):
        bm.plan_dataset("kadid", SPLITS, settings, test_on="kadid10k")


def test_a_checkpoint_trained_on_another_seeds_split_is_refused(tmp_path):
    """Split 0 of seed 1 holds most of split 0 of seed 3407's test images in its training set."""
    settings = bm.BenchmarkSettings(checkpoints=tmp_path, results=tmp_path / "r")
    run = bm.plan_dataset("koniq", [0], settings).runs[0]
    meta = {"method": "loda", "config": {"vit": run.variant.vit, "cnn": "resnet50"},
            "dataset": {"name": run.dataset, "split": 0, "seed": 1, "train_fraction": run.variant.train_fraction}}
    assert bm.identity_mismatch(run, settings, meta) == "seed 1 (expected 3407)"
    assert bm.identity_mismatch(run, settings, {**meta, "dataset": {**meta["dataset"], "seed": 3407}}) is None


def _fake_report(tmp_path) -> bm.Report:
    settings = bm.BenchmarkSettings(checkpoints=tmp_path, results=tmp_path / "r")
    plan = bm.plan_table(7, SPLITS, settings, datasets=["kadid10k"])
    results = {}
    for i, run in enumerate(plan.runs):
        if run.variant.key == "add":
            continue  # left out: rendered as missing
        srcc = {"full": 0.88, "loda": 0.93}[run.variant.key] + 0.002 * i
        results[run.id] = {"metrics": {"n": 2000, "srcc": srcc, "plcc": srcc + 0.01, "krcc": 0.77,
                                       "rmse": 0.4, "fit_method": "logistic4"}}
    return bm.Report(plan, results, {}, bm.summarize(plan, results), 1.0)


def test_markdown_has_the_papers_layout_values_and_differences(tmp_path):
    report = _fake_report(tmp_path)
    text = bm.render_markdown(report)
    lines = text.splitlines()
    assert lines[0] == "## Table 7: Ablation experiments"
    header = next(line for line in lines if line.startswith("| Module"))
    assert header == ("| Module | KADID-10k SRCC | KADID-10k PLCC | KonIQ-10k SRCC | KonIQ-10k PLCC |")
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ViT") or line.startswith("| LoDa")}
    assert list(rows) == ["ViT", "ViT + Extractor", "LoDa"]  # the paper's row order
    # Table 7's LoDa on KADID: runs 4 and 5 -> SRCC 0.938 and 0.940, median 0.939 vs 0.931.
    assert "| 0.939 (0.931, +0.008) | 0.949 (0.936, +0.013) |" in rows["LoDa"]
    assert "| - (0.915) | - (0.921) |" in rows["ViT + Extractor"]  # not run: the paper's value alone
    assert rows["LoDa"].endswith("| - (0.932) | - (0.944) |")  # KonIQ not in this plan
    assert "bottleneck 64" in text and "rank 8" in text and "10 prompts per block" in text
    cell = next(c for c in report.summary["cells"] if c["row"] == "loda" and c["column"] == "kadid10k")
    assert cell["diff_srcc"] == pytest.approx(0.008) and cell["splits"] == [0, 1]


def test_a_report_describes_how_its_checkpoints_were_trained_and_flags_tiny_test_sets(tmp_path):
    """It said "the paper's protocol (batch 128, 10 epochs)" and pretrained: true for a one-step
    smoke checkpoint on random backbones, and compared it with the paper without a word."""
    report = _fake_report(tmp_path)
    text = bm.render_markdown(report)
    assert "- Training: the paper's protocol" in text and "Warning" not in text  # no record: the plan's
    paper = {"epochs": 10, "batch_size": 128, "max_steps": None, "pretrained": True, "steps": 1000}
    for result in report.results.values():
        result["checkpoint_metadata"] = {"train": dict(paper)}
    assert "- Training: the paper's protocol" in bm.render_markdown(report)
    smoke = {"epochs": 1, "batch_size": 8, "max_steps": 2, "pretrained": False, "steps": 2}
    first = next(iter(report.results.values()))
    first["checkpoint_metadata"] = {"train": smoke}
    first["metrics"]["n"] = 6
    text = " ".join(bm.render_markdown(report).split())
    assert "the paper's protocol (AdamW" not in text
    assert ("Training, as the checkpoints record it: stopped at step 2 (--max-steps 2), random backbones, "
            "1 epoch, batch 8. NOT the paper's protocol") in text
    assert "Warning: as few as 6 test images in a run" in text
    assert smoke in report.to_dict()["checkpoints_trained"]


def test_test_crops_are_averaged_per_image_in_item_order(tmp_path):
    """The paper's test: n seeded random crops per image, the mean raw output per image."""
    import torch

    from loda_cli.data import ImageSource
    from loda_cli.datasets import read_labels, resolve_dataset

    class MeanPixel(torch.nn.Module):  # raw = a crop's mean normalised pixel value
        def forward(self, x):
            return x.mean(dim=(1, 2, 3)).unsqueeze(1)

    root = fx.make_koniq(tmp_path / "koniq", n=6)
    spec = resolve_dataset("koniq10k")
    items = read_labels(spec, root).items
    source = ImageSource(spec, root)
    settings = bm.BenchmarkSettings(test_crops=4, workers=0)
    raw = bm.predict_items(MeanPixel(), items, source, settings, "cpu", "fp32")
    assert len(raw) == 6 and len(set(raw)) == 6
    from loda_cli.config import Preprocess
    from loda_cli.data import TestCrops
    from loda_cli.transforms import normalize

    for i in range(len(items)):
        crops = TestCrops(items, source, n=4, seed=3407)[i][1]
        assert crops.shape[0] == 4
        assert raw[i] == pytest.approx(float(normalize(crops, Preprocess()).mean()), abs=1e-5)
    grid = bm.predict_items(MeanPixel(), items, source, bm.BenchmarkSettings(test_crops=4, workers=0,
                                                                             deterministic_crops=True), "cpu", "fp32")
    assert grid != raw


# ---------------------------------------------------------------------------------------------
# Dry run


def test_table1_dry_run_lists_all_seven_datasets(tmp_path):
    result = runner.invoke(app, ["benchmark", "--table", "1", "--dry-run", "--data-root", str(tmp_path),
                                 "--checkpoints", str(tmp_path / "ck"), "--train"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Table 1: ") and "70 runs (splits 0-9)" in lines[0]
    runs = [line.split()[0] for line in lines[2:-2]]
    assert len(runs) == 70
    for name in ("live", "tid2013", "kadid10k", "livec", "koniq10k", "spaq", "flive"):
        assert [r for r in runs if r.startswith(f"{name}-split")] == [f"{name}-split{k}" for k in range(10)]
    assert all(line.split()[1] == "train" for line in lines[2:-2])
    assert lines[-2].startswith("total: 70 train; about ")
    assert "crops per second" in lines[-1] and "nominal sizes" in lines[-1]

    as_json = runner.invoke(app, ["benchmark", "--table", "1", "--dry-run", "--splits", "0-1", "--json",
                                  "--checkpoints", str(tmp_path / "ck"), "--data-root", str(tmp_path)])
    payload = json.loads(as_json.stdout)
    assert len(payload["runs"]) == 14 and {r["status"] for r in payload["runs"]} == {"missing"}
    assert payload["totals"]["seconds"] == 0 and payload["totals"]["seconds_if_trained"] > 0

    # A dataset with --table keeps only that dataset's runs of the table.
    only = runner.invoke(app, ["benchmark", "kadid", "--table", "6", "--splits", "3-3", "--dry-run",
                               "--checkpoints", str(tmp_path / "ck"), "--data-root", str(tmp_path)])
    ids = [line.split()[0] for line in only.stdout.splitlines()[2:-2]]
    assert ids == [f"kadid10k-split3{t}" for t in ("-linear", "-full", "-adapter", "-lora", "-vpt", "")]


def test_crops_option_of_the_accuracy_path(tmp_path, capsys):
    """`--crops N` (passed by `loda benchmark` as ``crops``) sets the test crops per image."""
    from loda_cli.cli.benchmark_accuracy import run_accuracy

    kw = dict(target="koniq", data=None, splits="2", checkpoints=tmp_path, train_first=True, test_on=None,
              test_data=None, table=None, data_root=tmp_path, results=tmp_path / "r", by_distortion=False,
              dry_run=True, deterministic_crops=False, epochs=None, vit=None, cnn=None, vit_depth=None,
              no_pretrained=False, batch_size=None, device="cpu", precision="auto", workers=None, as_json=True)
    run_accuracy(**kw, crops=4)
    payload = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in payload["runs"]] == ["koniq10k-split0-c4", "koniq10k-split1-c4"]
    assert "4 test crops" in payload["totals"]["assumption"]
    with pytest.raises(UsageError):
        run_accuracy(**kw, crops=0)


def test_dry_run_estimates_scale_with_the_data():
    settings = bm.BenchmarkSettings(train=True)
    sizes = {name: (n, False) for name, n in bm.NOMINAL_SIZES.items()}
    koniq = bm.plan_dataset("koniq", [0], settings).runs[0]
    live = bm.plan_dataset("live", [0], settings).runs[0]
    assert bm.estimate_seconds(koniq, settings, sizes, "train") > 5 * bm.estimate_seconds(live, settings, sizes, "train")
    assert bm.estimate_seconds(koniq, settings, sizes, "evaluate") < bm.estimate_seconds(koniq, settings, sizes, "train")
    assert bm.estimate_seconds(koniq, settings, sizes, "done") == 0
    # Table 2 tests FLIVE's checkpoint twice but trains it once.
    rows, totals = bm.dry_run(bm.plan_table(2, [0], settings))
    assert [r.status for r in rows if r.run.dataset == "flive"] == ["train", "evaluate"]


def test_cli_usage_errors_are_one_line(tmp_path):
    cases = [
        ["benchmark"],
        ["benchmark", "kadid", "--splits", "x"],
        ["benchmark", "--table", "9", "--dry-run"],
        ["benchmark", "--table", "1", "--test-on", "livec", "--dry-run"],
        ["benchmark", "kadid", "--test-data", str(tmp_path), "--dry-run"],
        ["benchmark", "nosuchset", "--dry-run"],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.strip().startswith("error:") and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# End to end: tiny backbones, generated datasets, two splits, one epoch


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The seven datasets in their distributed formats, each with 5 test images per split."""
    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    fx.make_live(data / "live", per_folder=5, n_refs=5)
    fx.make_tid2013(data / "tid2013", n_refs=5, per_ref=5)
    fx.make_kadid(data / "kadid10k", n_refs=5, per_ref=10)  # two distortion types per reference
    fx.make_livec(data / "livec", n=25)  # 20 training images: 20% of them is 4
    fx.make_koniq(data / "koniq10k", n=20)
    fx.make_spaq(data / "spaq", n=20)
    fx.make_flive(data / "flive", n=20)
    return root


def _settings(world: Path, **kw) -> bm.BenchmarkSettings:
    values = dict(
        data_root=world / "data", checkpoints=world / "ck", results=world / "results", train=True,
        epochs=1, batch_size=2, vit=TINY_KW["vit"], vit_kwargs=TINY_KW["vit_kwargs"], cnn=TINY_KW["cnn"],
        pretrained=False, test_crops=1, workers=0, device="cpu", precision="fp32",
        # Smoke sizes: one optimiser step of two crops, one test crop, a 4-image calibration (the
        # crop averaging itself is tested on its own below).
        train_overrides={"max_steps": 1, "crops_per_image": 1, "num_crops": 1, "calibration_images": 4},
    )
    values.update(kw)
    return bm.BenchmarkSettings(**values)


@pytest.fixture(scope="module")
def table1(world):
    """Table 1 trained and tested once; later tables and tests build on its checkpoints."""
    plan = bm.plan_table(1, SPLITS, _settings(world))
    return (plan, *_execute(plan))


def _execute(plan):
    events = []
    report = bm.execute(plan, lambda e: events.append((e.kind, e.run.id)))
    paths = bm.write_report(report)
    return report, events, paths


def test_table1_end_to_end(table1):
    plan, report, events, paths = table1
    assert len(report.results) == 14 and not report.skipped
    assert [k for k, _ in events].count("train") > 0 and [k for k, _ in events].count("done") == 14
    for run in plan.runs:
        result = json.loads(run.result.read_text())
        assert run.checkpoint.is_file() and result["checkpoint_sha256"]
        m = result["metrics"]
        assert m["n"] == {"kadid10k": 10, "live": 5, "tid2013": 5, "livec": 5}.get(run.dataset, 4)
        assert all(math.isfinite(m[k]) for k in ("srcc", "plcc", "krcc", "rmse"))
        assert result["protocol"] == {"crops": 1, "grid": False, "seed": 3407}
        assert len(result["predictions"]["names"]) == m["n"] and result["versions"]["torch"]
        # The benchmark's test is train's own final test: same crops, same seed, same numbers.
        meta_srcc = result["checkpoint_metadata"]["metrics"]["srcc"]
        assert m["srcc"] == pytest.approx(meta_srcc, abs=1e-6)
    text = paths["markdown"].read_text()
    assert text.startswith("## Table 1: ")
    header = next(line for line in text.splitlines() if line.startswith("| Method"))
    assert header.count("SRCC") == 7 and header.index("LIVE SRCC") < header.index("FLIVE SRCC")
    loda_row = next(line for line in text.splitlines() if line.startswith("| LoDa"))
    assert "(0.975, " in loda_row and "(0.578, " in loda_row  # the paper's LIVE and FLIVE SRCC
    summary = json.loads(paths["json"].read_text())
    assert summary["table"] == 1 and len(summary["runs"]) == 14
    assert {c["column"] for c in summary["summary"]["cells"]} == set(bm.TABLES[1].datasets)

    # A second pass reuses every result: no training, no testing.
    again, events, _ = _execute(plan)
    assert {k for k, _ in events} == {"run", "reused"}
    assert again.summary == report.summary


def test_table2_cross_dataset_end_to_end(world, table1):
    # Table 1's FLIVE checkpoints, each tested on every KonIQ and every LIVEC image.
    plan = bm.plan_table(2, SPLITS, _settings(world, train=False), datasets=["flive"])
    report, events, paths = _execute(plan)
    assert "train" not in {k for k, _ in events} and len(report.results) == 4
    assert [r.id for r in plan.runs][:2] == ["flive-split0-on-koniq10k-c1", "flive-split0-on-livec-c1"]
    result = report.results["flive-split0-on-koniq10k-c1"]
    assert result["metrics"]["n"] == 20  # every KonIQ image, no split
    assert result["checkpoint"].endswith("loda-flive-split0.safetensors")
    text = paths["markdown"].read_text()
    assert "| FLIVE -> KonIQ-10k SRCC |" in text and "(0.763, " in text and "PLCC" not in text.split("### Runs")[0]
    assert "| - (0.745) | - (0.811) |" in text  # the LIVEC and KonIQ sources were not in this run


def test_tables_3_4_5_end_to_end(world, table1):
    settings = _settings(world)
    for number, variants, dataset in ((3, ["mae", "loda"], "kadid10k"), (4, ["tiny", "loda"], "spaq"),
                                      (5, ["frac0.2"], "livec")):
        plan = bm.plan_table(number, SPLITS, settings, variants=variants, datasets=[dataset])
        report, events, paths = _execute(plan)
        assert len(report.results) == 2 * len(variants), number
        kinds = [k for k, _ in events]
        if "loda" in variants:  # Table 1's runs are reused, not trained again
            assert kinds.count("reused") == 2
        text = paths["markdown"].read_text()
        assert text.startswith(f"## Table {number}: ")
    frac = json.loads((world / "results" / "runs" / "livec-split0-frac0.2-c1.json").read_text())
    assert frac["checkpoint_metadata"]["dataset"]["train_fraction"] == 0.2
    assert frac["checkpoint_metadata"]["dataset"]["train_images"] == 4
    assert frac["metrics"]["n"] == 5  # the test set does not shrink with the training set


def test_tables_6_and_7_with_the_distortion_breakdown(world, table1):
    settings = _settings(world, by_distortion=True)
    plan6 = bm.plan_table(6, SPLITS, settings, datasets=["kadid10k"])
    report6, events, paths = _execute(plan6)
    assert len(report6.results) == 12
    for method in ("linear", "full", "adapter", "lora", "vpt"):
        meta = report6.results[f"kadid10k-split0-{method}-c1"]["checkpoint_metadata"]
        assert meta["method"] == method and meta["config"]["trainable"] == ("full" if method == "full" else "adapters")
    text = paths["markdown"].read_text()
    assert "### KADID-10k by distortion group" in text
    blur = next(line for line in text.splitlines() if line.startswith("| blur | 01, 02, 03, 05 |"))
    assert blur.count("|") == 2 + 2 * 6 + 1
    assert "| noise | 11, 12, 13, 14, 15 | - |" in text  # no noise images in this small set
    cell = next(c for c in report6.summary["cells"] if c["row"] == "lora")
    assert cell["by_distortion"]["groups"]["blur"]["n"] == 2 * 10

    plan7 = bm.plan_table(7, SPLITS, settings, datasets=["kadid10k"])
    report7, events, paths = _execute(plan7)
    kinds = [k for k, _ in events]
    assert kinds.count("reused") == 4 and kinds.count("done") == 2  # ViT and LoDa come from Table 6
    assert report7.results["kadid10k-split1-add-c1"]["checkpoint_metadata"]["method"] == "add"
    assert "1 random 224 crop per test image (seed 3407)" in paths["markdown"].read_text()


def test_checkpoint_trained_differently_is_refused(world, table1, tmp_path):
    settings = _settings(world, train=False, epochs=3)
    plan = bm.plan_dataset("live", [0], settings)
    events = []
    with pytest.raises(CheckpointError, match="epochs 1 \\(expected 3\\)"):
        bm.execute(plan, events.append)
    assert events == []  # refused before any run starts
    # The dry run says so too, instead of listing the run as one to evaluate.
    rows, totals = bm.dry_run(plan)
    assert [row.status for row in rows] == ["refused"] and totals["by_status"] == {"refused": 1}
    assert "epochs 1 (expected 3)" in rows[0].reason and rows[0].seconds == 0
    broken = tmp_path / "ck"
    broken.mkdir()
    (broken / plan.runs[0].checkpoint.name).write_bytes(b"not a checkpoint")
    rows, _ = bm.dry_run(bm.plan_dataset("live", [0], _settings(world, train=False, checkpoints=broken)))
    assert rows[0].status == "refused" and rows[0].reason


def test_missing_checkpoints_without_train(world, tmp_path):
    settings = _settings(world, train=False, checkpoints=tmp_path / "empty", results=tmp_path / "r")
    with pytest.raises(UsageError, match="--train"):
        bm.execute(bm.plan_dataset("live", SPLITS, settings))
    missing_data = _settings(world, data_root=tmp_path / "nothing", checkpoints=tmp_path / "ck2",
                             results=tmp_path / "r2")
    with pytest.raises(Exception, match="not found"):
        bm.execute(bm.plan_dataset("live", [0], missing_data))


def test_cli_benchmark_of_one_dataset(world, table1, tmp_path):
    """`loda benchmark livec --data DIR --checkpoints CK` on Table 1's checkpoints, deterministic
    crops, JSON out; then the KADID by-distortion error for another dataset."""
    common = ["--checkpoints", str(world / "ck"), "--out", str(tmp_path / "res"), "--vit", "test_vit",
              "--vit-depth", "2", "--cnn", "test_resnet", "--no-pretrained", "--epochs", "1",
              "--device", "cpu", "--workers", "0"]
    result = runner.invoke(app, ["benchmark", "livec", "--data", str(world / "data" / "livec"),
                                 "--splits", "1-1", "--deterministic-crops", "--json", *common])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["name"] == "livec" and payload["protocol"] == {"crops": 15, "grid": True, "seed": 3407}
    cell = payload["summary"]["cells"][0]
    assert cell["paper_srcc"] == 0.876 and cell["splits"] == [1]
    assert cell["srcc"] == pytest.approx(bm.median([r["metrics"]["srcc"] for r in payload["runs"]]))
    assert (tmp_path / "res" / "livec.md").is_file() and (tmp_path / "res" / "runs" / "livec-split1-grid.json").is_file()

    bad = runner.invoke(app, ["benchmark", "livec", "--data", str(world / "data" / "livec"), "--splits", "1",
                              "--by-distortion", *common])
    assert bad.exit_code == 2 and "KADID" in bad.output


def test_nothing_to_evaluate_names_a_missing_data_folder_too(tmp_path, monkeypatch):
    monkeypatch.setenv("LODA_HOME", str(tmp_path / "home"))
    r = runner.invoke(app, ["benchmark", "kadid", "--data", str(tmp_path / "nowhere"), "--splits", "0-0"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "no run of kadid10k has a checkpoint" in text and "The --data folder does not exist either" in text
