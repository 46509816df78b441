"""Opening a Parquet file galray did not write, without running anything the file asks for.

**Why.** A Parquet file written by pyarrow stores its Arrow schema (``ARROW:schema`` in the
footer), and in it a column may name an *extension type* (``ARROW:extension:name``). When a
Python library has registered a type of that name, pyarrow builds it with the library's own
code; Ray registers several as soon as ``ray.data`` is imported (in every galray process that
uses Ray). One of them, ``ray.data.arrow_pickled_object``, unpickles its values in
``to_pylist()`` / ``to_numpy()``: a file can carry a pickle whose ``__reduce__`` runs a shell
command. Ray's own ``read_parquet`` refuses that type; galray reads Parquet with pyarrow directly
(ingest, embed, encode, training's driver, ``info``), so it needs its own gate.

**The rule** (an allow-list, checked on the raw footer, before pyarrow builds any type):

- plain Arrow types: null, bool, integers, floats, decimals, dates, times, timestamps,
  durations, binary and string (also large and view variants, fixed-size binary), and lists,
  fixed-size lists, structs and maps of those;
- one extension type: Arrow's canonical ``arrow.fixed_shape_tensor`` (the cutout store's image
  column), whose declared per-row size must stay within ``limits.max_decoded_bytes``.

Anything else (any other extension type, registered or not; unions, intervals, run-end encoded)
is refused with :class:`UnsafeParquetError`, naming the file and the column. The footer is read
by hand (its size bounded; the two Thrift fields needed are decoded here) and the ``ARROW:schema``
flatbuffer is walked here with bounds checks, so no Arrow type is built; only when every
field passes does pyarrow open the file, and :func:`open_parquet` checks the schema pyarrow built
once more before a single value is read.

Pure pyarrow (no Ray): every reader imports it, in the driver and in the workers.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from galray.data.limits import DecodeLimits

MAGIC = b"PAR1"
TENSOR_EXTENSION = "arrow.fixed_shape_tensor"
ALLOWED_EXTENSIONS = frozenset({TENSOR_EXTENSION})
EXTENSION_NAME_KEY = "ARROW:extension:name"
EXTENSION_META_KEY = "ARROW:extension:metadata"
MAX_FOOTER_BYTES = 64 << 20  # a footer of 1,000 columns x 1,000 row groups is ~50 MB; more is not a cutout store
TAIL_READ_BYTES = 64 << 10  # one ranged read usually holds the whole footer
MAX_SCHEMA_DEPTH = 32

# Members of the Type union of Arrow's Schema.fbs (format/Schema.fbs), by id.
ARROW_TYPES = {1: "null", 2: "int", 3: "float", 4: "binary", 5: "string", 6: "bool", 7: "decimal", 8: "date",
               9: "time", 10: "timestamp", 11: "interval", 12: "list", 13: "struct", 14: "union",
               15: "fixed_size_binary", 16: "fixed_size_list", 17: "map", 18: "duration", 19: "large_binary",
               20: "large_string", 21: "large_list", 22: "run_end_encoded", 23: "binary_view",
               24: "string_view", 25: "list_view", 26: "large_list_view"}
REFUSED_TYPES = frozenset({"interval", "union", "run_end_encoded"})


class UnsafeParquetError(ValueError):
    """A Parquet file whose schema is outside the allow-list; the message names the file and the column."""


class UnreadableParquetError(ValueError):
    """Not a readable Parquet file (truncated, not Parquet, a corrupt footer); the message says why."""


@dataclass(frozen=True)
class ArrowField:
    """One field of a file's stored Arrow schema, as the raw footer declares it."""

    path: str
    """Dotted column path (``image``, ``image.bytes``)."""
    type: str
    """The Arrow type's name (:data:`ARROW_TYPES`)."""
    extension: str | None
    """``ARROW:extension:name``, if any."""
    extension_metadata: bytes = b""


