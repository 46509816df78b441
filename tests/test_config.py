"""Config machinery: strict loading, dotted-name errors, overrides, dumps with secrets redacted."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest
import yaml

from galray.config import (ConfigDeprecationWarning, ConfigError, check, dumps, field_spec, flatten, from_dict, load,
                           replace, to_dict, upgrade_keys)
from galray.storage import StorageConfig


@dataclass(frozen=True)
class Inner:
    k: int = 8
    widths: tuple[int, ...] = (64, 128)
    mode: Literal["a", "b"] = "a"
    lr: float = 1e-3
    name: str | None = None
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        check(self.k > 0, "k", "must be positive")


@dataclass(frozen=True)
class Outer:
    out: str = "x"
    inner: Inner = field(default_factory=Inner)
    storage: StorageConfig = field(default_factory=StorageConfig)


def test_defaults_and_roundtrip():
    cfg = from_dict(Outer, {"inner": {"k": 3, "widths": [1, 2, 3], "betas": [0.5, 1]}})
    assert cfg.inner.k == 3 and cfg.inner.widths == (1, 2, 3) and cfg.inner.betas == (0.5, 1.0)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, field_name", [
    ({"inner": {"kk": 1}}, "inner.kk"),
    ({"inner": {"k": "eight"}}, "inner.k"),
    ({"inner": {"k": -1}}, "inner.k"),
    ({"inner": {"mode": "c"}}, "inner.mode"),
    ({"inner": {"widths": [1, "x"]}}, "inner.widths[1]"),
    ({"inner": {"lr": True}}, "inner.lr"),
    ({"storage": {"max_attempts": 0}}, "storage.max_attempts"),
    ({"storage": {"endpoint_url": "localhost:9000"}}, "storage.endpoint_url"),
    ({"bogus": 1}, "bogus"),
    ({"inner": {"betas": [0.9]}}, "inner.betas"),
    ({"inner": {"betas": [0.9, "x"]}}, "inner.betas[1]"),
])
def test_errors_name_the_field(data, field_name):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert info.value.field == field_name
    assert str(info.value).startswith(field_name + ":")


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"out": "a", "inner": {"k": 2}}))
    cfg = load(Outer, path, ["inner.k=5", "inner.widths=[4, 8]", "inner.lr=0.5", "inner.name=abc"])
    assert (cfg.out, cfg.inner.k, cfg.inner.widths, cfg.inner.lr, cfg.inner.name) == ("a", 5, (4, 8), 0.5, "abc")
    with pytest.raises(ConfigError, match="inner.nope"):
        load(Outer, path, ["inner.nope=1"])
    with pytest.raises(ConfigError):
        load(Outer, path, ["no_equals_sign"])
    assert replace(cfg, ["out=b"]).out == "b"


def test_frozen():
    cfg = Outer()
    with pytest.raises(Exception):
        cfg.out = "y"  # type: ignore[misc]


def test_dump_yaml_and_json_redact_secrets():
    cfg = from_dict(Outer, {"storage": {"access_key_id": "AKIDSECRET", "secret_access_key": "s3cr3t"}})
    for text in (dumps(cfg), dumps(cfg, "json")):
        assert "AKIDSECRET" not in text and "s3cr3t" not in text
    assert "s3cr3t" not in repr(cfg)
    data = json.loads(dumps(cfg, "json"))
    assert data["storage"]["secret_access_key"] == "***" and data["inner"]["k"] == 8
    assert flatten(cfg)["storage.secret_access_key"] == "***"
    assert yaml.safe_load(dumps(Outer()))["inner"]["widths"] == [64, 128]


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2.5", 2.5), ("3", 3.0), ("-1E2", -100.0), ("1_000", 1000.0)])
def test_numbers_parse_as_typed(text, value):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; a number field takes it as the number it is."""
    assert load(Outer, overrides=[f"inner.lr={text}"]).inner.lr == value
    assert from_dict(Outer, {"inner": {"lr": text}}).inner.lr == value


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "inf", "nan", "1e400"])
def test_non_finite_numbers_are_refused(text):
    with pytest.raises(ConfigError, match="finite") as info:
        load(Outer, overrides=[f"inner.lr={text}"])
    assert info.value.field == "inner.lr"


def test_integers_parse_as_typed():
    assert load(Outer, overrides=["inner.k=1e1"]).inner.k == 10
    with pytest.raises(ConfigError, match="expected an integer") as info:
        load(Outer, overrides=["inner.k=2.5"])
    assert info.value.field == "inner.k"


@dataclass(frozen=True)
class Renamed:
    RENAMED: ClassVar[dict[str, str]] = {"out": "output", "k": "inner.k"}
    output: str = "x"
    inner: Inner = field(default_factory=Inner)


def test_renamed_keys_keep_working_with_a_warning_naming_the_new_key():
    with pytest.warns(ConfigDeprecationWarning, match="'out' is deprecated .* use 'output'"):
        cfg = from_dict(Renamed, {"out": "y"})
    assert cfg.output == "y"
    with pytest.warns(ConfigDeprecationWarning, match="use 'inner.k'"):
        assert from_dict(Renamed, {"k": 3, "inner": {"mode": "b"}}).inner == Inner(k=3, mode="b")
    with pytest.raises(ConfigError, match="renamed to output") as info:
        from_dict(Renamed, {"out": "y", "output": "z"})
    assert info.value.field == "out"
    data = {"out": "y"}
    assert upgrade_keys(Renamed, data, warn=False) == {"output": "y"} and data == {"out": "y"}


def test_field_spec_reads_types_and_defaults():
    assert field_spec(Outer, "inner.k") == (int, 8)
    assert field_spec(Outer, "inner.widths") == (tuple[int, ...], (64, 128))
    assert field_spec(Outer, "storage.max_attempts") == (int, 10)


@pytest.mark.parametrize("resources, field_name", [
    ({"GPU": 1}, "pool.resources.GPU"),  # has its own setting (num_gpus)
    ({"galray_pool": 0}, "pool.resources.galray_pool"),
    ({"galray_pool": "one"}, "pool.resources.galray_pool"),
])
def test_pool_custom_resources_are_checked_and_reach_ray(resources, field_name):
    from galray.stages.embed import EmbedJob

    job = {"input": "in", "output": "out", "backbone": {"name": "test_convnext"}}
    with pytest.raises(ConfigError) as info:
        from_dict(EmbedJob, {**job, "pool": {"resources": resources}})
    assert info.value.field == field_name
    pool = load(EmbedJob, overrides=["pool.resources.galray_pool=1"], base=job).pool
    assert pool.ray_options() == {"num_cpus": 1.0, "num_gpus": None, "resources": {"galray_pool": 1.0}}
