"""Every flag comes from a field of its command's settings model: its name, type, choices, default and help, so a
default is written once (issue 32)."""
import argparse
import subprocess
import sys

import pytest
import torch
import transformers

import slimconv
from slimconv.cli import build_parser, main
from slimconv.options import COMMANDS, flag, help_text, parse_options
from slimconv.selection.settings import DEFAULT_OPS


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_a_field_and_holds_no_default_of_its_own(command):
    model, positional, _ = COMMANDS[command]
    actions = [a for a in _subparsers()[command]._actions if not isinstance(a, argparse._HelpAction)]
    assert sorted(a.dest for a in actions) == sorted(model.model_fields)
    for a in actions:
        if a.option_strings:
            # A flag left out is absent, so the model's own default applies: the one place it is written.
            assert a.default is argparse.SUPPRESS, (command, a.dest)
        else:
            assert a.dest in positional
        assert a.help.removeprefix("turn off: ") == help_text(model.model_fields[a.dest]), (command, a.dest)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_default_as_the_field_holds_it(command, capsys):
    model = COMMANDS[command][0]
    assert main([command, "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    for name, field in model.model_fields.items():
        if field.is_required() or field.annotation is bool or field.default is None:
            continue
        default = ",".join(map(str, field.default)) if isinstance(field.default, list) else str(field.default)
        assert f"(default: {default})" in shown, (command, name)


@pytest.mark.parametrize("command", COMMANDS)
def test_leaving_out_every_flag_gives_the_fields_defaults(command):
    model, positional, flags = COMMANDS[command]
    required = [n for n, f in model.model_fields.items() if f.is_required() and n not in positional]
    argv = [command, *(["x"] * len(positional))]
    values = {"method": "sleb", "target": "decode:1.2", "out": "o", "repo_id": "me/m"}
    for name in required:
        argv += [flags.get(name, [flag(name)])[-1], values[name]]
    parsed = vars(build_parser().parse_args(argv))
    parsed.pop("func"), parsed.pop("command")
    options = parse_options(command, parsed)
    for name, field in model.model_fields.items():
        if name not in positional and name not in required:
            # search's --method auto resolves by the target (decode: mip), its --ops to what that method searches
            want = {("search", "ops"): DEFAULT_OPS["mip"], ("search", "method"): "mip"}.get((command, name),
                                                                                          field.default)
            assert getattr(options, name) == want, (command, name)


def test_version_names_slimconv_torch_and_transformers():
    p = subprocess.run([sys.executable, "-m", "slimconv", "--version"], capture_output=True, text=True)
    assert p.returncode == 0
    assert p.stdout.startswith(f"slimconv {slimconv.__version__} ")
    assert f"torch {torch.__version__}" in p.stdout and f"transformers {transformers.__version__}" in p.stdout


def test_a_value_the_field_refuses_names_its_flag_and_exits_2(capsys):
    assert main(["heal", "somewhere", "--lr", "1"]) == 2
    err = capsys.readouterr().err
    assert "--lr 1: Input should be less than or equal to 0.01" in err and "slimconv heal --help" in err
    assert main(["export", "somewhere", "--format", "gguf", "--dtype", "int4"]) == 2
    assert "--dtype int4 is an ONNX precision" in capsys.readouterr().err
