"""XMP sidecars: valid packets, round trips, and updates that keep everything else."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from loda_cli import xmp

DARKTABLE_SIDECAR = b"""<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:darktable="http://darktable.sf.net/"
   exif:DateTimeOriginal="2024:06:01 15:02:11"
   xmp:Rating="1"
   xmpMM:DerivedFrom="IMG_1.CR2"
   darktable:xmp_version="5"
   darktable:history_end="2">
   <!-- edited in darktable -->
   <dc:subject>
    <rdf:Bag>
     <rdf:li>wedding &amp; cake</rdf:li>
     <rdf:li>\xc3\xa9t\xc3\xa9</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:num="0" darktable:operation="exposure" darktable:enabled="1"
       darktable:params="0000000000000000" xml:lang="x-default"/>
     <rdf:li darktable:num="1" darktable:operation="colorbalancergb" darktable:params="gz12eJxjYGBgYAA"/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""

ELEMENT_FORM = b"""<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:xap="http://ns.adobe.com/xap/1.0/" xmlns:lr="http://ns.adobe.com/lightroom/1.0/">
<xap:Rating>4</xap:Rating><xap:Label>Green</xap:Label>
<lr:hierarchicalSubject><rdf:Bag><rdf:li>People|Anna</rdf:li></rdf:Bag></lr:hierarchicalSubject>
</rdf:Description></rdf:RDF></x:xmpmeta>"""


def _packet_ok(data: bytes) -> ET.Element:
    text = data.decode("utf-8")
    assert text.startswith('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>')
    assert text.rstrip().endswith('<?xpacket end="w"?>')
    root = ET.fromstring(data)  # a standard XML parser reads the whole packet
    assert root.tag == "{adobe:ns:meta/}xmpmeta"
    desc = root.find(f"{{{xmp.RDF_NS}}}RDF/{{{xmp.RDF_NS}}}Description")
    assert desc is not None
    return root


@pytest.mark.parametrize("rating", [1, 2, 3, 4, 5])
def test_new_sidecar_is_a_valid_packet_that_reads_back(rating):
    data = xmp.new_sidecar(rating, "Red" if rating == 1 else None)
    root = _packet_ok(data)
    desc = root.find(f".//{{{xmp.RDF_NS}}}Description")
    assert desc.get(f"{{{xmp.XMP_NS}}}Rating") == str(rating)
    state = xmp.read_state(data)
    assert state.rating == rating and not state.rating_set_by_person
    assert state.label == ("Red" if rating == 1 else None)


def test_update_keeps_darktable_history_subjects_comments_and_prefixes():
    state = xmp.read_state(DARKTABLE_SIDECAR)
    assert state.rating == 1 and state.rating_set_by_person
    assert xmp.plan_rating(DARKTABLE_SIDECAR, 4).action == "kept"
    update = xmp.plan_rating(DARKTABLE_SIDECAR, 4, "Red", force=True)
    assert update.action == "update"
    out = update.new_bytes
    root = _packet_ok(out)
    text = out.decode("utf-8")
    for kept in ('darktable:operation="colorbalancergb"', 'darktable:params="gz12eJxjYGBgYAA"', "wedding &amp; cake",
                 "été", "<!-- edited in darktable -->", 'xmpMM:DerivedFrom="IMG_1.CR2"', 'xml:lang="x-default"',
                 'exif:DateTimeOriginal="2024:06:01 15:02:11"', 'darktable:history_end="2"', 'x:xmptk="XMP Core 4.4.0-Exiv2"'):
        assert kept in text, kept
    ns = {"rdf": xmp.RDF_NS, "dc": "http://purl.org/dc/elements/1.1/", "darktable": "http://darktable.sf.net/"}
    assert [li.text for li in root.findall(".//dc:subject/rdf:Bag/rdf:li", ns)] == ["wedding & cake", "été"]
    assert len(root.findall(".//darktable:history/rdf:Seq/rdf:li", ns)) == 2
    after = xmp.read_state(out)
    assert (after.rating, after.label, after.rating_set_by_person) == (4, "Red", False)
    # loda's own rating can be changed again without --force, and an equal one is left alone
    assert xmp.plan_rating(out, 2).action == "update"
    assert xmp.plan_rating(out, 4, "Red").action == "unchanged"


