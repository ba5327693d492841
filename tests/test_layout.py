"""House rules that keep the library/stage split honest."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_pipeline_never_imports_click_or_stages():
    for path in (ROOT / "pipeline").rglob("*.py"):
        assert not imported_modules(path) & {"click", "stages"}, path


def test_stages_hold_no_training_or_tensor_code():
    for path in (ROOT / "stages").glob("*.py"):
        assert "torch" not in imported_modules(path), f"{path}: tensor code belongs in pipeline/"


def test_ce_baseline_gets_every_student_setting_except_the_kd_ones():
    import yaml

    # The baseline reads no teacher: neither its targets nor its layers (init_from_teacher).
    kd_only = {"alpha", "temperature", "loss", "kd_signal", "beta", "hidden_loss", "layer_map", "tail_model", "mode",
               "cosine", "init_from_teacher"}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for params_file in ("params.yaml", "params.smoke.yaml", "params.classification.yaml",
                        "params.classification.smoke.yaml", "params.masked.yaml", "params.masked.smoke.yaml"):
        student = yaml.safe_load((ROOT / params_file).read_text())["student"]
        for key in set(student) - kd_only:
            assert f"${{student.{key}}}" in stages["student_ce"]["cmd"], (params_file, key)
            assert f"student.{key}" in stages["student_ce"]["params"], (params_file, key)


def local_imports(path: Path) -> set[Path]:
    """Files of this project that `path` imports (any depth of `from pipeline.x.y import z`, function-level
    imports included), as paths relative to ROOT."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] not in ("pipeline", "stages"):
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # a package import runs its __init__ too
                base = ROOT.joinpath(*parts[:i])
                for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                    if candidate.exists():
                        found.add(candidate.relative_to(ROOT))
    return found


def docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def import_closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(local_imports(ROOT / path) - seen)
    return seen


def test_every_stage_depends_on_every_module_it_imports():
    """A change to any module a stage runs (config.py's defaults included) makes `dvc status` show it."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if stage.get("always_changed"):
            continue  # runs every time anyway (the inputs stage)
        command = stage["cmd"].split()[1]  # kdcache <command> ...
        deps = [Path(dep) for dep in stage["deps"]]
        needed = import_closure(Path("stages") / f"{command}.py")
        assert Path("pipeline/config.py") in needed
        needed = {p for p in needed if not docstring_only(ROOT / p)}  # nothing there can change a result
        missing = sorted(str(p) for p in needed if not any(p == d or d in p.parents for d in deps))
        assert not missing, f"dvc.yaml stage {name} misses deps {missing}"


def test_teacher_and_targets_never_import_training_or_students():
    for package in ("teacher", "targets"):
        for path in (ROOT / "pipeline" / package).rglob("*.py"):
            closure = import_closure(path.relative_to(ROOT))
            bad = sorted(str(p) for p in closure if p.parts[:2] in (("pipeline", "training"), ("pipeline", "student")))
            assert not bad, f"{path.relative_to(ROOT)} reaches {bad}"


def test_losses_never_import_models_or_data():
    for path in (ROOT / "pipeline" / "losses").rglob("*.py"):
        closure = import_closure(path.relative_to(ROOT))
        assert not [p for p in closure if p.name in ("models.py", "tokens.py")], path


@pytest.mark.parametrize("pipeline", ["chain", "seqkd"])
def test_sub_pipeline_stages_depend_on_every_module_they_import(pipeline):
    """chain/ and seqkd/dvc.yaml (foreach stages, paths relative to their folder) list their import
    closures like dvc.yaml."""
    import yaml

    stages = yaml.safe_load((ROOT / pipeline / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        stage = stage.get("do", stage)
        command = stage["cmd"].split()[1]
        deps = [Path(dep.removeprefix("../")) for dep in stage["deps"] if dep.startswith("../")]
        needed = {p for p in import_closure(Path("stages") / f"{command}.py") if not docstring_only(ROOT / p)}
        missing = sorted(str(p) for p in needed if not any(p == d or d in p.parents for d in deps))
        assert not missing, f"{pipeline}/dvc.yaml stage {name} misses deps {missing}"
