"""Reading and writing star ratings in XMP sidecar files (stdlib XML only).

A rating is ``xmp:Rating`` (namespace ``http://ns.adobe.com/xap/1.0/``), 1 to 5; an optional colour
label is ``xmp:Label``. darktable, digiKam and Lightroom read both from sidecars.

loda marks what it wrote with ``loda:Rating`` / ``loda:Label`` attributes (namespace ``LODA_NS``)
beside the values. A rating whose marker is missing or differs was set by a person (or changed by
one since loda wrote it) and is kept unless the caller forces it. A rating of 0 means "unrated" in
XMP and counts as unset.

Updating an existing sidecar keeps every other element, attribute, namespace, comment and the
whitespace between them; only the two values and their markers change. Documents with a DOCTYPE
are refused: XMP never has one, and entity tricks are the usual way to attack an XML parser.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional

from loda_cli import __version__
from loda_cli.errors import LodaError, UsageError

XMP_NS = "http://ns.adobe.com/xap/1.0/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
X_NS = "adobe:ns:meta/"
LODA_NS = "http://ns.loda-cli.org/xmp/1.0/"
XML_NS = "http://www.w3.org/XML/1998/namespace"

_RATING = f"{{{XMP_NS}}}Rating"
_LABEL = f"{{{XMP_NS}}}Label"
_LODA_RATING = f"{{{LODA_NS}}}Rating"
_LODA_LABEL = f"{{{LODA_NS}}}Label"
_DESCRIPTION = f"{{{RDF_NS}}}Description"
_RDF = f"{{{RDF_NS}}}RDF"
_ABOUT = f"{{{RDF_NS}}}about"

_PREFERRED_PREFIXES = {X_NS: "x", RDF_NS: "rdf", XMP_NS: "xmp", LODA_NS: "loda"}
_PACKET_BEGIN = '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
_PACKET_END_RE = re.compile(r'<\?xpacket\s+end=["\'](?P<mode>[rw])["\']\s*\?>')
# Writers leave padding so a sidecar can grow in place; 2 KB is what most tools use.
_PADDING = ("\n" + " " * 99) * 20 + "\n"


@dataclass(frozen=True)
class XmpState:
    """What a sidecar says about rating and label, and whether loda wrote them."""

    rating: Optional[int] = None
    label: Optional[str] = None
    loda_rating: Optional[int] = None
    loda_label: Optional[str] = None

    @property
    def rating_set_by_person(self) -> bool:
        return self.rating not in (None, 0) and self.loda_rating != self.rating

    @property
    def label_set_by_person(self) -> bool:
        return bool(self.label) and self.loda_label != self.label


@dataclass(frozen=True)
class RatingUpdate:
    """The outcome of asking for a rating: new bytes to write, or None to leave the file alone."""

    new_bytes: Optional[bytes]
    action: str  # "create", "update", "unchanged" or "kept"
    reason: str = ""


class XmpError(LodaError):
    """A sidecar that is not XMP loda can safely rewrite."""


def read_state(data: bytes) -> XmpState:
    """The rating and label in an XMP document. Raises XmpError when it cannot be parsed."""
    root, _ = _parse(data)
    descriptions = _descriptions(root)
    rating = label = loda_label = None
    loda_rating = None
    for desc in descriptions:
        found_rating = _get_value(desc, _RATING)
        if found_rating is not None and rating is None:
            rating = _parse_rating(found_rating)
            loda_rating = _parse_rating(desc.get(_LODA_RATING))
        found_label = _get_value(desc, _LABEL)
        if found_label is not None and label is None:
            label = found_label
            loda_label = desc.get(_LODA_LABEL)
    return XmpState(rating=rating, label=label, loda_rating=loda_rating, loda_label=loda_label)


def new_sidecar(rating: int, label: Optional[str] = None) -> bytes:
    """A complete XMP packet holding only loda's rating (and label)."""
    _check_rating(rating)
    check_label(label)
    attrs = [
        ("rdf:about", ""),
        ("xmp:Rating", str(rating)),
        ("loda:Rating", str(rating)),
    ]
    if label:
        attrs += [("xmp:Label", label), ("loda:Label", label)]
    attr_text = "".join(f'\n    {name}="{_escape_attr(value)}"' for name, value in attrs)
    body = (
        f'<x:xmpmeta xmlns:x="{X_NS}" x:xmptk="loda-cli {_escape_attr(__version__)}">\n'
        f' <rdf:RDF xmlns:rdf="{RDF_NS}">\n'
        f'  <rdf:Description xmlns:xmp="{XMP_NS}" xmlns:loda="{LODA_NS}"{attr_text}/>\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>"
    )
    return (_PACKET_BEGIN + "\n" + body + _PADDING + '<?xpacket end="w"?>').encode("utf-8")


