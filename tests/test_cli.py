"""The `sail-jax` command line as a whole: one flag spelling (dashes; the t5x gin spellings stay), defaults in every
`--help`, a wrong flag answered with the sub-command's own usage, `--version` from the package metadata."""

from __future__ import annotations

import argparse
import importlib.metadata

import pytest

from sail_jax import cli

T5X_SPELLINGS = {"--gin_file", "--gin_bindings", "--gin_search_path"}


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the tree by its command line ('sail-jax', 'sail-jax convert hf-to-orbax', ...)."""
    found, todo = {}, [cli.build_parser()]
    while todo:
        parser = todo.pop()
        found[parser.prog] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return found


def test_every_command_is_reached():
    names = set(command_parsers())
    assert {"sail-jax", "sail-jax train", "sail-jax demo", "sail-jax generate", "sail-jax convert hf-to-orbax",
            "sail-jax convert export-llm"} <= names


@pytest.mark.parametrize("prog", sorted(command_parsers()))
def test_flags_use_dashes_and_help_shows_defaults(prog):
    parser = command_parsers()[prog]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        for flag in action.option_strings:
            assert "_" not in flag or flag in T5X_SPELLINGS, f"{prog}: {flag} (use dashes)"
        if cli.shows_default(action):
            assert f"(default: {action.default})" in text, f"{prog} --help: no default for {action.option_strings}"


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"sail-jax {importlib.metadata.version('sail-jax')}"


@pytest.mark.parametrize("argv, prog", [
    (["info", "--bogus"], "sail-jax info"),
    (["plot", "--workdir", "w", "--gin.train.steps=3"], "sail-jax plot"),  # gin flags only where gin configures
    (["convert", "export-llm", "--src", "a", "--dst", "b", "--scan-layers"], "sail-jax convert export-llm"),
    (["train", "--gin.train.steps=3", "--max_tiles=2"], "sail-jax train"),
])
def test_a_wrong_flag_prints_the_sub_commands_usage(argv, prog, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(f"usage: {prog} ") and f"{prog}: error: unrecognized arguments: " in err, err
