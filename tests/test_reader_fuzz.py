"""Fuzzing the safetensors reader: a corrupt, truncated or lying checkpoint gives an error naming the
file, never a crash, a hang, or gigabytes allocated for a header that lies.

Every property has the same two outcomes. Either ``CheckpointReader`` opens the checkpoint, and then
every read (``get``, ``iter_tensors``, ``fingerprint``, ``StoredTensor.read`` in chunks, the same
through ``map_files``) returns the dtype, shape and bytes that safetensors itself finds in the file;
or it raises ``ValueError`` (``PickleRefusedError`` included) or ``FileNotFoundError`` with the path
of the file at fault in the message. Nothing else: no ``TypeError`` from deep inside, no raw
``json.JSONDecodeError``, no torch error about a negative dimension.

Runs are deterministic (``derandomize=True``, no example database): CI sees the same examples for
the same set of test files (Hypothesis also draws constants from the project modules imported).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from darwin_hydra.io.reader import CheckpointReader, PickleRefusedError
from darwin_hydra.io.format import DTYPES, MAX_HEADER_BYTES, read_header

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=5000,  # ms per example: generous on 2 shared cores; the alarm below catches a real hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NAMED = (ValueError, FileNotFoundError, PickleRefusedError)
HANG_SECONDS = 120

# A small checkpoint with a bit of everything: several dtypes, a misaligned float after 3 bytes of
# uint8, a zero-size tensor, a 0-dim tensor.
TENSORS = {
    "model.embed_tokens.weight": torch.arange(12, dtype=torch.float32).view(3, 4) / 7,
    "model.ids": torch.tensor([1, 2, 3], dtype=torch.uint8),
    "model.layers.0.w": torch.linspace(-1, 1, 6, dtype=torch.float16).view(2, 3),
    "model.norm.weight": torch.arange(5, dtype=torch.bfloat16),
    "model.mask": torch.zeros(0, dtype=torch.bool),
    "model.step": torch.tensor(7, dtype=torch.int64),
}
VALID = st_save(TENSORS, metadata={"format": "pt"})
CODES = ["F32", "F16", "BF16", "U8", "I64", "BOOL", "I32", "F64"]


@pytest.fixture(autouse=True)
def hang_guard():
    """A test that runs past HANG_SECONDS fails (TimeoutError) instead of hanging CI."""

    def timeout(signum, frame):
        raise TimeoutError(f"reader fuzz test still running after {HANG_SECONDS} s: a hang")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(HANG_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_named(err: BaseException, *paths: Path) -> None:
    """``err`` is one of the reader's named errors and its message gives one of ``paths``."""
    assert type(err) in NAMED, f"unnamed error {type(err).__name__}: {err}"
    assert any(str(p) in str(err) for p in paths), f"error does not name {paths}: {err}"


def expected_tensors(files: list[Path]) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """What safetensors itself reads from ``files`` (it must accept whatever our reader accepts)."""
    out = {}
    for f in files:
        try:
            tensors = st_load(f.read_bytes())
        except Exception as e:  # noqa: BLE001 - reported as the property's failure
            raise AssertionError(f"the reader accepted {f.name}, which safetensors refuses: {e}") from e
        out.update({n: (t.dtype, tuple(t.shape), raw(t)) for n, t in tensors.items()})
    return out