def test_element_form_rating_with_other_prefix_is_updated_in_place():
    assert xmp.read_state(ELEMENT_FORM).rating == 4
    assert xmp.plan_rating(ELEMENT_FORM, 2).action == "kept"
    out = xmp.update_sidecar(ELEMENT_FORM, 2)
    text = out.decode()
    assert "<xap:Rating>2</xap:Rating>" in text and "People|Anna" in text and "<xap:Label>Green</xap:Label>" in text
    assert text.count("Rating>") == 2  # no second rating was added
    assert xmp.read_state(out).rating == 2


def test_a_person_changing_lodas_rating_is_respected():
    ours = xmp.new_sidecar(3)
    changed = ours.replace(b'xmp:Rating="3"', b'xmp:Rating="5"')
    state = xmp.read_state(changed)
    assert state.rating == 5 and state.loda_rating == 3 and state.rating_set_by_person
    assert xmp.plan_rating(changed, 2).action == "kept"
    assert xmp.plan_rating(changed, 2, force=True).action == "update"


def test_rating_zero_is_unrated_and_a_human_label_is_kept():
    unrated = xmp.update_sidecar(ELEMENT_FORM, 1).replace(b"<xap:Rating>1</xap:Rating>", b"<xap:Rating>0</xap:Rating>")
    assert not xmp.read_state(unrated).rating_set_by_person
    labelled = ELEMENT_FORM.replace(b"<xap:Rating>4</xap:Rating>", b"")
    update = xmp.plan_rating(labelled, 1, "Red")
    assert update.action == "kept" and "label" in update.reason
    assert xmp.plan_rating(labelled, 1).action == "update"


def test_empty_xmpmeta_gets_an_rdf_body():
    out = xmp.update_sidecar(b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>", 3)
    _packet_ok(out)
    assert xmp.read_state(out).rating == 3


@pytest.mark.parametrize(
    "data",
    [
        b"not xml at all",
        b"<html><body>not xmp</body></html>",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>',
        b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF",
        # The same entity in UTF-16, which a look for the ASCII bytes of "<!DOCTYPE" misses.
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "aaaa">]>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">&a;</x:xmpmeta>'.encode("utf-16"),
    ],
    ids=["text", "html", "entity", "cut-short", "utf-16-entity"],
)
def test_unreadable_or_hostile_sidecars_are_refused(data):
    with pytest.raises(xmp.XmpError):
        xmp.plan_rating(data, 3)


@pytest.mark.parametrize("value", ["1e999", "nan", "-inf", "three"])
def test_a_rating_that_is_no_whole_number_reads_as_none(value):
    sidecar = f"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>" \
              f"<rdf:Description xmlns:xmp='http://ns.adobe.com/xap/1.0/' xmp:Rating='{value}'/></rdf:RDF></x:xmpmeta>"
    assert xmp.read_state(sidecar.encode()).rating is None


def test_bad_ratings_are_refused():
    for bad in (0, 6, -1, 2.5):
        with pytest.raises(xmp.XmpError):
            xmp.new_sidecar(bad)  # type: ignore[arg-type]


def test_labels_with_markup_characters_are_escaped():
    data = xmp.new_sidecar(1, 'Red "&" <b>')
    _packet_ok(data)
    assert xmp.read_state(data).label == 'Red "&" <b>'


def test_a_persons_rating_equal_to_lodas_is_not_claimed():
    human = xmp.update_sidecar(ELEMENT_FORM, 4).replace(b' loda:Rating="4"', b"")
    assert xmp.read_state(human).rating_set_by_person
    assert xmp.plan_rating(human, 4).action == "unchanged"
    with_label = xmp.plan_rating(human.replace(b"<xap:Label>Green</xap:Label>", b""), 4, "Red")
    state = xmp.read_state(with_label.new_bytes)
    assert (state.rating, state.loda_rating, state.label, state.loda_label) == (4, None, "Red", "Red")
    assert xmp.plan_rating(with_label.new_bytes, 2).action == "kept"  # still the person's
