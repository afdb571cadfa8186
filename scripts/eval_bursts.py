"""Measure burst grouping on a generated burst set, and print a small table.

    python scripts/eval_bursts.py [--out DIR] [--seed 7] [--frames 2-8] [--model PATH] [--timing]
                                  [--features]

1. The burst set (``make_burst_set``): real photos that ship inside PyPI packages (scikit-image,
   scikit-learn, matplotlib), each the scene of one burst of 2-8 frames from camera A: small
   shifts and crops, one or two frames blurred or noisy, EXIF ``DateTimeOriginal`` +
   ``SubSecTimeOriginal`` + ``OffsetTimeOriginal`` 0.1-0.5 s apart (written with Pillow's Exif
   support). Distractors: the same scene again minutes later from camera A (a group of its own),
   and a different scene within 2 s of the burst from camera B (one or two frames: a group of
   their own). Every fourth burst has no ``SubSecTimeOriginal`` (whole seconds only). Camera A's
   clock jumps back once: a last burst of another scene is stamped with the first burst's time.
   Two scenes come without EXIF time or camera (exported copies: resized and recompressed, at
   most 1% cropped): look alone must group them. Every frame's true group is (camera, scene,
   session).
2. ``loda score`` (the real command, in a subprocess) scores and groups the folder; the script
   reads the JSON and prints:
   - pairwise precision and recall over same-group pairs: of the pairs of frames loda put in
     one group, the share that truly share one (precision), and of the pairs that truly share a
     group, the share loda put in one (recall);
   - the keeper check: in every true burst that has a clean frame, loda's best frame is clean;
   - the singleton check: the distinct source photos, scored as they are, each get a group of
     their own.
3. ``--timing``: the time of `loda score` with grouping on and off (``--no-groups``), each on a
   fresh cache; and ``--photos N``: N frames scored in this process (no cache, no workers), the
   time spent on the look and EXIF (the scorer's ``times.look``) and on grouping, against the
   rest of the run.
5. ``--scale N``: the time and the peak RSS of grouping N synthetic records (a third without
   EXIF time, the rest in bursts), what a cached rerun of N files adds.
4. ``--features``: the same precision and recall for the alternative, the model's own pooled
   features (cosine similarity of the mean pooled feature over the crops), measured in-process.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parent.parent
START = 1_700_000_000.0  # 2023-11-14, the first burst's time
CAMERAS = {
    "A": {"make": "Loda", "model": "Burst A", "serial": "A-0001"},
    "B": {"make": "Loda", "model": "Burst B", "serial": "B-0002"},
}
FRAME_SIZE = 512  # the long side of every written frame


def _eval_builtin():
    spec = importlib.util.spec_from_file_location("eval_builtin", REPO / "scripts" / "eval_builtin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def scene_photos() -> list[tuple[str, np.ndarray]]:
    """Distinct real photos: eval_builtin's held-out photos (scikit-image's astronaut, chelsea,
    coffee, rocket; scikit-learn's china and flower; matplotlib's grace_hopper) and more of
    scikit-image's (camera, moon, coins, clock, hubble_deep_field, immunohistochemistry, retina,
    cell), grey ones made RGB. Those missing locally are left out; nothing is downloaded."""
    photos = list(_eval_builtin().heldout_photos())
    try:
        from skimage import data

        for name in ("camera", "moon", "coins", "clock", "hubble_deep_field", "immunohistochemistry",
                     "retina", "cell"):  # fmt: skip
            try:
                image = np.asarray(getattr(data, name)())
            except Exception:  # a data file scikit-image would have to download
                continue
            if image.ndim == 2:
                image = np.stack([image] * 3, axis=-1)
            photos.append((name, np.ascontiguousarray(image[..., :3], dtype=np.uint8)))
    except ImportError:
        pass
    seen: set[str] = set()
    return [(n, a) for n, a in photos if not (n in seen or seen.add(n))]


@dataclass
class Frame:
    name: str  # file name
    truth: str  # the true group: camera/scene/session
    degraded: str  # "", "blur" or "noise"
    taken: float | None  # seconds since the epoch (UTC), None: no EXIF time
    camera: str


def exif_bytes(taken: float | None, camera: dict[str, str] | None, offset: str = "+01:00",
               subsec: bool = True):
    """A Pillow Exif with the capture time (local time at ``offset``) and the camera."""
    exif = Image.Exif()
    if camera is not None:
        exif[0x010F] = camera["make"]
        exif[0x0110] = camera["model"]
    ifd = exif.get_ifd(0x8769)
    if camera is not None and camera.get("serial"):
        ifd[0xA431] = camera["serial"]
    if taken is not None:
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        shift = (hours * 3600 + minutes * 60) * (1 if offset[0] == "+" else -1)
        local = time.gmtime(int(taken) + shift)
        ifd[0x9003] = time.strftime("%Y:%m:%d %H:%M:%S", local)
        if subsec:
            ifd[0x9291] = f"{int(round((taken % 1) * 1000)):03d}"
        ifd[0x9011] = offset
    return exif


def _frame_image(base: np.ndarray, rng: np.random.Generator, degrade: str, moved: bool = True) -> Image.Image:
    """A frame of ``base``: a crop of 90-97% of each side, shifted by up to 3% (``moved``; else
    99-100%, an exported copy), resized to FRAME_SIZE on the long side; blurred (Gaussian, sigma
    3-4 px) or noisy (sigma 20-28)."""
    h, w = base.shape[:2]
    keep = rng.uniform(0.90, 0.97) if moved else rng.uniform(0.99, 1.0)
    shift = 0.03 if moved else 0.0
    ch, cw = int(h * keep), int(w * keep)
    top = int(np.clip((h - ch) / 2 + rng.uniform(-shift, shift) * h, 0, h - ch))
    left = int(np.clip((w - cw) / 2 + rng.uniform(-shift, shift) * w, 0, w - cw))
    image = Image.fromarray(base[top : top + ch, left : left + cw])
    scale = FRAME_SIZE / max(cw, ch)
    image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS)
    if degrade == "blur":
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(3.0, 4.0)))
    elif degrade == "noise":
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(20, 28), (image.height, image.width, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def _write(folder: Path, frame: Frame, image: Image.Image, exif) -> None:
    image.save(folder / frame.name, "JPEG", quality=92, exif=exif)


def _burst(folder, frames, rng, base, scene, camera, start, count, session, degrade=True, subsec=True) -> float:
    """Write ``count`` frames of one scene, 0.1-0.5 s apart; returns the last frame's time."""
    bad = set(rng.choice(count, size=min(count - 1, int(rng.integers(1, 3))), replace=False).tolist()) if degrade and count > 1 else set()
    taken = start
    for i in range(count):
        if i:
            taken += float(rng.uniform(0.1, 0.5))
        kind = ("blur", "noise")[int(rng.integers(0, 2))] if i in bad else ""
        frame = Frame(f"{camera}_{scene}_{session}_{i}.jpg", f"{camera}/{scene}/{session}", kind, taken, camera)
        _write(folder, frame, _frame_image(base, rng, kind), exif_bytes(taken, CAMERAS[camera], subsec=subsec))
        frames.append(frame)
    return taken


