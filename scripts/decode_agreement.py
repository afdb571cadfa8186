"""Device JPEG decoding (nvJPEG on CUDA) against the CPU path, on one folder of photos.

    python scripts/decode_agreement.py --device cuda [--images DIR] [--model loda-builtin]

Scores every file twice with the same model and device, JPEGs decoded by the CPU workers
(``--decode cpu``) and on the device (``--decode device``), and prints the largest score
difference (the target is <= 0.005), whether sizes, formats and error rows match, and how many
files the device decoded or handed back to the CPU. Without ``--images`` it writes a folder of
every kind of file the device path must handle: plain, EXIF-rotated, progressive, CMYK and
truncated JPEGs, a PNG, and a text file named .jpg. Exits 1 when anything disagrees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_folder(folder: Path) -> Path:
    from PIL import Image

    from loda_cli.benchmark_speed import photo_like as _photo

    folder.mkdir(parents=True, exist_ok=True)
    _photo(6000, 4000, 1).save(folder / "plain_24mp.jpg", quality=92)
    _photo(4000, 3000, 2).save(folder / "plain_12mp.jpg", quality=85)
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(4000, 3000, 3).save(folder / "rotated.jpg", quality=92, exif=exif)
    _photo(3000, 2000, 4).save(folder / "progressive.jpg", quality=92, progressive=True)
    _photo(2000, 1500, 5).convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    _photo(1500, 1000, 6).convert("L").save(folder / "grey.jpg", quality=92)
    _photo(1200, 900, 7).save(folder / "photo.png")
    (folder / "truncated.jpg").write_bytes((folder / "plain_12mp.jpg").read_bytes()[:-20000])
    (folder / "notes.jpg").write_text("not a picture")
    return folder


def main() -> int:
    from loda_cli.scoring import Scorer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    folder = args.images or make_folder(Path(tempfile.mkdtemp(prefix="loda-decode-")) / "photos")
    rows, counts = {}, {}
    for decode in ("cpu", "device"):
        scorer = Scorer(args.model, device=args.device, precision=args.precision, decode=decode, cache=False)
        rows[decode] = {r.path: r for r in scorer.score_files([folder])}
        if scorer.device_decoder is not None:
            counts = {"decoded": scorer.device_decoder.decoded, "fallbacks": scorer.device_decoder.fallbacks}
    cpu, dev = rows["cpu"], rows["device"]
    mismatched = [p for p in cpu if p not in dev or (cpu[p].error, cpu[p].width, cpu[p].height, cpu[p].format)
                  != (dev[p].error, dev[p].width, dev[p].height, dev[p].format)]
    deltas = {p: abs(cpu[p].score - dev[p].score) for p in cpu if p in dev and cpu[p].ok and dev[p].ok}
    report = {
        "device": scorer.device, "model": scorer.name, "files": len(cpu), "device_decoded": counts.get("decoded"),
        "device_fallbacks": counts.get("fallbacks"), "max_abs_delta": max(deltas.values(), default=0.0),
        "mean_abs_delta": float(np.mean(list(deltas.values()))) if deltas else 0.0,
        "rows_that_differ": mismatched, "errors": sorted({r.error for r in cpu.values() if r.error}),
    }
    for p in sorted(cpu):
        d = dev.get(p)
        print(f"{Path(p).name:28s} cpu {cpu[p].score if cpu[p].ok else cpu[p].error!s:>10.10}  "
              f"device {(d.score if d.ok else d.error) if d else 'missing'!s:>10.10}")
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["max_abs_delta"] <= 0.005 and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
