"""An HTML contact sheet of scored photos, for deciding before culling.

``build_review`` writes one page and a folder of JPEG thumbnails beside it (``review.html`` gets
``review_files/``). The page is self-contained: inline CSS, an inline SVG histogram, and a small
inline script (a folder filter, a "would be culled" filter, the order) whose hash is pinned in the
page's Content-Security-Policy, so no other script can run even if escaping ever failed. It loads
nothing from the network and opens from disk with no server.

Every file name and folder is HTML-escaped; names that are not valid UTF-8 are shown with their
odd bytes escaped (``\\xff``), never dropped. Photos are only read, never changed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from loda_cli import __version__
from loda_cli.errors import OutputError, UsageError
from loda_cli.scoresfile import read_scores, scores_bases

GENERATOR = f"loda review {__version__}"
_MARKER = ".loda-review"
_BINS = 20


@dataclass
class ReviewItem:
    path: str  # where the photo is, as resolved
    shown: str  # the path as the scores file gave it, made printable
    folder: str  # shown folder, used by the filter
    score: float
    thumb: Optional[str] = None  # file name inside the thumbnails folder
    thumb_size: tuple[int, int] = (0, 0)
    error: Optional[str] = None  # why `loda score` could not score it (score is then 0)
    found: bool = True  # whether the file is where the path leads


@dataclass
class ReviewReport:
    page: str
    thumbs_dir: str
    photos: int
    thumbs: int
    failed: int
    below: int
    unscored: int = 0  # the scores file's failed rows, shown marked after the scored photos
    missing: int = 0  # paths that lead to no file (relative paths resolved elsewhere?)
    bases: tuple[str, ...] = ()  # where relative paths were looked for, in order


def _printable(path: str) -> str:
    text = os.fsencode(path).decode("utf-8", errors="backslashreplace")
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


def _resolve(raw: str, bases: Sequence[str]) -> tuple[str, bool]:
    """Where a path from the scores file leads, and whether a file is there."""
    if os.path.isabs(raw):
        return raw, os.path.lexists(raw)
    for base in bases:
        candidate = os.path.join(base, raw)
        if os.path.lexists(candidate):
            return candidate, True
    return os.path.join(bases[0], raw), False


def _make_thumb(source: str, target: str, size: int) -> tuple[int, int]:
    """Write a JPEG thumbnail; returns its size. Raises on failure.

    Decoded by the scorer's own decoder (``images.decode_image``), so every photo `loda score`
    read gets a preview: HEIC/HEIF, camera RAW previews, EXIF orientation, 16-bit and CMYK files.
    """
    from loda_cli.images import decode_image

    img = decode_image(source, target_short_side=size).image
    img.thumbnail((size, size))
    tmp = target + ".part"
    img.save(tmp, "JPEG", quality=82)
    os.replace(tmp, target)
    return img.size


def _thumb_name(path: str, size: int) -> str:
    try:
        st = os.stat(path)
        key = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        key = "missing"
    digest = hashlib.sha256(os.fsencode(path) + f"|{key}|{size}".encode()).hexdigest()[:20]
    return f"{digest}.jpg"


def build_review(
    scores_file: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    below: Optional[float] = None,
    thumb_size: int = 256,
    force: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> ReviewReport:
    """Write the review page ``out`` and its thumbnails folder; returns what was written."""
    if below is not None and not 0.0 <= below <= 1.0:
        raise UsageError("--below is a score in [0, 1]")
    if not 32 <= thumb_size <= 2048:
        raise UsageError("--thumb-size is between 32 and 2048 pixels")
    parsed = read_scores(scores_file)
    page = os.path.abspath(os.fspath(out))
    page_dir = os.path.dirname(page)
    stem = os.path.splitext(os.path.basename(page))[0]
    thumbs_dir = os.path.join(page_dir, f"{stem}_files")
    _check_outputs(page, thumbs_dir, force)
    os.makedirs(thumbs_dir, exist_ok=True)
    marker = os.path.join(thumbs_dir, _MARKER)
    if not os.path.exists(marker):
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(f"Thumbnails for {os.path.basename(page)}, written by {GENERATOR}.\n")

    bases = scores_bases(scores_file, parsed.header)
    items = []
    for row in sorted(parsed.rows, key=lambda r: (r.score, r.path)):
        shown = _printable(row.path)
        folder = os.path.dirname(shown) or "."
        path, found = _resolve(row.path, bases)
        items.append(ReviewItem(path, shown, folder, row.score, found=found))
    for raw, error in parsed.failed:  # after the scored photos, as the scores file ranks them
        shown = _printable(raw)
        path, found = _resolve(raw, bases)
        items.append(ReviewItem(path, shown, os.path.dirname(shown) or ".", 0.0, error=error, found=found))

    def work(item: ReviewItem) -> None:
        if not item.found:
            return
        name = _thumb_name(item.path, thumb_size)
        target = os.path.join(thumbs_dir, name)
        try:
            if os.path.exists(target):
                from PIL import Image

                with Image.open(target) as existing:
                    item.thumb_size = existing.size
            else:
                item.thumb_size = _make_thumb(item.path, target, thumb_size)
            item.thumb = name
        except Exception:  # noqa: BLE001 - any undecodable file just shows without a preview
            item.thumb = None

    done = 0
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for _ in pool.map(work, items):
            done += 1
            if progress:
                progress(done, len(items))

    html_text = render_page(
        items,
        thumbs_url=urllib.parse.quote(os.path.basename(thumbs_dir)),
        below=below,
        page_dir=page_dir,
        title=_printable(os.path.basename(os.fspath(scores_file))),
    )
    tmp = page + ".part"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(html_text)
        os.replace(tmp, page)
    except OSError as exc:
        raise OutputError(f"cannot write {_printable(page)}: {exc.strerror}") from None
    thumbs = sum(1 for i in items if i.thumb)
    cull = sum(1 for i in items if below is not None and i.error is None and i.score < below)
    unscored = sum(1 for i in items if i.error is not None)
    missing = sum(1 for i in items if not i.found)
    return ReviewReport(
        page, thumbs_dir, len(items), thumbs, len(items) - thumbs, cull, unscored, missing,
        tuple(bases),
    )


def _check_outputs(page: str, thumbs_dir: str, force: bool) -> None:
    """Refuse to overwrite anything loda did not write (a photo named review.html, say)."""
    if os.path.lexists(page):
        if os.path.islink(page) or not os.path.isfile(page):
            raise OutputError(f"{_printable(page)} exists and is not a file loda wrote")
        with open(page, "rb") as fh:
            head = fh.read(4096)
        if b'content="loda review' not in head and not force:
            raise OutputError(
                f"{_printable(page)} exists and was not written by loda review; "
                "pass --force to replace it"
            )
    if os.path.lexists(thumbs_dir):
        if os.path.islink(thumbs_dir) or not os.path.isdir(thumbs_dir):
            raise OutputError(f"{_printable(thumbs_dir)} exists and is not a folder loda made")
        if not os.path.exists(os.path.join(thumbs_dir, _MARKER)) and os.listdir(thumbs_dir):
            raise OutputError(
                f"{_printable(thumbs_dir)} exists and holds files loda did not write; "
                "choose another --out"
            )


def _histogram_svg(scores: Sequence[float], below: Optional[float]) -> str:
    counts = [0] * _BINS
    for score in scores:
        counts[min(_BINS - 1, int(score * _BINS))] += 1
    width, height, pad = 600, 160, 24
    plot_h = height - 2 * pad
    bar_w = (width - 2 * pad) / _BINS
    peak = max(counts) or 1
    parts = [
        f'<svg class="hist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="Histogram of scores">'
    ]
    for i, count in enumerate(counts):
        h = plot_h * count / peak
        x = pad + i * bar_w
        low = i / _BINS
        cls = "bar cull" if below is not None and low < below else "bar"
        parts.append(
            f'<rect class="{cls}" x="{x:.1f}" y="{pad + plot_h - h:.1f}" '
            f'width="{bar_w - 2:.1f}" height="{h:.1f}">'
            f"<title>{low:.2f}-{low + 1 / _BINS:.2f}: {count}</title></rect>"
        )
    base = pad + plot_h
    parts.append(f'<line class="axis" x1="{pad}" y1="{base}" x2="{width - pad}" y2="{base}"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + tick * (width - 2 * pad)
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{tick:g}</text>')
    if below is not None:
        x = pad + below * (width - 2 * pad)
        n = sum(1 for s in scores if s < below)
        parts.append(
            f'<line class="threshold" x1="{x:.1f}" y1="{pad - 8}" x2="{x:.1f}" y2="{base}"/>'
        )
        parts.append(
            f'<text class="threshold-label" x="{x + 4:.1f}" y="{pad - 10}">'
            f"below {below:g}: {n}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


_SCRIPT = """
(function () {
  var grid = document.getElementById('grid');
  var folder = document.getElementById('folder');
  var onlyCull = document.getElementById('only-cull');
  var order = document.getElementById('order');
  var shown = document.getElementById('shown');
  function apply() {
    var n = 0;
    var items = grid.children;
    for (var i = 0; i < items.length; i++) {
      var el = items[i];
      var ok = (folder.value === '' || el.getAttribute('data-folder') === folder.value) &&
               (!onlyCull.checked || el.classList.contains('cull'));
      el.hidden = !ok;
      if (ok) n++;
    }
    shown.textContent = String(n);
  }
  function reorder() {
    var items = Array.prototype.slice.call(grid.children);
    var sign = order.value === 'best' ? -1 : 1;
    items.sort(function (a, b) {
      var sa = parseFloat(a.getAttribute('data-score'));
      var sb = parseFloat(b.getAttribute('data-score'));
      if (isNaN(sa) || isNaN(sb)) { return (isNaN(sa) ? 1 : 0) - (isNaN(sb) ? 1 : 0); }
      return sign * (sa - sb);
    });
    items.forEach(function (el) { grid.appendChild(el); });
  }
  function countLoaded() {
    var imgs = document.querySelectorAll('#grid img');
    var ok = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
    }
    document.documentElement.setAttribute('data-loaded-images', String(ok));
    document.getElementById('loaded').textContent = String(ok);
  }
  folder.addEventListener('change', apply);
  onlyCull.addEventListener('change', apply);
  order.addEventListener('change', function () { reorder(); apply(); });
  var imgs = document.querySelectorAll('#grid img');
  for (var i = 0; i < imgs.length; i++) { imgs[i].addEventListener('load', countLoaded); }
  window.addEventListener('load', countLoaded);
  apply();
})();
"""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
header { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-end; margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0 0 4px; }
.controls label { margin-right: 14px; }
.hist .bar { fill: #7a9cc6; } .hist .bar.cull { fill: #d9534f; }
.hist .axis { stroke: #555; } .hist text { font-size: 11px; fill: #444; }
.hist .threshold { stroke: #b00; stroke-width: 2; stroke-dasharray: 4 3; }
.hist .threshold-label { fill: #b00; font-weight: 600; }
#grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; padding: 6px; background: #fff; border: 3px solid #ddd; border-radius: 4px;
         width: var(--thumb); }
figure.cull { border-color: #d9534f; background: #fff3f2; }
figure img, figure .missing { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figure .missing { height: 80px; line-height: 80px; text-align: center; color: #999;
                  background: #eee; }
figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
figcaption .score { font-weight: 700; margin-right: 6px; }
figure.cull .score::after { content: " cull"; color: #d9534f; }
figure.failed { border-color: #555; border-style: dashed; background: #f2f2f2; }
figure.failed .score { color: #555; }
figcaption .error { display: block; color: #a00; }
"""


