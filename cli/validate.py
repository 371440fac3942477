"""``qbert validate``: check configs against the schema (and optionally the model and data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import user_errors


def validate(
    arguments: Annotated[
        list[str], typer.Argument(help="Config files (YAML), then key.path=value overrides applied to each, as in "
                                  "`qbert run`.", show_default=False, metavar="CONFIG... [KEY=VALUE...]")
    ],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="key.path=value override, repeatable (same as a KEY=VALUE "
                                       "argument).", show_default=False)
    ] = None,
    preflight: Annotated[
        bool, typer.Option("--preflight", help="Also resolve the model and load the task data, as `run` does.")
    ] = False,
) -> None:
    """Validate each CONFIG with the overrides; print one line per file. Exit status 2 if any is invalid.

    Needs no torch: the schema and every recipe's parameters load in well under a second.
    """
    configs = [Path(a) for a in arguments if not _is_override(a)]
    overrides = [*(a for a in arguments if _is_override(a)), *(overrides or [])]
    with user_errors():
        from qbert.config import load_config
        from qbert.errors import QbertError

        failed = 0
        for path in configs:
            try:
                described = _other_file(path)
                if described:
                    typer.echo(f"ok {path}: {described}")
                    continue
                cfg = load_config(path, overrides or [])
                if preflight:
                    from qbert.pipeline.run import preflight as check

                    check(cfg)
            except QbertError as exc:
                failed += 1
                typer.echo(f"error: {exc.render() if exc.source else f'{path}: {exc.render()}'}", err=True)
                continue
            # finetune.precision: auto is decided where the run starts, for its machine, and so is the hash
            identity = ("hash decided at run start (finetune.precision: auto)" if cfg.finetune.precision == "auto"
                        else f"hash {cfg.config_hash()}")
            typer.echo(f"ok {path}: {cfg.name} ({cfg.model}, {cfg.task}, {cfg.recipe.name}) {identity}")
        if failed:
            raise typer.Exit(2)


def _is_override(argument: str) -> bool:
    """``key.path=value`` (an argument that is not an existing file and has a ``=`` after a key)."""
    key, sep, _ = argument.partition("=")
    if not sep or "/" in key or key.endswith((".yaml", ".yml")):
        return False
    try:
        return not Path(argument).exists()
    except OSError:  # e.g. a name longer than the file system allows: not a file
        return True


def _other_file(path: Path) -> str | None:
    """Sweep files and table specs are validated by their own schema (a sweep also expands every cell);
    returns what the file is, or None for an experiment config."""
    from qbert.config import file_kind, read_yaml

    data = read_yaml(path)
    if file_kind(data) == "table":
        from qbert.tables import load_table_spec

        spec = load_table_spec(path)
        return f"table spec: {spec.title}"
    from qbert.sweep import expand, load_sweep

    if file_kind(data) == "config":
        return None
    spec, base = load_sweep(path)
    cells = expand(spec, base)
    return f"sweep {spec.name}, {len(cells)} cells"
