"""The repository as a newcomer meets it: the README's commands and CI agree."""

import re

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
