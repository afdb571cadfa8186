"""Benchmark reports: medians over splits beside the paper's values, the JSON of every number,
and the Markdown table in the paper's layout."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from loda_cli.atomic import replacing
from loda_cli.benchmark.paper import DISTORTION_GROUPS, column_title
from loda_cli.benchmark.plan import Plan, format_splits
from loda_cli.config import DEFAULT_CNN, DEFAULT_VIT


# --- summaries -----------------------------------------------------------------------------------


METRICS = ("srcc", "plcc", "krcc", "rmse")


def median(values: Sequence[float]) -> Optional[float]:
    """The median the paper reports (mean of the two middle values for an even count)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(values)) if values else None


def summarize(plan: Plan, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Medians over splits for every (row, column) cell, the paper's values and the differences,
    and (for KADID) the per-distortion-group medians."""
    cells = []
    for variant in plan.spec.variants:
        for column in plan.spec.columns():
            runs = [r for r in plan.runs if r.variant.key == variant.key and r.column == column]
            if not runs:
                continue
            done = [results[r.id] for r in runs if r.id in results]
            cell: dict[str, Any] = {"row": variant.key, "title": variant.title, "column": column,
                                    "splits": [r.split for r in runs if r.id in results]}
            for metric in METRICS:
                value = median([d["metrics"].get(metric) for d in done])
                cell[metric] = value
                paper = plan.paper_value(variant.key, column, metric)
                if paper is not None:
                    cell[f"paper_{metric}"] = paper
                    cell[f"diff_{metric}"] = None if value is None else value - paper
            if any("by_distortion" in d for d in done):
                cell["by_distortion"] = _median_breakdown([d["by_distortion"] for d in done if "by_distortion" in d])
            cells.append(cell)
    return {"cells": cells}


def _median_breakdown(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in ("groups", "kadid_categories", "types"):
        out[section] = {}
        for name in parts[0][section]:
            values = [p[section][name] for p in parts]
            out[section][name] = {
                "srcc": median([v["srcc"] for v in values]),
                "plcc": median([v["plcc"] for v in values]),
                "n": int(sum(v["n"] for v in values)),
            }
    return out


# --- the report ----------------------------------------------------------------------------------


def versions() -> dict[str, Any]:
    from importlib import metadata

    from loda_cli import __version__

    out: dict[str, Any] = {"loda": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "timm", "numpy", "scipy", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, "w", encoding="utf-8", sync=False) as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")


@dataclass
class Report:
    plan: Plan
    results: dict[str, dict[str, Any]]  # run id -> result
    skipped: dict[str, str]  # run id -> why
    summary: dict[str, Any]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        plan = self.plan
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(plan.settings).items()}
        settings["data"] = {k: str(v) for k, v in plan.settings.data.items()}
        settings["checkpoints"] = str(plan.settings.checkpoint_dir())
        from loda_cli.baselines import HYPERPARAMETERS

        return {
            "name": plan.name, "title": plan.title,
            "table": plan.paper_table if plan.name.startswith("table") else None,
            "splits": plan.splits, "settings": settings, "protocol": plan.settings.protocol(),
            # what the evaluated checkpoints record of their own training ("settings" is the plan's)
            "checkpoints_trained": _recorded_training(self),
            "hyperparameters": HYPERPARAMETERS, "summary": self.summary,
            "runs": [{**run.describe(), "status": "done" if run.id in self.results else "skipped",
                      "reason": self.skipped.get(run.id),
                      "result": str(run.result) if run.id in self.results else None,
                      "metrics": _headline(self.results.get(run.id)),
                      "checkpoint_sha256": (self.results.get(run.id) or {}).get("checkpoint_sha256")}
                     for run in plan.runs],
            "versions": versions(), "elapsed_s": round(self.elapsed_s, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _headline(result: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not result:
        return None
    return {k: result["metrics"].get(k) for k in ("n", "srcc", "plcc", "krcc", "rmse", "fit_method")}


# --- Markdown ------------------------------------------------------------------------------------


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cell_text(cell: Optional[dict[str, Any]], metric: str, paper: Optional[float]) -> str:
    value = None if cell is None else cell.get(metric)
    if paper is None:
        return _fmt(value)
    if value is None:
        return f"- ({paper:.3f})"
    return f"{value:.3f} ({paper:.3f}, {value - paper:+.3f})"


def render_markdown(report: Report) -> str:
    """The table in the paper's layout (each cell: our median, then the paper's value and the
    difference), every run, the KADID distortion groups when asked for, and a footer with the
    protocol, the baselines' hyper-parameters and the versions."""
    from loda_cli.baselines import HYPERPARAMETERS

    plan, summary = report.plan, report.summary
    spec = plan.spec
    by_key = {(c["row"], c["column"]): c for c in summary["cells"]}
    lines = [f"## {plan.title}", ""]
    splits_text = format_splits(plan.splits)
    if plan.paper_table is not None:
        lines += [f"Each cell: our median over splits {splits_text} (the paper's value, our difference).", ""]
    else:
        lines += [f"Median over splits {splits_text}.", ""]
    header = [spec.row_header]
    for column in spec.columns():
        header += [f"{column_title(column)} {m.upper()}" for m in spec.metrics]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for variant in spec.variants:
        row = [variant.title]
        for column in spec.columns():
            cell = by_key.get((variant.key, column))
            for metric in spec.metrics:
                row.append(_cell_text(cell, metric, plan.paper_value(variant.key, column, metric)))
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "### Runs", "", "| run | split | test images | SRCC | PLCC | KRCC | RMSE | fit |",
              "|---|---|---|---|---|---|---|---|"]
    for run in plan.runs:
        result = report.results.get(run.id)
        if result is None:
            lines.append(f"| {run.id} | {run.split} | - | - | - | - | - | {report.skipped.get(run.id, 'not run')} |")
            continue
        m = result["metrics"]
        lines.append(f"| {run.id} | {run.split} | {m['n']} | {_fmt(m['srcc'])} | {_fmt(m['plcc'])} | "
                     f"{_fmt(m['krcc'])} | {m['rmse']:.4g} | {m['fit_method']} |")

    if plan.settings.by_distortion:
        lines += _render_distortions(plan, summary)

    s = plan.settings
    crop_word = "crop" if s.test_crops == 1 else "crops"
    crops_text = (f"the scorer's grid of {s.test_crops} 224 {crop_word} per test image" if s.deterministic_crops
                  else f"{s.test_crops} random 224 {crop_word} per test image (seed {s.seed})")
    backbone = s.vit or ("per row" if any(v.vit_key for v in spec.variants) else DEFAULT_VIT)
    hp = HYPERPARAMETERS
    lines += [
        "",
        "---",
        f"- Protocol: {crops_text}, mean "
        "raw output per image; SRCC and KRCC on those means, PLCC and RMSE after the 4-parameter "
        "logistic (VQEG); the median over splits. Splits: 80/20, seeded, by reference image for "
        "LIVE/TID2013/KADID." + (" Cross-dataset runs test on every image of the test dataset, "
                                 "without adaptation." if any(r.test_on for r in plan.runs) else ""),
        _training_line(report, s, backbone),
        f"- Baselines: Houlsby adapters after attention and MLP, bottleneck {hp['adapter_bottleneck']}; "
        f"LoRA on attn.qkv, rank {hp['lora_rank']}, alpha {hp['lora_alpha']:g}; deep VPT, "
        f"{hp['vpt_prompts_per_block']} prompts per block; the same cosine head everywhere; lr "
        f"{hp['lr']['loda']:g} (frozen-backbone methods and LoDa), {hp['lr']['full']:g} (full "
        "fine-tune). \"ViT + Extractor\" adds LoDa's 196 distortion tokens, up-projected, to the "
        "196 patch tokens one to one before every block (no cross-attention).",
    ]
    sizes = [r["metrics"]["n"] for r in report.results.values() if isinstance(r.get("metrics", {}).get("n"), int)]
    if sizes and min(sizes) < SMALL_TEST_SET:
        lines.append(f"- Warning: as few as {min(sizes)} test images in a run; SRCC and PLCC are noisy at that "
                     "size (the paper's test sets hold hundreds to thousands).")
    done = len(report.results)
    if done < len(plan.runs):
        lines.append(f"- {len(plan.runs) - done} of {len(plan.runs)} runs have no result (see Runs).")
    v = versions()
    lines.append(f"- loda {v['loda']}, torch {v['torch']}, timm {v['timm']}, python {v['python']}.")
    return "\n".join(lines) + "\n"


