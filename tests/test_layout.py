"""House rules that keep the library/stage split honest."""

import ast
from pathlib import Path

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

    kd_only = {"alpha", "temperature", "loss", "kd_targets", "beta", "layer_map"}
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for params_file in ("params.yaml", "params.smoke.yaml"):
        student = yaml.safe_load((ROOT / params_file).read_text())["student"]
        for key in set(student) - kd_only:
            assert f"${{student.{key}}}" in stages["student_ce"]["cmd"], (params_file, key)
            assert f"student.{key}" in stages["student_ce"]["params"], (params_file, key)
