"""Scale benchmark for `loda score` (issue 8, "Scale").

Measures, with real `python -m loda_cli score` processes:

* the peak RSS of the main process and of each DataLoader worker at each file count, and the
  growth in bytes per file between the smallest and the largest count;
* the wall time of a fully cached rerun against the first run;
* the time to the first result: from process start to the first line of a JSONL stream on
  stdout (`--out -`), against the time the walk of the same tree takes alone.

Usage (run it niced; a 50,000-file first run takes many minutes on a small CPU):

    nice -n 19 python scripts/scale_bench.py --counts 5000 50000
    nice -n 19 python scripts/scale_bench.py --counts 500 --model tiny   # a quick check
    python scripts/scale_bench.py --report                               # print stored results

Per count N it (1) generates N JPEGs of 64x48 pixels (a few KB, each different) under
DIR/set-N/<a>/<b>/, 100 per folder, once, reused by later runs; (2) times the walk alone in a
fresh process; (3) scores the tree with an empty $LODA_HOME (DIR/home-N), sampling
/proc/PID/status (VmHWM) of the main process and its children every 0.1 s, and `wait4`'s ru_maxrss;
(4) scores it again, all from the cache; and, for the largest N, (5) streams `--out -` with a
fresh cache and times the first stdout line, with `-q` and with the progress bar (whose counting
thread walks the tree at the same time), and for a one-file folder as the start-up floor.

--model: `auto` (default) takes the built-in model when weights/ has it (resolve_model(None)),
else a tiny random LoDa checkpoint (test_vit depth 2 + test_resnet, 3 crops) made in DIR; `tiny`
forces that; anything else is passed to `--model`. DIR defaults to /tmp/loda-bench-scale.
Results are stored in DIR/results.json, keyed by model and N, and printed as a table with a
one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PER_FOLDER = 100
FOLDERS_PER_PARENT = 100
SAMPLE_EVERY_S = 0.1


# ---------------------------------------------------------------------------------------------
# The image tree


def generate_tree(root: Path, count: int) -> Path:
    """DIR/set-N with N small JPEGs, 100 per folder, two levels deep; made once."""
    import numpy as np
    from PIL import Image

    tree = root / f"set-{count}"
    done = tree / ".complete"
    if done.exists():
        return tree
    if tree.exists():
        shutil.rmtree(tree)
    started = time.monotonic()
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    for index in range(count):
        parent, leaf = divmod(index // PER_FOLDER, FOLDERS_PER_PARENT)
        folder = tree / f"a{parent:03d}" / f"b{leaf:02d}"
        if index % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(index)
        fx, fy, phase = rng.uniform(0.02, 0.3, 2).tolist() + [rng.uniform(0, 6.3)]
        base = rng.uniform(40, 215, 3)
        wave = np.sin(x * fx + phase)[..., None] * np.cos(y * fy)[..., None] * rng.uniform(10, 90)
        noise = rng.normal(0, rng.uniform(0, 25), (48, 64, 3))
        pixels = np.clip(base + wave + noise, 0, 255).astype(np.uint8)
        quality = int(rng.integers(40, 96))
        Image.fromarray(pixels, "RGB").save(folder / f"img_{index:06d}.jpg", quality=quality)
    done.write_text(f"{count}\n", encoding="utf-8")
    print(f"generated {count} files under {tree} in {time.monotonic() - started:.0f} s", flush=True)
    return tree


def tree_bytes(tree: Path) -> int:
    return sum(entry.stat().st_size for entry in tree.rglob("*.jpg"))


# ---------------------------------------------------------------------------------------------
# The model


def tiny_checkpoint(root: Path) -> Path:
    path = root / "tiny.safetensors"
    if path.exists():
        return path
    import torch

    from loda_cli.config import LoDaConfig, Preprocess
    from loda_cli.model import LoDa
    from loda_cli.weights import Calibration, save_checkpoint

    torch.manual_seed(0)
    config = LoDaConfig(vit="test_vit", vit_kwargs={"img_size": 224, "depth": 2}, cnn="test_resnet")
    save_checkpoint(
        LoDa(config).eval(), path, name="tiny-bench",
        calibration=Calibration("none", [], 1, 5, False), preprocess=Preprocess(num_crops=3),
    )
    return path


def choose_model(root: Path, wanted: str) -> tuple[str, str]:
    """(value for --model, label for the table)."""
    if wanted == "tiny":
        label = "tiny random LoDa (test_vit depth 2, test_resnet, 3 crops)"
        return str(tiny_checkpoint(root)), label
    if wanted != "auto":
        return wanted, wanted
    from loda_cli.errors import LodaError
    from loda_cli.weights import resolve_model

    saved = os.environ.get("LODA_HOME")
    os.environ["LODA_HOME"] = str(root / "home-resolve")  # empty: only weights/ can answer
    try:
        resolved = resolve_model(None)
    except LodaError:
        resolved = None
    finally:
        if saved is None:
            os.environ.pop("LODA_HOME", None)
        else:
            os.environ["LODA_HOME"] = saved
    if resolved is not None and resolved.builtin:
        return str(resolved.path), f"built-in {resolved.name}"
    return choose_model(root, "tiny")


# ---------------------------------------------------------------------------------------------
# Running and sampling processes


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(name))
    return found


def bench_env(home: Path) -> dict[str, str]:
    return dict(os.environ, LODA_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))


def run_measured(args: list[str], env: dict[str, str]) -> dict:
    """Run `python -m loda_cli ARGS`, sampling the peak RSS of it and of its children.

    ``main_peak_kb`` is the main process's VmHWM, last read just before it exits (the end of the
    run, where the ranked output is built, is inside it: the process is reaped with wait4 only
    after a final read). ``rusage_maxrss_kb`` is wait4's ru_maxrss, the largest of the main
    process and the children it reaped, as /usr/bin/time reports it.
    """
    err_path = Path(env["LODA_HOME"]).parent / "last-stderr.txt"  # a file: a pipe could fill up
    started = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "loda_cli", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    main_peak = 0
    worker_peaks: dict[int, int] = {}
    timeline: list[tuple[float, int]] = []  # (seconds, main VmRSS kB), about one a second
    next_children_scan = 0.0
    while True:
        # waitid with WNOWAIT: a process that has exited stays a zombie until wait4 below, and a
        # zombie's /proc/PID/status has no memory lines any more, so read first, then look.
        main_peak = max(main_peak, _status_kb(proc.pid, "VmHWM") or 0)
        now = time.monotonic()
        if not timeline or now - started - timeline[-1][0] >= 1.0:
            timeline.append((round(now - started, 1), _status_kb(proc.pid, "VmRSS") or 0))
        if now >= next_children_scan:  # scanning /proc costs more than reading one file
            for child in _children(proc.pid):
                worker_peaks.setdefault(child, 0)
            next_children_scan = now + 1.0
        for child in worker_peaks:
            worker_peaks[child] = max(worker_peaks[child], _status_kb(child, "VmHWM") or 0)
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        time.sleep(SAMPLE_EVERY_S)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        stderr = err_path.read_text(encoding="utf-8", errors="replace")
        raise SystemExit(f"loda {' '.join(args)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "wall_s": round(wall, 2), "main_peak_kb": main_peak, "rusage_maxrss_kb": usage.ru_maxrss,
        "worker_peak_kb": max(worker_peaks.values(), default=0), "workers_seen": len(worker_peaks),
        "rss_timeline": timeline,
    }


def time_walk(tree: Path) -> dict:
    """The walk alone, as `loda score` does it, in a fresh process (import time excluded)."""
    code = (
        "import sys, time\n"
        "t0 = time.perf_counter()\n"
        "from loda_cli.images import iter_image_files\n"
        "t1 = time.perf_counter()\n"
        "n = sum(1 for _ in iter_image_files([sys.argv[1]]))\n"
        "print(n, time.perf_counter() - t1, t1 - t0)\n"
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, str(tree)], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT))).stdout.split()
    return {"files": int(out[0]), "walk_s": round(float(out[1]), 3),
            "walk_process_s": round(time.monotonic() - started, 3)}


def time_first_row(tree: Path, model: str, home: Path, quiet: bool, extra: list[str],
                   trace: bool = False) -> dict:
    """Seconds from process start to the first JSONL line on stdout, with an empty cache.

    With ``trace``, the run is under ``strace -f`` (openat and write only): the folders of the tree
    that any process of the run had opened when the first row was written, against all of them,
    show whether the walk had finished by then. Tracing slows the run, so its time is not reported
    as the time to the first row.
    """
    if home.exists():
        shutil.rmtree(home)
    command = [sys.executable, "-m", "loda_cli", "score", str(tree), "--out", "-", "--model", model,
               *(["-q"] if quiet else []), *extra]
    log = home.parent / "ttfr-strace.txt"
    if trace:
        command = ["strace", "-f", "-ttt", "-e", "trace=openat,write", "-o", str(log), *command]
    started = time.monotonic()
    # A session of its own, so the stop below reaches loda under strace too. SIGTERM, not SIGINT:
    # a shell's background job (nohup ... &) inherits SIGINT ignored, and so would loda.
    proc = subprocess.Popen(command, env=bench_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = proc.stdout.readline()
    seconds = time.monotonic() - started
    time.sleep(1.0 if trace else 0.0)
    os.killpg(proc.pid, signal.SIGTERM)  # loda stops as on Ctrl-C: keeps what is done, exits 130
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    if not first.startswith(b"{"):
        raise SystemExit(f"no JSONL row from loda score {tree}: {first[:200]!r}")
    if not trace:
        return {"first_row_s": round(seconds, 2)}
    return _folders_open_before_first_row(log, tree)


def _folders_open_before_first_row(log: Path, tree: Path) -> dict:
    import re

    folders = {str(tree)} | {str(p) for p in tree.rglob("*") if p.is_dir()}
    opened: set[str] = set()
    first_row_at = None
    start_at = None
    pattern = re.compile(r'^\d+\s+(\d+\.\d+)\s+(openat|write)\((.*)')
    with open(log, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            match = pattern.match(line)
            if not match:
                continue
            stamp, call, rest = float(match.group(1)), match.group(2), match.group(3)
            start_at = stamp if start_at is None else start_at
            if call == "openat" and "O_DIRECTORY" in rest:
                name = rest.split('"', 2)[1] if '"' in rest else ""
                if name in folders:
                    opened.add(name)
            elif call == "write" and rest.startswith('1, "{') and first_row_at is None:
                first_row_at = stamp
                break
    traced = round(first_row_at - start_at, 2) if first_row_at and start_at else None
    return {"folders": len(folders), "folders_opened_before_first_row": len(opened),
            "traced_first_row_s": traced}


# ---------------------------------------------------------------------------------------------
# One count, the table


def bench_count(root: Path, count: int, model: str, extra: list[str], first_row: bool) -> dict:
    tree = generate_tree(root, count)
    home = root / f"home-{count}"
    if home.exists():
        shutil.rmtree(home)
    env = bench_env(home)
    walk = time_walk(tree)
    common = ["score", str(tree), "--model", model, "-q", *extra]
    print(f"[{count}] walk alone {walk['walk_s']} s; first run ...", flush=True)
    first = run_measured([*common, "--out", str(root / f"first-{count}.csv")], env)
    print(f"[{count}] first run {first['wall_s']} s; cached rerun ...", flush=True)
    cached = run_measured([*common, "--out", str(root / f"cached-{count}.csv")], env)
    rows_first = _csv_rows(root / f"first-{count}.csv")
    rows_cached = _csv_rows(root / f"cached-{count}.csv")
    if len(rows_first) != count or rows_first != rows_cached:
        raise SystemExit(f"[{count}] outputs differ: {len(rows_first)} vs {len(rows_cached)} rows")
    result = {
        "count": count, "tree_mb": round(tree_bytes(tree) / 1e6, 1), **walk,
        "first": first, "cached": cached,
        "cached_ratio": round(cached["wall_s"] / first["wall_s"], 4),
        "images_per_s": round(count / first["wall_s"], 1),
    }
    if first_row:
        print(f"[{count}] cached rerun {cached['wall_s']} s; again without -q ...", flush=True)
        result["cached_progress"] = cached_rerun_with_progress(root, count, model, extra)
        seconds = result["cached_progress"]["wall_s"]
        print(f"[{count}] without -q {seconds} s; time to first row ...", flush=True)
        single = generate_tree(root, 1)
        ttfr_home = root / "home-ttfr"
        result["first_row_quiet"] = time_first_row(tree, model, ttfr_home, True, extra)
        result["first_row_progress"] = time_first_row(tree, model, ttfr_home, False, extra)
        result["first_row_one_file"] = time_first_row(single, model, ttfr_home, True, extra)
        if shutil.which("strace"):
            result["first_row_traced"] = time_first_row(tree, model, ttfr_home, True, extra,
                                                        trace=True)
    return result


def cached_rerun_with_progress(root: Path, count: int, model: str, extra: list[str]) -> dict:
    """The cached rerun as people type it, without -q: progress bar (and its counting thread)
    and the end-of-run summary on stderr."""
    tree, home = root / f"set-{count}", root / f"home-{count}"
    out = root / f"cached-progress-{count}.csv"
    args = ["score", str(tree), "--model", model, *extra, "--out", str(out)]
    return run_measured(args, bench_env(home))


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return sorted((row["path"], row["score"]) for row in csv.DictReader(fh))


def print_table(entries: list[dict], label: str) -> None:
    entries = sorted(entries, key=lambda e: e["count"])
    print(f"\nmodel: {label}")
    header = ("files", "MB", "walk s", "1st run s", "img/s", "main RSS MiB", "worker RSS MiB",
              "cached s", "cached %", "cached main MiB", "1st row s (-q / bar / 1 file)")
    print(" | ".join(header))
    for e in entries:
        ttfr = "-"
        if "first_row_quiet" in e:
            ttfr = " / ".join(str(e[key]["first_row_s"]) for key in (
                "first_row_quiet", "first_row_progress", "first_row_one_file"))
        print(" | ".join(str(v) for v in (
            e["count"], e["tree_mb"], e["walk_s"], e["first"]["wall_s"], e["images_per_s"],
            round(e["first"]["main_peak_kb"] / 1024, 1),
            round(e["first"]["worker_peak_kb"] / 1024, 1),
            e["cached"]["wall_s"], round(100 * e["cached_ratio"], 1),
            round(e["cached"]["main_peak_kb"] / 1024, 1), ttfr,
        )))
    for e in entries:
        timeline = e["first"].get("rss_timeline") or []
        live = [kb for _, kb in timeline if kb]
        if len(live) >= 8:  # main RSS through the first run: does it climb with the rows done?
            marks = [live[round(f * (len(live) - 1))] for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
            print(f"{e['count']} files, main VmRSS at 10/25/50/75/100% of the first run: "
                  + " / ".join(f"{kb / 1024:.0f}" for kb in marks) + " MiB")
        if "cached_progress" in e:
            run = e["cached_progress"]
            print(f"{e['count']} files, cached rerun without -q (progress bar, end summary): "
                  f"{run['wall_s']} s, main peak {run['main_peak_kb'] / 1024:.0f} MiB")
        if e.get("first_row_traced"):
            traced = e["first_row_traced"]
            print(f"{e['count']} files, under strace: first row at "
                  f"{traced['traced_first_row_s']} s, "
                  f"when the run had opened {traced['folders_opened_before_first_row']} of the "
                  f"tree's {traced['folders']} folders")
    if len(entries) >= 2:
        small, large = entries[0], entries[-1]
        files = large["count"] - small["count"]

        def per_file(run: str, key: str) -> float:
            return (large[run][key] - small[run][key]) * 1024 / files

        line = (
            f"summary: main RSS grows {per_file('first', 'main_peak_kb'):.0f} B/file on a first "
            f"run and {per_file('cached', 'main_peak_kb'):.0f} B/file on a cached one "
            f"({small['count']} -> {large['count']} files), workers "
            f"{per_file('first', 'worker_peak_kb'):.0f} B/file; cached rerun "
            f"{100 * large['cached_ratio']:.1f}% of the first run at {large['count']} files"
        )
        if "first_row_quiet" in large:
            floor = large["first_row_one_file"]["first_row_s"]
            line += (f"; first row after {large['first_row_quiet']['first_row_s']} s "
                     f"(walk alone {large['walk_s']} s, one-file floor {floor} s)")
        print(line)


# ---------------------------------------------------------------------------------------------
# What the rows cost the main process (tracemalloc, in this process)


def _row_like_the_cli(index: int, root: str):
    """A ScoreRow as the main process holds it: its strings arrive unpickled from a DataLoader
    worker, so none is shared with another row; a photo's width and height are not small ints."""
    from loda_cli.scoring import ScoreRow

    path = "".join((root, f"/a{index // 10000:03d}/b{index // 100 % 100:02d}/img_{index:06d}.jpg"))
    return ScoreRow(
        path=path, root="".join((root, "")), score=index / 1e6, mos=1 + index / 1e6,
        raw=0.5 - index / 1e7, width=6000 + index % 7, height=4000 + index % 5,
        format="".join(("JP", "EG")), error=None, warnings=[], cached=False, index=index,
    )


