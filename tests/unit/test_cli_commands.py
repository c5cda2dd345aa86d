"""The CLI's command table (`cli.base.COMMANDS`): its one lazy boundary. `--help` lists every
command without importing their modules, a command imports only its own module, and the table
names the module and the line of each command exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import typer
from typer.testing import CliRunner

from captchaops.cli import app
from captchaops.cli.base import COMMANDS

LOADED = """
import json, sys
from typer.testing import CliRunner
from captchaops.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({
    "code": result.exit_code,
    "output": result.output,
    "cli": sorted(m for m in sys.modules if m.startswith("captchaops.cli.")),
    "heavy": sorted({m.split(".")[0] for m in sys.modules} & {"mlflow", "ray", "tensorflow"}),
}))
"""


def run_fresh(*args: str) -> dict[str, object]:
    """What `captchaops ARGS` printed and imported, in a process that imported nothing else."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    answer: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_help_lists_every_command_and_imports_none_of_their_modules() -> None:
    shown = run_fresh("--help")
    assert shown["code"] == 0
    assert shown["cli"] == ["captchaops.cli.base"]
    assert shown["heavy"] == []
    rows = re.findall(r"^│ (\S+) ", str(shown["output"]), flags=re.M)  # a row names a command
    assert [name for name in rows if not name.startswith("-")] == list(COMMANDS)


def test_a_model_server_imports_only_its_own_command_module() -> None:
    """supervisord starts every replica as `captchaops serve`: the stack's, the registry's and
    the training commands (MLflow, Ray, TensorFlow) stay out of its memory."""
    shown = run_fresh("serve", "--help")
    assert shown["code"] == 0 and "--alias" in str(shown["output"])
    assert shown["cli"] == ["captchaops.cli.base", "captchaops.cli.serve"]
    assert shown["heavy"] == []


def test_the_table_names_each_command_s_module_and_line() -> None:
    for module in {module for module, _ in COMMANDS.values()}:
        __import__(f"captchaops.cli.{module}")
    defined: dict[str, str] = {}
    for command in app.registered_commands:
        assert command.callback is not None
        name = command.name or typer.main.get_command_name(command.callback.__name__)
        defined[name] = command.callback.__module__
    for group in app.registered_groups:
        assert group.name and group.typer_instance
        callbacks = [c.callback for c in group.typer_instance.registered_commands]
        defined[group.name] = next(c.__module__ for c in callbacks if c is not None)
    assert defined == {name: f"captchaops.cli.{module}" for name, (module, _) in COMMANDS.items()}
    real = typer.main.get_group(app).commands
    for name, (_, line) in COMMANDS.items():
        first = (real[name].help or "").split("\n\n")[0]
        assert " ".join(first.split()) == line, f"COMMANDS[{name!r}] differs from its docstring"


def test_an_unknown_command_is_one_usage_error_with_the_near_names() -> None:
    result = CliRunner().invoke(app, ["promot"])
    assert result.exit_code == 2
    assert "No such command 'promot'. Did you mean 'promote'" in result.output
    assert "Traceback" not in result.output
