"""The cluster's files: cluster.yaml against the autoscaler's own schema, the KubeRay manifest, jobs/ and its configs.

No Ray cluster is started: these read files and validate them with the code Ray and galray ship.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from galray.cli import VERBS
from galray.config import ConfigError, from_dict, read_mapping

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_the_autoscaler_schema_in_the_ray_package():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(cfg)))  # and as `ray up` fills and checks it


def test_cluster_yaml_layout_auth_and_no_secrets():
    cfg = _cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0, "the head runs no work"
    gpu = [t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0]
    cpu = [t for n, t in types.items() if n != cfg["head_node_type"] and not t.get("resources", {}).get("GPU")]
    assert gpu and all(t["min_workers"] == 0 for t in gpu), "GPU workers scale from zero"
    assert cpu, "a CPU worker type for preprocessing"
    for name, t in types.items():
        assert "IamInstanceProfile" in t["node_config"], f"{name}: S3 through the instance role"
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|AKIA[0-9A-Z]{12}", text)
    for cmd in (" ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token" in cmd
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])


def test_cluster_image_ray_version_satisfies_the_package_pin():
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    image = _cluster()["docker"]["image"]
    version = re.search(r":(\d+\.\d+\.\d+)", image).group(1)
    assert ray_req.specifier.contains(version), f"{image} vs {ray_req}"


def _entrypoint_verb(script: Path) -> list[str]:
    """The argv prefix a jobs/*.py entrypoint hands to galray.cli.main (its literal list before *sys.argv[1:])."""
    tree = ast.parse(script.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "main"]
    assert len(calls) == 1, f"{script.name}: one call of galray.cli.main"
    return [e.value for e in calls[0].args[0].elts if isinstance(e, ast.Constant)]


def test_every_job_entrypoint_is_a_thin_call_of_an_existing_verb():
    scripts = sorted(JOBS.glob("*.py"))
    assert {"embed.py", "encode.py", "simulate.py", "ingest.py", "train_sae.py", "train_vqvae.py",
            "train_prior.py"} <= {s.name for s in scripts}
    for script in scripts:
        verb = _entrypoint_verb(script)
        assert verb and verb[0] in VERBS, f"{script.name} calls an unknown verb {verb}"
        assert len(script.read_text().splitlines()) < 20, f"{script.name} should only call the CLI"


def _loads_as_some_job(path: Path) -> list[str]:
    """The verbs whose job config accepts the file (galray's own strict loader)."""
    data = read_mapping(path)
    ok = []
    for name, verb in VERBS.items():
        job_cls, _ = verb.load()
        try:
            from_dict(job_cls, data)
            ok.append(name)
        except (ConfigError, TypeError):
            pass
    return ok


def test_every_named_experiment_has_a_cpu_debug_variant_and_loads():
    configs = sorted((JOBS / "configs").glob("*.yaml"))
    names = {c.stem for c in configs}
    for c in configs:
        if not c.stem.endswith("_cpu_debug"):
            assert f"{c.stem}_cpu_debug" in names, f"{c.name} has no _cpu_debug variant"
        if c.stem.removesuffix("_cpu_debug").endswith("_space"):
            continue  # a Tune search space (`galray tune --space`), checked by tests/test_tune.py
        assert _loads_as_some_job(c), f"{c.name} loads as no verb's job config"


def test_runtime_env_is_valid_and_carries_no_secret():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)  # Ray's own validation of the fields
    assert ".git" in data["excludes"]
    assert not any(re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", k) for k in data.get("env_vars", {}))


def test_kuberay_rayjob_parses_and_its_entrypoint_names_files_that_exist():
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and (ROOT / argv[1]).is_file(), argv
    verb = _entrypoint_verb(ROOT / argv[1])
    config = ROOT / argv[argv.index("--config") + 1]
    assert config.is_file() and verb[0] in _loads_as_some_job(config)
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    spec = job["spec"]["rayClusterSpec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = [g for g in spec["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu and gpu[0]["minReplicas"] == 0
    account = spec["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["name"] == account and "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY)", (ROOT / "k8s" / "rayjob.yaml").read_text())


@pytest.mark.parametrize("script", ["embed.py", "train_sae.py"])
def test_job_entrypoint_config_error_is_one_line_not_a_traceback(script):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(JOBS / script), "--config", str(JOBS / "configs" / "sae.yaml"),
                           "--set", "no_such_key=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "config error" in proc.stderr
