"""README is the front door: its commands must be the ones CI runs and the CLI accepts."""

import re

from tests.conftest import REPO


def _readme_commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2
    run_cmd, test_cmd = cmds
    assert "pip install torch==2.13.0" in run_cmd and "dpgen run configs/quickstart.yaml" in run_cmd
    assert "pytest" in test_cmd
    ci = (REPO / ".ci" / "run").read_text()
    # CI runs the README's test command after the same venv set-up
    assert test_cmd.split("&& ", 2)[-1] in ci


def test_readme_configs_exist():
    text = (REPO / "README.md").read_text()
    for path in set(re.findall(r"configs/[\w.]+\.yaml", text)):
        assert (REPO / path).is_file(), path


def test_cli_help_lists_documented_commands():
    from dpgen.cli import build_parser

    help_text = build_parser().format_help()
    for cmd in ["run", "pretrain", "finetune", "sample", "privacy"]:
        assert cmd in help_text
