"""Fuzzing the readers of user input: IDX files, the labels CSV, params files and ``--set`` overrides.

Property everywhere: a reader returns a valid result or raises the project's DataError / ConfigError
whose message is one line. Any other exception is a bug in the reader.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from semiprune_core.config import SECTIONS, Section, apply_overrides, parse_override, read_yaml, validate
from semiprune_core.data import idx, parse_idx, read_idx, read_labels_csv
from semiprune_core.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
N = 2000
fuzz = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))


def one_line(err: Exception) -> str:
    text = str(err)
    assert text and len(text.splitlines()) == 1 and text == text.strip(), repr(text[:300])
    return text


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the files the examples write (hypothesis rules out function-scoped fixtures)."""
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------- IDX


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def check_idx(raw: bytes) -> None:
    try:
        out = parse_idx(raw)
    except DataError as err:
        one_line(err)
        return
    header = 4 + 4 * out.ndim
    assert out.dtype == np.uint8 and 1 <= out.ndim <= 4
    assert raw[:4] == bytes([0, 0, 0x08, out.ndim]) and struct.unpack(f">{out.ndim}I", raw[4:header]) == out.shape
    assert out.tobytes() == raw[header:]


# Dimension values around the limits: zero, tiny, 2**16 (four of them overflow int64), 2**31, 2**32 - 1.
EDGE_DIMS = st.one_of(st.integers(0, 5), st.sampled_from([2**16, 2**16 + 1, 2**31, 2**31 + 1, 2**32 - 1]))


@st.composite
def mutated_idx(draw) -> bytes:
    """A valid IDX file, then a few random edits: a header field, the dims, a byte, the length."""
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=4))
    raw = bytearray(idx_bytes(np.arange(math.prod(shape)).reshape(shape) % 256))
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["magic", "type", "ndim", "dim", "byte", "cut", "grow"]))
        if edit == "magic" and len(raw) >= 2:
            raw[0:2] = draw(st.binary(min_size=2, max_size=2))
        elif edit == "type" and len(raw) >= 3:
            raw[2] = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
        elif edit == "ndim" and len(raw) >= 4:
            raw[3] = draw(st.integers(0, 255))
        elif edit == "dim" and len(raw) >= 8:
            at = 4 + 4 * draw(st.integers(0, (len(raw) - 8) // 4))
            raw[at:at + 4] = struct.pack(">I", draw(EDGE_DIMS))
        elif edit == "byte" and raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        elif edit == "cut":
            del raw[draw(st.integers(0, len(raw))):]
        elif edit == "grow":
            raw += draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


@fuzz
@given(st.binary(max_size=300))
def test_parse_idx_random_bytes(raw):
    check_idx(raw)


@fuzz
@given(mutated_idx())
@example(struct.pack(">HBB4I", 0, 0x08, 4, 2**16, 2**16, 2**16, 2**16))  # 2**64 elements: 0 in int64
@example(struct.pack(">HBB4I", 0, 0x08, 4, 2**31, 2**31, 0, 2))  # no elements, but dimensions numpy refuses
def test_parse_idx_mutated_headers_and_bodies(raw):
    check_idx(raw)


@st.composite
def mutated_gzip(draw) -> bytes:
    """A gzip-wrapped IDX file (sometimes two members), then a few random edits of the compressed bytes."""
    raw = bytearray(gzip.compress(draw(mutated_idx()), mtime=0))
    if draw(st.booleans()):
        raw += gzip.compress(draw(st.binary(max_size=16)), mtime=0)
    for _ in range(draw(st.integers(0, 2))):
        edit = draw(st.sampled_from(["byte", "cut", "grow"]))
        if edit == "byte" and raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        elif edit == "cut":
            del raw[max(2, draw(st.integers(0, len(raw)))):]  # keep the magic, or it is not read as gzip
        elif edit == "grow":
            raw += draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


@fuzz
@given(raw=st.one_of(mutated_gzip(), st.binary(max_size=64).map(lambda b: b"\x1f\x8b" + b)))
def test_read_idx_gzip_files(scratch, raw):
    path = scratch / "fuzz-idx1-ubyte.gz"
    path.write_bytes(raw)
    try:
        out = read_idx(path)
    except DataError as err:
        assert str(path) in one_line(err)
        return
    assert out.dtype == np.uint8 and 1 <= out.ndim <= 4


def test_gzip_bomb_stops_at_the_size_limit(scratch, monkeypatch):
    monkeypatch.setattr(idx, "_MAX_ELEMENTS", 1000)
    path = scratch / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 0x08, 1, 10**7) + bytes(10**7), mtime=0))
    with pytest.raises(DataError, match=r"decompresses to more than 1020 bytes") as err:
        read_idx(path)
    one_line(err.value)