def make_burst_set(folder: Path, photos=None, *, seed: int = 7, frames: tuple[int, int] = (2, 8),
                   untimed_scenes: int = 2) -> list[Frame]:
    """Write the burst set into ``folder``; returns every frame with its true group."""
    photos = photos if photos is not None else scene_photos()
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: list[Frame] = []
    timed = photos[: len(photos) - untimed_scenes] if len(photos) > untimed_scenes + 1 else photos
    untimed = photos[len(timed):]
    for k, (scene, base) in enumerate(timed):
        start = START + k * 1800.0  # a burst every half hour
        count = int(rng.integers(frames[0], frames[1] + 1))
        end = _burst(folder, out, rng, base, scene, "A", start, count, "s0", subsec=k % 4 != 3)
        # the same scene minutes later, same camera: not the same burst
        _burst(folder, out, rng, base, scene, "A", end + float(rng.uniform(180, 600)), 1, "s1", degrade=False)
        # a different scene from a second camera, within 2 s of the burst
        other_name, other = timed[(k + 1) % len(timed)]
        _burst(folder, out, rng, other, other_name, "B", start + float(rng.uniform(0.0, 1.5)),
               int(rng.integers(1, 3)), f"near{k}", degrade=False)
    if len(timed) > 2:  # camera A's clock jumps back: another scene, at the first burst's time
        scene, base = timed[2]
        _burst(folder, out, rng, base, scene, "A", START + 0.2, int(rng.integers(2, 4)), "jump")
    for scene, base in untimed:  # exported copies: no EXIF time, no camera
        for i in range(int(rng.integers(2, 4))):
            frame = Frame(f"export_{scene}_{i}.jpg", f"-/{scene}/export", "", None, "")
            _write(folder, frame, _frame_image(base, rng, "", moved=False), Image.Exif())
            out.append(frame)
    (folder / "truth.json").write_text(json.dumps([f.__dict__ for f in out], indent=1))
    return out