def plan_rating(
    existing: Optional[bytes], rating: int, label: Optional[str] = None, *, force: bool = False
) -> RatingUpdate:
    """Decide what to write to give a sidecar ``rating`` (and ``label``).

    ``existing`` is the sidecar's current bytes, or None when there is none. A rating or label set
    by a person is kept unless ``force``; then nothing is written at all, so a half-applied change
    never happens. Raises XmpError when ``existing`` is not parseable XMP.
    """
    _check_rating(rating)
    check_label(label)
    if existing is None:
        return RatingUpdate(new_sidecar(rating, label), "create")
    state = read_state(existing)
    write_rating, write_label = True, bool(label)
    # A person's value that already equals ours is left as theirs: marking it as loda's would let
    # a later run change it without --force.
    if state.rating_set_by_person:
        if state.rating == rating:
            write_rating = False
        elif not force:
            reason = f"rating {state.rating} set by a person (use --force)"
            return RatingUpdate(None, "kept", reason)
    if label and state.label_set_by_person:
        if state.label == label:
            write_label = False
        elif not force:
            reason = f"label {state.label!r} set by a person (use --force)"
            return RatingUpdate(None, "kept", reason)
    if write_rating and state.rating == rating and state.loda_rating == rating:
        write_rating = False
    if write_label and state.label == label and state.loda_label == label:
        write_label = False
    if not write_rating and not write_label:
        return RatingUpdate(None, "unchanged")
    new = update_sidecar(existing, rating if write_rating else None, label if write_label else None)
    return RatingUpdate(new, "update")


def update_sidecar(data: bytes, rating: Optional[int], label: Optional[str] = None) -> bytes:
    """``data`` with its rating (and label) set and marked as loda's; everything else kept.
    A ``rating`` of None leaves the rating alone."""
    if rating is not None:
        _check_rating(rating)
    root, prefixes = _parse(data)
    descriptions = _descriptions(root)
    if not descriptions:
        rdf = root if root.tag == _RDF else root.find(f".//{_RDF}")
        if rdf is None:
            # An empty x:xmpmeta is still XMP: give it the rdf:RDF it lacks.
            rdf = ET.SubElement(root, _RDF)
            rdf.text, rdf.tail = "\n", "\n"
        desc = ET.SubElement(rdf, _DESCRIPTION, {_ABOUT: ""})
        desc.tail = "\n"
        descriptions = [desc]
    if rating is not None:
        _set_value(descriptions, _RATING, _LODA_RATING, str(rating))
    if label:
        _set_value(descriptions, _LABEL, _LODA_LABEL, label)

    text = _serialize(root, prefixes)
    mode_match = _PACKET_END_RE.search(data.decode("utf-8", errors="replace"))
    mode = mode_match.group("mode") if mode_match else "w"
    out = (_PACKET_BEGIN + "\n" + text + _PADDING + f'<?xpacket end="{mode}"?>').encode("utf-8")
    # Never hand back something we could not read ourselves.
    written = read_state(out)
    if (rating is not None and written.rating != rating) or (label and written.label != label):
        raise XmpError("internal error: the rewritten sidecar does not hold the rating")
    return out


# --- parsing -----------------------------------------------------------------------------------


_XML_CODECS = ("utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")  # the encodings XMP allows


def _parse(data: bytes) -> tuple[ET.Element, dict[str, str]]:
    """The root element and the URI -> prefix map the document declares (first prefix wins)."""
    lowered = data.lower()  # ASCII letters only, so UTF-16 and UTF-32 text is lowered too
    if any(mark.encode(codec) in lowered for mark in ("<!doctype", "<!entity") for codec in _XML_CODECS):
        raise XmpError("sidecar has a DOCTYPE or entity declaration; XMP never does")
    builder = _NamespaceKeepingBuilder()
    parser = ET.XMLParser(target=builder)
    try:
        parser.feed(data)
        root = parser.close()
    except ET.ParseError as exc:
        raise XmpError(f"sidecar is not valid XML: {exc}") from None
    if root.tag not in (f"{{{X_NS}}}xmpmeta", _RDF) and root.find(f".//{_RDF}") is None:
        raise XmpError("sidecar is XML but not XMP (no x:xmpmeta or rdf:RDF)")
    return root, builder.prefixes


