"""`loda benchmark DATASET` / `loda benchmark --table N`: the accuracy side of `loda benchmark`.

Thin: it turns options into :class:`~loda_cli.benchmark.BenchmarkSettings`, draws progress on
stderr, writes the results and prints the Markdown table (or JSON) on stdout. Everything else is
in :mod:`loda_cli.benchmark`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from loda_cli.cli.common import err_console, plural


def run_accuracy(
    *,
    target: Optional[str],
    data: Optional[Path],
    splits: str,
    checkpoints: Optional[Path],
    train_first: bool,
    test_on: Optional[str],
    test_data: Optional[Path],
    table: Optional[int],
    data_root: Optional[Path],
    results: Path,
    by_distortion: bool,
    dry_run: bool,
    deterministic_crops: bool,
    epochs: Optional[int],
    vit: Optional[str],
    cnn: Optional[str],
    vit_depth: Optional[int],
    no_pretrained: bool,
    batch_size: Optional[int],
    device: str,
    precision: str,
    workers: Optional[int],
    as_json: bool,
    crops: int = 15,
) -> None:
    """``loda benchmark``'s accuracy path. ``crops`` is the number of test crops per image (the
    paper's 15); a TARGET given with ``--table`` restricts the table to that dataset."""
    from loda_cli import benchmark as bm
    from loda_cli.errors import UsageError

    settings = bm.BenchmarkSettings(
        data_root=data_root, checkpoints=checkpoints, results=results, train=train_first,
        deterministic_crops=deterministic_crops, by_distortion=by_distortion, epochs=epochs,
        batch_size=batch_size, cnn=cnn, pretrained=not no_pretrained, device=device,
        precision=precision, workers=workers, test_crops=crops,
    )
    if crops < 1:
        raise UsageError("--crops must be at least 1")
    if vit or vit_depth:
        settings.vit = vit
        # A replacement ViT must still take the 224 crops, whatever its own default size.
        settings.vit_kwargs = ({"img_size": 224} if vit else {}) | ({"depth": vit_depth} if vit_depth else {})
    if epochs is not None and epochs < 1:
        raise UsageError("--epochs must be at least 1")
    split_list = bm.parse_splits(splits)

    if table is not None:
        if test_on or test_data:
            raise UsageError("--test-on belongs to a single-dataset benchmark; Table 2 is --table 2")
        if data is not None:
            raise UsageError("--table reads every dataset from --data-root ROOT/<name>; --data is for one dataset")
        plan = bm.plan_table(table, split_list, settings, datasets=[target] if target else None)
    else:
        if target is None:
            raise UsageError("name a dataset (kadid, koniq, ...) or a --table")
        canonical = bm.canonical_name(target)
        if data is not None:
            settings.data[canonical] = data
        if test_data is not None:
            if not test_on:
                raise UsageError("--test-data needs --test-on DATASET")
            settings.data[bm.canonical_name(test_on)] = test_data
        plan = bm.plan_dataset(target, split_list, settings, test_on=test_on)
    if not plan.runs:
        raise UsageError(f"{plan.name}: nothing to run for {target!r}")

    if dry_run:
        _print_dry_run(plan, as_json)
        return
    reporter = _Progress(len(plan.runs))
    try:
        report = bm.execute(plan, reporter)
    finally:
        reporter.close()
    paths = bm.write_report(report)
    for run_id, reason in report.skipped.items():
        err_console.print(f"skipped {run_id}: {reason}", markup=False, soft_wrap=True)
    err_console.print(f"results: {paths['markdown']} and {paths['json']}", markup=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=1) + "\n")
    else:
        sys.stdout.write(bm.render_markdown(report))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _print_dry_run(plan, as_json: bool) -> None:
    from loda_cli import benchmark as bm

    rows, totals = bm.dry_run(plan)
    if as_json:
        payload = {"name": plan.name, "title": plan.title, "splits": plan.splits, "totals": totals,
                   "runs": [{**row.run.describe(), "status": row.status, "seconds": round(row.seconds, 1),
                             **({"reason": row.reason} if row.reason else {})}
                            for row in rows]}
        sys.stdout.write(json.dumps(payload, indent=1) + "\n")
        return
    width = max(len(row.run.id) for row in rows)
    out = [f"{plan.title}: {plural(len(rows), 'run')} (splits {bm.format_splits(plan.splits)})",
           f"{'run':<{width}}  {'status':<8}  {'estimate':>8}  checkpoint"]
    for row in rows:
        out.append(f"{row.run.id:<{width}}  {row.status:<8}  {_duration(row.seconds):>8}  {row.run.checkpoint}")
    refused = [row for row in rows if row.status == "refused"]
    for row in refused:
        out.append(f"refused: {row.run.id}: {row.reason}")
    if refused:
        out.append(f"the benchmark would stop before its first run: move {plural(len(refused), 'refused checkpoint')} "
                   "away or point --checkpoints elsewhere")
    counts = ", ".join(f"{n} {status}" for status, n in sorted(totals["by_status"].items()))
    out.append(f"total: {counts}; about {_duration(totals['seconds'])} to run now"
               + (f", {_duration(totals['seconds_if_trained'])} with --train"
                  if totals["by_status"].get("missing") else ""))
    nominal = [k for k, v in totals["sizes"].items() if not v["from_labels"]]
    out.append(f"assumes {totals['assumption']}"
               + (f"; nominal sizes for {', '.join(nominal)} (not found on disk)" if nominal else ""))
    sys.stdout.write("\n".join(out) + "\n")


class _Progress:
    """One bar over the runs, one over the current training epoch (stderr)."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err_console, transient=True,
                                 disable=not err_console.is_terminal)
        self.progress.start()
        self.runs = self.progress.add_task("runs", total=total)
        self.epoch: Any = None

    def __call__(self, event) -> None:
        p = self.progress
        if event.kind == "run":
            p.update(self.runs, description=f"run {event.run.id}")
        elif event.kind == "train":
            inner = event.data["event"]
            d = inner.data
            if inner.kind == "start":
                p.console.print(f"training {event.run.id}: {d['train_images']} images, {d['steps_per_epoch']} "
                                f"steps/epoch, {d['trainable_params']:,} trainable parameters", markup=False)
            elif inner.kind == "step":
                if self.epoch is None:
                    self.epoch = p.add_task("epoch", total=d["steps_per_epoch"])
                p.update(self.epoch, completed=d["epoch_step"], total=d["steps_per_epoch"],
                         description=f"epoch {d['epoch'] + 1} loss {d['loss']:.4f}")
            elif inner.kind == "epoch":
                srcc = (d.get("metrics") or {}).get("srcc")
                p.console.print(f"  epoch {d['epoch']}: test SRCC {srcc:.4f}" if srcc is not None
                                else f"  epoch {d['epoch']} done", markup=False)
        elif event.kind == "evaluate":
            p.update(self.runs, description=f"testing {event.run.id} on {event.data['images']} images")
        elif event.kind in ("done", "reused", "skipped"):
            if event.kind == "done":
                m = event.data["result"]["metrics"]
                p.console.print(f"{event.run.id}: SRCC {m['srcc']:.4f} PLCC {m['plcc']:.4f}", markup=False)
            p.advance(self.runs)
            if self.epoch is not None:
                p.remove_task(self.epoch)
                self.epoch = None

    def close(self) -> None:
        self.progress.stop()
