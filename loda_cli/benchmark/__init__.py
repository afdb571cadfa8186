"""The paper's accuracy protocol and its tables: plan the runs, train what is missing, evaluate, and
report medians beside the paper's numbers. The library side of ``loda benchmark``; it never prints.

Four modules, each importing only those before it:

- ``paper``: the paper's numbers and the table presets (data).
- ``plan``: settings, the runs of a table or dataset, their training configuration and identity,
  the results already stored, and dry-run estimates.
- ``report``: medians over splits, the JSON of every number and the Markdown table.
- ``run``: evaluation and execution (``execute``), which stores each run's result.

The names below are this package's API; they are defined in the modules above.
"""

from __future__ import annotations

from loda_cli.benchmark.paper import (
    DATASET_TITLES,
    DISTORTION_GROUPS,
    KADID_CATEGORIES,
    KADID_TYPES,
    LODA,
    NOMINAL_SIZES,
    PAPER,
    TABLES,
    TableSpec,
    Variant,
    column_title,
)
from loda_cli.benchmark.plan import (
    EVAL_CROPS_PER_S,
    METHOD_COST,
    TRAIN_CROPS_PER_S,
    VIT_COST,
    BenchmarkSettings,
    DryRunRow,
    Plan,
    Run,
    canonical_name,
    checkpoint_identity,
    checkpoint_refusal,
    dataset_folder,
    dataset_sizes,
    dry_run,
    estimate_seconds,
    expected_identity,
    format_splits,
    identity_mismatch,
    parse_splits,
    plan_dataset,
    plan_table,
    run_status,
    train_config,
)
from loda_cli.benchmark.report import (
    METRICS,
    Report,
    median,
    render_markdown,
    summarize,
    versions,
    write_report,
)
from loda_cli.benchmark.run import (
    BenchmarkEvent,
    distortion_breakdown,
    execute,
    kadid_type,
    predict_items,
    score_predictions,
)

__all__ = [
    "DATASET_TITLES",
    "DISTORTION_GROUPS",
    "EVAL_CROPS_PER_S",
    "KADID_CATEGORIES",
    "KADID_TYPES",
    "LODA",
    "METHOD_COST",
    "METRICS",
    "NOMINAL_SIZES",
    "PAPER",
    "TABLES",
    "TRAIN_CROPS_PER_S",
    "VIT_COST",
    "BenchmarkEvent",
    "BenchmarkSettings",
    "DryRunRow",
    "Plan",
    "Report",
    "Run",
    "TableSpec",
    "Variant",
    "canonical_name",
    "checkpoint_identity",
    "checkpoint_refusal",
    "column_title",
    "dataset_folder",
    "dataset_sizes",
    "distortion_breakdown",
    "dry_run",
    "estimate_seconds",
    "execute",
    "expected_identity",
    "format_splits",
    "identity_mismatch",
    "kadid_type",
    "median",
    "parse_splits",
    "plan_dataset",
    "plan_table",
    "predict_items",
    "render_markdown",
    "run_status",
    "score_predictions",
    "summarize",
    "train_config",
    "versions",
    "write_report",
]