class _NamespaceKeepingBuilder(ET.TreeBuilder):
    """A TreeBuilder that keeps comments and remembers each namespace's declared prefix."""

    def __init__(self) -> None:
        super().__init__(insert_comments=True)
        self.prefixes: dict[str, str] = {}

    def start_ns(self, prefix: str, uri: str) -> None:
        if prefix and uri not in self.prefixes:
            self.prefixes[uri] = prefix


def _descriptions(root: ET.Element) -> list[ET.Element]:
    if root.tag == _DESCRIPTION:
        return [root]
    return list(root.iter(_DESCRIPTION))


def _get_value(desc: ET.Element, name: str) -> Optional[str]:
    if name in desc.attrib:
        return desc.attrib[name]
    child = desc.find(name)
    if child is not None:
        return (child.text or "").strip()
    return None


def _set_value(descriptions: list[ET.Element], name: str, marker: str, value: str) -> None:
    # Update the value where it already is (attribute or element form), else add an attribute to
    # the first rdf:Description, which is where darktable and Lightroom put theirs.
    for desc in descriptions:
        if name in desc.attrib:
            desc.set(name, value)
            desc.set(marker, value)
            return
        child = desc.find(name)
        if child is not None:
            child.text = value
            desc.set(marker, value)
            return
    descriptions[0].set(name, value)
    descriptions[0].set(marker, value)


def _parse_rating(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except (ValueError, OverflowError):  # not a number, NaN, or 1e999
        return None


def _check_rating(rating: int) -> None:
    if not isinstance(rating, int) or not 1 <= rating <= 5:
        raise XmpError(f"a star rating is 1 to 5, not {rating!r}")


def check_label(label: Optional[str]) -> None:
    """Refuse a label XML cannot hold (control characters, undecodable bytes from the command
    line, U+FFFE/U+FFFF) before any sidecar is planned: written, it would make sidecars that no
    XMP reader, loda's included, can read back."""
    if not label:
        return
    for ch in label:
        code = ord(ch)
        if code < 0x20 or 0xD800 <= code <= 0xDFFF or code in (0xFFFE, 0xFFFF):
            shown = label.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(f"--label {shown!r} holds a character a sidecar cannot hold ({ch!r}); "
                             "use plain text such as Red")


# --- serialising (our own, so prefixes survive and nothing global changes) ----------------------


def _serialize(root: ET.Element, declared: dict[str, str]) -> str:
    uris: list[str] = []
    for elem in root.iter():
        if not isinstance(elem.tag, str):
            continue
        for qname in [elem.tag, *elem.attrib]:
            uri = _uri(qname)
            if uri and uri != XML_NS and uri not in uris:
                uris.append(uri)
    mapping: dict[str, str] = {}
    used: set[str] = {"xml"}
    for uri in uris:
        prefix = declared.get(uri) or _PREFERRED_PREFIXES.get(uri)
        if not prefix or prefix in used:
            counter = 1
            while f"ns{counter}" in used:
                counter += 1
            prefix = f"ns{counter}"
        mapping[uri] = prefix
        used.add(prefix)
    out: list[str] = []
    _write_element(root, mapping, out, declare=True)
    return "".join(out)


def _uri(qname: str) -> Optional[str]:
    if qname.startswith("{"):
        return qname[1 : qname.index("}")]
    return None


def _qualify(qname: str, mapping: dict[str, str]) -> str:
    uri = _uri(qname)
    if uri is None:
        return qname
    local = qname[len(uri) + 2 :]
    if uri == XML_NS:
        return f"xml:{local}"
    return f"{mapping[uri]}:{local}"


def _write_element(
    elem: ET.Element, mapping: dict[str, str], out: list[str], declare: bool
) -> None:
    if elem.tag is ET.Comment:
        out.append(f"<!--{elem.text or ''}-->")
        out.append(_escape_text(elem.tail or ""))
        return
    tag = _qualify(elem.tag, mapping)
    out.append(f"<{tag}")
    if declare:
        for uri, prefix in mapping.items():
            out.append(f' xmlns:{prefix}="{_escape_attr(uri)}"')
    for name, value in elem.attrib.items():
        out.append(f' {_qualify(name, mapping)}="{_escape_attr(value)}"')
    if len(elem) == 0 and not elem.text:
        out.append("/>")
    else:
        out.append(">")
        out.append(_escape_text(elem.text or ""))
        for child in elem:
            _write_element(child, mapping, out, declare=False)
        out.append(f"</{tag}>")
    out.append(_escape_text(elem.tail or ""))


def _escape_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attr(text: str) -> str:
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\n", "&#10;")
        .replace("\r", "&#13;")
        .replace("\t", "&#9;")
    )
