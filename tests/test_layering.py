"""The architecture's rules (ARCHITECTURE.md, "Which way dependencies point"), one parametrised check each.

- Import rules: importing a pure module must not load ray, mlflow, boto3, botocore or s3fs, directly or
  through another galray module (a fresh interpreter per rule; after each module its ``sys.modules``
  is checked, so the first module that pulls a forbidden one in is the one named).
- Static rules (read from the source): stages do not import each other (only ``demo`` runs the
  others), ``models/`` and the pure loops import no layer above them, ``data/`` imports neither the
  stages nor training, only ``jobs/`` imports the CLI, and each job calls the CLI's main with its verb.
- One name, one definition: a module-level constant, helper or class is defined in one module only;
  the exceptions are names that are a face several modules show on purpose.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "galray"
RAY_LAYER = {"ray", "mlflow", "boto3", "botocore", "s3fs"}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _modules(pattern: str) -> list[str]:
    return [_module(p) for p in sorted(PKG.glob(pattern)) if p.name != "__init__.py"]


PURE = (["galray.config", "galray.data.cutouts", "galray.data.preprocess", "galray.train.loop",
         "galray.export.saelens", "galray.export.hf"]
        + _modules("models/*.py") + _modules("train/*_loop.py") + _modules("analysis/*.py"))

# (rule, modules imported one after the other, forbidden top-level modules, code run after the imports)
IMPORT_RULES = [
    ("pure modules never load the Ray layer", PURE, RAY_LAYER, ""),
    ("numpy-only modules never load torch", ["galray.data.cutouts", "galray.data.preprocess",
                                             "galray.data.galsim_survey", "galray.data.split",
                                             "galray.models.backbone_config", "galray.analysis.montage",
                                             "galray.analysis.figures", "galray.analysis.alignment",
                                             "galray.analysis.alignment_plots", "galray.analysis.families",
                                             "galray.analysis.galleries", "galray.analysis.report"],
     RAY_LAYER | {"torch"}, ""),
    ("analysis figures are built without pyplot (no global figure state)",
     ["galray.analysis.alignment_plots", "galray.analysis.codebook", "galray.analysis.generations",
      "galray.analysis.report"], RAY_LAYER | {"matplotlib.pyplot"}, ""),
    ("the workers of embed and features load neither Ray nor torch when they unpickle the stage (both come "
     "inside functions)", ["galray.stages.embed", "galray.stages.features", "galray.stages.pool",
                           "galray.stages.summary"], RAY_LAYER | {"torch"}, ""),
    ("the report stage renders without torch", ["galray.stages.report"], {"ray", "torch"}, ""),
    ("an MLflow model loads without Ray, storage or galray's training code", ["galray.export.pyfunc"],
     {"ray", "boto3", "botocore", "s3fs", "galray.train", "galray.stages", "galray.data", "galray.storage"}, ""),
    ("survey readers run in plain tasks", ["galray.data.formats", "galray.data.stores", "galray.data.shards",
                                           "galray.data.resume", "galray.data.split", "galray.data.checkpoints",
                                           "galray.data.arrow_safety", "galray.data.limits", "galray.data.ids"],
     {"ray", "mlflow"}, ""),
    ("training figures are built without pyplot (no global state in workers)", ["galray.analysis.figures"],
     RAY_LAYER | {"matplotlib.pyplot"},
     "import numpy as np; from galray.analysis import figures as f; "
     "f.loss_curves({'loss': ([1, 2, 3], [3.0, 2.0, 1.0])}); f.codebook_usage(np.array([5, 0, 3, 1])); "
     "f.feature_density([1, 2], [-2.0, -1.0, 0.0], n_latents=8, n_samples=10)"),
]

CHECK = """
import importlib, json, sys
modules, forbidden, code = json.loads(sys.argv[1])
forbidden = set(forbidden)
for m in modules:
    importlib.import_module(m)
    bad = sorted(forbidden & set(sys.modules))
    if bad:
        print(json.dumps({m: bad}))
        sys.exit(0)
