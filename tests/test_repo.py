"""The repository as a newcomer meets it: the README's commands and CI agree."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def readme_commands() -> list[str]:
    block = re.search(r"```(?:bash|sh)\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_train_and_test_commands():
    train, test = readme_commands()[:2]
    assert "train/main.py" in train and "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    test = readme_commands()[1]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci


def test_the_code_keeps_its_shape():
    """No function over 50 lines and no class over 150 in train/, infer/, launch/; the engine under 300 lines."""
    too_long = []
    for path in sorted(p for folder in ("train", "infer", "launch") for p in (REPO / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {ast.FunctionDef: 50, ast.AsyncFunctionDef: 50, ast.ClassDef: 150}.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not too_long, too_long
    assert len((REPO / "train" / "engine.py").read_text().splitlines()) < 300


def test_ruff_lints_and_formats_clean():
    """The linter and formatter configured in pyproject.toml find nothing to change (CI runs this test)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    for command in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        proc = subprocess.run([ruff, *command, str(REPO)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, f"ruff {' '.join(command)}:\n{proc.stdout[-3000:]}{proc.stderr[-1000:]}"


def test_exit_codes_are_one_table():
    """README and the sbatch scripts cite train/cli.py's Exit; no script hard-codes a code of its own."""
    from train.cli import Exit

    readme = (REPO / "README.md").read_text()
    for code in Exit:
        assert re.search(rf"^\| {code.value} \|", readme, re.M), f"README lacks the row for exit code {code.value} ({code.name})"
    for script in (REPO / "slurm").glob("*.sbatch"):
        assert not re.search(r"\b75\b", script.read_text()), f"{script.name} hard-codes 75: cite train.cli.Exit"