def write_distinct(folder: Path, photos=None) -> list[str]:
    """The source photos as they are (no EXIF), one file each: none shares a scene."""
    photos = photos if photos is not None else scene_photos()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, array in photos:
        Image.fromarray(array).save(folder / f"{name}.png")
        names.append(f"{name}.png")
    return names


# --- measuring ----------------------------------------------------------------------------------


def pairwise_precision_recall(truth: dict[str, str], found: dict[str, object]) -> tuple[float, float, int, int]:
    """Precision and recall over unordered pairs of frames: a pair is positive when both frames
    share a group. Returns (precision, recall, true pairs, found pairs)."""
    names = sorted(truth)
    true_pairs = found_pairs = both = 0
    for a, b in itertools.combinations(names, 2):
        same_truth = truth[a] == truth[b]
        same_found = found.get(a) is not None and found.get(a) == found.get(b)
        true_pairs += same_truth
        found_pairs += same_found
        both += same_truth and same_found
    precision = both / found_pairs if found_pairs else 1.0
    recall = both / true_pairs if true_pairs else 1.0
    return precision, recall, true_pairs, found_pairs


def keeper_check(frames: list[Frame], rows: dict[str, dict]) -> tuple[int, int, list[str]]:
    """(bursts whose best frame is clean, bursts with a clean frame, the failures)."""
    bursts: dict[str, list[Frame]] = {}
    for frame in frames:
        bursts.setdefault(frame.truth, []).append(frame)
    good = total = 0
    failures = []
    for truth, members in sorted(bursts.items()):
        if len(members) < 2 or all(m.degraded for m in members):
            continue
        total += 1
        best = max(members, key=lambda m: rows[m.name]["score"])
        if best.degraded:
            failures.append(f"{truth}: kept {best.name} ({best.degraded})")
        else:
            good += 1
    return good, total, failures


