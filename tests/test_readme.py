"""The README's commands, checked against the real CLI: every `imkd ...` line must parse
(command names, option names, option types), so the README cannot drift from the code.
The quickstart it advertises is executed end to end in tests/regression/."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from imkd_deploy.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_commands() -> list[str]:
    cmds = []
    for line in README.read_text().splitlines():
        m = re.match(r"^ {4}(imkd .+?)(\s+#.*)?$", line)
        if m:
            cmds.append(m.group(1).strip())
    return cmds


def _parse(argv: list[str]) -> None:
    """Walk to the (sub)command the tokens name, then let typer's own parser parse the rest
    without running anything: unknown options, wrong types and missing values raise."""
    cmd, name, argv = typer.main.get_command(app), "imkd", list(argv)
    while argv and argv[0] in getattr(cmd, "commands", {}):
        name, cmd, argv = argv[0], cmd.commands[argv[0]], argv[1:]
    ctx = cmd.make_context(name, argv)
    assert not getattr(ctx, "args", []) or hasattr(cmd, "commands"), f"unparsed arguments {ctx.args}"


def test_readme_lists_the_main_commands():
    cmds = _readme_commands()
    for sub in ("quickstart", "data synth", "train teacher", "train student", "eval", "export", "infer", "calibrate",
                "build-engine", "bench"):
        assert any(c.startswith(f"imkd {sub}") for c in cmds), sub


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_command_parses(command):
    _parse(shlex.split(command)[1:])


def test_parse_rejects_a_wrong_option():
    with pytest.raises(Exception, match="--opps"):
        _parse(["export", "--checkpoint", "x", "--out", "y.onnx", "--opps", "onnx"])
