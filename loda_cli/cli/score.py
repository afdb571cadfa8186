"""`loda score`: ranked quality scores for every photo under the given paths."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loda_cli.cli.common import (check_score_cache, err_console, fail, handle_errors, measuring_precision_notice,
                                 own_folders_note, plural, print_precision_choice, shown, write_stdout_line)
from loda_cli.errors import NoImagesError, UsageError
from loda_cli.output import check_writable_output, mos_is_meaningful, output_format


def register(app: typer.Typer) -> None:
    app.command("score")(score)


def parse_shard(value: str | None) -> tuple[int, int]:
    if not value:
        return (0, 1)
    try:
        k, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise UsageError(f"--shard takes K/N, for example 0/4, not {value!r}") from None
    if not (n >= 1 and 0 <= k < n):
        raise UsageError(f"--shard {value}: K must be in 0..N-1")
    return (k, n)


def _distributed() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ.get("RANK", "0")), world


class _Counter(threading.Thread):
    """Counts the files in the background so the progress bar can show an ETA."""

    def __init__(self, paths, **walk_kw):
        super().__init__(daemon=True)
        self.paths, self.walk_kw, self.total = paths, walk_kw, None
        self._stop_event = threading.Event()

    def run(self) -> None:
        from loda_cli.images import iter_image_files

        n = 0
        for _ in iter_image_files(self.paths, **self.walk_kw):
            n += 1
            if self._stop_event.is_set():
                return
        self.total = n

    def stop(self) -> None:
        self._stop_event.set()


def _own_folder_globs(paths: list[Path]) -> tuple[tuple[str, ...], list[str]]:
    """Globs for the folders loda fills itself: every `_culled`, and the destinations of cull and
    sort runs not undone yet; and those of them that exist under ``paths``, for the summary.
    Naming such a folder as a path still scores it (a root is never matched against the globs)."""
    from loda_cli import organize

    globs = {organize.CULLED_DIRNAME}
    folders: list[str] = []
    roots = [p for p in paths if os.path.isdir(p)]
    for root in roots:
        culled = os.path.join(root, organize.CULLED_DIRNAME)
        if os.path.isdir(culled) and not os.path.islink(culled):
            folders.append(os.path.normpath(culled))
    for dest in organize.own_folders(roots):
        for root in roots:
            real = os.path.realpath(root)
            if organize.is_under(dest, real) and dest != real:
                relative = os.path.relpath(dest, real)
                globs.add(organize.glob_escape(relative))
                shown_as = os.path.normpath(os.path.join(root, relative))
                if os.path.isdir(dest) and shown_as not in folders:
                    folders.append(shown_as)
    return tuple(sorted(globs)), folders


def _check_some_image(paths: list[Path], walk_kw: dict, own_folders: list[str]) -> None:
    """Fail before torch and the model load (seconds) when there is nothing to score."""
    from loda_cli.images import iter_image_files

    skipped: list = []
    found = iter_image_files(paths, **walk_kw, on_skip=skipped.append)
    try:
        if next(found, None) is not None:
            return
    finally:
        found.close()
    for notice in skipped[:5]:
        err_console.print(f"skipped {shown(str(notice.path))}: {notice.reason}", markup=False)
    if own_folders:
        err_console.print(own_folders_note(own_folders, "scored"), markup=False, soft_wrap=True)
    raise NoImagesError(f"no image files found under {', '.join(str(p) for p in paths)}")


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


@handle_errors
def score(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Photo files or folders (default: the current folder).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Write ranked scores to a .csv, .json or .jsonl file, or - for JSONL on stdout (streamed in completion order, so those rows carry no rank).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint: a file, a name in $LODA_HOME, or a manifest name. Default: the best available.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into subfolders.")] = True,
    include: Annotated[Optional[list[str]], typer.Option(help="Only files matching this glob (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Skip files matching this glob (repeatable).")] = None,
    crops: Annotated[Optional[int], typer.Option(help="Crops per image (default: the checkpoint's, 15 for paper models).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Crops per forward pass.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes. On the CPU each decodes and scores its own photos with one thread (default: one per CPU); with a GPU they decode (default: the CPUs less one, at most 8). 0 does everything in the main process.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16, fp16 or int8 (auto: on the CPU the fastest that agrees with fp32 "
                                          "within 0.005, measured once per model and machine; bf16/fp16 on GPUs).")] = "auto",
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse and store scores in $LODA_HOME/cache.sqlite.")] = True,
    shard: Annotated[Optional[str], typer.Option(help="Score only shard K of N (K/N), for job arrays.")] = None,
    decode_timeout: Annotated[float, typer.Option(help="Seconds one image may take to decode before it becomes an error row.")] = 10.0,
    decode: Annotated[str, typer.Option(help="Where JPEGs decode: auto (on the GPU with nvJPEG when scoring on CUDA), cpu, or device.")] = "auto",
    groups: Annotated[bool, typer.Option("--groups/--no-groups", help="Group bursts and near-duplicates (columns group, rank_in_group).")] = True,
    burst_gap: Annotated[float, typer.Option(help="Seconds between frames of one camera that can still be one burst (EXIF capture time).")] = 2.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, notices or summary.")] = False,
) -> None:
    """Score the technical quality of every photo; rows are ranked best first, failures last.

    Example: loda score ~/Photos --out scores.csv
    """
    from loda_cli.bursts import check_burst_gap

    paths = paths or [Path(".")]
    _check_out(out)
    check_burst_gap(burst_gap)
    shard_k, shard_n = parse_shard(shard)
    dist = _distributed()
    if dist is not None:
        shard_k, shard_n, device, quiet = _under_torchrun(dist, shard, device, quiet)
    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"no such file or directory: {p}")
    own_globs, own_folders = _own_folder_globs(paths)
    walk_kw = dict(recursive=recursive, include=tuple(include or ()), exclude=tuple(exclude or ()) + own_globs)
    if model is not None:
        from loda_cli.weights import resolve_model

        resolve_model(model)  # a mistyped --model is named first, and without torch
    _check_some_image(paths, walk_kw, own_folders)
    from loda_cli.scoring import check_options

    check_options(precision=precision, decode=decode, crops=crops, batch_size=batch_size, workers=workers)
    start = time.monotonic()
    # A tree whose every photo is in the cache needs no model: its rows come from the cache
    # without importing torch or loading weights (seconds). Options that change what a score is
    # (--crops), which files a run holds (--shard, torchrun) or that ask for a device to be
    # checked (cuda, mps) take the normal path, which also reads the cache.
    if cache:
        check_score_cache()
    from_cache = split = None
    if cache and not shard and dist is None and crops is None and device in ("auto", "cpu"):
        from_cache, split = _scores_from_cache(model, paths, walk_kw, groups, quiet,
                                               crops=out is not None and output_format(out) != "csv")
    read_seconds = None
    if from_cache is not None:
        scorer, rows, skipped = from_cache
        interrupted = False
        if out == "-":
            from loda_cli.output import JsonlStream

            stream = JsonlStream(sys.stdout)
            for row in rows:
                stream.write(row)
    else:
        try:
            scorer = _open_scorer(
                model, device=device, precision=precision, crops=crops, batch_size=batch_size,
                workers=workers, cache=cache, decode_timeout=decode_timeout, quiet=quiet, groups=groups,
                decode=decode,
            )
        except KeyboardInterrupt:
            kept = f"; {out} was not written" if out not in (None, "-") else ""
            err_console.print(f"interrupted while the model loaded, before any photo was scored{kept}.",
                              style="yellow", soft_wrap=True)
            raise typer.Exit(130) from None
        # The cache pass counts as this run's work; loading the model does not.
        start = time.monotonic() - (split.seconds if split is not None else 0.0)
        rows, skipped, interrupted, read_seconds = _score_all(scorer, paths, walk_kw, (shard_k, shard_n), out,
                                                              quiet, split)
    if dist is not None:
        rows = _gather_rows(rows)
        if dist[0] != 0:
            return
    # A --shard holds every n-th file, a fraction of each burst: its group columns stay empty.
    # The looks are cached all the same, so scoring the whole tree afterwards groups from the cache.
    grouped = groups and not shard
    if grouped:
        from loda_cli.bursts import assign_groups

        assign_groups(rows, burst_gap=burst_gap)
    elapsed = time.monotonic() - start
    if not rows and not interrupted:
        for path, reason in skipped[:5]:
            err_console.print(f"skipped {shown(path)}: {reason}", markup=False)
        raise NoImagesError(f"no image files found under {', '.join(str(p) for p in paths)}")
    _write_rows(out, rows, scorer, paths, elapsed, interrupted, burst_gap if grouped else None)
    if not quiet:
        _summary(scorer, rows, skipped, elapsed, out, read_seconds)
        if own_folders:
            err_console.print(own_folders_note(own_folders, "scored"), markup=False, soft_wrap=True)
    if interrupted:
        _report_interrupted(rows, out, cache)
        raise typer.Exit(130)
    if all(row.error is not None for row in rows):
        # Each file is a row with its error, and the output is written; but a run that scored
        # nothing did not do its job (`loda score broken.jpg && ...` must not go on).
        raise fail("no file could be scored" if len(rows) > 1 else "the file could not be scored")


def _check_out(out: str | None) -> None:
    """Refuse a bad --out before any work: an unknown suffix, or a folder that cannot take it."""
    from loda_cli.output import output_format

    if out is not None:
        output_format(out)
        if out != "-":
            check_writable_output(out)


def _under_torchrun(dist: tuple[int, int], shard: str | None, device: str, quiet: bool) -> tuple[int, int, str, bool]:
    """Under torchrun each rank scores its own shard, on its own GPU; only rank 0 talks."""
    if shard:
        raise UsageError("--shard cannot be combined with torchrun; each rank takes its own shard")
    shard_k, shard_n = dist
    if dist[0] != 0:
        quiet = True
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return shard_k, shard_n, device, quiet


def _open_scorer(model: str | None, *, quiet: bool, **scorer_kw: Any):
    """The Scorer, and a note when the built-in model (not a paper model) does the scoring."""
    from loda_cli.scoring import Scorer

    scorer = Scorer(model, **scorer_kw, on_measure_precision=None if quiet else measuring_precision_notice)
    if not quiet:
        _note_builtin(scorer.loaded, model)
    return scorer


def _note_builtin(loaded, model: str | None) -> None:
    if loaded.builtin:
        trained_on = str(loaded.metadata.get("description") or "not a paper model").split(". ")[0]
        err_console.print(
            f"note: using the built-in model {loaded.name!r} ({trained_on}). Train or import a real "
            "checkpoint for research-grade scores: see `loda weights`.",
            style="yellow", soft_wrap=True,
        )
        if model is None:
            _note_passed_over_checkpoints()


@dataclass
class _CachedRun:
    """What the header and the summary say of a run that took every row from the cache: the
    checkpoint, and no device or precision (nothing ran)."""

    loaded: Any
    device: None = None
    precision: None = None
    precision_choice: None = None

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def model_id(self) -> str:
        return self.loaded.sha256

    @property
    def preprocess(self) -> Any:
        return self.loaded.preprocess


def _scores_from_cache(model: str | None, paths, walk_kw: dict[str, Any], groups: bool, quiet: bool,
                       crops: bool = True):
    """((run, rows, skipped), split) when the cache answers every file; else (None, the cache's
    pass for the scorer to go on from), or (None, None) when there is no cache. ``crops``:
    whether the output writes each crop's score (JSON, JSONL); without them the cached rows
    leave them unread (a third of the time of 40,000 cached rows)."""
    from loda_cli.cache import default_cache_path
    from loda_cli.cachelookup import cache_split, rows_of
    from loda_cli.weights import load_model_info

    cache_path = default_cache_path()
    if not cache_path.is_file():
        return None, None
    loaded = load_model_info(model)
    with _reading_cache(quiet):
        split = cache_split(paths, loaded, cache_path=cache_path, groups=groups, crops=crops, **walk_kw)
    if split is None or split.pending:
        return None, split  # (None: the scorer decides, after bringing an older cache up to date)
    rows = rows_of(split, loaded.calibration)
    if not mos_is_meaningful(loaded.calibration, loaded.metadata):
        for row in rows:
            row.mos = None  # as _score_all does
    if not quiet:
        _note_builtin(loaded, model)
    return (_CachedRun(loaded), rows, split.skipped), split


def _reading_cache(quiet: bool):
    return contextlib.nullcontext() if quiet else err_console.status("reading the score cache", spinner="dots")


def _note_passed_over_checkpoints() -> None:
    from loda_cli.weights import builtin_srcc, home_checkpoints_below_builtin, list_models

    entries = list_models()
    below = home_checkpoints_below_builtin(entries)
    if below:
        names = ", ".join(f"{name} (test SRCC {srcc:.3f})" for name, srcc in below[:3])
        more = f" and {len(below) - 3} more" if len(below) > 3 else ""
        err_console.print(
            f"note: not used by default, below the built-in model's cross-validated SRCC "
            f"{builtin_srcc(entries):.3f}: {names}{more}; --model NAME uses one.",
            style="yellow", soft_wrap=True, markup=False,
        )


def _score_all(scorer, paths, walk_kw: dict[str, Any], shard: tuple[int, int], out: str | None, quiet: bool,
               split=None):
    """Every row (JSONL streamed to stdout with --out -), the skipped paths, whether Ctrl-C or
    SIGTERM stopped the run (what was scored by then is kept, and cached), and the seconds spent
    on the files the cache did not answer (None without the cache). ``split``: the cache's pass
    over these paths, when made already (:func:`_scores_from_cache`)."""
    from loda_cli.output import JsonlStream

    stream = JsonlStream(sys.stdout) if out == "-" else None
    keep_mos = mos_is_meaningful(scorer.loaded.calibration, scorer.loaded.metadata)
    rows: list[Any] = []
    skipped: list[tuple[str, str]] = []
    interrupted = False
    previous_term = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    counter = None
    progress = None
    read_started: float | None = None
    failed_before = 0
    try:
        if scorer.cache_path and (split is None or not split.answers(scorer.scan_spec(paths, **walk_kw, shard=shard))):
            with _reading_cache(quiet):
                split = scorer.split_by_cache(paths, **walk_kw, shard=shard)
        if split is None:
            counter = _Counter(paths, **walk_kw)  # the bar's total, while the workers walk too
        elif split.done and split.pending and not quiet:
            err_console.print(f"{plural(len(split.done), 'file')} from the score cache; "
                              f"{plural(len(split.pending), 'file')} to read", markup=False, soft_wrap=True)
        # The bar counts the files read in this run, from when the cached rows are out: they
        # come at once and would make its rate and its eta meaningless.
        before = len(split.done) if split is not None else 0
        # Not in a log or a pipe: rich draws no bar there, and a transient one left an empty line.
        progress = None if quiet or not err_console.is_terminal else _progress()
        task = None

        def reading() -> None:
            nonlocal read_started, task, failed_before
            read_started = time.monotonic()
            failed_before = scorer.times.failed
            if progress is not None:
                if counter is not None:
                    counter.start()
                progress.start()
                task = progress.add_task("scoring", total=len(split.pending) if split is not None else None, errors=0)

        generator = scorer.score_files(
            paths, **walk_kw, shard=shard, on_skip=lambda p, r: skipped.append((p, r)), split=split,
            cache_pass=split is not None,  # tried above: not worth it (or no cache)
        )
        try:
            if before == 0:
                reading()
            for row in generator:
                if not keep_mos:
                    row.mos = None  # it would only repeat score (see "What a score means")
                rows.append(row)
                if stream is not None:
                    stream.write(row)
                if len(rows) == before:
                    reading()
                elif task is not None and len(rows) > before:
                    update: dict[str, Any] = {}
                    if counter is not None and counter.total is not None:
                        update["total"] = (counter.total + shard[1] - 1) // shard[1]
                    progress.update(task, completed=len(rows) - before, errors=scorer.times.failed - failed_before,
                                    **update)
        finally:
            generator.close()  # flushes the cache, also on Ctrl-C
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if counter is not None:
            counter.stop()
        if progress is not None:
            progress.stop()
    read_seconds = None
    if split is not None and split.pending and read_started is not None:
        read_seconds = time.monotonic() - read_started
    return rows, skipped, interrupted, read_seconds


def _write_rows(out: str | None, rows, scorer, paths, elapsed: float, interrupted: bool, burst_gap=None) -> None:
    """The ranked rows to the --out file, or as lines on stdout without --out (--out - streamed
    them already)."""
    from loda_cli.output import ranked_records, write_scores

    if interrupted and not rows:
        return  # stopped before any row: an --out file from an earlier run stays as it was
    if out is not None and out != "-":
        header = _header(scorer, paths, elapsed, interrupted)
        header["burst_gap"] = burst_gap  # None: grouping was off (--no-groups)
        write_scores(out, rows, header)
    elif out is None:
        for rec in ranked_records(rows):
            score_text = f"{rec['score']:.4f}" if rec["score"] is not None else "error"
            line = f"{score_text}\t{rec['path']}" + (f"\t{rec['error']}" if rec["error"] else "")
            write_stdout_line(line)


def _report_interrupted(rows, out: str | None, cached: bool) -> None:
    partial = ""
    if out is not None and out != "-" and not rows:
        partial = f" {out} was not written."
    elif out is not None and out != "-":
        partial = (
            f" {out} holds only those rows (a .json says \"complete\": false; a .csv has no "
            "marker, so trust this line)."
        )
    if cached:
        done = f"{plural(len(rows), 'image')} done and cached; run the same command again to finish."
    else:
        # Nothing was kept: the same command would start over.
        done = f"{plural(len(rows), 'image')} done, not cached (--no-cache); a rerun scores every file again."
    err_console.print(f"interrupted: {done}{partial}", style="yellow", soft_wrap=True)


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class RateColumn(TextColumn):
        def __init__(self):
            super().__init__("")

        def render(self, task):
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} img/s" if speed else "- img/s")

    return Progress(
        TextColumn("[bold]scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def _header(scorer, paths, elapsed: float, interrupted: bool) -> dict[str, Any]:
    from loda_cli import __version__

    return {
        "model": scorer.name,
        "checkpoint_sha256": scorer.model_id,
        "builtin_model": scorer.loaded.builtin,
        "preprocess": scorer.preprocess.to_dict(),
        "device": scorer.device,
        "precision": scorer.precision,
        # Both None when every row came from the cache: nothing ran.
        "precision_choice": scorer.precision_choice.as_dict() if scorer.precision_choice is not None else None,
        "roots": [os.fsdecode(p) for p in paths],
        "cwd": os.getcwd(),  # what relative paths in the rows are relative to
        "loda_version": __version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(elapsed, 3),
        "complete": not interrupted,
        "score": "quality in [0, 1], higher is better (the checkpoint's calibration of raw)",
    }


def summary_counts(rows, elapsed: float, read_seconds: float | None = None) -> str:
    """The first summary line's counts: scored now + from cache + failed = files found, and a rate
    only for the work done in this run (cached rows cost nothing), over ``read_seconds`` (the
    time spent on those files) where known, else over the whole run."""
    scored = [r for r in rows if r.error is None and r.score is not None]
    cached = sum(1 for r in scored if r.cached)
    failed = len(rows) - len(scored)
    worked = sum(1 for r in rows if not r.cached)
    parts = [f"{len(scored) - cached} scored now"]
    if cached:
        parts.append(f"{cached} from cache")
    parts.append(f"{failed} failed")
    text = f"{plural(len(rows), 'file')}: " + ", ".join(parts) + f" in {elapsed:.1f} s"
    seconds = read_seconds if read_seconds is not None else elapsed
    if worked and seconds > 0:
        text += f" ({worked / seconds:.2f} img/s for the {plural(worked, 'file')} read now)"
    return text


def _summary(scorer, rows, skipped, elapsed: float, out: str | None, read_seconds: float | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from loda_cli.cli.common import middle_ellipsis
    from loda_cli.images import LINKED_DUPLICATE_REASON, UNKNOWN_EXTENSION_REASON
    from loda_cli.output import rank_rows

    ranked = rank_rows(rows)
    good = [r for r in ranked if r.error is None and r.score is not None]
    failed = ranked[len(good):]  # rank_rows puts every failure after the scored rows
    unknown = Counter(
        reason.rsplit(" ", 1)[-1] for _, reason in skipped if reason.startswith(UNKNOWN_EXTENSION_REASON)
    )
    # A link to a photo scored under its real path (a folder of favourites, say) is not a problem.
    links = sum(1 for _, r in skipped if r == LINKED_DUPLICATE_REASON)
    other_skips = [(p, r) for p, r in skipped
                   if not r.startswith(UNKNOWN_EXTENSION_REASON) and r != LINKED_DUPLICATE_REASON]
    ran = f"{scorer.device} {scorer.precision}, " if scorer.device is not None else "all from the cache, "
    err_console.print(
        summary_counts(rows, elapsed, read_seconds)
        + (f", {plural(len(other_skips), 'path')} skipped" if other_skips else "")
        + f"; {ran}model {scorer.name}",
        markup=False, soft_wrap=True,
    )
    if scorer.precision_choice is not None:
        print_precision_choice(scorer.precision_choice)
    if unknown:
        kinds = ", ".join(f"{ext} ({n})" for ext, n in unknown.most_common())
        err_console.print(
            f"{plural(sum(unknown.values()), 'file')} skipped: image formats loda does not read: {kinds}",
            markup=False, soft_wrap=True,
        )
    if good:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("", style="dim")
        table.add_column("score", justify="right")
        table.add_column("path", overflow="fold")
        # In a terminal a long path loses its middle, never its file name; in a log it stays whole.
        room = max(20, err_console.width - 16) if err_console.is_terminal else 10**6
        for label, subset in (("best", good[:5]), ("worst", good[5:][-5:][::-1])):
            for r in subset:
                table.add_row(label, f"{r.score:.3f}", escape(middle_ellipsis(shown(r.path), room)))
        err_console.print(table)
    for r in failed[:5]:
        err_console.print(f"[red]failed[/] {escape(shown(r.path))}: {escape(r.error or '')}", soft_wrap=True)
    if len(failed) > 5:
        err_console.print(f"... and {len(failed) - 5} more failures" + (f" (see {out})" if out and out != "-" else ""))
    for path, reason in other_skips[:3]:
        err_console.print(f"[dim]skipped {escape(shown(path))}: {escape(reason)}[/]", soft_wrap=True)
    if links:
        err_console.print(f"[dim]{plural(links, 'link')} to photos scored under their real paths, not again[/]",
                          soft_wrap=True)
    _groups_summary(rows)
    warned = sum(1 for r in rows if r.warnings)
    if warned:
        err_console.print(f"[dim]{plural(warned, 'file')} raised decoder warnings (decoded anyway)[/]")
    if out and out != "-":
        err_console.print(f"wrote {out}", markup=False, soft_wrap=True)


def _groups_summary(rows) -> None:
    """One line on the bursts found: how many groups of two or more, holding how many photos."""
    sizes = Counter(r.group for r in rows if r.group is not None)
    bursts = [n for n in sizes.values() if n > 1]
    if bursts:
        err_console.print(
            f"groups: {plural(len(bursts), 'burst or near-duplicate set', 'bursts or near-duplicate sets')} "
            "of 2 or more "
            f"({plural(sum(bursts), 'photo')}; `loda cull --bursts` keeps the best of each)"
            + (f", {plural(singles, 'single photo')}" if (singles := len(sizes) - len(bursts)) else ""),
            markup=False, soft_wrap=True,
        )


def _gather_rows(rows: list[Any]) -> list[Any]:
    """Under torchrun: every rank's rows to rank 0, which writes the one merged output."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    gathered: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None  # type: ignore[assignment]
    dist.gather_object(rows, gathered, dst=0)
    merged = [r for part in gathered for r in part] if dist.get_rank() == 0 else []
    dist.destroy_process_group()
    return merged
