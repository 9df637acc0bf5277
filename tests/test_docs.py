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


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_documents_every_option_of_the_run_and_release_commands():
    """--no-progress, --json, sweep's options... each one a user can type is in the README."""
    import argparse

    from dpgen.cli import build_parser

    commands = _section((REPO / "README.md").read_text(), "Commands")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("run", "pretrain", "finetune", "sample", "release", "report", "sweep"):
        for action in sub.choices[name]._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in commands, f"dpgen {name} {opt} is not documented in README's Commands section"


def test_readme_api_example_is_sized_for_minutes_on_a_cpu():
    """The example runs as written: a short pretraining and DP fine-tune, a cohort of hundreds."""
    import ast

    from dpgen.config import load_config

    code = re.findall(r"## Python API\n\n```python\n(.+?)\n```", (REPO / "README.md").read_text(), flags=re.S)[0]
    calls = {c.func.attr: c for c in ast.walk(ast.parse(code)) if isinstance(c, ast.Call)
             and isinstance(c.func, ast.Attribute)}
    run = calls["run"]
    config = load_config(REPO / ast.literal_eval(run.args[0]), ast.literal_eval(
        next(k.value for k in run.keywords if k.arg == "overrides")))
    assert config.pretrain.steps <= 200 and config.finetune.steps <= 50 and config.sample.num_images <= 100
    n = ast.literal_eval(next(k.value for k in calls["sample_cohort"].keywords if k.arg == "n"))
    assert n <= 2000


def test_every_subcommand_answers_help():
    """Every subcommand (and every `privacy` subcommand) is registered and prints its help. The CLI
    imports each command's module directly: a broken import is an error, not a missing command."""
    import argparse
    import contextlib
    import io

    import pytest

    from dpgen.cli import LAZY_COMMANDS, build_parser, main

    def subcommands(parser):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        return {} if sub is None else sub.choices

    top = subcommands(build_parser())
    assert set(LAZY_COMMANDS) | {"run", "pretrain", "finetune", "sample"} == set(top)
    argvs = [[name] for name in top] + [["privacy", name] for name in subcommands(top["privacy"])]
    assert len(argvs) > len(top)
    for argv in argvs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0 and out.getvalue().startswith(f"usage: dpgen {' '.join(argv)}"), argv


def test_a_command_whose_module_fails_to_import_is_an_error_not_a_missing_command(monkeypatch):
    """cli.py used to catch ImportError and register a stub that only said 'not available'."""
    import pytest

    import dpgen.cli as cli

    monkeypatch.setitem(cli.LAZY_COMMANDS, "broken", ("dpgen.no_such_module", "a command whose module is gone"))
    with pytest.raises(ImportError):
        cli.build_parser()
