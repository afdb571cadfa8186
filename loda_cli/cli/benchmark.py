"""`loda benchmark`: speed (`loda benchmark speed`) and the paper's accuracy protocol and tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loda_cli.cli.common import (err_console, handle_errors, measuring_precision_notice, out_console,
                                 print_precision_choice)


def register(app: typer.Typer) -> None:
    app.command("benchmark")(benchmark)


@handle_errors
def benchmark(
    target: Annotated[Optional[str], typer.Argument(help="'speed', or a dataset name for the accuracy protocol (kadid, koniq, ...).")] = None,
    # accuracy
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder (accuracy).")] = None,
    splits: Annotated[str, typer.Option(help="Splits to run: a count (10), a range (0-9) or a list (0,3,5).")] = "10",
    checkpoints: Annotated[Optional[Path], typer.Option(help="Folder of trained checkpoints named loda-<dataset>-split<K>.safetensors.")] = None,
    train_first: Annotated[bool, typer.Option("--train", help="Train each missing split first (resumable).")] = False,
    test_on: Annotated[Optional[str], typer.Option(help="Cross-dataset: test on this dataset instead (paper Table 2).")] = None,
    test_data: Annotated[Optional[Path], typer.Option(help="Folder of the --test-on dataset.")] = None,
    table: Annotated[Optional[int], typer.Option(help="Run a paper table preset (1-7).")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Folder holding every dataset (for --table).")] = None,
    results: Annotated[Path, typer.Option("--out", help="Results folder (JSON and Markdown).")] = Path("results"),
    by_distortion: Annotated[bool, typer.Option(help="KADID: SRCC per distortion group (paper Figure 4).")] = False,
    dry_run: Annotated[bool, typer.Option(help="List the runs and their estimated time; run nothing.")] = False,
    deterministic_crops: Annotated[bool, typer.Option(help="Test on the scorer's fixed crop grid instead of 15 random crops.")] = False,
    epochs: Annotated[Optional[int], typer.Option(help="Override the training epochs (smoke runs).")] = None,
    vit: Annotated[Optional[str], typer.Option(help="Override the timm ViT when training.")] = None,
    cnn: Annotated[Optional[str], typer.Option(help="Override the timm CNN when training.")] = None,
    vit_depth: Annotated[Optional[int], typer.Option(help="Override the ViT depth when training.")] = None,
    no_pretrained: Annotated[bool, typer.Option("--no-pretrained", help="Random backbones (offline smoke runs).")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch (accuracy) or crops per forward (speed).")] = None,
    # speed
    images: Annotated[Optional[Path], typer.Option(help="Speed: a folder of photos to time.")] = None,
    synthetic: Annotated[int, typer.Option(help="Speed: generate this many 24 MP JPEGs (when no --images).")] = 6,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Speed: checkpoint to time (default: the paper's architecture, random weights).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto, fp32, bf16, fp16 or int8 (speed: auto measures on the CPU; int8 is for scoring only).")] = "auto",
    crops: Annotated[Optional[int], typer.Option(help="Crops per image: for speed, of the 384 view (default: the checkpoint's own; 15 for the random-weight paper model); for accuracy, the test crops (default 15, the paper's).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Speed: worker processes, as loda score --workers.")] = None,
    decode: Annotated[str, typer.Option(help="Speed: where JPEGs decode: auto (nvJPEG when on CUDA), cpu, or device.")] = "auto",
    compare_naive: Annotated[bool, typer.Option(help="Speed: also time the naive pipeline on the same files and print the ratio.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Benchmark speed (`loda benchmark speed --compare-naive`) or accuracy with the paper's protocol
    (`loda benchmark kadid --data DIR --splits 10`, `loda benchmark --table 1 --data-root ROOT`)."""
    from loda_cli.errors import UsageError

    if target == "speed":
        _speed(images, synthetic, model, device, precision, batch_size, crops, workers, compare_naive, as_json, decode)
        return
    from loda_cli.cli.benchmark_accuracy import run_accuracy

    if target is None and table is None:
        raise UsageError("name 'speed', a dataset, or --table N; see loda benchmark --help")
    run_accuracy(
        target=target, data=data, splits=splits, checkpoints=checkpoints, train_first=train_first,
        test_on=test_on, test_data=test_data, table=table, data_root=data_root, results=results,
        by_distortion=by_distortion, dry_run=dry_run, deterministic_crops=deterministic_crops,
        epochs=epochs, vit=vit, cnn=cnn, vit_depth=vit_depth, no_pretrained=no_pretrained,
        batch_size=batch_size, device=device, precision=precision, workers=workers, as_json=as_json,
        crops=15 if crops is None else crops,  # the paper's 15 test crops
    )