def row_cost(count: int) -> None:
    """Bytes per file the main process holds: the path alone, the ScoreRow kept for ranking, and
    the peak of ranking and rendering a CSV at the end; then the time of the end-of-run summary
    (which `-q` skips) at a few sizes, to show how it grows."""
    import tracemalloc
    import types

    from loda_cli.cli import score as score_cli
    from loda_cli.output import ranked_records, render

    root = "/tmp/loda-bench-scale/set-50000"
    _row_like_the_cli(0, root)  # imports happen here, not inside the measurement
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    paths = [_row_like_the_cli(i, root).path for i in range(count)]
    path_bytes = tracemalloc.get_traced_memory()[0] - base
    del paths
    base = tracemalloc.get_traced_memory()[0]
    rows = [_row_like_the_cli(i, root) for i in range(count)]
    row_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.reset_peak()
    text = render(ranked_records(rows), "csv")
    end_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    print(f"{count} rows: path strings {path_bytes / count:.0f} B/file; ScoreRow list "
          f"{row_bytes / count:.0f} B/file; peak while ranking and rendering the CSV "
          f"{end_peak / count:.0f} B/file (the CSV text itself {len(text) / count:.0f} B/file)")

    scorer = types.SimpleNamespace(times=types.SimpleNamespace(cached=0), device="cpu",
                                   precision="fp32", name="bench")
    score_cli.err_console.quiet = True
    for size in (1000, 2000, 4000):
        rows = [_row_like_the_cli(i, root) for i in range(size)]
        started = time.perf_counter()
        score_cli._summary(scorer, rows, [], 1.0, None)
        print(f"end-of-run summary (cli/score.py _summary, not run with -q) for {size} rows: "
              f"{time.perf_counter() - started:.2f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 50000])
    default_dir = Path(os.environ.get("LODA_BENCH_DIR", "/tmp/loda-bench-scale"))
    parser.add_argument("--dir", type=Path, default=default_dir)
    parser.add_argument("--model", default="auto", help="auto, tiny, or a --model value")
    parser.add_argument("--workers", type=int, default=None,
                        help="--workers for loda score (default: its own)")
    parser.add_argument("--crops", type=int, default=None,
                        help="--crops for loda score (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="--device for loda score (default: auto)")
    parser.add_argument("--row-cost", type=int, metavar="N", default=None,
                        help="only measure (tracemalloc) what N result rows cost the main process")
    parser.add_argument("--no-first-row", action="store_true",
                        help="skip the time-to-first-result runs")
    parser.add_argument("--report", action="store_true", help="only print the stored results")
    parser.add_argument("--progress-rerun", action="store_true",
                        help="only add a cached rerun without -q to the stored results of --counts")
    options = parser.parse_args(argv)

    root = options.dir
    root.mkdir(parents=True, exist_ok=True)
    store = root / "results.json"
    results = json.loads(store.read_text(encoding="utf-8")) if store.exists() else {}
    if options.row_cost:
        row_cost(options.row_cost)
        return
    if not options.report:
        model, label = choose_model(root, options.model)
        extra = []
        passed = (("--workers", options.workers), ("--crops", options.crops),
                  ("--device", options.device))
        for flag, value in passed:
            if value is not None:
                extra += [flag, str(value)]
                label += f", {flag} {value}"
        for count in options.counts:
            if options.progress_rerun:  # add a run without -q to a count benched earlier
                entry = results.get(label, {}).get(str(count))
                if entry is None:
                    raise SystemExit(f"no stored results for {count} files with {label}")
                entry["cached_progress"] = cached_rerun_with_progress(root, count, model, extra)
            else:
                largest = count == max(options.counts)
                entry = bench_count(root, count, model, extra,
                                    first_row=largest and not options.no_first_row)
                entry["loda_options"] = extra
                results.setdefault(label, {})[str(count)] = entry
            store.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    for label, by_count in results.items():
        print_table(list(by_count.values()), label)


if __name__ == "__main__":
    main()
