"""The `probe` command: thin click wrappers over library functions. Each command that computes something
runs inside one MLflow run (experiments.tracking). User errors print one line and exit with status 2;
set STEPSLAB_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import json
import os
import sys

import click


class _Group(click.Group):
    """Turns user errors (bad names, values, missing data or runs) into one line instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # noqa: BLE001 - filtered just below
            if os.environ.get("STEPSLAB_DEBUG") or not _is_user_error(exc):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


def _is_user_error(exc: Exception) -> bool:
    from experiments.tracking import TrackingError
    return isinstance(exc, (ValueError, TrackingError, FileNotFoundError))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """StepsLab: probe the slow and fast paths of Step by Step Networks."""


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--micro", is_flag=True, help="The CPU research configs (28 px, 10 classes) instead of the paper's.")
def models_cmd(as_json: bool, micro: bool) -> None:
    """Table of models: steps, widths, blocks, layers, params, GMACs, and the paper's values beside ours."""
    import models  # noqa: F401  (registers models)
    from models.counting import count_model, paper_models
    from models.registry import BASELINE_OF

    if micro:
        names = [n for s, b in BASELINE_OF.items() if "micro" in s for n in (b, s)]
        rows = [count_model(n, input_size=(1, 28, 28), num_classes=10) for n in names]
    else:
        rows = [count_model(n) for n in paper_models()]
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rows], indent=1))
        return

    def fmt(v):
        return "-" if v is None else str(v)

    header = ["model", "steps", "widths (last stage)", "blocks/step (last stage)", "blocks", "layers",
              "params M", "GMACs", "paper blocks", "paper layers", "paper params M", "paper GMACs"]
    table = [[r.name, fmt(r.steps), fmt(r.widths[-1] if r.widths else None),
              fmt(r.depths[-1] if r.steps else r.depths), str(r.blocks), str(r.layers), str(r.params_m),
              str(r.gmacs), fmt(r.paper_blocks), fmt(r.paper_layers), fmt(r.paper_params_m), fmt(r.paper_gmacs)]
             for r in rows]
    click.echo(_format_table(header, table))


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
