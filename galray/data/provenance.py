"""What made an output folder, and the rule for running into one again.

Every stage that writes a store (ingest, simulate, sample, embed, encode) calls
:func:`claim_output` before writing anything. The folder's ``_provenance.yaml`` records the stage,
the settings that decide the output's content (the job config minus its run-only keys, such as
resources, storage credentials and tracking; secrets never appear) and what the settings cannot
show: the model's weights hash, the checkpoint's hash. The full config, run-only keys included,
stays in ``_config.yaml`` beside it, for people.

- An empty folder (or a new one) is claimed: the record is written first.
- A folder made with the same settings is resumed: the stage redoes what is unfinished.
- A folder made with other settings (another model, weights, seed, size, input...) is refused
  at once, naming the first differing field and both values, unless ``overwrite``, which deletes
  the folder's shards, errors and records first: the output is replaced entirely, never mixed.
- A folder written by the previous release (``_config.yaml`` only) is compared on its settings.
- A folder that holds Parquet files and no record at all is refused: its content is unknown.

No Ray: plain pyarrow filesystems and YAML.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import pyarrow.fs as pafs
import yaml

from galray import __version__
from galray.config import ConfigError, dumps, flatten, to_dict, upgrade_keys
from galray.data.shards import CONFIG_NAME, ERRORS_DIR, list_parquet
from galray.storage import StorageConfig, check_access, join, write_text

PROVENANCE_NAME = "_provenance.yaml"
# Settings every job may change between a run and its rerun without changing the output's content.
COMMON_RUN_ONLY = ("overwrite", "storage", "tracking", "max_error_fraction")


def _settings(data: Mapping[str, Any], cls: type, run_only: Iterable[str]) -> dict[str, Any]:
    skip = (*COMMON_RUN_ONLY, *getattr(cls, "RUN_ONLY", ()), *run_only)
    return {k: v for k, v in flatten(dict(data)).items() if not any(k == s or k.startswith(f"{s}.") for s in skip)}


def settings_of(job: Any, run_only: Iterable[str] = ()) -> dict[str, Any]:
    """The job's content-deciding settings, dotted (``backbone.name``): everything but ``COMMON_RUN_ONLY``,
    ``run_only`` and the job class's ``RUN_ONLY`` (dotted names or section prefixes), secrets redacted."""
    return _settings(to_dict(job), type(job), run_only)


def _plain(value: Any) -> Any:
    """A value as YAML gives it back (tuples become lists), so a record compares equal to itself."""
    return yaml.safe_load(yaml.safe_dump(value))


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _refuse(uri: str, key: str, old: Mapping[str, Any], new: Mapping[str, Any], others: int) -> ConfigError:
    more = f" (and {others} more setting(s))" if others else ""
    return ConfigError(key, f"{uri} was made with {key}={old.get(key)!r}, this run has {new.get(key)!r}{more}: "
                            "rerun with --overwrite to replace it entirely, or choose another --output")


def clear_output(fs: pafs.FileSystem, root: str) -> None:
    """Delete what a stage writes into a folder: its shards, its errors and its records."""
    for sub in (root, f"{root}/{ERRORS_DIR}"):
        for f in list_parquet(fs, sub):
            fs.delete_file(f.path)
    for name in (PROVENANCE_NAME, CONFIG_NAME):
        if fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File:
            fs.delete_file(f"{root}/{name}")


def _read_yaml(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        data = yaml.safe_load(f.read().decode("utf-8"))
    return data if isinstance(data, dict) else {}


def claim_output(job: Any, stage: str, made_with: Mapping[str, Any] | None = None,
                 run_only: Iterable[str] = ()) -> None:
    """Check that ``job.output`` is empty or was made with the same settings (see the module docstring),
    clear it first with ``job.overwrite``, and record what makes it. Raises :class:`ConfigError` naming
    the first differing field. ``made_with``: what the settings cannot show (``weights_sha256``, ...)."""
    storage: StorageConfig = job.storage
    uri = job.output
    fs, root = check_access(uri, storage)
    new = _plain({**settings_of(job, run_only), **{f"made_with.{k}": v for k, v in (made_with or {}).items()}})
    if getattr(job, "overwrite", False):
        clear_output(fs, root)
    else:
        record = _read_yaml(fs, f"{root}/{PROVENANCE_NAME}")
        if record is not None:
            if record.get("stage") != stage:
                raise ConfigError("output", f"{uri} was made by `galray {record.get('stage')}`, not `galray {stage}`: "
                                            "choose another --output (or --overwrite to replace it)")
            old = {**record.get("settings", {}), **{f"made_with.{k}": v for k, v in (record.get("made_with") or {}).items()}}
            changed = _differences(old, new)
            if changed:
                raise _refuse(uri, changed[0], old, new, len(changed) - 1)
        elif list_parquet(fs, root) or list_parquet(fs, f"{root}/{ERRORS_DIR}"):
            legacy = _read_yaml(fs, f"{root}/{CONFIG_NAME}")
            if legacy is None:
                raise ConfigError("output", f"{uri} holds Parquet files but no {PROVENANCE_NAME} saying what made "
                                            "them: rerun with --overwrite to replace them, or choose another --output")
            # Written by the previous release: the settings it recorded (renamed keys upgraded) must match;
            # settings added since and the weights' hash are unknown.
            old = _plain(_settings(upgrade_keys(type(job), legacy, warn=False), type(job), run_only))
            current = {k: v for k, v in new.items() if k in old}
            changed = _differences(old, current)
            if changed:
                raise _refuse(uri, changed[0], old, current, len(changed) - 1)
    write_text(join(uri, PROVENANCE_NAME), yaml.safe_dump(
        {"stage": stage, "galray_version": __version__,
         "settings": {k: v for k, v in new.items() if not k.startswith("made_with.")},
         "made_with": {k[len("made_with."):]: v for k, v in new.items() if k.startswith("made_with.")}},
        sort_keys=True), storage)
    write_text(join(uri, CONFIG_NAME), dumps(job), storage)

