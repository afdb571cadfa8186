"""`loda data`: inspect, check, prepare and split the IQA datasets. No torch is imported here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from loda_cli import datasets
from loda_cli.cli.common import announce_generation, err_console, fail, handle_errors, out_console

data_app = typer.Typer(
    help="Inspect, check, prepare (resize once to 384) and split the IQA datasets.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

SHOWN = 20  # names listed per problem kind before "... and N more"

DatasetArg = Annotated[str, typer.Argument(help="Dataset name: koniq10k, kadid10k, spaq, live, livec, tid2013, flive or csv.")]
DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", help="The dataset folder (for csv: the CSV file or its folder). Default: $LODA_DATA/<name> or ~/datasets/<name>."),
]
PathColumnOpt = Annotated[Optional[str], typer.Option("--path-column", help="csv only: the column holding image paths (default: auto-detect).")]
MosColumnOpt = Annotated[Optional[str], typer.Option("--mos-column", help="csv only: the column holding the labels (default: auto-detect).")]
LowerBetterOpt = Annotated[
    Optional[bool], typer.Option("--lower-better/--higher-better", help="csv only: the labels' direction (default: higher is better).")
]


def _spec(name: str, path_column: Optional[str] = None, mos_column: Optional[str] = None, lower_better: Optional[bool] = None) -> datasets.DatasetSpec:
    spec = datasets.resolve_dataset(name)
    if spec.name == "csv":
        return datasets.csv_spec(path_column=path_column, mos_column=mos_column, lower_better=lower_better)
    return spec


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    )


def _list(title: str, entries: list[str]) -> None:
    err_console.print(f"[bold]{title}[/] ({len(entries)}):")
    for entry in entries[:SHOWN]:
        err_console.print(f"  {entry}", markup=False, soft_wrap=True)
    if len(entries) > SHOWN:
        err_console.print(f"  ... and {len(entries) - SHOWN} more")


@data_app.command("check")
@handle_errors
def check(
    dataset: DatasetArg,
    data: DataOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Processes decoding images (default: all cores).")] = None,
    path_column: PathColumnOpt = None,
    mos_column: MosColumnOpt = None,
    lower_better: LowerBetterOpt = None,
) -> None:
    """Check the label file and that every listed image exists and decodes."""
    spec = _spec(dataset, path_column, mos_column, lower_better)
    root = datasets.dataset_root(spec, data)
    announce_generation(spec, root)
    _check(spec, root, workers)


def _check(spec: datasets.DatasetSpec, root: Path, workers: Optional[int]) -> None:
    """`loda data check`'s work and report; raises the one-line failure when anything is wrong."""
    with _progress() as progress:
        task = progress.add_task(f"checking {spec.name}", total=None)
        report = datasets.check_dataset(
            spec, root, workers=workers, progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    if report.label_error is not None:
        raise fail(report.label_error)
    err_console.print(f"[bold]{escape(spec.title)}[/] at {escape(str(root))}", soft_wrap=True)
    err_console.print(f"  label file: {report.label_file}", markup=False, soft_wrap=True)
    expected = f" (published: {report.expected_count})" if report.expected_count is not None else ""
    err_console.print(f"  labelled images: {report.n_labels}{expected}")
    if not report.count_matches:
        err_console.print(f"  [yellow]warning:[/] {report.n_labels} labelled images, the published dataset has {report.expected_count}")
    good = report.n_labels - len(report.missing) - len(report.broken)
    err_console.print(f"  decoded fine: {good}; missing: {len(report.missing)}; broken: {len(report.broken)}")
    if report.missing:
        _list("missing", report.missing)
    if report.broken:
        _list("broken", [f"{name}: {reason}" for name, reason in report.broken])
    if report.duplicates:
        _list("listed more than once", report.duplicates)
    if not report.ok:
        raise fail(report.summary())
    err_console.print("[green]ok[/]")


@data_app.command("download")
@handle_errors
def download(
    dataset: DatasetArg,
    data: Annotated[Optional[Path], typer.Option("--data", help="Where the dataset goes (default: $LODA_DATA/<name> or ~/datasets/<name>, where loda train looks).")] = None,
    url: Annotated[Optional[str], typer.Option("--url", help="A mirror: the archive's URL, or a folder URL (or local path) holding the archives by their official names. Default: $LODA_DATA_URL_<NAME>, else the official URL.")] = None,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Times a transfer that stops part way is resumed before giving up.")] = 3,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Processes decoding images in the final check (default: all cores).")] = None,
) -> None:
    """Fetch a dataset with a public direct download (KADID-10k, KonIQ-10k, TID2013), verify and unpack it, then check it.

    Resumes where an interrupted run stopped; a rerun after success does nothing. The other
    datasets have no direct download: it says where to get them and the layout to unpack.
    """
    fetch_and_check(datasets.resolve_dataset(dataset), data, url=url, retries=retries, workers=workers)


