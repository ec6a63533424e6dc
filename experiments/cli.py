"""The `probe` command: thin click wrappers over library functions. Each command that computes something
runs inside one MLflow run (experiments.tracking). User errors print one line and exit with status 2;
set STEPSLAB_DEBUG=1 for the traceback. SIGINT / SIGTERM exit 130 / 143, the open run ends KILLED.
"""
from __future__ import annotations

import json
import sys

import click

from experiments.options import (AttributeConfig, DemoConfig, FreezeConfig, ProbeConfig, RunsConfig, TrainConfig,
                                 click_options, from_cli)


class _Group(click.Group):
    """Applies the one error policy (experiments.errors): a user's mistake is one line and exit 2, a bug shows
    its traceback. click's own usage errors (bad option, value not among the choices) are exit 2 too."""

    def main(self, *args, **kwargs):
        from experiments.errors import catch_signals, interrupted

        # click would print usage and a hint around a usage error: one line instead, as for every mistake.
        kwargs["standalone_mode"] = False
        restore = catch_signals()
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(interrupted())
        except click.exceptions.Abort as exc:
            if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C / SIGTERM into Abort
                sys.exit(interrupted())
            click.echo("Aborted!", err=True)
            sys.exit(1)
        finally:
            restore()

    def invoke(self, ctx):
        from experiments.errors import report

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the policy decides: one line or a traceback
            sys.exit(report(exc))


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


@main.command("ui")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="Tracking store (default: $MLFLOW_TRACKING_URI, else <$STEPSLAB_HOME or .>/mlruns/mlflow.db). "
                   "An http(s) server is only pointed at, not started.")
@click.option("--port", type=int, default=0, show_default=True, help="Port on 127.0.0.1; 0 picks a free one.")
@click.option("--no-browser-hint", is_flag=True, help="Print only the URLs (stdout), no hints (stderr).")
def ui_cmd(tracking_uri: str | None, port: int, no_browser_hint: bool) -> None:
    """Start the MLflow UI on the tracking store and print the experiment's URLs; Ctrl-C stops it.

    Prints the runs view of the experiment, its probe runs sorted by dol.acc, and the compare-runs view of the
    newest Steps probe run beside its baseline's (without such a pair: of the newest runs).
    """
    import signal
    import threading

    from experiments.ui import COMPARE_MAX_RUNS, UIServer

    def hint(text: str) -> None:
        if not no_browser_hint:
            click.echo(text, err=True)

    ui = UIServer(tracking_uri, port)
    in_main = threading.current_thread() is threading.main_thread()

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        hint(f"MLflow UI for {ui.uri} ...")
        ui.start()
        click.echo(ui.url)
        if ui.probes_url:
            click.echo(ui.probes_url)
        if ui.compare_url:
            click.echo(ui.compare_url)
        if not ui.started:
            hint(f"{ui.uri} is a tracking server with its own UI: nothing started here.")
            return
        port_used = ui.base_url.rsplit(":", 1)[1]
        hint("above: the experiment's runs table"
             + (", its probe runs with the DoL columns" if ui.probes_url else "")
             + (", and the newest Steps probe run beside its baseline's (each probe run's compare_dol.png draws "
                "the two with their intervals)" if len(ui.pair_ids) == 2 else
                f", and the compare view of its newest {len(ui.run_ids)} run(s) (at most {COMPARE_MAX_RUNS})"
                if ui.compare_url else ""))
        hint(f"from another machine: ssh -L {port_used}:127.0.0.1:{port_used} <this host>, then the URL. "
             "Ctrl-C stops the server.")
        ui.wait()  # returns only by raising: the server died
    except KeyboardInterrupt:
        hint("stopping the MLflow UI ...")
    finally:
        ui.stop()
        if in_main:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)


def _add_study_group() -> None:
    # Built from experiments.studies without importing torch: each study's options come from its Config,
    # loaded only when that study is named.
    from experiments.studies import study_group
    main.add_command(study_group(), "study")


_add_study_group()


@main.command("attribute")
@click_options(AttributeConfig)
def attribute_cmd(**values) -> None:
    """Path shares (layer IG), path input maps, ablation/patching with damage-matched controls; one MLflow run."""
    from experiments.attribute import attribute, format_summary

    res = attribute(from_cli(AttributeConfig, values), echo=lambda msg: click.echo(msg, err=True))
    click.echo(format_summary(res.metrics))
    click.echo(f"run {res.run_id}")


@main.command("run")
@click_options(ProbeConfig)
def run_cmd(**values) -> None:
    """Linear probes of the slow / fast paths (coarse vs fine labels), MDL, division of labour; one MLflow run."""
    from experiments.probe_run import run_probe

    run_probe(from_cli(ProbeConfig, values), echo=click.echo)