#: Below this many test images a run's figures are flagged as noisy.
SMALL_TEST_SET = 50

#: The paper's training protocol, as the checkpoints' metadata records it.
_PAPER_TRAINING = {"epochs": 10, "batch_size": 128, "max_steps": None, "pretrained": True}


def _recorded_training(report: Report) -> list[dict[str, Any]]:
    """How each evaluated checkpoint was trained, from its own metadata ("train"), so a report
    never claims the paper's protocol for checkpoints made otherwise."""
    seen = []
    for result in report.results.values():
        train = (result.get("checkpoint_metadata") or {}).get("train")
        if isinstance(train, dict):
            record = {k: train.get(k) for k in ("epochs", "batch_size", "max_steps", "pretrained", "steps")}
            if record not in seen:
                seen.append(record)
    return seen


def _training_line(report: Report, s, backbone: str) -> str:
    recorded = _recorded_training(report)
    departures = []
    paper = _PAPER_TRAINING
    for record in recorded:
        if record.get("max_steps") != paper["max_steps"]:
            departures.append(f"stopped at step {record.get('steps')} (--max-steps {record['max_steps']})")
        if record.get("pretrained") is False:
            departures.append("random backbones")
        if record.get("epochs") not in (None, paper["epochs"]):
            departures.append(f"{record['epochs']} epoch{'' if record['epochs'] == 1 else 's'}")
        if record.get("batch_size") not in (None, paper["batch_size"]):
            departures.append(f"batch {record['batch_size']}")
    if departures:
        return (f"- Training, as the checkpoints record it: {', '.join(dict.fromkeys(departures))}. NOT the "
                f"paper's protocol: these figures are not comparable with the paper's. ViT {backbone}, CNN "
                f"{s.cnn or DEFAULT_CNN}.")
    return (f"- Training: the paper's protocol (AdamW, PLCC loss, cosine schedule, batch "
            f"{s.batch_size or 128}, {s.epochs or 10} epoch{'' if s.epochs == 1 else 's'}, seed {s.seed}); ViT "
            f"{backbone}, CNN "
            f"{s.cnn or DEFAULT_CNN}{'' if s.pretrained else ', random backbones (not a paper result)'}.")