exec(code)
bad = sorted(forbidden & set(sys.modules))
print(json.dumps({"(after running the code)": bad} if bad else {}))
"""


@pytest.mark.parametrize("rule, modules, forbidden, code", IMPORT_RULES, ids=[r[0] for r in IMPORT_RULES])
def test_import_rule(rule, modules, forbidden, code):
    out = subprocess.run([sys.executable, "-c", CHECK, json.dumps([modules, sorted(forbidden), code])],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}, f"{rule}: {out.stdout}"


# --- static rules ----------------------------------------------------------------------------------

def _galray_imports(path: Path) -> set[str]:
    """Every galray module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("galray")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("galray"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from galray.train import sae_loop`
    return out


STAGES = {p.stem for p in PKG.glob("stages/*.py")} - {"__init__", "pool", "summary", "shard_attempts"}


def _may_import(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def _stage_rule(path: Path, imported: str) -> bool:
    other = imported.split(".")[2] if imported.startswith("galray.stages.") else None
    return other not in STAGES or other == path.stem or path.stem == "demo"


STATIC_RULES = {
    "stages do not import each other (only demo runs the others)": ("stages/*.py", _stage_rule),
    "models import only galray.config and other models (pure torch)":
        ("models/*.py", lambda p, m: _may_import(m, ("galray.config", "galray.models"))),
    "the pure loops import only config, models and the loop face":
        ("train/*_loop.py", lambda p, m: _may_import(m, ("galray.config", "galray.models", "galray.train.loop"))),
    "analysis imports no layer above it":
        ("analysis/*.py", lambda p, m: _may_import(m, ("galray.config", "galray.models", "galray.data",
                                                        "galray.analysis"))),
    "data imports neither the stages, training nor the CLI":
        ("data/*.py", lambda p, m: not _may_import(m, ("galray.stages", "galray.train", "galray.cli"))),
    "only jobs/ import the CLI": ("**/*.py", lambda p, m: p.name == "cli.py" or not _may_import(m, ("galray.cli",))),
}


@pytest.mark.parametrize("rule", sorted(STATIC_RULES))
def test_static_rule(rule):
    pattern, allowed = STATIC_RULES[rule]
    bad = sorted(f"{p.relative_to(ROOT)} imports {m}" for p in PKG.glob(pattern)
                 for m in _galray_imports(p) if not allowed(p, m))
    assert not bad, f"{rule}:\n" + "\n".join(bad)


def test_jobs_only_call_the_cli_with_their_verb():
    for job in sorted((ROOT / "jobs").glob("*.py")):
        tree = ast.parse(job.read_text())
        imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imports |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imports <= {"sys", "galray.cli"}, (job.name, imports)
        words = ", ".join(f'"{w}"' for w in job.stem.split("_"))  # jobs/train_sae.py -> galray train sae
        assert f'main([{words}, *sys.argv[1:]])' in job.read_text(), job.name


# --- one name, one definition ----------------------------------------------------------------------

# Names several modules define on purpose, each module its own: the face every train/*_loop.py shows
# (galray.train.loop), and the stage name a row-reading module writes into its errors rows.
FACES = {"train/*_loop.py": {"TrainConfig", "MODEL", "CURVES", "OBJECTIVE", "make_optimizer", "lr_at", "train_step",
                             "evaluate", "train"},
         "**/*.py": {"STAGE"}}


def test_no_name_is_defined_in_two_modules():
    defined: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        faces = set().union(*(names for pattern, names in FACES.items() if path.match(pattern)))
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name) and t.id != "__all__"]
            else:
                continue
            for name in set(names) - faces:
                defined.setdefault(name, []).append(str(path.relative_to(ROOT)))
    twice = {name: paths for name, paths in defined.items() if len(paths) > 1}
    assert not twice, "defined in more than one module (define once, import elsewhere): " + json.dumps(twice, indent=1)