def run_score(folder: Path, out: Path, *extra: str, home: Path | None = None) -> float:
    """Run `loda score` on ``folder``; returns its wall time in seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if home is not None:
        env["LODA_HOME"] = str(home)
    command = [sys.executable, "-m", "loda_cli", "score", str(folder), "--out", str(out), "-q", *extra]
    t0 = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - t0


def read_rows(out: Path) -> dict[str, dict]:
    doc = json.loads(out.read_text())
    return {Path(r["path"]).name: r for r in doc["rows"]}


def measure(folder: Path, frames: list[Frame], rows: dict[str, dict]) -> dict:
    truth = {f.name: f.truth for f in frames}
    found = {name: rows[name].get("group") for name in truth}
    precision, recall, true_pairs, found_pairs = pairwise_precision_recall(truth, found)
    good, total, failures = keeper_check(frames, rows)
    return {"frames": len(frames), "true_groups": len(set(truth.values())),
            "found_groups": len({g for g in found.values() if g is not None}),
            "precision": precision, "recall": recall, "true_pairs": true_pairs, "found_pairs": found_pairs,
            "keeper_ok": good, "keeper_total": total, "keeper_failures": failures}


def feature_groups(folder: Path, frames: list[Frame], model: str | None, threshold: float) -> dict[str, int]:
    """The alternative: group by the model's pooled features (mean over the scoring crops),
    linking frames of one camera within 2 s whose cosine similarity is at least ``threshold``
    (frames without time: any two), as burst grouping does with hashes."""
    import torch

    from loda_cli.bursts import Look, group_records
    from loda_cli.images import decode_image
    from loda_cli.model import pooled_feature
    from loda_cli.scoring import Scorer, decode_target
    from loda_cli.transforms import normalize, scoring_crops

    scorer = Scorer(model, device="cpu", precision="fp32", cache=False, workers=0)
    net = scorer.loaded.model
    vectors = []
    for frame in frames:
        image = decode_image(folder / frame.name, target_short_side=decode_target(scorer.preprocess)).image
        crops = torch.from_numpy(scoring_crops(image, scorer.preprocess))
        with torch.inference_mode():
            tokens = net.forward_features(normalize(crops, scorer.preprocess))
            feature = pooled_feature(net.vit, tokens).mean(dim=0)
        vectors.append(torch.nn.functional.normalize(feature, dim=0).numpy())
    similarity = np.stack(vectors) @ np.stack(vectors).T
    records = [Look(i, f.taken, f.camera, None) for i, f in enumerate(frames)]
    groups = group_records(records, similar=lambda i, j, timed: similarity[i, j] >= threshold)
    return {f.name: groups[i] for i, f in enumerate(frames)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the burst set (default: a temp folder)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--frames", default="2-8", help="frames per burst, MIN-MAX")
    parser.add_argument("--model", default=None)
    parser.add_argument("--timing", action="store_true", help="also time scoring with grouping on and off")
    parser.add_argument("--features", action="store_true", help="also measure the model's pooled features")
    parser.add_argument("--photos", type=int, default=0, help="also split the time of scoring this many frames")
    parser.add_argument("--scale", type=int, default=0, help="only: group this many synthetic records")
    parser.add_argument("--untimed", action="store_true", help="with --scale: none of them has an EXIF time")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.scale:
        result = scale(args.scale, args.untimed)
        print(f"grouped {result['records']} records into {result['groups']} groups in "
              f"{result['grouping_seconds']:.2f} s; peak RSS {result['peak_rss_mb_before']:.0f} MB before, "
              f"{result['peak_rss_mb_after']:.0f} MB after")
        return 0
    low, high = (int(x) for x in args.frames.split("-"))
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        result = evaluate(base, seed=args.seed, frames=(low, high), model=args.model,
                          timing=args.timing, features=args.features)
        if args.photos:
            result.update(overhead_in_process(base / "many", args.photos, args.model))
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    ok = (result["precision"] >= 0.95 and result["recall"] >= 0.95 and not result["keeper_failures"]
          and result["singletons_ok"])
    return 0 if ok else 1


def evaluate(base: Path, *, seed: int = 7, frames=(2, 8), model: str | None = None, timing: bool = False,
             features: bool = False, photos=None, untimed_scenes: int = 2) -> dict:
    photos = photos if photos is not None else scene_photos()
    burst_dir, distinct_dir = base / "bursts", base / "distinct"
    written = make_burst_set(burst_dir, photos, seed=seed, frames=frames, untimed_scenes=untimed_scenes)
    write_distinct(distinct_dir, photos)
    model_args = ("--model", model) if model else ()
    home = base / "home"
    out = base / "bursts.json"
    seconds = run_score(burst_dir, out, *model_args, home=home)
    rows = read_rows(out)
    result = measure(burst_dir, written, rows)
    result["score_seconds"] = seconds
    distinct_out = base / "distinct.json"
    run_score(distinct_dir, distinct_out, *model_args, home=home)
    distinct = read_rows(distinct_out)
    groups = [r["group"] for r in distinct.values()]
    result["distinct_photos"] = len(groups)
    result["singletons_ok"] = len(set(groups)) == len(groups) and None not in groups
    if timing:
        result.update(time_grouping(burst_dir, base, model_args))
    if features:
        result["features"] = {}
        for threshold in (0.80, 0.85, 0.90, 0.95):
            found = feature_groups(burst_dir, written, model, threshold)
            p, r, _, _ = pairwise_precision_recall({f.name: f.truth for f in written}, found)
            result["features"][f"{threshold:.2f}"] = {"precision": p, "recall": r}
    return result


def time_grouping(folder: Path, base: Path, model_args) -> dict:
    """`loda score` with grouping on and off, alternately, each on a fresh cache (twice each:
    the faster of two)."""
    on, off = [], []
    for attempt in range(2):
        for flag, bucket in (("--groups", on), ("--no-groups", off)):
            home = base / f"home-{flag}-{attempt}"
            bucket.append(run_score(folder, base / "timing.json", *model_args, flag, home=home))
    return {"seconds_groups_on": min(on), "seconds_groups_off": min(off),
            "overhead": min(on) / min(off) - 1.0}


def overhead_in_process(folder: Path, count: int, model: str | None) -> dict:
    """Score ``count`` frames (burst sets written with more seeds until there are enough) in this
    process with grouping on, and split the time: look and EXIF, grouping, and the rest."""
    from loda_cli.bursts import assign_groups
    from loda_cli.scoring import Scorer

    seed = 100
    while len(list(folder.glob("*.jpg"))) < count:
        make_burst_set(folder / f"set{seed}", seed=seed, frames=(6, 8))
        for path in (folder / f"set{seed}").glob("*.jpg"):
            path.rename(folder / f"{seed}_{path.name}")
        seed += 1
    paths = sorted(folder.glob("*.jpg"))[:count]
    scorer = Scorer(model, device="cpu", cache=False, workers=0)
    t0 = time.perf_counter()
    rows = list(scorer.score_files(paths))
    t1 = time.perf_counter()
    assign_groups(rows)
    grouping = time.perf_counter() - t1
    look = scorer.times.look
    rest = t1 - t0 - look
    return {"overhead_photos": len(rows), "overhead_score_seconds": t1 - t0, "look_seconds": look,
            "grouping_seconds": grouping, "in_process_overhead": (look + grouping) / rest}


def scale(count: int, untimed: bool = False) -> dict:
    """Group ``count`` synthetic rows (random looks; two thirds in 3-frame bursts of one camera,
    a third without time; with ``untimed``, none has a time: the slowest case, every pair
    compared): seconds and the process's peak RSS before and after."""
    import random
    import resource

    import numpy  # noqa: F401 - imported before the first measurement: grouping's own memory only

    from loda_cli.bursts import assign_groups

    class Row:
        __slots__ = ("path", "score", "raw", "error", "taken", "camera", "look", "group", "rank_in_group")

    rng = random.Random(5)
    rows = []
    for k in range(count):
        row = Row()
        row.path, row.score, row.error = f"/photos/{k:06d}.jpg", rng.random(), None
        row.raw = row.score
        scene = k // 3
        bits = random.Random(scene)  # the frames of one scene share a look
        row.look = f"{bits.getrandbits(64):016x}{bits.getrandbits(64):016x}"
        row.taken = None if untimed or (k % 3 == 0 and scene % 2) else 1_700_000_000.0 + scene * 60 + (k % 3) * 0.3
        row.camera = "A"
        rows.append(row)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    assign_groups(rows)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"records": count, "grouping_seconds": seconds, "peak_rss_mb_before": before, "peak_rss_mb_after": after,
            "groups": len({r.group for r in rows})}


