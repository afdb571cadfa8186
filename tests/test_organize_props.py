"""Property tests: over random trees of photos, companions and name collisions, any sequence of
cull/sort/rate applies followed by undos (newest first) leaves every original file exactly once,
byte-identical, at its original path, and touches nothing outside the roots and destinations."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loda_cli import organize
from tests.test_organize import photo_bytes, write, write_scores

FOLDERS = ["", "a", "a/b"]
STEMS = ["IMG_1", "IMG_2", "DSC 3", "x"]

photo = st.fixed_dictionaries(
    {
        "folder": st.sampled_from(FOLDERS),
        "stem": st.sampled_from(STEMS),
        "ext": st.sampled_from([".jpg", ".JPG", ".heic", ".png"]),
        "raw": st.sampled_from([None, ".CR2", ".nef", ".DNG"]),
        "xmp_dt": st.booleans(),
        "xmp_lr": st.booleans(),
        "aae": st.booleans(),
        "mov": st.booleans(),
        "score": st.one_of(st.none(), st.floats(0, 1, allow_nan=False)),
    }
)

operation = st.one_of(
    st.fixed_dictionaries({"op": st.just("cull"), "below": st.floats(0, 1), "mode": st.sampled_from(["move", "copy", "link"]),
                           "to": st.sampled_from([None, "dest"])}),
    st.fixed_dictionaries({"op": st.just("cull-worst"), "n": st.integers(0, 6), "mode": st.sampled_from(["move", "copy"])}),
    st.fixed_dictionaries({"op": st.just("sort"), "mode": st.sampled_from(["copy", "move"]), "quantiles": st.booleans(),
                           "into": st.sampled_from(["sorted", "root/sorted"])}),
    st.fixed_dictionaries({"op": st.just("rate"), "style": st.sampled_from(["darktable", "lightroom", "both"]),
                           "label": st.sampled_from([None, "Red"]), "force": st.booleans()}),
)


def _files(folder: Path) -> dict[bytes, tuple[str, bytes]]:
    """Files and links under ``folder`` (loda's journals left out): path bytes -> (kind, content)."""
    out: dict[bytes, tuple[str, bytes]] = {}
    if not folder.exists():
        return out
    base = os.fsencode(folder)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            if name.startswith(b".loda-journal-"):
                continue
            rel = os.path.relpath(full, base)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            else:
                with open(full, "rb") as fh:
                    out[rel] = ("file", fh.read())
    return out


def _build(tmp: Path, photos: list[dict], collisions: list[int]) -> tuple[Path, Path]:
    root = tmp / "root"
    root.mkdir()
    rows: list[tuple[str, float | None]] = []
    errors = {}
    seed = 0
    for spec in photos:
        folder = root / spec["folder"] if spec["folder"] else root
        name = spec["stem"] + spec["ext"]
        path = folder / name
        if path.exists():
            continue
        seed += 1
        write(path, photo_bytes(seed))
        companions = []
        if spec["raw"]:
            companions.append(spec["stem"] + spec["raw"])
            if spec["xmp_dt"]:
                companions.append(spec["stem"] + spec["raw"] + ".xmp")
        if spec["xmp_dt"]:
            companions.append(name + ".xmp")
        if spec["xmp_lr"]:
            companions.append(spec["stem"] + ".xmp")
        if spec["aae"]:
            companions.append(spec["stem"] + ".AAE")
        if spec["mov"]:
            companions.append(spec["stem"] + ".mov")
        for comp in companions:
            if not (folder / comp).exists():
                seed += 1
                write(folder / comp, b"companion %d" % seed)
        rel = str(path.relative_to(tmp))
        rows.append((rel, spec["score"]))
        if spec["score"] is None:
            errors[rel] = "could not decode"
    # Files already at the destinations, with the names the photos would take.
    existing = sorted(p for p in root.rglob("*") if p.is_file())
    for i in collisions:
        if existing:
            victim = existing[i % len(existing)]
            rel = victim.relative_to(root)
            write(root / "_culled" / rel, b"an earlier cull of %d" % i)
            write(tmp / "sorted" / "1-star" / rel, b"an earlier sort of %d" % i)
    # A sibling folder that must never change, reached by a link and by scores rows.
    outside = tmp / "outside"
    write(outside / "victim.jpg", photo_bytes(999))
    os.symlink(outside / "victim.jpg", root / "link.jpg")
    rows += [("root/link.jpg", 0.0), ("outside/victim.jpg", 0.0), ("root/../outside/victim.jpg", 0.0)]
    return root, write_scores(tmp / "scores.csv", rows, errors=errors)


def _apply(op: dict, tmp: Path, root: Path, scores: Path) -> str | None:
    roots = organize.resolve_roots([root])
    source = organize.load_scores(roots, scores)
    source.bases = [str(tmp)]
    kind = op["op"]
    if kind in ("cull", "cull-worst"):
        to = tmp / op["to"] if op.get("to") else None
        dests = organize.cull_dests(roots, to)
        groups, _ = organize.collect_groups(roots, source, exclude=organize.cull_excludes(roots, dests))
        if kind == "cull":
            selected = organize.select_worst(groups, below=op["below"])
        else:
            selected = organize.select_worst(groups, worst=op["n"])
        plan = organize.plan_cull(roots, selected, mode=op["mode"], to=to)
    elif kind == "sort":
        into = root / "sorted" if op["into"] == "root/sorted" else tmp / "sorted"
        groups, _ = organize.collect_groups(roots, source, exclude=organize.cull_excludes(roots, [str(into)]))
        edges = organize.quantile_edges([g.score for g in groups]) if op["quantiles"] else organize.DEFAULT_EDGES
        plan = organize.plan_sort(roots, groups, into=into, mode=op["mode"], edges=edges)
    else:
        groups, _ = organize.collect_groups(roots, source, exclude=organize.cull_excludes(roots, []))
        plan = organize.plan_rate(roots, groups, style=op["style"], label=op["label"], force=op["force"])
    return organize.apply_plan(plan).journal


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    photos=st.lists(photo, min_size=1, max_size=10),
    collisions=st.lists(st.integers(0, 50), max_size=4),
    ops=st.lists(operation, min_size=1, max_size=3),
)
def test_any_applies_then_undos_restore_every_file_and_touch_nothing_else(photos, collisions, ops):
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        root, scores = _build(tmp, photos, collisions)
        everything_before = _files(tmp)
        journals = []
        for op in ops:
            journal = _apply(op, tmp, root, scores)
            if journal:
                journals.append(journal)
            # between runs: originals never vanish from both places, outside never changes
            assert _files(tmp / "outside") == {k[len(b"outside/"):]: v for k, v in everything_before.items()
                                               if k.startswith(b"outside/")}
        for journal in reversed(journals):
            plan = organize.plan_undo(journal)
            assert plan.conflicts == [], [s.message for s in plan.conflicts]
            report = organize.apply_undo(plan)
            assert report.complete
        after = _files(tmp)
        assert after == everything_before
        assert not [p for p in tmp.rglob(".loda-tmp-*")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    photos=st.lists(photo, min_size=1, max_size=8),
    ops=st.lists(operation.filter(lambda o: o.get("mode") in ("move", None) or o["op"] == "rate"), min_size=1, max_size=3),
)
def test_after_applies_every_original_exists_exactly_once_somewhere(photos, ops):
    """Moves never duplicate or lose a photo, even before any undo."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        root, scores = _build(tmp, photos, [])
        originals = {v[1] for v in _files(root).values() if v[0] == "file" and v[1].startswith(b"\xff\xd8")}
        for op in ops:
            _apply(op, tmp, root, scores)
        found = [v[1] for k, v in _files(tmp).items() if v[0] == "file" and v[1] in originals]
        assert sorted(found) == sorted(originals)


_part = st.sampled_from(["a", "b", "ab", "a.b", "é", " x"])


@given(st.lists(_part, max_size=4), st.lists(_part, max_size=4))
def test_the_plans_prefix_test_answers_as_is_under_on_resolved_paths(path, folder):
    """is_under_resolved (a prefix test) stands in for is_under where both paths come from
    realpath: the two must agree on every such pair, a sibling sharing a prefix ("/a" and
    "/ab") and the filesystem root included."""
    from loda_cli.organize.paths import is_under, is_under_resolved

    real_path, real_folder = "/" + "/".join(path), "/" + "/".join(folder)
    assert is_under_resolved(real_path, real_folder) == is_under(real_path, real_folder)
