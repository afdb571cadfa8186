"""--precision auto: measured once per model and machine, only agreeing candidates, cached safely."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pytest

from loda_cli import precision as P
from loda_cli.config import Preprocess
from tests.scripts import load_script


def trials(**ms_delta):
    return [P.Trial(name, ms, delta) for name, (ms, delta) in ms_delta.items()]


def test_pick_takes_the_fastest_candidate_that_agrees():
    assert P.pick(trials(fp32=(100, 0.0), bf16=(50, 0.004), int8=(70, 0.001))) == "bf16"


def test_a_candidate_that_disagrees_is_never_chosen_however_fast():
    for delta in (0.0051, 0.02, 1.0):
        assert P.pick(trials(fp32=(100, 0.0), bf16=(1, delta))) == "fp32"
        assert P.pick(trials(fp32=(100, 0.0), bf16=(1, delta), int8=(80, 0.001))) == "int8"
    assert P.pick(trials(fp32=(100, 0.0), bf16=(1, float("nan")))) == "fp32"


def test_a_marginal_gain_keeps_fp32_and_skipped_candidates_do_not_count():
    assert P.pick(trials(fp32=(100, 0.0), int8=(97, 0.0))) == "fp32"
    assert P.pick([P.Trial("fp32", 100, 0.0), P.Trial("bf16", skipped="no native bf16")]) == "fp32"


def to_score(raw):
    import torch

    return torch.sigmoid(raw)


def test_measure_flags_disagreement_and_survives_a_failing_candidate(tiny_model):
    """A candidate whose scores move by more than 0.005 is measured but marked as disagreeing; one
    that raises is skipped with its reason."""
    import torch

    class Off(P.Runner):
        def __call__(self, batch):
            return super().__call__(batch) + 1.0  # sigmoid moves by far more than 0.005

    def prepare(model, precision, device):
        if precision == "fp16":
            raise RuntimeError("no kernel for this")
        return (Off if precision == "int8" else P.Runner)(model, "fp32" if precision == "int8" else precision, device)

    flags = frozenset({"avx512_bf16", "avx512_fp16"})
    got = {t.precision: t for t in P.measure(tiny_model, Preprocess(), to_score, flags=flags, prepare=prepare)}
    assert got["fp32"].agrees and got["fp32"].ms_per_crop > 0
    assert got["bf16"].max_delta is not None and got["bf16"].ms_per_crop > 0
    assert not got["int8"].agrees and got["int8"].max_delta > 0.005
    assert got["fp16"].skipped.startswith("failed: RuntimeError")
    assert P.pick(list(got.values())) != "int8"
    # The model the caller passed is still fp32 afterwards.
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


def test_timing_excludes_first_run_set_up_and_one_slow_round(tiny_model, monkeypatch):
    """The candidate that is faster once warm is chosen even though its first run of the probe
    batch pays a large set-up cost and one of its timed rounds is hit by a hiccup; what is timed
    is each candidate's fastest round after a full-batch warm-up."""
    import torch

    clock = {"t": 0.0}
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock["t"])
    cost = {"fp32": 10.0, "int8": 9.0, "bf16": 6.0}  # ms a crop once warm

    class Fake:
        def __init__(self, model, precision, device):
            self.precision, self.calls = precision, 0

        def __call__(self, batch):
            self.calls += 1
            ms = cost[self.precision] * len(batch)
            if self.precision == "bf16" and self.calls == 1:
                ms += 1000 * len(batch)  # kernel selection on the first batch
            if self.precision == "bf16" and self.calls == 2:
                ms *= 3  # a hiccup in one timed round
            clock["t"] += ms / 1000
            return torch.zeros(len(batch))

    got = {t.precision: t for t in P.measure(tiny_model, Preprocess(), to_score, flags=frozenset({"avx512_bf16"}),
                                             candidates=("fp32", "bf16", "int8"), prepare=Fake)}
    assert got["bf16"].ms_per_crop == pytest.approx(6.0)
    assert got["int8"].ms_per_crop == pytest.approx(9.0)
    assert got["fp32"].ms_per_crop == pytest.approx(10.0)
    assert P.pick(list(got.values())) == "bf16"


def test_candidates_without_hardware_support_are_skipped(tiny_model):
    got = {t.precision: t for t in P.measure(tiny_model, Preprocess(), to_score, flags=frozenset())}
    assert "bf16" in got["bf16"].skipped and "fp16" in got["fp16"].skipped
    assert got["int8"].ms_per_crop is not None  # int8 needs only the quantized engine