@dataclass(frozen=True)
class Footer:
    """What the raw footer of a Parquet file says, read without building an Arrow type."""

    num_rows: int
    fields: tuple[ArrowField, ...]
    """The stored Arrow schema's fields, nested ones included; empty when the file stores none."""


# --- the raw footer --------------------------------------------------------------------------------

def _read_tail(fs: pafs.FileSystem, path: str) -> tuple[bytes, int]:
    """(the footer's Thrift bytes, file size); one or two ranged reads."""
    with fs.open_input_file(path) as f:
        size = f.size()
        if size < 12:
            raise UnreadableParquetError(f"not a Parquet file ({size} bytes)")
        f.seek(max(0, size - TAIL_READ_BYTES))
        tail = f.read(min(size, TAIL_READ_BYTES))
        if tail[-4:] != MAGIC:
            raise UnreadableParquetError("not a Parquet file, or truncated (no PAR1 footer)")
        n = struct.unpack("<I", tail[-8:-4])[0]
        if n > size - 12 or n > MAX_FOOTER_BYTES:
            raise UnreadableParquetError(f"corrupt footer (claims {n:,} bytes in a {size:,}-byte file)")
        if n + 8 <= len(tail):
            return tail[len(tail) - 8 - n:-8], size
        f.seek(size - 8 - n)
        return f.read(n), size


def read_footer(fs: pafs.FileSystem, path: str) -> Footer:
    """The row count and stored Arrow fields of a Parquet file, read without building any Arrow type.

    Raises :class:`UnreadableParquetError` for a file that is not readable Parquet."""
    try:
        raw, _ = _read_tail(fs, path)
    except (OSError, pa.ArrowException) as err:
        raise UnreadableParquetError(f"cannot read: {err}") from None
    num_rows, kv = _file_metadata(raw)
    if num_rows < 0:
        raise UnreadableParquetError(f"corrupt footer (claims {num_rows} rows)")
    # Every ARROW:schema entry is checked: a reader might use any of them.
    fields = tuple(f for key, value in kv if key == b"ARROW:schema" for f in _stored_fields(value))
    return Footer(num_rows=num_rows, fields=fields)


# --- the footer's Thrift (compact protocol) --------------------------------------------------------
# pq.read_metadata and pq.ParquetFile build the Arrow schema, and with it any registered extension
# type; pyarrow's bare Thrift parser (_reconstruct_filemetadata) aborts the process on a corrupt
# footer. So the two fields needed here are read by hand: FileMetaData's num_rows (3) and
# key_value_metadata (5), skipping the rest (https://github.com/apache/thrift/blob/master/doc/specs/thrift-compact-protocol.md).

_STOP, _TRUE, _FALSE, _I8, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT, _UUID = range(14)
_FMD_NUM_ROWS, _FMD_KV = 3, 5
_KV_KEY_ID, _KV_VALUE_ID = 1, 2


