"""The house rules, read from the source: which part of the service may import which, and that
the trials' settings are the config's own dataclasses, not copies made by hand."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from sae import SaeConfig
from sweeps.cli import DEMO_CONFIG
from sweeps.config import fixed_fields, load_config
from sweeps.search.driver import trial_settings
from sweeps.search.trial import trial_configs
from sweeps.vocabulary import Hyperparams

ROOT = Path(__file__).resolve().parents[1]

#: The shared core: the lowest modules, which every stage may import.
CORE = {
    f"sweeps.{m}"
    for m in (
        "config",
        "vocabulary",
        "ranking",
        "space",
        "storage",
        "ridge",
        "signals",
        "progress",
        "redact",
    )
}

#: What each part may import from the project, besides its own modules and `sae`.
ALLOWED = {
    "core": CORE,
    "activations": CORE,
    "tracking": CORE,
    "search": CORE | {"sweeps.activations", "sweeps.tracking"},
    "results": CORE | {"sweeps.activations", "sweeps.tracking"},
}


def part(module: str) -> str:
    """core, one of the four stages, or top (cli and demo, which may import anything)."""
    if module in CORE:
        return "core"
    name = module.split(".")[1] if "." in module else ""
    return name if name in ALLOWED else "top"


def project_imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import of sae or sweeps in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "sweeps":  # `from sweeps import storage`
                names = [f"sweeps.{a.name}" for a in node.names]
            found += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return [(m, line) for m, line in found if m.split(".")[0] in ("sae", "sweeps")]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


SWEEPS = sorted((ROOT / "sweeps").rglob("*.py"))


def test_the_sae_library_imports_nothing_of_the_service():
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {m}"
        for p in sorted((ROOT / "sae").rglob("*.py"))
        for m, line in project_imports(p)
        if m.startswith("sweeps")
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_module_imports_only_what_its_part_may(path):
    me = module_name(path)
    mine = part(me)
    if mine == "top":
        return
    own = f"sweeps.{mine}" if mine != "core" else None
    bad = []
    for m, line in project_imports(path):
        if m.startswith("sae") or m in ("sweeps",):
            continue
        ok = m in ALLOWED[mine] or any(m.startswith(a + ".") for a in ALLOWED[mine])
        ok |= own is not None and (m == own or m.startswith(own + "."))
        if not ok:
            bad.append(f"line {line}: {me} ({mine}) imports {m}")
    assert not bad, bad


def test_the_search_never_imports_results_and_tracking_never_imports_ray():
    for path in SWEEPS:
        me, tree = module_name(path), ast.parse(path.read_text())
        mods = {m for m, _ in project_imports(path)}
        if me.startswith("sweeps.search"):
            assert not any(m.startswith("sweeps.results") for m in mods), me
        if me.startswith("sweeps.tracking"):
            imported = {
                a.name.split(".")[0]
                for n in ast.walk(tree)
                if isinstance(n, ast.Import)
                for a in n.names
            } | {
                n.module.split(".")[0]
                for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and n.module
            }
            assert "ray" not in imported, me


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in [*SWEEPS, *sorted((ROOT / "sae").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                ("sweeps", "sae")
            ):
                bad += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not bad, bad


def test_a_new_sae_config_field_reaches_every_trial_and_its_params():
    """The trials' SAE settings are the config's SaeConfig itself: a field added to it needs
    no code to reach a trial (the old driver copied two fields by hand)."""

    @dataclasses.dataclass
    class WithNewField(SaeConfig):
        decoder_init_norm: float = 1.0

    cfg = load_config(DEMO_CONFIG)
    cfg.sae = WithNewField(normalize_decoder=False, decoder_init_norm=0.1)
    fixed = trial_settings(cfg, tokens_per_image=3)
    point = Hyperparams(layer=1, k=4, expansion_factor=2, lr=3e-4, auxk_alpha=0.5)
    sae_cfg, train_cfg = trial_configs(point, fixed)
    assert isinstance(sae_cfg, WithNewField) and sae_cfg.decoder_init_norm == 0.1
    assert sae_cfg.normalize_decoder is False
    assert (sae_cfg.k, sae_cfg.expansion_factor, sae_cfg.activation) == (4, 2, "topk")
    assert (train_cfg.lr, train_cfg.auxk_alpha) == (3e-4, 0.5)
    assert train_cfg.batch_size == cfg.train.batch_size * 3  # images -> activations
    # ... and is logged with every trial's params, searched fields left to the trial's own
    logged = fixed_fields(cfg, "sae")
    assert logged["decoder_init_norm"] == 0.1 and logged["normalize_decoder"] is False
    assert not set(logged) & {"k", "expansion_factor", "num_latents", "activation"}


def test_a_new_train_field_reaches_every_trial():
    cfg = load_config(DEMO_CONFIG, ["train.dead_feature_threshold=12345", "train.probe=true"])
    fixed = trial_settings(cfg, tokens_per_image=1)
    point = Hyperparams(layer=1, k=4, expansion_factor=2, lr=1e-3)
    _, train_cfg = trial_configs(point, fixed)
    assert train_cfg.dead_feature_threshold == 12345 and fixed.probe
    assert not hasattr(train_cfg, "probe")  # a sweep's flag: the SAE library never sees it
    names = {f.name for f in dataclasses.fields(type(cfg.train))}
    assert names - {f.name for f in dataclasses.fields(train_cfg)} == {"probe"}


def test_hyperparams_read_back_from_mlflow_text_are_typed():
    params = {"layer": "9", "k": "32", "expansion_factor": "8", "lr": "0.0003"}
    point = Hyperparams.from_values(params | {"auxk_alpha": "0.03125", "activation": "batchtopk"})
    want = dict(layer=9, k=32, expansion_factor=8, lr=3e-4, auxk_alpha=0.03125)
    assert point == Hyperparams(**want, activation="batchtopk")
    assert isinstance(point.layer, int) and isinstance(point.lr, float)
    with pytest.raises(ValueError, match="lack layer"):
        Hyperparams.from_values({"k": "32", "expansion_factor": "8", "lr": "1e-3"})


def _runtime_imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import a file runs (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return found


def test_only_the_tracking_package_imports_mlflow():
    """MLflow stays behind sweeps/tracking/: every other module reaches the store through
    it (the Tune callback through tracking.trial_runs, export through tracking.registry)."""
    outside = [p for p in SWEEPS if "tracking" not in p.relative_to(ROOT).parts]
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {m}"
        for p in [*outside, *sorted((ROOT / "sae").rglob("*.py"))]
        for m, line in _runtime_imports(p)
        if m.split(".")[0] == "mlflow"
    ]
    assert not bad, bad
