"""An HTML contact sheet of scored photos, for deciding before culling.

``build_review`` writes one page and a folder of JPEG thumbnails beside it (``review.html`` gets
``review_files/``). The page is self-contained: inline CSS, an inline SVG histogram, and a small
inline script (a folder filter, a "would be culled" filter, the order, the crop-map toggle) whose
hash is pinned in the page's Content-Security-Policy, so no other script can run even if escaping
ever failed. It loads nothing from the network and opens from disk with no server.

Bursts and near-duplicate sets (the scores file's ``group``) are shown as rows of frames, best
first, the frames ``loda cull --bursts --keep N`` keeps marked. The crop map draws each crop's
score (the scores file's ``crops``) over the thumbnail as a translucent grid: the crops of the
whole-picture view as tiles, the detail view's smaller crops as outlined squares. The page
opened as ``review.html#cropmap`` starts with the map shown.

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
from loda_cli.atomic import replacing
from loda_cli.errors import OutputError, UsageError
from loda_cli.images import REVIEW_MARKER
from loda_cli.organize.paths import display_path
from loda_cli.scoresfile import read_scores, scores_bases

GENERATOR = f"loda review {__version__}"
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
    group: Optional[int] = None  # its burst or near-duplicate set
    crops: tuple = ()  # (x, y, w, h, score) per crop, in displayed pixels of ``size``
    size: tuple[int, int] = (0, 0)  # the displayed width and height the crops are measured in
    in_burst: bool = False  # one of a group of two or more
    keeper: bool = False  # among the frames `loda cull --bursts` keeps


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
    bursts: int = 0  # groups of two or more photos, shown as rows
    maps: int = 0  # photos with a crop map


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
    with replacing(target, sync=False) as fh:  # a preview: losing it to a power cut costs nothing
        img.save(fh, "JPEG", quality=82)
    return img.size


def _common_folder(folders: list[str]) -> str:
    """The folder every photo lies in ("../lib" when `loda score ../lib` wrote the paths), which
    the folder filter names once instead of in every entry; "" when there is none to name."""
    try:
        common = os.path.commonpath(folders) if folders else ""
    except ValueError:  # absolute and relative paths mixed
        return ""
    return "" if common in ("", ".", os.sep) else common


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
    keep: int = 1,
) -> ReviewReport:
    """Write the review page ``out`` and its thumbnails folder; returns what was written.
    ``keep``: how many frames of each burst are marked as kept (as ``loda cull --keep``)."""
    if below is not None and not 0.0 <= below <= 1.0:
        raise UsageError("--below is a score in [0, 1]")
    if keep < 1:
        raise UsageError("--keep must be 1 or more")
    if not 32 <= thumb_size <= 2048:
        raise UsageError("--thumb-size is between 32 and 2048 pixels")
    parsed = read_scores(scores_file)
    page = os.path.abspath(os.fspath(out))
    page_dir = os.path.dirname(page)
    stem = os.path.splitext(os.path.basename(page))[0]
    thumbs_dir = os.path.join(page_dir, f"{stem}_files")
    _check_outputs(page, thumbs_dir, force)
    os.makedirs(thumbs_dir, exist_ok=True)
    marker = os.path.join(thumbs_dir, REVIEW_MARKER)
    if not os.path.exists(marker):
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(f"Thumbnails for {display_path(os.path.basename(page))}, written by {GENERATOR}.\n")

    bases = scores_bases(scores_file, parsed.header)
    items = []
    for row in sorted(parsed.rows, key=lambda r: (r.score, r.path)):
        shown = display_path(row.path)
        folder = os.path.dirname(shown) or "."
        path, found = _resolve(row.path, bases)
        items.append(ReviewItem(
            path, shown, folder, row.score, found=found, group=row.group, crops=row.crops or (),
            size=(row.width or 0, row.height or 0),
        ))
    bursts = _mark_keepers(items, keep)
    for raw, error in parsed.failed:  # after the scored photos, as the scores file ranks them
        shown = display_path(raw)
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

    from loda_cli.threads import available_cpus

    done = 0
    with ThreadPoolExecutor(max_workers=min(8, available_cpus())) as pool:
        for _ in pool.map(work, items):
            done += 1
            if progress:
                progress(done, len(items))

    html_text = render_page(
        items,
        thumbs_url=urllib.parse.quote(os.fsencode(os.path.basename(thumbs_dir))),  # bytes: any name
        below=below,
        page_dir=page_dir,
        title=display_path(os.path.basename(os.fspath(scores_file))),
        keep=keep,
    )
    try:
        with replacing(page, "w", encoding="utf-8") as fh:
            fh.write(html_text)
    except OSError as exc:
        raise OutputError(f"cannot write {display_path(page)}: {exc.strerror}") from None
    thumbs = sum(1 for i in items if i.thumb)
    cull = sum(1 for i in items if below is not None and i.error is None and i.score < below)
    unscored = sum(1 for i in items if i.error is not None)
    missing = sum(1 for i in items if not i.found)
    maps = sum(1 for i in items if _has_map(i))
    return ReviewReport(
        page, thumbs_dir, len(items), thumbs, len(items) - thumbs, cull, unscored, missing,
        tuple(bases), bursts, maps,
    )


def _mark_keepers(items: Sequence[ReviewItem], keep: int) -> int:
    """Mark the ``keep`` best frames of each group of two or more; returns how many such groups."""
    members: dict[int, list[ReviewItem]] = {}
    for item in items:
        if item.group is not None and item.error is None:
            members.setdefault(item.group, []).append(item)
    bursts = 0
    for frames in members.values():
        if len(frames) < 2:
            continue
        bursts += 1
        for place, item in enumerate(sorted(frames, key=lambda i: (-i.score, i.path))):
            item.in_burst, item.keeper = True, place < keep
    return bursts


def _has_map(item: ReviewItem) -> bool:
    return bool(item.crops) and item.size[0] > 0 and item.size[1] > 0 and item.thumb is not None


def _check_outputs(page: str, thumbs_dir: str, force: bool) -> None:
    """Refuse to overwrite anything loda did not write (a photo named review.html, say)."""
    if os.path.lexists(page):
        if os.path.islink(page) or not os.path.isfile(page):
            raise OutputError(f"{display_path(page)} exists and is not a file loda wrote")
        with open(page, "rb") as fh:
            head = fh.read(4096)
        if b'content="loda review' not in head and not force:
            raise OutputError(
                f"{display_path(page)} exists and was not written by loda review; "
                "pass --force to replace it"
            )
    if os.path.lexists(thumbs_dir):
        if os.path.islink(thumbs_dir) or not os.path.isdir(thumbs_dir):
            raise OutputError(f"{display_path(thumbs_dir)} exists and is not a folder loda made")
        if not os.path.exists(os.path.join(thumbs_dir, REVIEW_MARKER)) and os.listdir(thumbs_dir):
            raise OutputError(
                f"{display_path(thumbs_dir)} exists and holds files loda did not write; "
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
  var maps = document.getElementById('maps');
  var shown = document.getElementById('shown');
  function apply() {
    var n = 0;
    var items = document.querySelectorAll('figure.photo');
    for (var i = 0; i < items.length; i++) {
      var el = items[i];
      var ok = (folder.value === '' || el.getAttribute('data-folder') === folder.value) &&
               (!onlyCull.checked || el.classList.contains('cull'));
      el.hidden = !ok;
      if (ok) n++;
    }
    var rows = document.querySelectorAll('.burst');
    for (var j = 0; j < rows.length; j++) {
      rows[j].hidden = rows[j].querySelectorAll('figure.photo:not([hidden])').length === 0;
    }
    shown.textContent = String(n);
  }
  function reorder() {
    // The single photos by score, and the burst rows by their best frame's (the keeper's).
    var sign = order.value === 'best' ? -1 : 1;
    [grid, document.getElementById('bursts')].forEach(function (box) {
      if (!box) { return; }
      var items = Array.prototype.slice.call(box.children);
      items.sort(function (a, b) {
        var sa = parseFloat(a.getAttribute('data-score'));
        var sb = parseFloat(b.getAttribute('data-score'));
        if (isNaN(sa) || isNaN(sb)) { return (isNaN(sa) ? 1 : 0) - (isNaN(sb) ? 1 : 0); }
        return sign * (sa - sb);
      });
      items.forEach(function (el) { box.appendChild(el); });
    });
  }
  // A crop map's cells are made from its data-cells ("left top width height" in percent of
  // the picture, the colour's hue, the crop's score to 3 and to 2 decimals, 1 for a detail-view
  // crop; ";" between cells) the first time it is shown near the window, so a page of many
  // photos carries no spans it may never show.
  function drawMap(el) {
    if (el.getAttribute('data-drawn')) { return; }
    el.setAttribute('data-drawn', '1');
    var cells = (el.getAttribute('data-cells') || '').split(';');
    for (var i = 0; i < cells.length; i++) {
      var v = cells[i].split(' ');
      if (v.length !== 8) { continue; }
      var hue = v[4], detail = v[7] === '1';
      var cell = document.createElement('span');
      cell.className = detail ? 'cell detail' : 'cell';
      var style = cell.style;
      style.left = v[0] + '%'; style.top = v[1] + '%'; style.width = v[2] + '%'; style.height = v[3] + '%';
      style.background = 'hsla(' + hue + ',85%,45%,' + (detail ? '0.3' : '0.4') + ')';
      if (detail) { style.borderColor = 'hsl(' + hue + ',85%,40%)'; }
      cell.title = 'crop score ' + v[5];
      cell.textContent = v[6];
      el.appendChild(cell);
    }
  }
  var near = null;
  if (window.IntersectionObserver) {
    near = new IntersectionObserver(function (entries) {
      for (var i = 0; i < entries.length; i++) {
        if (entries[i].isIntersecting) { drawMap(entries[i].target); near.unobserve(entries[i].target); }
      }
    }, {rootMargin: '800px'});
  }
  function drawAll() {
    var all = document.querySelectorAll('.map');
    for (var i = 0; i < all.length; i++) { drawMap(all[i]); }
  }
  window.addEventListener('beforeprint', function () {
    if (maps.checked) { drawAll(); }
    // A printout shows every preview: those not loaded yet (lazy) start loading now.
    var lazy = document.querySelectorAll('img[loading="lazy"]');
    for (var i = 0; i < lazy.length; i++) { lazy[i].loading = 'eager'; }
  });
  var watching = false;
  function showMaps() {
    document.body.classList.toggle('maps', maps.checked);
    var all = document.querySelectorAll('.map');
    var visible = 0, close = [], reach = window.innerHeight + 800;
    for (var i = 0; i < all.length; i++) {
      if (all[i].offsetWidth > 0) {
        visible++;
        var box = all[i].getBoundingClientRect();
        if (box.bottom > -800 && box.top < reach) { close.push(all[i]); }
      }
    }
    if (maps.checked) {
      // Those near the window now are drawn at once (read first, then drawn, so the layout is
      // worked out once); the observer draws the rest as they come near.
      for (var k = 0; k < close.length; k++) { drawMap(close[k]); }
      if (!watching) {
        watching = true;
        if (!near) { drawAll(); }
        for (var j = 0; near && j < all.length; j++) { near.observe(all[j]); }
      }
    }
    document.documentElement.setAttribute('data-maps-shown', String(visible));
  }
  // Counted as each preview loads: counting them all again at every load took time growing
  // with the square of the photos (minutes for 40,000).
  var loaded = 0;
  function showLoaded() {
    document.documentElement.setAttribute('data-loaded-images', String(loaded));
    document.getElementById('loaded').textContent = String(loaded);
  }
  function countLoaded() { loaded++; showLoaded(); }
  folder.addEventListener('change', apply);
  onlyCull.addEventListener('change', apply);
  order.addEventListener('change', function () { reorder(); apply(); });
  maps.addEventListener('change', showMaps);
  var imgs = document.querySelectorAll('figure img');
  for (var i = 0; i < imgs.length; i++) {
    // (one already loaded fired its load event before this ran; one not yet will fire it later)
    if (imgs[i].complete && imgs[i].naturalWidth > 0) { loaded++; }
    else { imgs[i].addEventListener('load', countLoaded); }
  }
  showLoaded();
  if (location.hash === '#cropmap' && !maps.disabled) { maps.checked = true; }
  apply();
  showMaps();
})();
"""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
header { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-end; margin-bottom: 12px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 15px; margin: 12px 0 6px; }
.controls label { margin-right: 14px; }
.hist .bar { fill: #7a9cc6; } .hist .bar.cull { fill: #d9534f; }
.hist .axis { stroke: #555; } .hist text { font-size: 11px; fill: #444; }
.hist .threshold { stroke: #b00; stroke-width: 2; stroke-dasharray: 4 3; }
.hist .threshold-label { fill: #b00; font-weight: 600; }
#grid { display: flex; flex-wrap: wrap; gap: 10px; }
.burst { display: flex; gap: 10px; align-items: flex-start; overflow-x: auto; padding: 8px;
         margin-bottom: 10px; background: #eef2f7; border-radius: 4px; }
.burst .label { flex: 0 0 70px; font-size: 12px; color: #445; }
figure { margin: 0; padding: 6px; background: #fff; border: 3px solid #ddd; border-radius: 4px;
         width: var(--thumb); flex: 0 0 auto; }
figure.cull { border-color: #d9534f; background: #fff3f2; }
figure.keeper { border-color: #2e8b57; box-shadow: 0 0 0 2px #2e8b57; }
figure.keeper figcaption .keep { color: #2e8b57; font-weight: 700; margin-right: 6px; }
figure.frame:not(.keeper) { opacity: 0.8; }
figure img, figure .missing { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figure .missing { height: 80px; line-height: 80px; text-align: center; color: #999;
                  background: #eee; }
.pic { position: relative; width: fit-content; margin: 0 auto; }
.map { display: none; position: absolute; inset: 0; pointer-events: none; overflow: hidden; }
body.maps .map { display: block; }
.map .cell { position: absolute; box-sizing: border-box; border: 1px solid rgba(255,255,255,0.5);
             font: 10px/1 system-ui, sans-serif; color: #fff; text-shadow: 0 0 2px #000;
             padding: 2px; }
.map .cell.detail { border: 2px solid #fff; }
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
    keep: int = 1,
) -> str:
    """The HTML of the review page. Every piece of text from a file name is escaped here."""
    bursts = _bursts(items)
    in_bursts = {id(item) for frames in bursts for item in frames}
    out = _page_top(items, below, title, len(bursts), keep)
    shown = 0  # previews so far: those after the first EAGER_PREVIEWS load lazily

    def figure(item: ReviewItem) -> str:
        nonlocal shown
        shown += bool(item.thumb)
        return _figure(item, thumbs_url, below, page_dir, lazy=shown > EAGER_PREVIEWS)

    if bursts:
        out.append('<section id="bursts">')
        for frames in bursts:
            out.append(
                f'<div class="burst" data-group="{frames[0].group}" data-score="{frames[0].score:.6f}">'
                f'<div class="label">group {frames[0].group}<br>{len(frames)} frames</div>'
            )
            out += [figure(item) for item in frames]
            out.append("</div>")
        out += ["</section>", "<h2>Single photos</h2>" if len(in_bursts) < len(items) else ""]
    out.append('<main id="grid">')
    out += [figure(i) for i in items if id(i) not in in_bursts]
    out += ["</main>", f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""]
    return "\n".join(out)


def _bursts(items: Sequence[ReviewItem]) -> list[list[ReviewItem]]:
    """Groups of two or more scored photos, each best frame first; worst best frame first, as
    the single photos are ordered worst first (the page's Order control turns both)."""
    members: dict[int, list[ReviewItem]] = {}
    for item in items:
        if item.group is not None and item.error is None:
            members.setdefault(item.group, []).append(item)
    rows = [sorted(frames, key=lambda i: (-i.score, i.path)) for frames in members.values() if len(frames) > 1]
    return sorted(rows, key=lambda frames: (frames[0].score, frames[0].group))


def _page_top(items: Sequence[ReviewItem], below: Optional[float], title: str, bursts: int, keep: int) -> list[str]:
    """From the doctype to the histogram: head, title, summary line and controls."""
    esc = html.escape
    scores = [i.score for i in items if i.error is None]
    unscored = sum(1 for i in items if i.error is not None)
    width = max([i.thumb_size[0] for i in items] + [128])
    folders: dict[str, int] = {}
    for item in items:
        folders[item.folder] = folders.get(item.folder, 0) + 1
    common = _common_folder(list(folders))
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    csp = (
        "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{script_hash}'"
    )
    cull_count = sum(1 for s in scores if below is not None and s < below)
    notes = f" {unscored} could not be scored (marked, shown last)." if unscored else ""
    if bursts:
        kept = "the best frame" if keep == 1 else f"the {keep} best frames"
        sets = ("1 burst or near-duplicate set is shown as a row" if bursts == 1
                else f"{bursts} bursts or near-duplicate sets are shown as rows")
        notes += (f" {sets}, best first; "
                  f"{kept} of each (what <code>loda cull --bursts</code> keeps) outlined green.")
    if below is not None:
        notes += f" <strong>{cull_count}</strong> below {below:g} (outlined red) would be culled."
    thumb_count = sum(1 for i in items if i.thumb)
    disabled = "" if below is not None else " disabled"
    no_maps = "" if any(_has_map(i) for i in items) else " disabled"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en" data-loaded-images="0" data-maps-shown="0">',
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
        f"<p>{len(items)} photos, worst first. Score in [0, 1], higher is better.{notes}"
        f' Previews loaded: <span id="loaded">0</span> of {thumb_count}'
        f'{"; the rest load as you scroll to them" if thumb_count > EAGER_PREVIEWS else ""}.</p>',
        '<div class="controls">',
        f'<label>Folder{" in " + esc(common) if common else ""} <select id="folder">'
        '<option value="">All folders</option>',
    ]
    for folder, count in sorted(folders.items()):
        label = os.path.relpath(folder, common) if common else folder
        out.append(f'<option value="{esc(folder)}">{esc(label)} ({count})</option>')
    out += [
        "</select></label>",
        f'<label><input type="checkbox" id="only-cull"{disabled}> '
        "Only photos below the threshold</label>",
        '<label>Order <select id="order"><option value="worst">worst first</option>'
        '<option value="best">best first</option></select></label>',
        f'<label><input type="checkbox" id="maps"{no_maps}> Crop map (the score of each crop)</label>',
        'Showing <span id="shown">0</span>',
        "</div>",
        "</div>",
        _histogram_svg(scores, below),
        "</header>",
    ]
    return out


# A page loads its first previews at once and the rest as the window comes near them
# (``loading="lazy"``): a page of one shoot loads whole, ready to print, and one of a whole library
# opens at once instead of having the browser read and decode every preview first.
EAGER_PREVIEWS = 500


def _figure(item: ReviewItem, thumbs_url: str, below: Optional[float], page_dir: str,
            lazy: bool = False) -> str:
    esc = html.escape
    culled = below is not None and item.error is None and item.score < below
    classes = "photo failed" if item.error else "photo cull" if culled else "photo"
    if item.in_burst:
        classes += " frame keeper" if item.keeper else " frame"
    name = os.path.basename(item.shown) or item.shown
    link = _file_link(item.path, page_dir)
    if item.thumb:
        w, h = item.thumb_size
        loading = ' loading="lazy"' if lazy else ""
        picture = (
            f'<div class="pic"><a href="{esc(link)}"><img src="{esc(thumbs_url)}/{esc(item.thumb)}" '
            f'width="{w}" height="{h}"{loading} alt="{esc(name)}"></a>'
            f"{_crop_map(item)}</div>"
        )
    else:
        why = "no preview" if item.found else "file not found"
        picture = f'<a href="{esc(link)}"><div class="missing">{why}</div></a>'
    score_text = "failed" if item.error else f"{item.score:.3f}"
    data_score = "" if item.error else f"{item.score:.6f}"
    error_text = f'<span class="error">{esc(item.error)}</span>' if item.error else ""
    keep_text = '<span class="keep">keep</span>' if item.keeper else ""
    return (
        f'<figure class="{classes}" data-folder="{esc(item.folder)}" data-score="{data_score}">'
        f"{picture}"
        f'<figcaption>{keep_text}<span class="score">{score_text}</span>'
        f'<span class="name" title="{esc(item.shown)}">{esc(name)}</span>{error_text}'
        "</figcaption></figure>"
    )


def _crop_map(item: ReviewItem) -> str:
    """The crop map over a thumbnail, each crop coloured from red (0) to green (1) by its score,
    translucent. Crops come in sets of one size (a view of the picture each): the largest set
    (the whole-picture view) is drawn as tiles that share the picture between them; a smaller
    set (a detail view) as outlined squares where they lie, or as outlined tiles too where its
    crops overlap (a small photo, whose detail view is the photo itself)."""
    if not _has_map(item):
        return ""
    width, height = item.size
    sizes = sorted({(c[2], c[3]) for c in item.crops}, key=lambda s: -s[0] * s[1])
    cells = []
    for number, size in enumerate(sizes):
        crops = [c for c in item.crops if (c[2], c[3]) == size]
        tiled = number == 0 or _overlapping(crops)
        for c in crops:
            box = _tile(c, crops, width, height) if tiled else tuple(c[:4])
            cells.append((*box, c[4], number > 0))
    # The cells are drawn by the page's script when the map is shown, as each photo comes near
    # the window (all of them before printing): 14 spans a photo written out were 85% of a
    # 40,000-photo page (97 MB).
    encoded = []
    for x, y, w, h, score, detail in cells:
        score = min(1.0, max(0.0, score))
        encoded.append(
            f"{_pct(x, width)} {_pct(y, height)} {_pct(w, width)} {_pct(h, height)} "
            f"{round(120 * score)} {score:.3f} {score:.2f} {int(detail)}"
        )
    return f'<div class="map" data-cells="{";".join(encoded)}"></div>'


def _pct(value: float, total: float) -> str:
    """``value`` as a percentage of ``total``, two decimals, no trailing zeros."""
    text = f"{100 * value / total:.2f}".rstrip("0").rstrip(".")
    return text if text != "-0" else "0"


def _overlapping(crops) -> bool:
    return any(
        a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
        for i, a in enumerate(crops) for b in crops[i + 1 :]
    )


def _tile(crop, crops, width: float, height: float) -> tuple[float, float, float, float]:
    """The part of the picture closest to this crop's centre among ``crops`` (a grid): from the
    midpoints to its neighbours' centres, or to the picture's edge."""
    xs = sorted({c[0] + c[2] / 2 for c in crops})
    ys = sorted({c[1] + c[3] / 2 for c in crops})

    def span(centres: list[float], centre: float, size: float) -> tuple[float, float]:
        i = centres.index(centre)
        low = 0.0 if i == 0 else (centres[i - 1] + centre) / 2
        high = size if i == len(centres) - 1 else (centre + centres[i + 1]) / 2
        return low, high - low

    left, w = span(xs, crop[0] + crop[2] / 2, width)
    top, h = span(ys, crop[1] + crop[3] / 2, height)
    return left, top, w, h


def _file_link(path: str, page_dir: str) -> str:
    """A relative URL from the page to the photo, every byte of the name percent-encoded."""
    try:
        rel = os.path.relpath(path, page_dir)
    except ValueError:
        rel = path
    return urllib.parse.quote(os.fsencode(rel))