def _train_summary(results: list) -> str:
    """Table of finished train runs, then where each one's run, frozen model and checkpoint are."""
    header = ["model", "dataset", "epochs", "steps", "fine acc", "coarse acc", "test loss", "train img/s",
              "data wait", "train s"]
    rows, where = [], []
    for r in results:
        m = r.metrics
        rows.append([r.config.model, r.config.dataset, f"{m['epochs']:g}", str(m["steps"]), f"{m['fine_acc']:.4f}",
                     f"{m['coarse_acc']:.4f}", f"{m['test_loss']:.4f}", f"{m['images_per_s']:.0f}",
                     f"{m.get('data_wait_share', float('nan')):.0%}",
                     f"{m['train_time_s']:.1f}"])
        frozen = r.model_uri or ("not registered (--no-register)" if r.complete else
                                 "not registered: stopped early, continue with --resume")
        where.append(f"{r.config.model}: run {r.run_id}, frozen model {frozen}, checkpoint {r.checkpoint}")
    return "\n".join([_format_table(header, rows), "", *where])


_TRACKING_URI = click.option("--tracking-uri", default=None, metavar="URI",
                             help="Tracking store (default: $MLFLOW_TRACKING_URI, else mlruns/).")


@main.command("train")
@click_options(TrainConfig)
@_TRACKING_URI
def train_cmd(tracking_uri: str | None, **values) -> None:
    """Train a model on fine labels (one MLflow run, checkpoint per epoch) and freeze it in the registry.

    Several GPUs: torchrun --nproc_per_node=K -m experiments.train --model ... (the same options)."""
    from experiments.train import train

    res = train(from_cli(TrainConfig, values), tracking_uri)
    if res.run_id is None:  # torchrun ranks other than 0 track nothing and print nothing
        return
    click.echo(_train_summary([res]))
    click.echo(f"tracking {res.tracking_uri} (look: probe ui)")


@main.command("freeze")
@click_options(FreezeConfig)
def freeze_cmd(**values) -> None:
    """Freeze a train run from its checkpoint (safetensors + card) as a new registered version, or published
    weights as a baseline (--model M --pretrained [--weights FILE]).

    Re-freezes models frozen the old pickle way, and freezes runs stopped early (--max-steps, killed)."""
    from experiments.train import freeze

    freeze(from_cli(FreezeConfig, values), echo=click.echo)


@main.command("runs")
@click_options(RunsConfig)
def runs_cmd(**values) -> None:
    """List runs, newest first: kind, model, dataset, status (stale ones marked), age, key metrics.

    Opening the store first ends the RUNNING runs of this host whose process died as FAILED."""
    from mlflow import MlflowClient

    from experiments import tracking
    from experiments.runs import format_runs, list_runs

    cfg = from_cli(RunsConfig, values)
    if cfg.limit < 1:
        raise click.BadParameter(f"must be >= 1, got {cfg.limit}", param_hint="'--limit'")
    tracking.configure(cfg.tracking_uri)
    rows = list_runs(MlflowClient(), kind=cfg.kind, model=cfg.model, dataset=cfg.dataset, status=cfg.status,
                     stale=cfg.stale, limit=cfg.limit)
    click.echo(format_runs(rows) if rows else "no runs match")


@main.command("demo")
@click_options(DemoConfig)
def demo_cmd(**values) -> None:
    """The main job, offline on CPU in minutes: train Steps-DeiT-micro and DeiT-micro on Fashion-MNIST, freeze both."""
    from experiments.train import run_demo

    demo = from_cli(DemoConfig, values)
    results = run_demo(demo)
    tracking_uri = demo.tracking_uri
    uri = results[0].tracking_uri
    click.echo(_train_summary(results))
    click.echo("")
    click.echo(f"MLflow tracking URI: {uri}")
    ui = "probe ui" if tracking_uri is None else f"probe ui --tracking-uri {uri}"
    click.echo(f"  look:  {ui}   (or: mlflow ui --backend-store-uri {uri})")
    click.echo("  next:  probe run --model steps_deit_micro --path slow")


@main.command("figures")
@click.option("--runs", default=None, metavar="RUN_ID,...", help="Pin these runs (default: the newest that fits).")
@click.option("--out", default="experiments/figures", show_default=True, help="Folder for the PNG and PDF files.")
@click.option("--only", default=None, metavar="NAME,...", help="Only these figures (see experiments/figures.py).")
@click.option("--tracking-uri", default=None, metavar="URI")
def figures_cmd(runs, out, only, tracking_uri) -> None:
    """Regenerate every figure (PNG + PDF) from MLflow runs, byte-reproducibly; one MLflow run of kind figures."""
    from experiments.figures import make_figures

    make_figures(out=out, only=only, runs=runs, tracking_uri=tracking_uri, echo=click.echo)


if __name__ == "__main__":
    main()
