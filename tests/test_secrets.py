"""Secrets stay where they are: never given on the command line or in config files, never pickled into Ray
task arguments, never printed. No Ray here (the job-submission test checks a real Ray head)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from galray.cli import main
from galray.config import ConfigError, dumps, flatten, from_dict, load, redact_uri
from galray.stages.embed import EmbedJob
from galray.storage import StorageConfig, StorageError, arrow_filesystem, check_access

PKG = Path(__file__).resolve().parent.parent / "galray"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
JOB = ["--input", "in", "--output", "out", "--model", "test_convnext"]


def test_no_library_code_turns_ray_authentication_off():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE[\"']?\s*[,=:]\s*[\"']?disabled", text), path


@pytest.mark.parametrize("key,variable", [("storage.secret_access_key", "AWS_SECRET_ACCESS_KEY"),
                                          ("storage.access_key_id", "AWS_ACCESS_KEY_ID"),
                                          ("storage.session_token", "AWS_SESSION_TOKEN")])
def test_set_refuses_a_secret_and_names_the_variable_to_use(key, variable, capsys):
    assert main(["embed", *JOB, "--set", f"{key}={SECRET}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert key in err and variable in err and SECRET not in err


def test_config_file_refuses_a_secret_that_yaml_reads_as_a_number(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: in\noutput: out\nbackbone: {name: test_convnext}\nstorage: {secret_access_key: 31415926}\n")
    assert main(["embed", "--config", str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "AWS_SECRET_ACCESS_KEY" in err and "31415926" not in err
    with pytest.raises(ConfigError) as info:  # the Python API: a bad value is not echoed either
        from_dict(StorageConfig, {"secret_access_key": 31415926})
    assert "31415926" not in str(info.value)


def test_uri_passwords_are_redacted_in_dumps_params_and_errors():
    uri = "http://galray:hunter2@mlflow.internal:5000"
    assert redact_uri(f"see {uri}/x") == "see http://galray:***@mlflow.internal:5000/x"
    assert redact_uri("s3://bucket/key@v2 and http://host:5000") == "s3://bucket/key@v2 and http://host:5000"
    job = load(EmbedJob, None, [f"tracking.uri={uri}", "storage.endpoint_url=http://minio:pw@127.0.0.1:9"],
               base={"input": "in", "output": "out", "backbone": {"name": "m"}})
    for text in (dumps(job), str(flatten(job))):
        assert "hunter2" not in text and ":pw@" not in text and "galray:***@" in text
    with pytest.raises(ConfigError) as info:
        StorageConfig(endpoint_url="ftp://minio:pw@127.0.0.1:9")
    assert ":pw@" not in str(info.value) and "minio:***@" in str(info.value)
    with pytest.raises(StorageError) as info:  # nothing listens on port 9 (discard): a connection error
        check_access("s3://bucket/x", StorageConfig(endpoint_url="http://minio:pw@127.0.0.1:9", max_attempts=1,
                                                    connect_timeout_s=1, request_timeout_s=1))
    assert ":pw@" not in str(info.value)


def test_credentials_never_travel_in_pickles_or_resolved_configs(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    given = StorageConfig(endpoint_url="http://127.0.0.1:9", access_key_id="AKIAEXAMPLE", secret_access_key=SECRET)
    assert SECRET.encode() not in pickle.dumps(given)
    assert pickle.loads(pickle.dumps(given)).endpoint_url == "http://127.0.0.1:9"
    assert given.resolved().secret_access_key is None and StorageConfig().resolved().secret_access_key is None
    fs, _ = arrow_filesystem("s3://bucket/x", given)  # the driver's own filesystem holds the key ...
    blob = pickle.dumps(fs)  # ... the copy Ray ships to a worker does not
    assert SECRET.encode() not in blob and b"AKIAEXAMPLE" not in blob
    assert pickle.loads(blob).max_attempts == given.max_attempts
