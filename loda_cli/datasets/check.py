"""Checking a dataset: the label file parses, and every listed image exists and decodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loda_cli.datasets.parallel import run_parallel
from loda_cli.datasets.specs import DatasetSpec, Progress, read_labels
from loda_cli.errors import DatasetError

@dataclass
class CheckReport:
    """What :func:`check_dataset` found. ``ok`` is False for any problem; a count that differs
    from the published one is only a warning (subsets and fixtures are legitimate)."""

    dataset: str
    root: Path
    label_file: Optional[Path] = None
    label_error: Optional[str] = None
    n_labels: int = 0
    expected_count: Optional[int] = None
    missing: list[str] = field(default_factory=list)
    broken: list[tuple[str, str]] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.label_error is None and not (self.missing or self.broken or self.duplicates)

    @property
    def count_matches(self) -> bool:
        return self.expected_count is None or self.expected_count == self.n_labels

    def summary(self) -> str:
        if self.label_error is not None:
            return f"{self.dataset}: {self.label_error}"
        parts = [f"{len(self.missing)} missing", f"{len(self.broken)} broken"]
        if self.duplicates:
            parts.append(f"{len(self.duplicates)} duplicate names")
        return f"{self.dataset}: {', '.join(parts)} of {self.n_labels} labelled images"


def check_dataset(
    spec: DatasetSpec, root: Path, workers: Optional[int] = None, progress: Optional[Progress] = None
) -> CheckReport:
    """Validate the label file and decode every listed image (Pillow ``load()``)."""
    report = CheckReport(spec.name, Path(root), expected_count=spec.expected_count)
    try:
        labels = read_labels(spec, root)
    except DatasetError as exc:
        report.label_error = str(exc)
        return report
    report.label_file = labels.label_file
    report.n_labels = len(labels.items)
    report.duplicates = [repeat.name for _, repeat in labels.repeats()]
    present = []
    for item in labels.items:
        if item.path.is_file():
            present.append(item)
        else:
            report.missing.append(item.name)
    total = len(labels.items)
    done = len(report.missing)
    if progress is not None and done:
        progress(done, total)
    tasks = [(str(item.path),) for item in present]
    for index, error in run_parallel(_decode_error, tasks, workers):
        if error is not None:
            report.broken.append((present[index].name, error))
        done += 1
        if progress is not None:
            progress(done, total)
    order = {item.name: i for i, item in enumerate(labels.items)}
    report.broken.sort(key=lambda pair: order[pair[0]])
    return report


def _decode_error(path: str) -> Optional[str]:
    """None when the file decodes completely, else a short reason. Runs in a worker process."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # any decoder failure makes the image unusable
        return f"{type(exc).__name__}: {exc}"
    return None