def print_table(result: dict) -> None:
    print(f"frames {result['frames']}, true groups {result['true_groups']}, found {result['found_groups']}")
    print(f"pairwise precision {result['precision']:.4f}  recall {result['recall']:.4f} "
          f"(true pairs {result['true_pairs']}, found pairs {result['found_pairs']})")
    print(f"keeper clean in {result['keeper_ok']} of {result['keeper_total']} bursts with a clean frame")
    for failure in result["keeper_failures"]:
        print(f"  keeper failure: {failure}")
    print(f"distinct photos: {result['distinct_photos']}, all singletons: {result['singletons_ok']}")
    print(f"loda score on the burst set: {result['score_seconds']:.1f} s")
    if "overhead" in result:
        print(f"grouping on {result['seconds_groups_on']:.1f} s, off {result['seconds_groups_off']:.1f} s: "
              f"overhead {100 * result['overhead']:+.1f}%")
    if "in_process_overhead" in result:
        print(f"{result['overhead_photos']} photos scored in {result['overhead_score_seconds']:.1f} s: look and EXIF "
              f"{result['look_seconds']:.2f} s, grouping {result['grouping_seconds']:.3f} s: "
              f"overhead {100 * result['in_process_overhead']:.2f}%")
    for threshold, pr in (result.get("features") or {}).items():
        print(f"pooled features, cosine >= {threshold}: precision {pr['precision']:.4f} recall {pr['recall']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