def _speed(images, synthetic, model, device, precision, batch_size, crops, workers, compare_naive, as_json,
           decode="auto") -> None:
    from rich.table import Table

    from loda_cli import benchmark_speed as bs
    from loda_cli.errors import UsageError
    from loda_cli.images import iter_image_files
    from loda_cli.scoring import Scorer, describe_layout
    from loda_cli.weights import load_model

    if images is not None:
        files = [f.path for f in iter_image_files([images])]
        if not files:
            raise UsageError(f"no image files in {images}")
        source = str(images)
    else:
        if synthetic < 1:
            raise UsageError("--synthetic must be at least 1")
        from loda_cli.home import loda_home

        folder = loda_home() / "bench-images"
        err_console.print(f"preparing {synthetic} synthetic 24 MP JPEGs in {folder} ...")
        files = bs.make_synthetic_jpegs(folder, synthetic)
        source = f"{synthetic} synthetic 6000x4000 JPEGs"
    loaded = load_model(model) if model else bs.random_weights_model(crops=crops or 15)
    scorer = Scorer(loaded, device=device, precision=precision, crops=crops, batch_size=batch_size,
                    workers=workers, cache=False, on_measure_precision=measuring_precision_notice, decode=decode)
    crops = scorer.preprocess.num_crops
    label = f"{crops}+{scorer.preprocess.detail_crops} detail" if scorer.preprocess.has_detail_view else str(crops)
    err_console.print(f"timing {scorer.name} on {scorer.device} ({scorer.precision}), {label} crops, "
                      f"{describe_layout(scorer)}, JPEGs decoded on "
                      f"{scorer.device if scorer.device_decode else 'the CPU'}, {len(files)} images")
    print_precision_choice(scorer.precision_choice)
    bs.warm_up(loaded, scorer)
    results = {"loda": bs.run_pipeline(scorer, files)}
    results["model-only"] = bs.run_model_only(scorer)
    if compare_naive:
        from dataclasses import replace

        # The naive loop gets the scorer's crops (a --crops override included), not the checkpoint's.
        results["naive"] = bs.run_naive(replace(loaded, preprocess=scorer.preprocess), files, scorer.device)
    report: dict[str, Any] = {
        "source": source, "model": scorer.name, "device": scorer.device, "precision": scorer.precision,
        "precision_choice": scorer.precision_choice.as_dict(), "crops": crops,
        "detail_crops": scorer.preprocess.detail_crops, "batch_size": scorer.batch_size,
        "threads": scorer.threads, "workers": scorer.workers, "workers_score": scorer.score_in_workers,
        "worker_threads": scorer.worker_threads,
        "decode": scorer.device if scorer.device_decode else "cpu",
        "results": {k: v.as_dict() for k, v in results.items()}, "peak_rss": bs.peak_rss_mb(),
        "cuda_peak_mb": bs.cuda_peak_mb(scorer.device),
    }
    if scorer.device_decoder is not None:
        report["device_decoded"] = scorer.device_decoder.decoded
        report["device_fallbacks"] = scorer.device_decoder.fallbacks
    loda, ceiling = results["loda"], results["model-only"]
    flops = bs.flops_per_crop(loaded.model, scorer.preprocess.crop_size)
    report["gflop_per_crop"] = round(flops / 1e9, 3)
    report["model_only_gflop_per_s"] = round(flops * ceiling.crops_per_s / 1e9, 1)
    report["pipeline_share_of_model_only"] = round(loda.images_per_s / ceiling.images_per_s, 3)
    if compare_naive:
        report["speedup_vs_naive"] = round(loda.images_per_s / results["naive"].images_per_s, 2)

    if as_json:
        out_console.print_json(json.dumps(report))
    else:
        table = Table(title="loda benchmark speed")
        for col in ("pipeline", "img/s", "crops/s", "decode s", "crop s", "h2d s", "forward s", "wall s"):
            table.add_column(col, justify="right" if col != "pipeline" else "left")
        for name, r in results.items():
            st = r.stages
            table.add_row(name, f"{r.images_per_s:.3f}", f"{r.crops_per_s:.1f}",
                          *(f"{st[k]:.2f}" if k in st else "-" for k in ("decode", "crop", "h2d", "forward")),
                          f"{r.seconds:.1f}")
        out_console.print(table)
        rss = report["peak_rss"]
        out_console.print(f"peak RSS: main {rss['main_mb']:.0f} MB, workers {rss['workers_mb']:.0f} MB"
                          + (f"; CUDA peak {report['cuda_peak_mb']:.0f} MB" if report["cuda_peak_mb"] else ""))
        out_console.print(f"pipeline reaches {100 * report['pipeline_share_of_model_only']:.0f}% of the model-only "
                          f"throughput ({ceiling.images_per_s:.3f} img/s)")
        out_console.print(f"compute: {report['gflop_per_crop']:.2f} GFLOP a crop; the model alone runs "
                          f"{report['model_only_gflop_per_s']:.0f} GFLOP/s ({scorer.precision})")
    summary = (f"loda {loda.images_per_s:.2f} img/s, {scorer.device} {scorer.precision}, {label} crops")
    if compare_naive:
        naive = results["naive"]
        summary = (f"speedup {report['speedup_vs_naive']:.1f}x vs naive (loda {loda.images_per_s:.2f} img/s, "
                   f"naive {naive.images_per_s:.2f} img/s, {scorer.device} {scorer.precision}, {label} crops)")
    sys.stdout.write(summary + "\n") if not as_json else err_console.print(summary, markup=False)
