"""Typed, frozen configuration: dataclasses loaded from YAML/dicts with strict validation.

Every config in galray is a frozen dataclass. This module turns plain data (YAML, JSON,
``--set a.b=c`` overrides) into those dataclasses and back, and fails at once with the
field's dotted name when a key is unknown or a value has the wrong type or range.

Pure module: never imports ray, mlflow, boto3, botocore or s3fs (tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, missing or invalid. The message starts with the dotted field name; the
    password of any ``user:password@`` URI in it is redacted."""

    def __init__(self, field: str, message: str):
        self.field = field
        message = redact_uri(message)
        super().__init__(f"{field}: {message}" if field else message)


class ConfigDeprecationWarning(FutureWarning):
    """An old config key or flag was used; it still works for one release. The message names the new one."""


def check(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError for ``field`` unless ``condition`` holds. For use in ``__post_init__``."""
    if not condition:
        raise ConfigError(field, message)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(path, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (tuple, list):
        return _convert_sequence(value, tp, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, path): _convert(v, val_tp, _join(path, str(k))) for k, v in value.items()}
    if tp in (bool, int, float, str):
        return _convert_scalar(value, tp, path)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")


def _convert_field(value: Any, tp: Any, path: str) -> Any:
    """:func:`_convert`, except that the error for a secret field does not show the value (a secret that YAML
    read as a number would otherwise be printed)."""
    try:
        return _convert(value, tp, path)
    except ConfigError as err:
        if path.rsplit(".", 1)[-1] not in SECRET_KEYS:
            raise
        raise ConfigError(err.field, "expected a string (the value given is a secret: not shown)") from None


def _convert_union(value: Any, tp: Any, path: str) -> Any:
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(path, "must not be null")
    options = [arg for arg in args if arg is not type(None)]
    if len(options) == 1:  # Optional[X]: X's own error names the field and the problem
        return _convert(value, options[0], path)
    for arg in options:
        try:
            return _convert(value, arg, path)
        except ConfigError:
            pass
    raise ConfigError(path, f"{value!r} does not match {_type_name(tp)}")


def _convert_sequence(value: Any, tp: Any, path: str) -> list[Any] | tuple[Any, ...]:
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected a list, got {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        items = [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple and args:
        if len(args) != len(value):
            raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
        items = [_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    else:
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(value: Any, tp: type, path: str) -> bool | int | float | str:
    """bool, int, float or str; numbers may come as text (see :func:`_parse_number`), and must be finite."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if isinstance(value, str):
        value = _parse_number(value, path, integer=tp is int)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(path, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(path, f"must be a finite number, got {value!r}")
    return float(value)


def _parse_number(text: str, path: str, integer: bool = False) -> int | float:
    """A number as a person types it: ``1e-3``, ``2.5``, ``1_000``, ``1e3`` for an integer.

    PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string, so a YAML file or ``--set lr=1e-3``
    hands such numbers over as text; Python's own grammar reads them.
    """
    kind = "an integer" if integer else "a number"
    try:
        number = float(text.strip())
    except ValueError:
        raise ConfigError(path, f"expected {kind}, got {text!r}") from None
    if not math.isfinite(number):
        raise ConfigError(path, f"must be a finite number, got {text!r}")
    if not integer:
        return number
    try:
        return int(text.strip())
    except ValueError:
        if number.is_integer():
            return int(number)
        raise ConfigError(path, f"expected an integer, got {text!r}") from None


def upgrade_keys(cls: type, data: Mapping[str, Any], path: str = "", warn: bool = True) -> dict[str, Any]:
    """``data`` with the keys ``cls.RENAMED`` lists moved to their new (dotted) names.

    A config class declares ``RENAMED: ClassVar[dict[str, str]] = {"out": "output"}`` for keys renamed
    in this release: an old key keeps working for one release, with a :class:`ConfigDeprecationWarning`
    that names the new key; giving both the old and the new key is an error. Nested sections are
    upgraded when their own class is built.
    """
    out = dict(data)
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old not in out:
            continue
        value = out.pop(old)
        node = out
        *parents, last = new.split(".")
        for k in parents:
            sub = node.get(k)
            if sub is not None and not isinstance(sub, Mapping):
                raise ConfigError(_join(path, old), f"was renamed to {_join(path, new)}, which is also given")
            node[k] = sub = dict(sub or {})
            node = sub
        if last in node:
            raise ConfigError(_join(path, old), f"was renamed to {_join(path, new)}: give only {_join(path, new)}")
        node[last] = value
        if warn:
            warnings.warn(f"config key {_join(path, old)!r} is deprecated and will be removed in the next release: "
                          f"use {_join(path, new)!r}", ConfigDeprecationWarning, stacklevel=2)
    return out


def field_spec(cls: type, dotted: str) -> tuple[Any, Any]:
    """``(type, default)`` of the field ``dotted`` (``a.b``) of dataclass ``cls``; the default is
    ``dataclasses.MISSING`` for a required field. For the CLI: flag types and help defaults."""
    *parents, last = dotted.split(".")
    for name in parents:
        cls = get_type_hints(cls)[name]
        if get_origin(cls) in (Union, types.UnionType):  # an optional section: its own class
            cls = next(a for a in get_args(cls) if a is not type(None))
    f = {f.name: f for f in dataclasses.fields(cls)}[last]
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return get_type_hints(cls)[last], default


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``. Unknown keys and bad values raise ConfigError."""
    data = upgrade_keys(cls, data or {}, path)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            _join(path, unknown[0]),
            f"unknown key (valid keys of {cls.__name__}: {', '.join(sorted(fields))})",
        )
    kwargs = {name: _convert_field(value, hints[name], _join(path, name)) for name, value in data.items()}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "is required")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        if path and not err.field.startswith(path):
            raise ConfigError(_join(path, err.field), str(err).split(": ", 1)[-1]) from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config, ready for YAML or JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` view of a config, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in redacted(to_dict(cfg) if not isinstance(cfg, dict) else cfg).items():
        name = _join(prefix, key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3). The value is parsed as YAML, so lists and numbers work."""
    if "=" not in text:
        raise ConfigError("", f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError("", f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(data: dict[str, Any], keys: typing.Sequence[str], value: Any, source: str) -> None:
    """Set ``data[keys[0]][keys[1]]... = value`` in place, creating nested mappings; ``source`` names what
    asked for it in the error when a key on the way is a value."""
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(".".join(keys[: i + 1]), f"is a value, not a section ({source})")
        node = nxt
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=c`` override set (creating nested mappings)."""
    out = json.loads(json.dumps(data)) if data else {}
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(out, keys, value, f"override {text!r}")
    return out


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) file holding one mapping."""
    text = Path(path).read_text()
    data = yaml.safe_load(text) if text.strip() else {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = (),
         base: dict[str, Any] | None = None) -> T:
    """Load ``cls`` from an optional YAML file, then ``base`` keys, then ``--set`` overrides."""
    data: dict[str, Any] = read_mapping(path) if path else {}
    _refuse_secrets(data, "in a config file")
    overrides = list(overrides)
    _refuse_secrets(apply_overrides({}, overrides), "with --set")
    if base:
        data = _merge(data, base)
    return from_dict(cls, apply_overrides(data, overrides))


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def replace(cfg: T, overrides: typing.Iterable[str]) -> T:
    """A copy of ``cfg`` with ``a.b=c`` overrides applied and validated."""
    return from_dict(type(cfg), apply_overrides(to_dict(cfg), overrides))


# Fields whose values never leave the process in a dump (config files next to outputs, MLflow params), and
# the variable each one is read from instead: a secret is never given with --set (shell history, `ps`, a
# Ray job's entrypoint) or in a config file (copied next to outputs and into jobs).
SECRET_KEYS: Mapping[str, str] = types.MappingProxyType({
    "access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN", "password": "MLFLOW_TRACKING_PASSWORD"})

# `scheme://user:password@host`: the password part of a URI's userinfo (RFC 3986 section 3.2.1).
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):(?P<secret>[^/\s@]*)@")


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by ``***``."""
    return _URI_PASSWORD.sub(r"\g<head>:***@", text)


def redacted(data: Any) -> Any:
    """Copy of a plain config mapping with secret values replaced by ``"***"`` and URI passwords redacted."""
    if isinstance(data, dict):
        return {k: ("***" if k in SECRET_KEYS and v else redacted(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [redacted(v) for v in data]
    if isinstance(data, str):
        return redact_uri(data)
    return data


def _refuse_secrets(data: Any, where: str, path: str = "") -> None:
    """Raise ConfigError for the first secret key given in ``data`` (a config file's or --set's mapping)."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        name = _join(path, str(key))
        if key in SECRET_KEYS and value not in (None, ""):
            raise ConfigError(name, f"is a secret and cannot be given {where} (it would end up in shell history, "
                                    f"`ps`, job entrypoints or copies of the config): set {SECRET_KEYS[key]} in "
                                    f"the environment of every node instead, or use an AWS profile "
                                    f"(AWS_PROFILE, ~/.aws/credentials) or the instance role")
        _refuse_secrets(value, where, name)


def dumps(cfg: Any, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """The config as YAML or JSON text, secrets redacted."""
    data = redacted(to_dict(cfg))
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False) + "\n"
    return yaml.safe_dump(data, sort_keys=False)


def fmt_for(name: str) -> Literal["yaml", "json"]:
    return "json" if name.endswith(".json") else "yaml"