# ---------------------------------------------------------------------------------------- labels CSV


KNOWN = {"a.png", "b.png", "deep/c.png", "x, y.png"}
SKIPPED = {"out.png": "symlink leads outside the root", "far": "symlink leads outside the root"}
PATH_PARTS = st.sampled_from([
    "a.png", "b.png", "deep", "c.png", "x, y.png", "..", ".", "", "/", "//", "\\", "C:", "c:\\", "~", "\x00",
    "a.png\x00", "out.png", "far", "\u202e", "\ud800", " ", "\t", '"', "'",
])
LABELS = st.one_of(st.sampled_from(["cat", "dog", " ", "", "\x00", '"', ",", "\n", "a" * 200_000]), st.text(max_size=12))


@st.composite
def csv_rows(draw) -> str:
    header = draw(st.sampled_from(["sample_id,label", "SAMPLE_ID , Label", "\ufeffsample_id,label", "sample_id",
                                   "label,sample_id", ""]))
    lines = [header]
    for _ in range(draw(st.integers(0, 6))):
        sid = "/".join(draw(st.lists(PATH_PARTS, min_size=1, max_size=4)))
        if draw(st.booleans()):
            sid = '"' + sid.replace('"', '""') + '"'
        cells = [sid, draw(LABELS)] + draw(st.lists(st.text(max_size=3), max_size=1))
        lines.append(",".join(cells))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline]))


def check_csv(path: Path, root: Path) -> None:
    try:
        out = read_labels_csv(path, known=KNOWN, root=root, skipped=SKIPPED)
    except DataError as err:
        assert str(path) in one_line(err)
        return
    # only files the scan found can be labeled: nothing absolute, nothing through '..', no skipped link
    assert set(out) <= KNOWN
    assert all(isinstance(v, str) and v and v == v.strip() for v in out.values())


@fuzz
@given(text=st.one_of(csv_rows(), st.text(alphabet=st.sampled_from('ab.png,/\\".\x00\r\n \t'), max_size=80),
                      st.text(max_size=80).map(lambda t: "sample_id,label\n" + t)))
@example(text="sample_id,label\n" + "a" * 200_000 + ",cat\n")  # one field over the csv module's limit
def test_labels_csv_random_text(scratch, text):
    path = scratch / "labels.csv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_csv(path, scratch)


@fuzz
@given(raw=st.one_of(st.binary(max_size=120), st.binary(max_size=40).map(lambda b: b"sample_id,label\na.png," + b)))
@example(raw=b"sample_id,label\na.png,\xff\xfe\n")
def test_labels_csv_random_bytes(scratch, raw):
    path = scratch / "labels-bytes.csv"
    path.write_bytes(raw)
    check_csv(path, scratch)


def test_labels_csv_line_through_a_skipped_symlink_says_why(scratch):
    path = scratch / "labels-link.csv"
    path.write_text("sample_id,label\na.png,cat\nfar/deep.png,dog\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: 'far/deep.png' is not an image file under .* "
                                        r"\(skipped: symlink leads outside the root\)"):
        read_labels_csv(path, known=KNOWN, root=scratch, skipped=SKIPPED)


# ---------------------------------------------------------------------------------------- params


PARAMS = read_yaml(REPO / "params.yaml")


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


KEYS = leaf_keys(PARAMS)
HUGE = 10**5000  # more digits than Python turns into text
# built by a function: hypothesis cannot repr a strategy holding such an int
HUGE_INTS = st.sampled_from([1, -1]).map(lambda sign: sign * HUGE)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), HUGE_INTS,
    st.sampled_from([0, 1, -1, 0.5, 1.0, "auto", "null", "", "\x00", "\n", "x" * 5000, datetime.date(2001, 2, 3), b"\xff"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.none(), HUGE_INTS), inner, max_size=4),
), max_leaves=12)


