"""`loda weights list|info|import`: the checkpoints loda knows about."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from loda_cli.cli.common import err_console, handle_errors, out_console

weights_app = typer.Typer(
    help="List, inspect and import LoDa checkpoints.", no_args_is_help=True, rich_markup_mode=None
)


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")


def _format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _format_metrics(metrics: dict) -> str:
    parts = [f"{k.upper()} {metrics[k]:.3f}" for k in ("srcc", "plcc") if isinstance(metrics.get(k), (int, float))]
    # The built-in model's held-out measurements (weights/manifest.json, scripts/eval_builtin.py).
    if isinstance(metrics.get("cross_validation_median_srcc"), (int, float)):
        parts.append(f"cross-validated SRCC {metrics['cross_validation_median_srcc']:.3f}")
    if isinstance(metrics.get("heldout_synthetic_srcc"), (int, float)):
        parts.append(f"held-out SRCC {metrics['heldout_synthetic_srcc']:.3f}")
    if isinstance(metrics.get("real_photo_pairs_original_wins"), (int, float)):
        parts.append(f"photo pairs {100 * metrics['real_photo_pairs_original_wins']:.1f}%")
    if isinstance(metrics.get("fullsize_pairs_original_wins"), (int, float)):
        parts.append(f"full-size pairs {100 * metrics['fullsize_pairs_original_wins']:.1f}%")
    return ", ".join(parts) or "-"


def _merged_metrics(meta: dict, manifest: dict) -> dict:
    """The checkpoint's own test metrics, plus what its manifest entry measured beyond them."""
    listed = manifest.get("metrics") or {}
    own = meta.get("metrics") or listed.get("test_split") or {}
    extra = {k: v for k, v in listed.items() if k != "test_split" and k not in own}
    return {**own, **extra}


@weights_app.command("list")
@handle_errors
def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List known checkpoints: those in $LODA_HOME, then the repository's manifest."""
    from loda_cli.errors import CheckpointError
    from loda_cli.weights import list_models, read_metadata

    rows = []
    for entry in list_models():
        meta: dict = {}
        problem = ""
        if entry.available:
            try:
                meta = read_metadata(entry.path)  # type: ignore[arg-type]
            except CheckpointError as exc:
                problem = str(exc)
        else:
            problem = "file not present"
        backbones = meta.get("backbones") or entry.manifest.get("backbones") or {}
        dataset = (meta.get("dataset") or {}).get("name") or entry.manifest.get("dataset") or "-"
        rows.append(
            {
                "name": entry.name,
                "source": "built-in" if entry.builtin else entry.source,
                "dataset": dataset,
                "backbones": " + ".join(str(backbones[k]) for k in ("vit", "cnn") if backbones.get(k)) or "-",
                "size": entry.path.stat().st_size if entry.available else None,  # type: ignore[union-attr]
                "metrics": _merged_metrics(meta, entry.manifest),
                "path": str(entry.path) if entry.path else None,
                "problem": problem,
            }
        )
    if as_json:
        out_console.print_json(json.dumps(rows))
        return
    if not rows:
        err_console.print("No checkpoints. Train one with `loda train` or add one with `loda weights import`.")
        return
    table = Table(title="LoDa checkpoints")
    for col in ("name", "source", "dataset", "backbones", "size", "metrics"):
        table.add_column(col)
    for r in rows:
        size = _format_size(r["size"]) if r["size"] is not None else r["problem"]
        table.add_row(r["name"], r["source"], r["dataset"], r["backbones"], size, _format_metrics(r["metrics"]))
    out_console.print(table)


@weights_app.command("info")
@handle_errors
def info_cmd(
    name: Annotated[str, typer.Argument(help="A checkpoint name or a .safetensors path.")],
) -> None:
    """Show a checkpoint's metadata (architecture, dataset, calibration, metrics)."""
    from loda_cli.weights import file_sha256, list_models, read_metadata, resolve_model

    resolved = resolve_model(name)
    meta = read_metadata(resolved.path)
    digest = file_sha256(resolved.path)
    info = {"name": resolved.name, "path": str(resolved.path), "sha256": digest, **meta}
    listed = next((e.manifest for e in list_models() if e.source == "manifest" and e.path is not None
                   and e.path.resolve() == resolved.path.resolve()), None)
    if listed:
        # What weights/manifest.json records beside the file: for the built-in model, its
        # held-out measurements, speed and reproduce command.
        info["manifest"] = listed
        if listed.get("sha256") and listed["sha256"] != digest:
            info["manifest_warning"] = "the file's sha256 differs from the manifest's: its figures describe another file"
    out_console.print_json(json.dumps(info))


@weights_app.command("import")
@handle_errors
def import_cmd(
    file: Annotated[Path, typer.Argument(help="A loda .safetensors checkpoint, or an authors'-format .pt.")],
    name: Annotated[str, typer.Option("--name", help="Name to store it under in $LODA_HOME.")],
    dataset: Annotated[
        Optional[str], typer.Option(help="Dataset it was trained on (sets the label scale and direction).")
    ] = None,
    vit: Annotated[Optional[str], typer.Option(help="timm ViT of the .pt (default: the paper's ViT-B/16).")] = None,
    cnn: Annotated[Optional[str], typer.Option(help="timm CNN of the .pt (default: resnet50).")] = None,
    vit_depth: Annotated[Optional[int], typer.Option(help="Override the ViT depth (non-standard models).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a checkpoint of the same name.")] = False,
) -> None:
    """Import a checkpoint into $LODA_HOME; converts the authors' release format (.pt)."""
    from loda_cli.config import LoDaConfig
    from loda_cli.weights import import_checkpoint

    kw: dict = {}
    if vit:
        kw["vit"] = vit
    if cnn:
        kw["cnn"] = cnn
    if vit_depth:
        kw["vit_kwargs"] = {"depth": vit_depth}
    dest = import_checkpoint(file, name, config=LoDaConfig(**kw), dataset=dataset, overwrite=overwrite)
    err_console.print(f"imported {name!r} -> {dest}")