def _render_distortions(plan: Plan, summary: dict[str, Any]) -> list[str]:
    cells = [c for c in summary["cells"] if "by_distortion" in c]
    if not cells:
        return []
    lines = ["", "### KADID-10k by distortion group (paper Figure 4: PLCC; SRCC beside it)", "",
             "Groups: LIQE's classes as the paper says, JPEG + JPEG2000 as compression and over- + "
             "underexposure as brightness, giving nine. The figure's values are not in the paper's "
             "text, so no paper column.", ""]
    header = ["group", "types"]
    for c in cells:
        header += [f"{c['title']} PLCC", f"{c['title']} SRCC"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for group, members in DISTORTION_GROUPS.items():
        row = [group, ", ".join(f"{t:02d}" for t in members)]
        for c in cells:
            g = c["by_distortion"]["groups"][group]
            row += [_fmt(g["plcc"]), _fmt(g["srcc"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_report(report: Report) -> dict[str, Path]:
    """``<results>/<plan>.json`` (every number) and ``<results>/<plan>.md`` (the table)."""
    folder = Path(report.plan.settings.results)
    paths = {"json": folder / f"{report.plan.name}.json", "markdown": folder / f"{report.plan.name}.md"}
    write_json(paths["json"], report.to_dict())
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    with replacing(paths["markdown"], "w", encoding="utf-8", sync=False) as fh:  # never through a link left there
        fh.write(render_markdown(report))
    return paths