def read_everything(reader: CheckpointReader, mapped: bool) -> dict[str, tuple[torch.dtype, tuple[int, ...], bytes]]:
    """Every tensor through every read path; all paths must agree."""
    if mapped:
        reader.map_files()
    got = {}
    for name, t in reader.iter_tensors():
        s = reader.stored(name)
        n = s.numel()
        assert reader.get(name).shape == t.shape and s.shape == t.shape and s.dtype == t.dtype, name
        step = max(1, n // 3)
        chunks = b"".join(raw(s.read(lo, min(lo + step, n))) for lo in range(0, n, step))
        assert chunks == raw(s.read(0, n)) == raw(t), name
        assert s.read(n, n).numel() == 0
        s.release()
        got[name] = (t.dtype, tuple(t.shape), raw(t))
    reader.fingerprint()
    return got


def check(directory: Path, blame: tuple[Path, ...]) -> bool:
    """The property: open ``directory`` and read it all, or a named error giving one of ``blame``.
    True when it opened."""
    try:
        reader = CheckpointReader(directory)
    except NAMED as e:
        assert_named(e, *blame)
        return False
    with reader:
        files = sorted({reader.file_of(n) for n in reader.names})
        want = expected_tensors(files)
        assert read_everything(reader, mapped=False) == want
    with CheckpointReader(directory) as mapped:
        assert read_everything(mapped, mapped=True) == want
    return True


def write_checkpoint(parent: Path, files: dict[str, bytes]) -> Path:
    d = Path(tempfile.mkdtemp(dir=parent))
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def safetensors_file(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + data


# ---- random damage to a valid file ---------------------------------------------------------------

HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]
DIGITS = [i for i in range(8, HEADER_END) if chr(VALID[i]).isdigit()]

positions = st.one_of(st.integers(0, HEADER_END - 1), st.integers(0, len(VALID) - 1))
mutations = st.one_of(
    st.tuples(st.just("xor"), positions, st.integers(1, 255)),
    st.tuples(st.just("xor"), st.integers(HEADER_END, len(VALID) - 1), st.integers(1, 255)),  # data: still valid
    st.tuples(st.just("digit"), st.sampled_from(DIGITS), st.sampled_from(b"0123456789")),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID))),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), positions, st.integers(1, 12)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 2, 7, 8, 9, 2**32, 2**63, 2**64 - 1, MAX_HEADER_BYTES + 1])),
    st.tuples(st.just("length+"), st.integers(-16, 16)),
)


def damage(data: bytes, muts: list[tuple]) -> bytes:
    b = bytearray(data)
    for m in muts:
        kind, *args = m
        pos = args[0] % max(len(b), 1) if args and kind in ("xor", "insert", "delete", "digit") else 0
        if kind == "xor" and b:
            b[pos] ^= args[1]
        elif kind == "digit" and pos < len(b):
            b[pos] = args[1]
        elif kind == "truncate":
            del b[args[0] :]
        elif kind == "insert":
            b[pos:pos] = args[1]
        elif kind == "delete":
            del b[pos : pos + args[1]]
        elif kind == "append":
            b += args[0]
        elif kind == "length" and len(b) >= 8:
            b[:8] = struct.pack("<Q", args[0])
        elif kind == "length+" and len(b) >= 8:
            b[:8] = struct.pack("<Q", min(max(0, struct.unpack("<Q", b[:8])[0] + args[0]), 2**64 - 1))
    return bytes(b)


@settings(FUZZ, max_examples=300)
@given(muts=st.lists(mutations, min_size=1, max_size=4))
@example(muts=[("truncate", len(VALID) - 1)])
@example(muts=[("length+", 1)])
@example(muts=[("length", 2**64 - 1)])
def test_damaged_file_opens_exactly_or_names_itself(workdir, muts):
    d = write_checkpoint(workdir, {"model.safetensors": damage(VALID, muts)})
    try:
        event("opened" if check(d, blame=(d / "model.safetensors",)) else "refused")
    finally:
        shutil.rmtree(d)


# ---- crafted headers -----------------------------------------------------------------------------

json_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
bad_dims = st.one_of(
    st.integers(-(2**64), -1), st.integers(2**62, 2**65), st.floats(), st.booleans(), st.text(max_size=3), st.none()
)


