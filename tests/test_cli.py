"""The command line: every verb has a --help that explains each option, its defaults come from the
job configs, every verb takes --config/--set/--print-config, and old spellings still work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from galray.cli import VERBS, build_parser, main
from galray.config import field_spec

ROOT = Path(__file__).resolve().parents[1]


def _verbs():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_top_level_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for verb in _verbs():
        assert verb in out


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_every_option_is_explained(verb, capsys):
    parser = _verbs()[verb]
    assert parser.description and len(parser.description) > 40
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:  # old spellings are hidden on purpose
            continue
        assert action.help and len(action.help) > 10, f"{verb} {action.option_strings or action.dest} lacks help"
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--config", "--set", "--print-config"} <= options
    assert ("--json" in options) == VERBS[verb].json
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert re.search(r"usage: galray " + verb, capsys.readouterr().out)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_defaults_are_the_dataclass_defaults(verb):
    """A flag's [default: ...] is read from its job config, so help and config cannot drift."""
    job_cls, _ = VERBS[verb].load()
    helps = {a.dest: a.help for a in _verbs()[verb]._actions if a.help != argparse.SUPPRESS}
    for flag in VERBS[verb].flags:
        _, default = field_spec(job_cls, flag.field)
        shown = re.search(r"\[default: (.*)\]$", helps[flag.field])
        if flag.default is not None:
            assert shown and shown.group(1) == flag.default
        elif flag.const is None and default not in (dataclasses.MISSING, None, ""):
            assert shown and shown.group(1) == str(default), (verb, flag.name)


def test_flags_set_fields_and_print_config(capsys):
    assert main(["simulate", "--n", "7", "--size", "32", "--output", "o", "--overwrite", "--set", "sim.seed=3",
                 "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["n"], cfg["sim"]["size"], cfg["sim"]["seed"], cfg["output"], cfg["overwrite"]) == (7, 32, 3, "o", True)
    assert main(["embed", "--input", "a", "--output", "b", "--model", "m", "--random-init", "--actors", "2",
                 "--crop-fraction", "0.5", "--no-tracking", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["backbone"]["name"] == "m" and cfg["backbone"]["pretrained"] is False
    assert cfg["pool"]["actors"] == 2 and cfg["preprocess"]["crop_fraction"] == 0.5
    assert cfg["tracking"]["enabled"] is False
    assert main(["generate", "--prior", "p", "--vqvae", "v", "--output", "g.png", "--cfg-scale", "2",
                 "--label", "-1", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["sampling"]["cfg_scale"] == 2.0 and cfg["label"] == -1
    assert main(["info", "some/store", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["input"] == "some/store"


def test_numbers_as_typed_and_non_finite_refused(capsys):
    assert main(["train", "sae", "--input", "x", "--name", "r", "--set", "sae.train.lr=1e-3", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sae"]["train"]["lr"] == 1e-3
    assert main(["train", "sae", "--input", "x", "--name", "r", "--set", "sae.train.lr=.inf"]) == 2
    assert "sae.train.lr: must be a finite number" in capsys.readouterr().err
    assert main(["embed", "--input", "a", "--output", "b", "--model", "m", "--crop-fraction", "nan"]) == 2
    assert "preprocess.crop_fraction: must be a finite number" in capsys.readouterr().err
    assert main(["simulate", "--n", "many"]) == 2
    assert "n: expected an integer, got 'many'" in capsys.readouterr().err


def test_old_spellings_work_with_a_warning_naming_the_new_one(tmp_path, capsys):
    assert main(["simulate", "--out", "o", "--print-config"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["output"] == "o"
    assert "--out is deprecated" in captured.err and "use --output" in captured.err
    old = tmp_path / "old.yaml"
    old.write_text("kind: sae\ndata: emb\nname: r\n")
    assert main(["train", "--config", str(old), "--print-config"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["input"] == "emb"
    assert "config key 'data' is deprecated" in captured.err and "use 'input'" in captured.err
    assert main(["embed", "--input", "a", "--output", "b", "--set", "model=m", "--set", "actors=2",
                 "--print-config"]) == 0
    captured = capsys.readouterr()
    cfg = yaml.safe_load(captured.out)
    assert cfg["backbone"]["name"] == "m" and cfg["pool"]["actors"] == 2
    assert "use 'backbone.name'" in captured.err and "use 'pool.actors'" in captured.err
    assert main(["train", "sae", "--data", "x", "--input", "y", "--name", "r", "--print-config"]) == 0  # the last wins


def test_jobs_call_the_cli(tmp_path):
    """jobs/*.py take exactly the verb's options: the train job reads its kind from the config file."""
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config",
                          str(ROOT / "jobs" / "configs" / "sae_cpu_debug.yaml"), "--set", "steps=7", "--json",
                          "--print-config"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert (cfg["kind"], cfg["steps"], cfg["input"]) == ("sae", 7, "galray-data/embeddings")
    # that every jobs/*.py calls main with its own verb is tests/test_layering.py's rule


def test_json_summary(tmp_path, capsys):
    from galray.data.shards import make_table, shard_name, write_table
    from galray.data.galsim_survey import SimConfig, render_batch
    from galray.storage import arrow_filesystem

    sim = SimConfig(size=32)
    fs, root = arrow_filesystem(str(tmp_path / "s"))
    write_table(make_table(render_batch(range(3), sim), sim.image_spec()), fs, f"{root}/{shard_name(0)}")
    assert main(["info", str(tmp_path / "s"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rows"] == 3 and data["image"]["shape"] == [32, 32, 3]
