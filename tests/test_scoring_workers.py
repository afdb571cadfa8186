"""On the CPU the workers decode and score, one torch thread each: the layout is chosen from the
CPUs, the memory and the user's own thread setting, and it changes no score and loses no row."""

from __future__ import annotations

import pytest

from loda_cli import scoring
from tests.imagetree import make_image_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(tmp_path_factory.mktemp("photos"))


@pytest.fixture
def no_thread_setting(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


def test_one_scoring_worker_per_cpu_when_memory_holds_them(monkeypatch, no_thread_setting):
    monkeypatch.setattr(scoring, "can_fork_workers", lambda: True)
    assert scoring.cpu_scoring_workers(cpus=2, memory_mb=8 * 1024) == 2
    assert scoring.cpu_scoring_workers(cpus=16, memory_mb=16 * scoring.WORKER_MEMORY_MB) == 16
    # Too little memory for one worker per CPU: cores would sit idle, so the threaded layout.
    assert scoring.cpu_scoring_workers(cpus=16, memory_mb=15 * scoring.WORKER_MEMORY_MB) == 0
    # One CPU: nothing to spread; the decoding worker overlaps the model as before.
    assert scoring.cpu_scoring_workers(cpus=1, memory_mb=8 * 1024) == 0
    # Memory unknown (no /proc/meminfo): one per CPU.
    monkeypatch.setattr(scoring, "available_memory_mb", lambda: None)
    assert scoring.cpu_scoring_workers(cpus=3) == 3


def test_no_scoring_workers_without_fork_or_against_a_users_thread_count(monkeypatch, no_thread_setting):
    monkeypatch.setattr(scoring, "can_fork_workers", lambda: False)
    assert scoring.cpu_scoring_workers(cpus=2, memory_mb=8192) == 0
    monkeypatch.setattr(scoring, "can_fork_workers", lambda: True)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert scoring.cpu_scoring_workers(cpus=2, memory_mb=8192) == 0


def test_available_memory_is_read_from_meminfo():
    mb = scoring.available_memory_mb()
    if mb is None:
        pytest.skip("no /proc/meminfo here")
    assert mb > 0


def test_scorer_layouts(tiny_checkpoint, monkeypatch, no_thread_setting):
    from loda_cli.scoring import Scorer, describe_layout

    monkeypatch.setattr(scoring, "cpu_scoring_workers", lambda: 2)
    monkeypatch.setattr(scoring, "can_fork_workers", lambda: True)
    default = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=False)
    assert (default.workers, default.score_in_workers, default.worker_threads) == (2, True, 1)
    assert describe_layout(default) == "2 workers decoding and scoring (1 thread each)"
    main_only = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=False, workers=0)
    assert (main_only.workers, main_only.score_in_workers) == (0, False)
    assert "no workers" in describe_layout(main_only)
    # Decoding on the device keeps the model in the main process.
    on_device = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=False, decode="device")
    assert not on_device.score_in_workers
    # A user's thread count keeps the threaded layout, also with --workers.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    threaded = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=False, workers=1)
    assert (threaded.workers, threaded.score_in_workers) == (1, False)
    monkeypatch.setattr(scoring, "cpu_scoring_workers", lambda: 0)
    fallback = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=False)
    assert not fallback.score_in_workers and fallback.workers == scoring.default_workers("cpu")


def test_precision_is_timed_with_the_workers_thread_count(tiny_checkpoint, monkeypatch, no_thread_setting):
    import torch

    import loda_cli.precision as precision

    seen = []
    real = precision.measure

    def measure(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(precision, "measure", measure)
    monkeypatch.setattr(scoring, "can_fork_workers", lambda: True)
    before = torch.get_num_threads()
    scorer = scoring.Scorer(str(tiny_checkpoint), device="cpu", cache=False, workers=2)
    assert seen == [1] and scorer.score_in_workers
    assert torch.get_num_threads() == before == scorer.threads  # the main process keeps its own


@pytest.mark.skipif(not scoring.can_fork_workers(), reason="scoring workers need fork (Linux)")
def test_scoring_in_workers_matches_the_main_process(tree, tiny_checkpoint, no_thread_setting):
    from loda_cli.scoring import Scorer

    main = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=False, workers=0)
    pool = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=False, workers=2)
    assert pool.score_in_workers and not main.score_in_workers
    a = {r.path: r for r in main.score_files([tree["root"]])}
    b = {r.path: r for r in pool.score_files([tree["root"]])}
    assert a.keys() == b.keys() == {str(p) for p in tree["good"]} | {str(p) for p in tree["bad"]}
    for path, row in a.items():
        other = b[path]
        assert (row.error is None) == (other.error is None), path
        if row.error is None:
            # The workers run each image's crops alone, the main process packs crops of several
            # images into one batch: the same arithmetic up to float rounding.
            assert other.raw == pytest.approx(row.raw, abs=1e-5)
            assert [c[:4] for c in other.crops] == [c[:4] for c in row.crops]
            assert [c[4] for c in other.crops] == pytest.approx([c[4] for c in row.crops], abs=1e-4)
            assert (other.width, other.height, other.look) == (row.width, row.height, row.look)
        else:
            assert other.error == row.error
    # The workers' model time reaches the summary; nothing is left for the main process.
    assert pool.times.forward > 0 and pool.times.h2d == 0
    assert pool.times.crops == main.times.crops and pool.times.decoded == main.times.decoded


@pytest.mark.skipif(not scoring.can_fork_workers(), reason="scoring workers need fork (Linux)")
def test_scoring_workers_fill_the_cache_for_the_next_run(tree, tiny_checkpoint, tmp_path, no_thread_setting):
    from loda_cli.scoring import Scorer

    cache = tmp_path / "cache.sqlite"
    first = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=cache, workers=2)
    rows = {r.path: r.raw for r in first.score_files([tree["root"]])}
    again = Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", cache=cache, workers=2)
    cached = {r.path: (r.raw, r.cached) for r in again.score_files([tree["root"]])}
    assert again.times.decoded == 0 and again.times.forward == 0
    assert {p: raw for p, (raw, _) in cached.items()} == rows
    assert all(hit for _, hit in cached.values())