@st.composite
def crafted(draw) -> tuple[bytes, str]:
    """A safetensors file built from a valid layout with 0-3 corruptions; also returns what was done."""
    specs = draw(st.lists(st.tuples(st.sampled_from(CODES), st.lists(st.integers(0, 4), max_size=3)), max_size=4))
    header: dict = {}
    off = 0
    for i, (code, shape) in enumerate(specs):
        nbytes = math.prod(shape) * DTYPES[code].itemsize
        header[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    data = bytes(range(256)) * (off // 256) + bytes(range(off % 256))
    names = list(header)
    done = []
    length = None
    dup = None
    text_edit = None
    touched: set = set()
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from([
            "dtype", "shape", "dim", "offsets", "reverse", "overlap", "beyond", "drop_key", "extra_key",
            "entry", "metadata", "data", "dup", "name", "length", "top", "padding", "encoding",
        ]))
        if not isinstance(header, dict) and kind not in ("length", "data", "padding", "encoding"):
            continue  # the header is junk already ("top")
        untouched = [n for n in names if n not in touched]  # each edit finds a well-formed entry
        name = draw(st.sampled_from(untouched)) if untouched else None
        entry = header.get(name) if name else None
        touched.add(name)
        done.append(kind)
        if kind == "dtype" and entry:
            entry["dtype"] = draw(json_junk | st.sampled_from(["F33", "f32", "", "F4", "U8 ", "F8_E4M3", "C64"]))
        elif kind == "shape" and entry:
            entry["shape"] = draw(json_junk | st.lists(st.integers(0, 4) | bad_dims, max_size=4))
        elif kind == "dim" and entry:
            entry["shape"] = [*entry["shape"], draw(st.integers(0, 3) | st.integers(2**31, 2**63 + 1))]
        elif kind == "offsets" and entry:
            entry["data_offsets"] = draw(json_junk | st.lists(st.integers(-(2**64), 2**64) | bad_dims, max_size=3))
        elif kind == "reverse" and entry:
            entry["data_offsets"] = entry["data_offsets"][::-1]
        elif kind == "overlap" and entry:
            shift = draw(st.integers(-8, 8))
            entry["data_offsets"] = [max(0, o + shift) for o in entry["data_offsets"]]
        elif kind == "beyond" and entry:
            begin = off + draw(st.integers(0, 2**40))
            entry["data_offsets"] = [begin, begin + entry["data_offsets"][1] - entry["data_offsets"][0]]
        elif kind == "drop_key" and entry:
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        elif kind == "extra_key" and entry:
            entry[draw(st.text(max_size=4))] = draw(json_junk)  # ignored, or replaces a field
        elif kind == "entry" and name:
            header[name] = draw(json_junk)
        elif kind == "metadata":
            header["__metadata__"] = draw(json_junk | st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
        elif kind == "data":
            data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(max_size=8))
        elif kind == "dup" and name:
            dup = name
        elif kind == "name" and name:
            header[draw(st.text(max_size=6) | st.just("\ud800"))] = header.pop(name)
            names = list(header)
        elif kind == "length":
            length = draw(st.integers(0, 2**64 - 1) | st.sampled_from([0, 2**63, MAX_HEADER_BYTES + 1]))
        elif kind == "top":
            header = draw(json_junk)
            names = []
        else:
            text_edit = kind
    text = json.dumps(header)
    if dup is not None and isinstance(header, dict) and dup in header:
        # the entry twice: json.dumps cannot write a duplicate key
        text = text[:-1] + ", " + json.dumps({dup: header[dup]})[1:]
    if text_edit == "padding":
        text = draw(st.sampled_from(["", " ", "\n", "\ufeff"])) + text + draw(st.sampled_from([" " * 5, "\0", "x", "}"]))
    try:
        encoded = text.encode("utf-16" if text_edit == "encoding" else "utf-8", "surrogatepass")
    except UnicodeEncodeError:
        encoded = text.encode("utf-8", "replace")
    return safetensors_file(encoded, data, length), " ".join(done)


@settings(FUZZ, max_examples=300)
@given(case=crafted())
def test_crafted_header_opens_exactly_or_names_the_file(workdir, case):
    blob, _ = case
    d = write_checkpoint(workdir, {"model.safetensors": blob})
    try:
        event("opened" if check(d, blame=(d / "model.safetensors",)) else "refused")
    finally:
        shutil.rmtree(d)


@settings(FUZZ, max_examples=100)
@given(header=json_junk.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=48))
def test_any_json_or_bytes_as_header(workdir, header):
    d = write_checkpoint(workdir, {"model.safetensors": safetensors_file(header, b"")})
    try:
        event("opened" if check(d, blame=(d / "model.safetensors",)) else "refused")
    finally:
        shutil.rmtree(d)