def check_validate(raw) -> None:
    try:
        out = validate(raw)
    except ConfigError as err:
        one_line(err)
        return
    assert set(out) == set(SECTIONS) and all(isinstance(v, Section) for v in out.values())


def set_path(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        if not isinstance(tree.get(k), dict):
            tree[k] = {}
        tree = tree[k]
    tree[last] = value


@fuzz
@given(raw=st.one_of(VALUES, st.dictionaries(st.sampled_from([*SECTIONS, "dta", "", 1, None]), VALUES, max_size=4)))
def test_validate_random_nested_values(raw):
    check_validate(raw)


@fuzz
@given(edits=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"),
                                          st.sampled_from(KEYS).map(lambda k: k.rsplit(".", 1)[0])), VALUES),
                      min_size=1, max_size=3))
@example(edits=[("select.ratio", HUGE)])
@example(edits=[("base.seed", {HUGE: 1})])
def test_validate_real_params_with_random_values(edits):
    """params.yaml with a few keys set to random values: errors must reach into every section."""
    raw = copy.deepcopy(PARAMS)
    for key, value in edits:
        set_path(raw, key, value)
    check_validate(raw)


YAML_TEXT = st.text(alphabet=st.sampled_from("ab09.-_:,[]{}&*!|>#'\"?%@` \n\t\x00"), max_size=60)
DEEP = "[" * 500  # deeper than PyYAML's recursion allows
# One section of params.yaml at a time keeps each example cheap (PyYAML's parser is slow).
SECTION_TEXTS = [yaml.safe_dump({name: body}, sort_keys=False) for name, body in PARAMS.items()]


@st.composite
def mutated_params_text(draw) -> str:
    """A section of params.yaml with a few random edits: inserted YAML syntax, bad dates, huge numbers."""
    text = draw(st.sampled_from(SECTION_TEXTS))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        text = text[:at] + draw(st.one_of(YAML_TEXT, st.sampled_from(["2001-13-01", "9" * 5000, DEEP]))) + text[at + cut:]
    return text


@fuzz
@given(raw=st.one_of(YAML_TEXT.map(str.encode), mutated_params_text().map(str.encode), st.binary(max_size=60)))
@example(raw=b"base:\n  seed: 2001-13-01\n")
@example(raw=b"base:\n  seed: " + b"9" * 5000 + b"\n")
@example(raw=b"[" * 3000)
@example(raw=b"base: 0\ndata: []\n")
@example(raw=b"- base\n- data\n")
def test_read_yaml_then_validate(scratch, raw):
    path = scratch / "params.yaml"
    path.write_bytes(raw)
    try:
        data = read_yaml(path)
    except ConfigError as err:
        assert str(path) in one_line(err)
        return
    assert isinstance(data, dict)
    check_validate(data)


def test_read_yaml_of_a_folder_is_a_config_error(scratch):
    (scratch / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        read_yaml(scratch / "folder.yaml")


OVERRIDE_TEXT = st.one_of(
    st.text(max_size=40),
    st.tuples(st.one_of(st.sampled_from(KEYS), st.text(alphabet="ab.= ", max_size=8)),
              st.one_of(YAML_TEXT, st.sampled_from(["2001-13-01", "2001-02-30 10:00", "1" * 5000, DEEP,
                                                    "&a [*a]", "!!python/object/apply:os.system [ls]",
                                                    "{a: 1", "1e999", ".nan", "0x_", "1:30:00"])))
    .map("=".join),
)


@fuzz
@given(texts=st.lists(OVERRIDE_TEXT, min_size=1, max_size=3))
@example(texts=["base.seed=2001-13-01"])
@example(texts=["base.seed=" + "1" * 5000])
@example(texts=["select.ratio=" + "[" * 3000])
def test_override_parser_then_validate(texts):
    try:
        raw = apply_overrides(PARAMS, texts)
    except ConfigError as err:
        one_line(err)
        return
    for text in texts:
        keys, _ = parse_override(text)
        assert keys and all(keys)
    check_validate(raw)


def test_billion_laughs_override_fails_fast_with_a_short_line():
    """An override whose YAML anchors expand to 10**8 numbers: the error echoes a bounded value."""
    levels = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    raw = apply_overrides(PARAMS, ["select.ratio=[" + ", ".join(levels) + "]"])
    with pytest.raises(ConfigError, match="select.ratio: Input should be a valid number") as err:
        validate(raw)
    assert len(one_line(err.value)) < 500