def render_page(
    items: Sequence[ReviewItem],
    *,
    thumbs_url: str,
    below: Optional[float],
    page_dir: str,
    title: str,
) -> str:
    """The HTML of the review page. Every piece of text from a file name is escaped here."""
    esc = html.escape
    scores = [i.score for i in items if i.error is None]
    unscored = sum(1 for i in items if i.error is not None)
    width = max([i.thumb_size[0] for i in items] + [128])
    folders: dict[str, int] = {}
    for item in items:
        folders[item.folder] = folders.get(item.folder, 0) + 1
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    csp = (
        "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'"
    )
    cull_count = sum(1 for s in scores if below is not None and s < below)
    failed_note = (
        f" {unscored} could not be scored (marked, shown last)." if unscored else ""
    )
    thumb_count = sum(1 for i in items if i.thumb)
    disabled = "" if below is not None else " disabled"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en" data-loaded-images="0">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta name="generator" content="{esc(GENERATOR)}">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>loda review: {esc(title)}</title>",
        f"<style>{_STYLE}figure {{ --thumb: {width}px; }}</style>",
        "</head>",
        "<body>",
        "<header>",
        "<div>",
        f"<h1>loda review: {esc(title)}</h1>",
        f"<p>{len(scores)} photos, worst first. Score in [0, 1], higher is better.{failed_note}"
        + (
            f" <strong>{cull_count}</strong> below {below:g} (outlined red) would be culled."
            if below is not None
            else ""
        )
        + f' Previews loaded: <span id="loaded">0</span> of {thumb_count}.</p>',
        '<div class="controls">',
        '<label>Folder <select id="folder"><option value="">All folders</option>',
    ]
    for folder, count in sorted(folders.items()):
        out.append(f'<option value="{esc(folder)}">{esc(folder)} ({count})</option>')
    out += [
        "</select></label>",
        f'<label><input type="checkbox" id="only-cull"{disabled}> '
        "Only photos below the threshold</label>",
        '<label>Order <select id="order"><option value="worst">worst first</option>'
        '<option value="best">best first</option></select></label>',
        'Showing <span id="shown">0</span>',
        "</div>",
        "</div>",
        _histogram_svg(scores, below),
        "</header>",
        '<main id="grid">',
    ]
    for item in items:
        culled = below is not None and item.error is None and item.score < below
        classes = "photo failed" if item.error else "photo cull" if culled else "photo"
        name = os.path.basename(item.shown) or item.shown
        link = _file_link(item.path, page_dir)
        if item.thumb:
            w, h = item.thumb_size
            picture = (
                f'<img src="{esc(thumbs_url)}/{esc(item.thumb)}" width="{w}" height="{h}" '
                f'alt="{esc(name)}">'
            )
        else:
            why = "no preview" if item.found else "file not found"
            picture = f'<div class="missing">{why}</div>'
        score_text = "failed" if item.error else f"{item.score:.3f}"
        data_score = "" if item.error else f"{item.score:.6f}"
        error_text = f'<span class="error">{esc(item.error)}</span>' if item.error else ""
        out.append(
            f'<figure class="{classes}" data-folder="{esc(item.folder)}" '
            f'data-score="{data_score}">'
            f'<a href="{esc(link)}">{picture}</a>'
            f'<figcaption><span class="score">{score_text}</span>'
            f'<span class="name" title="{esc(item.shown)}">{esc(name)}</span>{error_text}'
            "</figcaption></figure>"
        )
    out += ["</main>", f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""]
    return "\n".join(out)


def _file_link(path: str, page_dir: str) -> str:
    """A relative URL from the page to the photo, every byte of the name percent-encoded."""
    try:
        rel = os.path.relpath(path, page_dir)
    except ValueError:
        rel = path
    return urllib.parse.quote(os.fsencode(rel))