class _Thrift:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise UnreadableParquetError("corrupt footer (ends early)")
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self) -> int:
        shift = out = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 70:
                raise UnreadableParquetError("corrupt footer (varint too long)")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def binary(self) -> bytes:
        n = self.varint()
        if self.pos + n > len(self.buf):
            raise UnreadableParquetError("corrupt footer (string out of range)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def fields(self) -> Iterator[tuple[int, int]]:
        """(field id, type) of a struct's fields; the caller reads or skips each value."""
        last = 0
        while True:
            head = self.byte()
            typ = head & 0x0F
            if typ == _STOP:
                return
            delta = head >> 4
            last = last + delta if delta else self.zigzag()
            yield last, typ

    def list_header(self) -> tuple[int, int]:
        head = self.byte()
        size = head >> 4
        return (self.varint() if size == 15 else size), head & 0x0F

    def skip(self, typ: int, depth: int = 0) -> None:
        if depth > MAX_SCHEMA_DEPTH:
            raise UnreadableParquetError("corrupt footer (nested too deep)")
        if typ in (_TRUE, _FALSE):
            return
        if typ == _I8:
            self.byte()
        elif typ in (_I16, _I32, _I64):
            self.varint()
        elif typ == _DOUBLE:
            self.pos += 8
        elif typ == _UUID:
            self.pos += 16
        elif typ == _BINARY:
            self.binary()
        elif typ in (_LIST, _SET):
            n, elem = self.list_header()
            for _ in range(n):
                self.byte() if elem in (_TRUE, _FALSE) else self.skip(elem, depth + 1)
        elif typ == _MAP:
            n = self.varint()
            if n:
                kinds = self.byte()
                for _ in range(n):
                    self.skip(kinds >> 4, depth + 1)
                    self.skip(kinds & 0x0F, depth + 1)
        elif typ == _STRUCT:
            for _, t in self.fields():
                self.skip(t, depth + 1)
        else:
            raise UnreadableParquetError(f"corrupt footer (unknown Thrift type {typ})")
        if self.pos > len(self.buf):
            raise UnreadableParquetError("corrupt footer (ends early)")


def _file_metadata(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    """(num_rows, key_value_metadata as (key, value) pairs) of a Parquet footer's FileMetaData."""
    t = _Thrift(raw)
    num_rows, kv = -1, []
    for fid, typ in t.fields():
        if fid == _FMD_NUM_ROWS and typ == _I64:
            num_rows = t.zigzag()
        elif fid == _FMD_KV and typ == _LIST:
            n, elem = t.list_header()
            if elem != _STRUCT:
                raise UnreadableParquetError("corrupt footer (key_value_metadata is not a list of structs)")
            for _ in range(n):
                key = value = b""
                for kid, ktyp in t.fields():
                    if kid in (_KV_KEY_ID, _KV_VALUE_ID) and ktyp == _BINARY:
                        key, value = (t.binary(), value) if kid == _KV_KEY_ID else (key, t.binary())
                    else:
                        t.skip(ktyp)
                kv.append((key, value))
        else:
            t.skip(typ)
    return num_rows, kv


# --- the stored Arrow schema (an IPC Schema message, flatbuffers) ------------------------------------

class _Flat:
    """Bounds-checked reads from a flatbuffer (https://flatbuffers.dev/internals/)."""

    def __init__(self, buf: bytes):
        self.buf = buf

    def read(self, fmt: str, pos: int) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > len(self.buf):
            raise UnreadableParquetError("corrupt ARROW:schema (offset out of range)")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def table(self, pos: int) -> "_Table":
        return _Table(self, pos)


class _Table:
    def __init__(self, fb: _Flat, pos: int):
        self.fb, self.pos = fb, pos
        self.vtable = pos - fb.read("<i", pos)
        self.vtable_len = fb.read("<H", self.vtable)

    def _slot(self, i: int) -> int:
        off = 4 + 2 * i
        return self.fb.read("<H", self.vtable + off) if off + 2 <= self.vtable_len else 0

    def _target(self, i: int) -> int | None:
        off = self._slot(i)
        if not off:
            return None
        p = self.pos + off
        return p + self.fb.read("<I", p)

    def ubyte(self, i: int) -> int:
        off = self._slot(i)
        return self.fb.read("<B", self.pos + off) if off else 0

    def string(self, i: int) -> bytes | None:
        p = self._target(i)
        if p is None:
            return None
        n = self.fb.read("<I", p)
        if p + 4 + n > len(self.fb.buf):
            raise UnreadableParquetError("corrupt ARROW:schema (string out of range)")
        return self.fb.buf[p + 4:p + 4 + n]

    def tables(self, i: int) -> list["_Table"]:
        p = self._target(i)
        if p is None:
            return []
        n = self.fb.read("<I", p)
        if p + 4 + 4 * n > len(self.fb.buf):
            raise UnreadableParquetError("corrupt ARROW:schema (vector out of range)")
        return [self.fb.table(p + 4 + 4 * k + self.fb.read("<I", p + 4 + 4 * k)) for k in range(n)]

    def table(self, i: int) -> "_Table | None":
        p = self._target(i)
        return None if p is None else self.fb.table(p)


# Slots of the tables of format/Message.fbs and format/Schema.fbs used here.
_MESSAGE_HEADER_TYPE, _MESSAGE_HEADER = 1, 2
_HEADER_SCHEMA = 1
_SCHEMA_FIELDS = 1
_FIELD_NAME, _FIELD_TYPE_TYPE, _FIELD_CHILDREN, _FIELD_METADATA = 0, 2, 5, 6
_KV_KEY, _KV_VALUE = 0, 1


def _stored_fields(encoded: bytes) -> Iterator[ArrowField]:
    """Every field (nested ones too) of the base64 IPC Schema message that pyarrow stores as ARROW:schema."""
    try:
        buf = base64.b64decode(encoded, validate=False)
    except ValueError:
        raise UnreadableParquetError("corrupt ARROW:schema (not base64)") from None
    # IPC encapsulation: [0xFFFFFFFF] int32 length, then the flatbuffer Message (pre-1.0 files omit the marker).
    start = 8 if buf[:4] == b"\xff\xff\xff\xff" else 4
    fb = _Flat(buf[start:])
    message = fb.table(fb.read("<I", 0))
    if message.ubyte(_MESSAGE_HEADER_TYPE) != _HEADER_SCHEMA:
        raise UnreadableParquetError("corrupt ARROW:schema (not a Schema message)")
    schema = message.table(_MESSAGE_HEADER)
    if schema is None:
        raise UnreadableParquetError("corrupt ARROW:schema (no schema)")
    yield from _walk(schema.tables(_SCHEMA_FIELDS), "", 0)


def _walk(fields: list[_Table], prefix: str, depth: int) -> Iterator[ArrowField]:
    if depth > MAX_SCHEMA_DEPTH:
        raise UnreadableParquetError(f"ARROW:schema nested deeper than {MAX_SCHEMA_DEPTH} levels")
    for f in fields:
        name = (f.string(_FIELD_NAME) or b"").decode("utf-8", "replace")
        path = f"{prefix}.{name}" if prefix else name
        meta = [((kv.string(_KV_KEY) or b""), (kv.string(_KV_VALUE) or b"")) for kv in f.tables(_FIELD_METADATA)]
        names = [v.decode("utf-8", "replace") for k, v in meta if k == EXTENSION_NAME_KEY.encode()]
        if len(names) > 1:  # which one would a reader take? Refuse rather than guess.
            names = [f"{len(names)} extension names ({', '.join(map(repr, names))})"]
        typ = f.ubyte(_FIELD_TYPE_TYPE)
        yield ArrowField(path=path, type=ARROW_TYPES.get(typ, f"type #{typ}"), extension=names[0] if names else None,
                         extension_metadata=next((v for k, v in meta if k == EXTENSION_META_KEY.encode()), b""))
        yield from _walk(f.tables(_FIELD_CHILDREN), path, depth + 1)


# --- the rule ----------------------------------------------------------------------------------------

def _tensor_values(metadata: bytes) -> int:
    """Values per row of a fixed-shape tensor, from its extension metadata (``{"shape": [...]}``)."""
    try:
        shape = json.loads(metadata)["shape"]
        assert isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    except Exception:
        raise ValueError("its fixed_shape_tensor metadata has no valid shape") from None
    n = 1
    for d in shape:
        n *= d
    return n


def refusal(field: ArrowField, limits: DecodeLimits) -> str | None:
    """Why ``field`` is outside the allow-list, or None."""
    if field.extension is not None:
        if field.extension not in ALLOWED_EXTENSIONS:
            return (f"has extension type {field.extension!r}; only {TENSOR_EXTENSION!r} and plain Arrow types are "
                    "read from files galray did not write (an extension type may run code when its values are read)")
        try:
            values = _tensor_values(field.extension_metadata)
        except ValueError as err:
            return str(err)
        if values * 8 > limits.max_decoded_bytes:  # 8: the widest value type a tensor may hold
            return (f"declares tensors of {values:,} values a row, over limits.max_decoded_bytes "
                    f"({limits.max_decoded_bytes:,} bytes)")
        return None
    if field.type in REFUSED_TYPES or field.type not in ARROW_TYPES.values():
        return f"has Arrow type {field.type}, which galray does not read from files it did not write"
    return None


def check_footer(footer: Footer, source: str, limits: DecodeLimits = DecodeLimits()) -> Footer:
    """Raise :class:`UnsafeParquetError` naming ``source`` and the first column outside the allow-list."""
    for field in footer.fields:
        reason = refusal(field, limits)
        if reason:
            raise UnsafeParquetError(f"{source}: column {field.path!r} {reason}")
    return footer


def checked_footer(fs: pafs.FileSystem, path: str, source: str | None = None,
                   limits: DecodeLimits = DecodeLimits()) -> Footer:
    """:func:`read_footer` then :func:`check_footer`: the row count of a file that is safe to open."""
    try:
        footer = read_footer(fs, path)
    except UnreadableParquetError as err:
        raise UnreadableParquetError(f"{source or path}: {err}") from None
    return check_footer(footer, source or path, limits)


def check_schema(schema: pa.Schema, source: str) -> None:
    """The same rule on a schema pyarrow built (a second line of defence, and for tables from elsewhere)."""
    def walk(name: str, typ: pa.DataType, metadata: dict[bytes, bytes] | None) -> None:
        ext = (metadata or {}).get(EXTENSION_NAME_KEY.encode())  # an extension no library registered
        if ext is not None and ext.decode("utf-8", "replace") not in ALLOWED_EXTENSIONS:
            raise UnsafeParquetError(f"{source}: column {name!r} has extension type {ext.decode('utf-8', 'replace')!r}")
        if isinstance(typ, pa.BaseExtensionType):
            if not isinstance(typ, pa.FixedShapeTensorType):
                raise UnsafeParquetError(f"{source}: column {name!r} has extension type {typ.extension_name!r}")
            return
        if pa.types.is_union(typ) or pa.types.is_interval(typ) or pa.types.is_run_end_encoded(typ):
            raise UnsafeParquetError(f"{source}: column {name!r} has Arrow type {typ}")
        if pa.types.is_dictionary(typ):
            walk(name, typ.value_type, None)
            return
        for i in range(typ.num_fields):
            child = typ.field(i)
            walk(f"{name}.{child.name}", child.type, child.metadata)

    for f in schema:
        walk(f.name, f.type, f.metadata)


def open_parquet(fs: pafs.FileSystem, path: str, source: str | None = None,
                 limits: DecodeLimits = DecodeLimits(), **kwargs: Any) -> pq.ParquetFile:
    """A ``pq.ParquetFile`` of a file that passed the allow-list (raw footer first, then pyarrow's schema).

    Raises :class:`UnsafeParquetError` or :class:`UnreadableParquetError` naming ``source`` (default: the path)."""
    checked_footer(fs, path, source, limits)
    try:
        pf = pq.ParquetFile(path, filesystem=fs, **kwargs)
    except (OSError, pa.ArrowException) as err:
        raise UnreadableParquetError(f"{source or path}: {err}") from None
    check_schema(pf.schema_arrow, source or path)
    return pf


def read_schema(fs: pafs.FileSystem, path: str, source: str | None = None,
                limits: DecodeLimits = DecodeLimits()) -> pa.Schema:
    """The Arrow schema of a checked file (``pq.read_schema`` behind the allow-list)."""
    return open_parquet(fs, path, source, limits).schema_arrow


def read_table(fs: pafs.FileSystem, path: str, source: str | None = None, limits: DecodeLimits = DecodeLimits(),
               columns: list[str] | None = None) -> pa.Table:
    """A whole checked file, or some of its columns (``pq.read_table`` behind the allow-list)."""
    return open_parquet(fs, path, source, limits).read(columns=columns)