def entry(code: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": code, "shape": shape, "data_offsets": [begin, end]}


# Inputs that crashed the reader, or that it accepted although safetensors refuses them (found while
# fuzzing it; the parenthesis says what happened before): each now raises ValueError naming the file and
# saying what is wrong.
REGRESSIONS = {
    "deep JSON nesting (RecursionError)": (b"[" * 100_000 + b"]" * 100_000, b"", "RecursionError"),
    "5000-digit integer (ValueError without the file)": (
        b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}', b"\0" * 4, "digits"),
    "shape [1e999] (OverflowError)": (b'{"a":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}}', b"\0" * 4, "'a'"),
    "dtype a list (TypeError: unhashable)": (json.dumps({"a": entry(["F32"], [1], 0, 4)}).encode(), b"\0" * 4, "'a'"),
    "data_offsets a 2-char string (TypeError)": (
        json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}).encode(), b"\0" * 4, "'a'"),
    "negative dim, reversed offsets (RuntimeError from torch.empty)": (
        json.dumps({"a": entry("F32", [-1], 8, 4), "b": entry("F32", [2], 0, 8)}).encode(), b"\0" * 8, "'a'"),
    "float offsets (TypeError from torch.empty)": (json.dumps({"a": entry("U8", [4], 0.0, 4.0)}).encode(), b"\0" * 4, "'a'"),
    "zero-size tensor with a 2**70 dim (TypeError from torch.empty)": (
        json.dumps({"a": entry("F32", [0, 2**70], 0, 0)}).encode(), b"", "'a'"),
    "zero-size tensor with strides past int64 (RuntimeError)": (
        json.dumps({"a": entry("F32", [2**62, 2**62, 0], 0, 0)}).encode(), b"", "too large"),
    "shape with strings ('12' read as [1, 2])": (json.dumps({"a": entry("U8", "12", 0, 2)}).encode(), b"\0" * 2, "'a'"),
    "__metadata__ a list (accepted)": (
        json.dumps({"__metadata__": [1], "a": entry("U8", [4], 0, 4)}).encode(), b"\0" * 4, "__metadata__"),
    "UTF-16 header (accepted)": (json.dumps({"a": entry("U8", [4], 0, 4)}).encode("utf-16"), b"\0" * 4, "UnicodeDecodeError"),
    "overlapping tensors (accepted)": (
        json.dumps({"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 2, 4)}).encode(), b"\0" * 4, "overlapping"),
    "a hole in the data (accepted)": (
        json.dumps({"a": entry("U8", [2], 0, 2), "b": entry("U8", [1], 3, 4)}).encode(), b"\0" * 4, "hole"),
    "duplicate tensor name (last one silently won)": (
        b'{"a":' + json.dumps(entry("U8", [4], 0, 4)).encode() + b',"a":' + json.dumps(entry("U8", [2], 0, 2)).encode()
        + b"}", b"\0" * 4, "duplicate key 'a'"),
    "lone surrogate in a tensor name (accepted; fingerprint() crashed)": (
        b'{"\\ud800":' + json.dumps(entry("U8", [4], 0, 4)).encode() + b"}", b"\0" * 4, "UTF-8"),
}


@pytest.mark.parametrize("what", list(REGRESSIONS))
def test_found_by_fuzzing(tmp_path, what):
    header, data, says = REGRESSIONS[what]
    f = tmp_path / "model.safetensors"
    f.write_bytes(safetensors_file(header, data))
    with pytest.raises(ValueError) as e:
        CheckpointReader(tmp_path)
    assert_named(e.value, f)
    assert says in str(e.value)


# ---- lying lengths -------------------------------------------------------------------------------


def opens_cheaply(path: Path) -> BaseException:
    """Open ``path``: returns the error, after checking the attempt took < 1 MiB and < 2 s."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        CheckpointReader(path)
    except BaseException as e:  # noqa: BLE001 - returned for the caller's asserts
        err = e
    else:
        err = AssertionError(f"{path}: a lying header was accepted")
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated for a lying header"
    assert time.perf_counter() - t0 < 2
    return err


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 2**40, MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES, 10**6])
def test_lying_header_length_is_refused_before_reading_it(tmp_path, length):
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", length) + b'{"__metadata__":{}}' + b" " * 64)
    err = opens_cheaply(tmp_path)
    assert_named(err, f)
    assert f"header length {length}" in str(err)


def test_lying_tensor_size_is_refused_at_open_even_in_a_huge_sparse_file(tmp_path):
    """Headers promising terabytes, in a small file and in a 2 GiB sparse one (no disk used): refused
    when the reader opens, so no tensor memory is ever allocated for them."""
    f = tmp_path / "model.safetensors"
    header = json.dumps({"w": entry("F32", [2**40], 0, 2**42)}).encode()
    f.write_bytes(safetensors_file(header, b"\0" * 64))
    assert "truncated" in str(opens_cheaply(tmp_path))
    with open(f, "r+b") as fh:
        fh.truncate(2 * 2**30)
    err = opens_cheaply(tmp_path)
    assert_named(err, f)
    # A header length of 1.5 GB in the 2 GiB file: refused (> MAX_HEADER_BYTES), not read.
    with open(f, "r+b") as fh:
        fh.write(struct.pack("<Q", 1_500_000_000))
    assert "header length 1500000000" in str(opens_cheaply(tmp_path))


def test_file_truncated_while_open_gives_named_read_errors(tmp_path):
    """A file cut short after its header was read: reads raise OSError naming file and tensor (a
    mapping made after the cut included; one made before it would be SIGBUS, see map_files)."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(VALID)
    plain, mapped = CheckpointReader(tmp_path), CheckpointReader(tmp_path)
    mapped.map_files()
    last = max(plain.names, key=lambda n: plain.entry(n).end)  # last in the file: the cut takes its bytes
    with open(f, "r+b") as fh:
        fh.truncate(plain.entry(last).start + 1)
    for read in (lambda: plain.get(last), lambda: plain.stored(last).read(0, plain.stored(last).numel()),
                 lambda: mapped.stored(last).read(0, mapped.stored(last).numel())):
        with pytest.raises(OSError, match=rf"{f}: cannot read tensor '{last}'"):
            read()
    plain.close()
    mapped.close()


# ---- sharded checkpoints: the index --------------------------------------------------------------

SHARDS = {
    "model-00001-of-00002.safetensors": st_save({k: TENSORS[k] for k in list(TENSORS)[:3]}),
    "model-00002-of-00002.safetensors": st_save({k: TENSORS[k] for k in list(TENSORS)[3:]}),
}
WEIGHT_MAP = {n: f for f, blob in SHARDS.items() for n in st_load(blob)}
INDEX = "model.safetensors.index.json"
file_names = st.sampled_from([
    *SHARDS, "missing.safetensors", "", ".", "..", "../model-00001-of-00002.safetensors", "/etc/passwd",
    "sub/model-00001-of-00002.safetensors", "config.json", "a\0b", "\ud800",
]) | st.text(max_size=8)


@st.composite
def damaged_index(draw) -> tuple[dict[str, bytes], list[str]]:
    weight_map = dict(WEIGHT_MAP)
    index: object = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    files = dict(SHARDS)
    done = []
    text = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(
            ["file", "drop", "add", "weight_map", "index", "text", "bytes", "nest", "no_shard", "bad_shard", "no_index"]
        ))
        done.append(kind)
        name = draw(st.sampled_from(list(WEIGHT_MAP)))
        if kind == "file":
            weight_map[name] = draw(file_names | json_junk)
        elif kind == "drop":
            weight_map.pop(name, None)
        elif kind == "add":
            weight_map[draw(st.text(max_size=6))] = draw(st.sampled_from(list(SHARDS)))
        elif kind == "weight_map" and isinstance(index, dict):
            index["weight_map"] = draw(json_junk)
        elif kind == "index":
            index = draw(json_junk)
        elif kind == "text":
            full = json.dumps(index)
            text = full[: draw(st.integers(0, len(full)))].encode()
        elif kind == "bytes":
            text = draw(st.binary(max_size=32))
        elif kind == "nest":
            text = b'{"weight_map":' + b"[" * 50_000
        elif kind == "no_shard":
            files.pop(draw(st.sampled_from(list(SHARDS))), None)
        elif kind == "bad_shard":
            shard = draw(st.sampled_from(list(SHARDS)))
            files[shard] = damage(SHARDS[shard], draw(st.lists(mutations, min_size=1, max_size=2)))
        elif kind == "no_index":
            index = None
    if index is not None or text is not None:
        files[INDEX] = text if text is not None else json.dumps(index).encode("utf-8", "surrogatepass")
    return files, done


@settings(FUZZ, max_examples=200)
@given(case=damaged_index())
def test_damaged_index_or_shards_open_exactly_or_name_the_file(workdir, case):
    files, _ = case
    d = write_checkpoint(workdir, files)
    try:
        # the message gives the index or a shard, all in d (the missing-weights error gives d itself)
        event("opened" if check(d, blame=(d,)) else "refused")
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize(
    "index, says",
    [
        (b"\xff\xfe{}", "UnicodeDecodeError"),  # was: UnicodeDecodeError not naming the index
        (b'{"weight_map": "ab"}', "'weight_map' is a str"),  # was: ValueError from dict("ab")
        (json.dumps({"weight_map": {"model.step": 1}}).encode(), "is in 1"),  # was: TypeError from Path / int
        (json.dumps({"weight_map": {"model.step": "../x.safetensors"}}).encode(), "not a file name"),  # read outside
        (json.dumps({"weight_map": {}}).encode(), "lists no tensors"),  # was: "no weights found (.bin)"
        (b'{"weight_map":' + b"[" * 50_000, "RecursionError"),
    ],
    ids=["utf-16", "str", "int", "outside", "empty", "deep"],
)
def test_index_errors_found_by_fuzzing(tmp_path, index, says):
    for name, blob in SHARDS.items():
        (tmp_path / name).write_bytes(blob)
    (tmp_path / INDEX).write_bytes(index)
    with pytest.raises(ValueError) as e:
        CheckpointReader(tmp_path)
    assert_named(e.value, tmp_path / INDEX)
    assert says in str(e.value)


@pytest.mark.parametrize("config", [b"{", b"\xff", b"[1, 2]", b"[" * 50_000], ids=["cut", "latin-1", "list", "deep"])
def test_corrupt_config_json_names_the_file(tmp_path, config):
    (tmp_path / "model.safetensors").write_bytes(VALID)
    (tmp_path / "config.json").write_bytes(config)
    with pytest.raises(ValueError) as e:
        CheckpointReader(tmp_path)
    assert_named(e.value, tmp_path / "config.json")


def test_a_directory_named_like_a_shard_is_not_read(tmp_path):
    (tmp_path / "a.safetensors").mkdir()  # was: IsADirectoryError from read_header
    (tmp_path / "b.safetensors").write_bytes(VALID)
    assert CheckpointReader(tmp_path).names == CheckpointReader(tmp_path / "b.safetensors").names


def test_valid_files_still_read_exactly(workdir):
    """The fixtures themselves: the reader opens them, and the properties' oracle agrees."""
    d = write_checkpoint(workdir, {"model.safetensors": VALID})
    assert check(d, blame=(d,))
    assert read_header(d / "model.safetensors")[1] == {"format": "pt"}
    d = write_checkpoint(workdir, {**SHARDS, INDEX: json.dumps({"weight_map": WEIGHT_MAP}).encode()})
    assert check(d, blame=(d,))
