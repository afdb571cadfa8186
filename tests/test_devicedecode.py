"""Decoding JPEGs on the scoring device (nvJPEG on CUDA). Where there is no GPU the same path runs
with ``decode="device"`` on the CPU (torchvision's libjpeg-turbo): orientation, resizing, crops,
the fallback to the CPU path and the error rows are all this code's, whatever the decoder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from loda_cli import devicedecode  # noqa: E402
from loda_cli.images import FoundFile, _apply_orientation  # noqa: E402
from loda_cli.images import resize_short_side as pil_resize  # noqa: E402


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    from loda_cli.benchmark_speed import photo_like

    return photo_like(w, h, seed)


def _jpeg(path: Path, image: Image.Image, **kw) -> Path:
    image.save(path, "JPEG", quality=kw.pop("quality", 92), **kw)
    return path


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_turns_the_picture_as_pillow_does(orientation):
    array = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    expected = np.asarray(_apply_orientation(Image.fromarray(array), orientation))
    got = devicedecode.orient(torch.from_numpy(array).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and (got == expected).all()


def test_resize_matches_pillows_size_and_nearly_its_pixels():
    image = _photo(1003, 701)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    for short in (384, 224, 701):
        ours = devicedecode.resize_short_side(tensor, short).permute(1, 2, 0).numpy()
        theirs = np.asarray(pil_resize(image, short, "bicubic"))
        assert ours.shape == theirs.shape
        assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 1.0


def test_only_plain_jpegs_go_to_the_device(tmp_path):
    photo = _photo(640, 480)
    plain = _jpeg(tmp_path / "plain.jpg", photo)
    progressive = _jpeg(tmp_path / "progressive.jpg", photo, progressive=True)
    cmyk = _jpeg(tmp_path / "cmyk.jpg", photo.convert("CMYK"))
    png = tmp_path / "photo.png"
    photo.save(png)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(plain.read_bytes()[:-2000])
    rotated = tmp_path / "rotated.jpg"
    rotated.write_bytes(_with_orientation(photo, 6))

    def take(path):
        item = {"index": 0}
        return devicedecode.jpeg_for_device(FoundFile(path, tmp_path), item, groups=True), item

    ok, item = take(plain)
    assert ok and item["jpeg"].tobytes() == plain.read_bytes() and (item["width"], item["height"]) == (640, 480)
    assert item["format"] == "JPEG" and "taken" in item and "camera" in item
    ok, item = take(rotated)
    assert ok and item["orientation"] == 6 and (item["width"], item["height"]) == (480, 640)
    for path in (progressive, cmyk, png, truncated):
        ok, item = take(path)
        assert not ok and item == {"index": 0}, path.name


def test_a_file_the_decoder_refuses_takes_the_cpu_path(tmp_path):
    """A batch the decoder rejects is decoded file by file; the refused file goes to the
    fallback and the others are still decoded on the device."""
    from loda_cli.config import Preprocess

    photo = _photo(500, 400)
    good = _jpeg(tmp_path / "good.jpg", photo)
    items = []
    for i, data in enumerate([good.read_bytes(), good.read_bytes()[:200] + b"\xff\xd9"]):
        items.append({"index": i, "jpeg": np.frombuffer(data, np.uint8), "orientation": 1, "width": 500,
                      "height": 400, "format": "JPEG", "found": FoundFile(good, tmp_path)})
    fell_back = []

    def fallback(item):
        fell_back.append(item["index"])
        return {"index": item["index"], "error": "corrupt image: from the CPU path"}

    decoder = devicedecode.DeviceDecoder("cpu", Preprocess(num_crops=3), True, fallback, 384, batch_size=8)
    out = [x for item in items for x in decoder.add(item)] + list(decoder.flush())
    assert fell_back == [1] and decoder.fallbacks == 1
    assert out[0]["crops"].shape == (3, 3, 224, 224) and out[0]["crops"].dtype == torch.uint8
    assert len(out[0]["look"]) == 32 and "jpeg" not in out[0] and "found" not in out[0]
    assert out[1]["error"] == "corrupt image: from the CPU path"
    small = devicedecode.DeviceDecoder("cpu", Preprocess(num_crops=3), False, fallback, 384, batch_pixels=300_000)
    assert list(small.add(dict(items[0]))) == [] and len(list(small.add(dict(items[0])))) == 2  # 400k pixels


def _scores(folder: Path, decode: str, model, workers: int = 0):
    from loda_cli.scoring import Scorer

    scorer = Scorer(model, device="cpu", precision="fp32", decode=decode, workers=workers, cache=False)
    return {Path(r.path).name: r for r in scorer.score_files([folder])}, scorer


def test_device_decoding_scores_as_the_cpu_path_and_keeps_its_error_rows(tmp_path):
    """The built-in model (a detail view, 9 + 5 crops) on a folder of every kind of file: plain,
    rotated, progressive and CMYK JPEGs, a PNG, a truncated JPEG and a text file named .jpg.
    Scores agree within 0.005 with the CPU path; sizes, formats and error rows are the same."""
    folder = tmp_path / "photos"
    folder.mkdir()
    big = _photo(2400, 1800, seed=1)
    _jpeg(folder / "plain.jpg", big)
    (folder / "rotated.jpg").write_bytes(_with_orientation(_photo(1800, 1350, seed=2), 6))
    _jpeg(folder / "progressive.jpg", _photo(1200, 900, seed=3), progressive=True)
    _jpeg(folder / "cmyk.jpg", _photo(1000, 800, seed=4).convert("CMYK"))
    _photo(900, 700, seed=5).save(folder / "photo.png")
    (folder / "truncated.jpg").write_bytes((folder / "plain.jpg").read_bytes()[:-5000])
    (folder / "notes.jpg").write_text("not a picture")

    cpu, scorer = _scores(folder, "cpu", None)
    assert scorer.device_decoder is None
    device, scorer = _scores(folder, "device", None, workers=1)  # headers read in a worker process
    assert scorer.device_decoder.decoded == 2 and scorer.device_decoder.fallbacks == 0  # plain, rotated
    assert cpu.keys() == device.keys() and len(cpu) == 7
    for name in cpu:
        a, b = cpu[name], device[name]
        assert (a.error, a.width, a.height, a.format) == (b.error, b.width, b.height, b.format), name
        if a.error is None:
            assert abs(a.score - b.score) <= 0.005, (name, a.score, b.score)
            assert len(a.crops) == len(b.crops) == 14
            assert [c[:4] for c in a.crops] == [c[:4] for c in b.crops], name  # the same boxes
    assert cpu["rotated.jpg"].width == 1350 and cpu["truncated.jpg"].error and cpu["notes.jpg"].error


def test_decode_choice_is_checked(tiny_checkpoint):
    from loda_cli.errors import UsageError
    from loda_cli.scoring import Scorer

    with pytest.raises(UsageError, match="unknown decode"):
        Scorer(str(tiny_checkpoint), device="cpu", decode="gpu")
    assert not Scorer(str(tiny_checkpoint), device="cpu", precision="fp32").device_decode
    assert Scorer(str(tiny_checkpoint), device="cpu", precision="fp32", decode="device").device_decode


@pytest.mark.parametrize("orientation", [1, 6])
@pytest.mark.parametrize("target", [40, 100, 800])  # draft 1/8 then reduce 2; draft 1/4; neither
def test_the_device_reduces_as_the_cpu_paths_draft_and_box_reduction(tmp_path, orientation, target):
    from torchvision.io import ImageReadMode, decode_jpeg

    from loda_cli.images import decode_image

    path = tmp_path / "photo.jpg"
    path.write_bytes(_with_orientation(_photo(2001, 1499), orientation))
    cpu = np.asarray(decode_image(path, target_short_side=target).image)
    stored = decode_jpeg(torch.from_numpy(np.fromfile(path, np.uint8)), mode=ImageReadMode.RGB)
    ours = devicedecode.reduce_like_cpu(stored, orientation, target).permute(1, 2, 0).numpy()
    assert ours.shape == cpu.shape
    assert np.abs(ours.astype(int) - cpu.astype(int)).mean() < 0.6  # measured 0.2-0.3 (bicubic: 1.6)