def test_int8_runner_quantizes_linear_layers_and_stays_close(tiny_model):
    import torch

    x = torch.randn(2, 3, 224, 224)
    ref = P.Runner(tiny_model, "fp32", "cpu")(x)
    runner = P.Runner(tiny_model, "int8", "cpu")
    quantized = lambda model: [m for m in model.modules() if "quantized" in type(m).__module__]  # noqa: E731
    assert len(quantized(runner.model)) > 4 and not quantized(tiny_model)
    assert torch.allclose(runner(x), ref, atol=0.1)


def test_half_precision_keeps_the_cnn_before_its_first_feature_map_in_fp32(tiny_model):
    """The stem and first stages see raw pixels and decide most of bf16's error: they stay fp32
    under autocast, and the later stages run in bf16."""
    import timm
    import torch

    lite = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(1, 2, 3, 4))
    assert P.keep_early_layers_fp32(lite) == ["conv_stem", "bn1", "blocks.0", "blocks.1"]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps = lite(torch.randn(1, 3, 64, 64))
    assert maps[0].dtype == torch.float32 and all(m.dtype == torch.bfloat16 for m in maps[1:])

    runner = P.Runner(tiny_model, "bf16", "cpu")
    names = [n for n, m in runner.model.cnn.named_children() if type(m).__name__ == "Fp32"]
    assert names == ["conv1", "bn1", "act1", "maxpool", "layer1"]
    assert not any(type(m).__name__ == "Fp32" for m in tiny_model.cnn.modules())  # the caller's is untouched
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(runner(x), P.Runner(tiny_model, "fp32", "cpu")(x), atol=0.05)
    # The accelerators' autocast path keeps the same layers fp32 (built here, run only on a GPU).
    for device, precision in (("cuda", "bf16"), ("cuda", "fp16"), ("mps", "fp16")):
        accel = P.Runner(tiny_model, precision, device)
        assert accel.autocast_dtype is not None
        assert [n for n, m in accel.model.cnn.named_children() if type(m).__name__ == "Fp32"] == names
    assert not any(type(m).__name__ == "Fp32" for m in tiny_model.cnn.modules())


def choose(tiny_model, path, calls):
    def fake_measure(*args, **kwargs):
        calls.append(1)
        return trials(fp32=(100, 0.0), bf16=(40, 0.001))

    return P.choose("auto", "cpu", model=tiny_model, preprocess=Preprocess(), to_score=to_score,
                    model_id="m", architecture={"vit": "test_vit"}, path=path, measurer=fake_measure)


def test_the_choice_is_cached_and_a_new_torch_version_measures_again(tiny_model, tmp_path, monkeypatch):
    import torch

    path, calls = tmp_path / "precision.json", []
    first = choose(tiny_model, path, calls)
    assert (first.precision, first.how, len(calls)) == ("bf16", "measured", 1)
    again = choose(tiny_model, path, calls)
    assert (again.precision, again.how, len(calls)) == ("bf16", "cached", 1)
    assert "bf16 40 ms/crop" in again.describe()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert choose(tiny_model, path, calls).how == "measured" and len(calls) == 2
    assert len(json.loads(path.read_text())["entries"]) == 2