def fetch_and_check(spec: datasets.DatasetSpec, data: Optional[Path], url: Optional[str] = None, retries: int = 3,
                    workers: Optional[int] = None) -> Path:
    """Download what is missing of ``spec`` into ``data`` (default $LODA_DATA/<name>), then run
    `loda data check` on it once; returns the dataset folder. Shared with `loda train --download`."""
    from loda_cli import download as dl

    plan = dl.plan(spec, data, url)
    if plan.state == "done":
        err_console.print(f"{spec.name}: already downloaded and checked in {plan.dest}; nothing to do",
                          markup=False, soft_wrap=True)
        return plan.dest
    if plan.state == "present":
        err_console.print(f"{plan.dest} already holds {spec.title}, not downloaded by loda, so left as it is; "
                          f"check it with: loda data check {spec.name} --data {plan.dest}", markup=False, soft_wrap=True)
        return plan.dest
    if plan.state == "missing":
        err_console.print(f"{spec.title}: {plan.describe()} into {plan.dest}",
                          markup=False, soft_wrap=True)
        view = DownloadView()
        try:
            dl.fetch(plan, view, retries=retries)
        finally:
            view.close()
    _check(spec, plan.dest, workers)
    dl.mark_checked(plan.dest)
    return plan.dest


class DownloadView:
    """Draws ``loda_cli.download`` events: a bar with bytes, rate and time left in a terminal, and
    one line per file and stage everywhere."""

    def __init__(self) -> None:
        self.progress: Optional[Progress] = None
        self.task = None

    def _bar(self, description: str, total: Optional[int], completed: int = 0) -> None:
        from rich.progress import DownloadColumn, TransferSpeedColumn

        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal,
            )
            self.progress.start()
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total, completed=completed)

    def __call__(self, kind: str, d: dict) -> None:
        from loda_cli.download import human_size

        if kind == "download":
            resumed = f", resuming at {human_size(d['start'])}" if d["start"] else ""
            self._line(f"downloading {d['url']} ({human_size(d['total'])}{resumed})")
            self._bar(d["file"], d["total"], d["start"])
        elif kind in ("bytes", "verify") and self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=d["done"], total=d["total"])
        elif kind == "unpack":
            how = f" with {d['tool']}" if d.get("tool") else ""
            self._line(f"unpacking {d['file']}{how} ({d['entries']:,} entries, {human_size(d['total'])})"
                       if d["total"] is not None else f"unpacking {d['file']}{how} ({d['entries']:,} entries)")
            self._bar(f"unpacking {d['file']}", d["total"])
        elif kind == "retry":
            self._line(f"{d['reason']}; resuming in {d['wait']} s (retry {d['attempt']} of {d['retries']})")
        elif kind == "notice":
            self._line(d["message"])

    def _line(self, text: str) -> None:
        (self.progress.console if self.progress is not None else err_console).print(text, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@data_app.command("prepare")
@handle_errors
def prepare(
    dataset: DatasetArg,
    data: DataOpt = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Processes resizing images (default: all cores).")] = None,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Where the resized images go (default: <data>/.loda-prepared-384).")] = None,
    path_column: PathColumnOpt = None,
    mos_column: MosColumnOpt = None,
    lower_better: LowerBetterOpt = None,
) -> None:
    """Resize every image once so its shorter side is 384 (the paper's preparation); resumable."""
    spec = _spec(dataset, path_column, mos_column, lower_better)
    root = datasets.dataset_root(spec, data)
    announce_generation(spec, root)
    with _progress() as progress:
        task = progress.add_task(f"preparing {spec.name}", total=None)
        report = datasets.prepare_dataset(
            spec, root, cache_dir=cache, workers=workers,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    err_console.print(
        f"{spec.name}: {report.written} resized, {report.skipped} already prepared, "
        f"{len(report.failed)} failed, in {report.cache_dir}",
        markup=False,
        soft_wrap=True,
    )
    if report.failed:
        _list("failed", [f"{name}: {reason}" for name, reason in report.failed])
        raise fail(f"{spec.name}: {len(report.failed)} of {report.total} images could not be prepared")


@data_app.command("splits")
@handle_errors
def splits(
    dataset: DatasetArg,
    data: DataOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split shuffles (the paper's is 3407).")] = datasets.DEFAULT_SEED,
    n_splits: Annotated[int, typer.Option("--splits", min=1, help="How many 80/20 splits.")] = 10,
    train_fraction: Annotated[float, typer.Option("--train-fraction", help="Keep this fraction of each training split (paper Table 5).")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the splits as JSON (image names) on stdout.")] = False,
    path_column: PathColumnOpt = None,
    mos_column: MosColumnOpt = None,
    lower_better: LowerBetterOpt = None,
) -> None:
    """Show the paper's train/test splits. Reads the label files only, never the images."""
    spec = _spec(dataset, path_column, mos_column, lower_better)
    root = datasets.dataset_root(spec, data)
    announce_generation(spec, root)
    labels = datasets.read_labels(spec, root)
    result = datasets.make_splits(labels, spec, seed=seed, n_splits=n_splits, train_fraction=train_fraction)
    if as_json:
        document = datasets.splits_to_json(labels, result, spec.name, seed, train_fraction)
        sys.stdout.write(json.dumps(document, indent=1) + "\n")
        return
    by = "reference image" if labels.kind == "synthetic" else "image"
    table = Table(title=f"{spec.name}: {n_splits} splits by {by}, seed {seed}")
    for column in ("split", "train", "test"):
        table.add_column(column, justify="right")
    if labels.kind == "synthetic":
        table.add_column("test references", justify="left")
    for i, split in enumerate(result):
        row = [str(i), str(len(split.train)), str(len(split.test))]
        if labels.kind == "synthetic":
            refs = sorted({labels.items[j].ref or "" for j in split.test})
            row.append(", ".join(refs[:6]) + (f" (+{len(refs) - 6})" if len(refs) > 6 else ""))
        table.add_row(*row)
    out_console.print(table)


@data_app.command("info")
@handle_errors
def info(dataset: DatasetArg) -> None:
    """What loda knows about a dataset: scale, direction, layout, crops, where it is published."""
    spec = datasets.resolve_dataset(dataset)
    table = Table(show_header=False, title=spec.title)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    scale = f"{spec.scale[0]:g} to {spec.scale[1]:g}" if spec.scale else "taken from the labels"
    rows = [
        ("name", spec.name + (f" (aliases: {', '.join(spec.aliases)})" if spec.aliases else "")),
        ("labels", f"{scale}, {spec.direction}"),
        ("split", "by reference image" if spec.kind == "synthetic" else "by image (80/20)"),
        ("images", str(spec.expected_count) if spec.expected_count else "any number"),
        ("training crops per image", str(spec.crops_per_image)),
        ("preparation", f"shorter side 384, {spec.interpolation}" + (", EXIF-transposed first" if spec.exif_transpose else "")),
        ("layout", spec.layout),
        ("published at", spec.homepage or "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out_console.print(table)


def register(app: typer.Typer) -> None:
    """Add `loda data ...` to the root app."""
    app.add_typer(data_app, name="data")
