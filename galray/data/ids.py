"""What an object id may be, and what an untrusted one becomes when it may not.

Ids come from strangers' files: file names, id columns, catalogs. A valid id is a non-empty
string of valid UTF-8, at most ``limits.max_id_bytes`` bytes, without NUL or other control
characters, unique within its input (the first occurrence wins). Ids are opaque: galray never
builds a path from one, so ``../`` in an id is just three characters.

An id that breaks a rule sends its row to the errors output; the errors row carries a printable
form of it (invalid bytes as ``\\xNN`` escapes, cut to the limit), so every row can still be traced
back to its input. Pure Python + pyarrow: no Ray.
"""

from __future__ import annotations

import unicodedata

import pyarrow as pa
import pyarrow.compute as pc

from galray.data.limits import DecodeLimits

MISSING = "missing object_id"


def printable(raw: bytes | str, limit: int) -> str:
    """A form of an id that is always valid UTF-8, without control characters, at most ~``limit`` bytes."""
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else \
        raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = "".join(c if unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text[:limit + 1])
    return text if len(text.encode()) <= limit else text.encode()[:limit].decode("utf-8", "ignore") + "..."


def id_problem(raw: bytes | str | None, limits: DecodeLimits) -> str | None:
    """Why ``raw`` is not a valid object id, or None. ``str`` may hold surrogate escapes (file names
    that are not valid UTF-8, as Python's os functions give them)."""
    if raw is None:
        return MISSING
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:
            return "object_id is not valid UTF-8"
    if not raw:
        return "empty object_id"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "object_id is not valid UTF-8"
    if len(raw) > limits.max_id_bytes:
        return f"object_id is {len(raw):,} bytes, over limits.max_id_bytes ({limits.max_id_bytes:,})"
    if any(unicodedata.category(c) == "Cc" for c in text):
        return "object_id contains control characters (NUL, newline, ...)"
    return None


def check_ids(values: pa.Array | pa.ChunkedArray, limits: DecodeLimits) -> tuple[list[str | None], dict[int, str]]:
    """``(ids, problems)`` of one input's id column: ``ids[i]`` as a string (its :func:`printable` form
    when it breaks a rule, None when missing), ``problems[i]`` why row ``i`` goes to the errors output.
    Duplicates within the column: the first occurrence is kept."""
    ids: list[str | None] = []
    problems: dict[int, str] = {}
    first: dict[str, int] = {}
    for i, raw in enumerate(raw_ids(values)):
        problem = id_problem(raw, limits)
        if problem is None:
            oid = raw.decode("utf-8")
            if oid in first:
                problem = f"duplicate object_id (first at row {first[oid]})"
            else:
                first[oid] = i
            ids.append(oid)
        else:
            ids.append(None if raw is None else printable(raw, limits.max_id_bytes))
        if problem is not None:
            problems[i] = problem
    return ids, problems


def raw_ids(values: pa.Array | pa.ChunkedArray) -> list[bytes | None]:
    """An id column as bytes (integers as their decimal text): a string column of a file galray did not
    write may hold invalid UTF-8, which a cast to string would abort on."""
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)
            or pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)):
        values = pc.cast(values, pa.string())
    return values.cast(pa.large_binary()).to_pylist()


def id_strings(values: pa.Array | pa.ChunkedArray, limits: DecodeLimits) -> list[str | None]:
    """An id column as strings: valid ids as they are, others in their :func:`printable` form, nulls as None."""
    return [None if v is None else v.decode("utf-8") if id_problem(v, limits) is None
            else printable(v, limits.max_id_bytes) for v in raw_ids(values)]