@pytest.mark.parametrize("junk", ["{not json", "", "[1, 2]", '{"entries": {"x": 3}}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(tiny_model, tmp_path, junk):
    path, calls = tmp_path / "precision.json", []
    path.write_text(junk)
    assert choose(tiny_model, path, calls).how == "measured"
    data = json.loads(path.read_text())
    assert len(calls) == 1 and any(e.get("precision") == "bf16" for e in data["entries"].values())
    assert choose(tiny_model, path, calls).how == "cached"


def test_an_entry_naming_an_unknown_precision_is_measured_again(tiny_model, tmp_path):
    path, calls = tmp_path / "precision.json", []
    choose(tiny_model, path, calls)
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["precision"] = "fp8"
    path.write_text(json.dumps(data))
    assert choose(tiny_model, path, calls).how == "measured"


def _store_many(path: str, who: int, n: int) -> None:
    from pathlib import Path

    for i in range(n):
        choice = P.PrecisionChoice("fp32", "measured", [P.Trial("fp32", 1.0, 0.0)])
        P.store_choice(f"{who}-{i}", {"who": who}, choice, Path(path))


def test_two_processes_writing_at_once_both_succeed(tmp_path):
    path = tmp_path / "precision.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_store_many, args=(str(path), who, 25)) for who in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 50
    assert not [f for f in tmp_path.iterdir() if f.name.endswith(".tmp")]


def _choose_once(path: str, out: str) -> None:
    import os
    import time
    from pathlib import Path

    def slow_measure(*args, **kwargs):
        time.sleep(0.5)  # long enough for the other process to arrive meanwhile
        # Each process would pick something else if it measured for itself.
        fast = "bf16" if os.getpid() % 2 else "int8"
        return [P.Trial("fp32", 100, 0.0), P.Trial(fast, 10, 0.0)]

    choice = P.choose("auto", "cpu", model=object(), preprocess=Preprocess(), model_id="m", path=Path(path),
                      measurer=slow_measure)
    Path(out).write_text(f"{choice.precision} {choice.how}")


def test_two_first_runs_at_once_measure_once_and_agree(tmp_path):
    """A second process that starts while the first measures waits for it and reads its choice,
    so two runs on one machine never score in different precisions."""
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "precision.json"
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [ctx.Process(target=_choose_once, args=(str(path), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    results = sorted(o.read_text().split() for o in outs)
    assert results[0][0] == results[1][0]
    assert sorted(how for _, how in results) == ["cached", "measured"]


def test_explicit_precision_is_forced_and_accelerators_follow_the_rule(tiny_model, tmp_path):
    assert P.choose("fp32", "cpu", model=tiny_model).how == "forced"
    assert P.choose("int8", "cpu").describe() == "int8 (asked for)"
    from loda_cli.errors import UsageError

    with pytest.raises(UsageError, match="CPU only"):
        P.choose("int8", "cuda")
    with pytest.raises(UsageError, match="unknown precision"):
        P.choose("fp64", "cpu")
    assert P.choose("auto", "mps").precision == "fp16"


def test_training_refuses_int8_and_keeps_fp32_on_a_cpu_without_amx(monkeypatch):
    from loda_cli.errors import UsageError
    from loda_cli.scoring import resolve_precision

    with pytest.raises(UsageError, match="scoring only"):
        resolve_precision("int8", "cpu")
    monkeypatch.setattr(P, "cpu_description", lambda: ("test cpu", frozenset({"avx512_bf16"})))
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(P, "cpu_description", lambda: ("test cpu", frozenset({"amx_bf16"})))
    assert resolve_precision("auto", "cpu") == "bf16"


def test_scorer_measures_once_then_reads_the_cache(tiny_checkpoint, tmp_path):
    from PIL import Image

    from loda_cli.scoring import Scorer

    Image.new("RGB", (320, 240), (120, 80, 40)).save(tmp_path / "a.jpg")
    first = Scorer(str(tiny_checkpoint), device="cpu", cache=False, workers=0)
    assert first.precision_choice.how == "measured" and first.precision in P.CPU_CANDIDATES
    assert [t.precision for t in first.precision_choice.trials] == list(P.CPU_CANDIDATES)
    second = Scorer(str(tiny_checkpoint), device="cpu", cache=False, workers=0)
    assert second.precision_choice.how == "cached" and second.precision == first.precision
    rows = list(second.score_files([str(tmp_path / "a.jpg")]))
    assert rows[0].error is None and 0 <= rows[0].score <= 1
    forced = Scorer(str(tiny_checkpoint), device="cpu", precision="int8", cache=False, workers=0)
    assert forced.precision_choice.how == "forced"
    int8_rows = list(forced.score_files([str(tmp_path / "a.jpg")]))
    assert abs(int8_rows[0].score - rows[0].score) < 0.05


def test_an_int8_photo_scores_the_same_whatever_is_scored_beside_it(tiny_checkpoint, tmp_path):
    """int8's dynamic quantization takes one scale per input, so the scorer runs each image on its
    own: a photo's int8 score is the same alone and among much louder photos. With images
    packed across a batch, a loud neighbour moved it."""
    import numpy as np
    from PIL import Image

    from loda_cli.scoring import Scorer

    rng = np.random.default_rng(0)
    Image.new("RGB", (320, 240), (120, 110, 100)).save(tmp_path / "quiet.jpg")
    for i in range(3):
        loud = (rng.random((240, 320, 3)) > 0.5).astype(np.uint8) * 255
        Image.fromarray(loud).save(tmp_path / f"loud{i}.jpg")
    paths = [str(tmp_path / n) for n in ("loud0.jpg", "quiet.jpg", "loud1.jpg", "loud2.jpg")]

    def quiet_score(scorer, files):
        return next(r.raw for r in scorer.score_files(files) if r.path.endswith("quiet.jpg"))

    scorer = Scorer(str(tiny_checkpoint), device="cpu", precision="int8", cache=False, workers=0, batch_size=8)
    assert scorer.runner.per_image
    alone = quiet_score(scorer, [paths[1]])
    assert quiet_score(scorer, paths) == alone
    scorer.runner.per_image = False  # images packed across batches, as before
    assert abs(quiet_score(scorer, paths) - alone) > 1e-6


def test_whole_image_batches_never_split_an_image():
    from loda_cli.scoring import _CropBatcher

    seen = []

    def forward(crops, groups=None):
        seen.append(groups)
        return [0.0] * len(crops)

    batcher = _CropBatcher(8, forward, whole_images=True)
    done = []
    for index, n in enumerate([3, 3, 3, 10, 2]):
        batcher.add({"index": index, "crops": np.zeros((n, 1)), "weights": [1.0 / n] * n})
        done += [item["index"] for item, _, _ in batcher.run()]
    done += [item["index"] for item, _, _ in batcher.run(final=True)]
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert seen == [[3, 3], [3], [10], [2]]  # an image larger than the batch runs alone


def test_benchmark_speed_reports_the_choice_the_compute_and_the_naive_ratio(tiny_checkpoint, tmp_path):
    """`loda benchmark speed --compare-naive` on real files: the measured table, FLOPs a crop, the
    GFLOP/s reached and the speedup over the naive loop, all in one report."""
    from PIL import Image
    from typer.testing import CliRunner

    from loda_cli.cli.main import app

    for i in range(3):
        Image.new("RGB", (640, 480), (40 * i, 90, 160)).save(tmp_path / f"{i}.jpg")
    out = CliRunner().invoke(app, ["benchmark", "speed", "--images", str(tmp_path), "--model", str(tiny_checkpoint),
                                   "--compare-naive", "--workers", "0", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["precision_choice"]["how"] == "measured"
    assert {t["precision"] for t in report["precision_choice"]["trials"]} == set(P.CPU_CANDIDATES)
    assert report["gflop_per_crop"] > 0 and report["model_only_gflop_per_s"] > 0
    assert report["speedup_vs_naive"] > 0 and report["results"]["naive"]["images"] == 3
    assert "speedup" in out.stderr and "precision: " in out.stderr


def _randomise_batchnorms(module, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return module


@pytest.mark.parametrize("name", ["test_resnet", "efficientnet_lite0"])
def test_folding_batchnorms_keeps_the_cnn_s_features(name):
    """Plain BatchNorms (ResNet) and timm's BatchNorm + activation (EfficientNet) fold into the
    convolutions before them; the feature maps stay the same and no BatchNorm is left."""
    import copy

    import timm
    import torch
    from timm.layers import BatchNormAct2d

    cnn = _randomise_batchnorms(timm.create_model(name, pretrained=False, features_only=True)).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    folded = copy.deepcopy(cnn)
    assert P.fold_batchnorm(folded) > 0
    assert not any(type(m) in (torch.nn.BatchNorm2d, BatchNormAct2d) for m in folded.modules())
    with torch.inference_mode():
        for a, b in zip(cnn(x), folded(x)):
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())  # rounding only


def test_the_runner_folds_a_copy_and_the_caller_keeps_its_batchnorms(tiny_model):
    import torch

    from loda_cli.transforms import normalize

    _randomise_batchnorms(tiny_model.cnn)
    before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.cnn.modules())
    batch = normalize(torch.from_numpy(P.probe_crops(2, 224)), Preprocess())
    with torch.inference_mode():
        want = tiny_model(batch).flatten()
    runner = P.Runner(tiny_model, "fp32", "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in runner.model.cnn.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.cnn.modules()) == before > 0
    assert runner.model is not tiny_model and tiny_model.cnn is not runner.model.cnn
    assert torch.allclose(runner(batch), want, atol=1e-4)


def test_a_cnn_that_runs_its_children_out_of_order_is_not_folded():
    """Folding trusts definition order; where that is not the order of execution, the numeric
    check keeps the CNN as it was."""
    import torch

    class NormFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)  # defined after the convolution, applied before it

        def forward(self, x):
            return self.conv(self.bn(x))

    cnn = _randomise_batchnorms(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), NormFirst())).eval()
    assert P._fold_checked(cnn) is cnn
    assert isinstance(cnn[1].bn, torch.nn.BatchNorm2d)


def test_precision_agreement_script_compares_with_fp32_and_fails_past_the_tolerance(tiny_checkpoint, tmp_path,
                                                                                    capsys):
    """scripts/precision_agreement.py (run by device_check.sh on a GPU) reports each precision's
    distance from fp32 on the same files, and exits 1 only when it is past the tolerance."""
    import numpy as np
    from PIL import Image

    script = load_script("precision_agreement")
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (300 + 20 * i, 400, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a picture")
    argv = ["--device", "cpu", "--images", str(folder), "--model", str(tiny_checkpoint), "--precision", "int8",
            "--json", str(tmp_path / "r.json")]
    assert script.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    entry = report["precisions"]["int8"]
    assert entry["files"] == 4 and entry["ran_in"] == "int8" and 0 <= entry["max_abs_delta"] <= 0.005
    assert script.main(argv[:-2] + ["--tolerance", "-1"]) == 1  # nothing can be that close
    assert "differs from fp32" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert script.main(["--device", "cpu", "--images", str(empty), "--model", str(tiny_checkpoint)]) == 2
    assert "no photo" in capsys.readouterr().err
    same = script.compare({"a": 0.5, "b": 0.25, "c": None}, {"a": 0.5, "b": 0.3, "c": 0.1})
    assert same["files"] == 2 and same["max_abs_delta"] == pytest.approx(0.05)


def test_a_measurement_taken_under_other_work_is_kept_for_a_while_only(tiny_model, tmp_path, monkeypatch):
    """Timed while other work loaded the CPU: runs starting within PROVISIONAL_S share the choice
    (so concurrent runs agree), a run after that measures again; a calm measurement stays."""
    monkeypatch.setattr(P, "BUSY_SHARE", 0.25)
    path, calls = tmp_path / "precision.json", []
    now = {"t": 1000.0}
    monkeypatch.setattr(P.time, "time", lambda: now["t"])

    def run(share, model_id="m"):
        def fake_measure(*args, **kwargs):
            calls.append(1)
            return trials(fp32=(100, 0.0), bf16=(40, 0.001))

        return P.choose("auto", "cpu", model=tiny_model, preprocess=Preprocess(), to_score=to_score,
                        model_id=model_id, path=path, measurer=fake_measure, watch=lambda: (lambda: share))

    busy = run(0.6)
    assert (busy.precision, busy.how) == ("bf16", "measured") and "10 minutes only" in busy.describe()
    now["t"] += P.PROVISIONAL_S - 1
    assert run(0.6).how == "cached" and len(calls) == 1  # a run alongside agrees
    now["t"] += 2
    calm = run(0.1)  # its while is over: measured again, on a calm machine this time
    assert calm.how == "measured" and "only" not in calm.describe() and len(calls) == 2
    now["t"] += 10 * P.PROVISIONAL_S
    assert run(0.9).how == "cached" and len(calls) == 2
    unknown = run(None, model_id="other")  # where the load cannot be read, a measurement counts as calm
    assert unknown.how == "measured" and "only" not in unknown.describe()
    now["t"] += 10 * P.PROVISIONAL_S
    assert run(0.9, model_id="other").how == "cached" and len(calls) == 3


def test_the_contention_watch_counts_other_processes_work_only(monkeypatch):
    """Other work's share = (CPU seconds all processes used - this process's) / (wall x CPUs)."""
    clock = {"wall": 0.0, "own": 0.0, "all": 1000.0}
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(P.time, "process_time", lambda: clock["own"])
    share = P.contention_watch(lambda: (clock["all"], 4))
    clock.update(wall=2.0, own=3.0, all=1000.0 + 3.0 + 2.0)  # we used 3 s, others 2 s, of 8 CPU-seconds
    assert share() == pytest.approx(0.25)
    assert P.contention_watch(lambda: None)() is None
    counters = P._cpu_counters()
    assert counters is None or (counters[0] > 0 and counters[1] >= 1)
