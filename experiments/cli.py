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


@main.command("ui")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="Tracking store (default: $MLFLOW_TRACKING_URI, else <$STEPSLAB_HOME or .>/mlruns/mlflow.db). "
                   "An http(s) server is only pointed at, not started.")
@click.option("--port", type=int, default=0, show_default=True, help="Port on 127.0.0.1; 0 picks a free one.")
@click.option("--no-browser-hint", is_flag=True, help="Print only the URLs (stdout), no hints (stderr).")
def ui_cmd(tracking_uri: str | None, port: int, no_browser_hint: bool) -> None:
    """Start the MLflow UI on the tracking store and print the experiment's URLs; Ctrl-C stops it.

    Prints the runs view of the experiment and, when runs exist, the compare-runs view of the newest ones.
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
        if ui.compare_url:
            click.echo(ui.compare_url)
        if not ui.started:
            hint(f"{ui.uri} is a tracking server with its own UI: nothing started here.")
            return
        port_used = ui.base_url.rsplit(":", 1)[1]
        hint("above: the experiment's runs table" + (f", and the compare view of its newest {len(ui.run_ids)} "
                                                     f"run(s) (at most {COMPARE_MAX_RUNS})" if ui.compare_url else ""))
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
@click.option("--model", default=None, help="Model name; its newest frozen model is used unless --run is given.")
@click.option("--run", "run_ref", default=None, metavar="REF", help="Frozen model: run id, models:/ URI or name.")
@click.option("--path", default="both", show_default=True, help="slow, fast or both (maps and causal tests).")
@click.option("--method", default="ig", show_default=True,
              help="Input attribution for the path maps: ig, saliency, gradshap, deeplift, occlusion.")
@click.option("--dataset", default=None, help="Default: the frozen model's training dataset.")
@click.option("--limit", type=int, default=256, show_default=True, help="Test images attributed and ablated.")
@click.option("--probe-limit", type=int, default=2000, show_default=True, help="Train images for the path probes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", "n_steps", type=int, default=32, show_default=True, help="Integrated-gradients steps.")
@click.option("--ablation", "modes", multiple=True, default=("zero", "mean", "resample"), show_default=True,
              help="Ablation modes (repeat); the first gives selectivity.<path>.")
@click.option("--pool", default="mean", show_default=True, help="Pooling of the probed path features.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per attribution batch.")
@click.option("--internal-batch-size", type=int, default=256, show_default=True,
              help="captum's internal_batch_size (interpolation points per forward pass).")
@click.option("--draws", type=int, default=3, show_default=True, help="Random channel sets per control size.")
@click.option("--max-delta", type=float, default=0.05, show_default=True,
              help="Fail when |convergence delta| exceeds this fraction of the mean |F(x) - F(baseline)|.")
@click.option("--device", default="auto", show_default=True)
@click.option("--tracking-uri", default=None, metavar="URI")
def attribute_cmd(model, run_ref, path, method, dataset, limit, probe_limit, seed, n_steps, modes, pool, batch_size,
                  internal_batch_size, draws, max_delta, device, tracking_uri) -> None:
    """Path shares (layer IG), path input maps, ablation/patching with damage-matched controls; one MLflow run."""
    from probes.attribution import attribute, format_summary

    res = attribute(model=model, run=run_ref, path=path, method=method, dataset=dataset, limit=limit,
                    probe_limit=probe_limit, seed=seed, n_steps=n_steps, modes=modes, pool=pool,
                    batch_size=batch_size, internal_batch_size=internal_batch_size, draws=draws,
                    max_delta=max_delta, device=device, tracking_uri=tracking_uri,
                    echo=lambda msg: click.echo(msg, err=True))
    click.echo(format_summary(res.metrics))
    click.echo(f"run {res.run_id}")


@main.command("run")
@click.option("--model", default=None, help="Model name; its newest frozen model is used unless --run is given.")
@click.option("--run", "run_ref", default=None, metavar="REF", help="Frozen model: run id, models:/ URI or name.")
@click.option("--path", default="all", show_default=True,
              help="Steps: slow, fast, full, all. Baselines: full, matched (slow/fast-width channel splits), all.")
@click.option("--level", default="both", show_default=True,
              help="coarse, fine, both, detail (fine within coarse), all.")
@click.option("--dataset", default=None, help="Default: the frozen model's training dataset.")
@click.option("--pool", default="mean", show_default=True, help="cls (DeiT), mean, tokens.")
@click.option("--layers", default="none", show_default=True, help="none, all, or block indices (0,3,7): depth curves.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="Train images (class-stratified subset); default all.")
@click.option("--test-limit", type=int, default=None, help="Test images (class-stratified subset); default all.")
@click.option("--probe", "probe_kind", default="auto", show_default=True, help="sklearn, torch, auto (by size).")
@click.option("--random-splits", type=int, default=3, show_default=True, help="Baselines: random matched splits.")
@click.option("--no-mdl", is_flag=True, help="Skip the online MDL (the slowest measure).")
@click.option("--no-curves", is_flag=True, help="Skip the small-probe curves.")
@click.option("--tracking-uri", default=None, metavar="URI")
def run_cmd(model, run_ref, path, level, dataset, pool, layers, seed, limit, test_limit, probe_kind, random_splits,
            no_mdl, no_curves, tracking_uri) -> None:
    """Linear probes of the slow / fast paths (coarse vs fine labels), MDL, division of labour; one MLflow run."""
    from probes.run import ProbeConfig, run_probe

    run_probe(ProbeConfig(model=model, run=run_ref, path=path, level=level, dataset=dataset, pool=pool, layers=layers,
                          seed=seed, limit=limit, test_limit=test_limit, probe=probe_kind,
                          random_splits=random_splits, mdl=not no_mdl, curves=not no_curves,
                          tracking_uri=tracking_uri), echo=click.echo)


def _key_values(items: tuple[str, ...], what: str) -> dict:
    """("n=8000", "img_size=32") -> {"n": 8000, "img_size": 32}: ints and floats parsed, the rest kept as text."""
    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        for parse in (int, float):
            try:
                out[key] = parse(text)
                break
            except ValueError:
                continue
        else:
            out[key] = text
    return out


def _train_summary(results: list) -> str:
    """Table of finished train runs, then where each one's run, frozen model and checkpoint are."""
    header = ["model", "dataset", "epochs", "steps", "fine acc", "coarse acc", "test loss", "train img/s",
              "train s"]
    rows, where = [], []
    for r in results:
        m = r.metrics
        rows.append([r.config.model, r.config.dataset, f"{m['epochs']:g}", str(m["steps"]), f"{m['fine_acc']:.4f}",
                     f"{m['coarse_acc']:.4f}", f"{m['test_loss']:.4f}", f"{m['images_per_s']:.0f}",
                     f"{m['train_time_s']:.1f}"])
        frozen = r.model_uri or ("not registered (--no-register)" if r.complete else
                                 "not registered: stopped early, continue with --resume")
        where.append(f"{r.config.model}: run {r.run_id}, frozen model {frozen}, checkpoint {r.checkpoint}")
    return "\n".join([_format_table(header, rows), "", *where])


@main.command("train")
@click.option("--model", default="steps_deit_micro", show_default=True, help="Model name (see `probe models`).")
@click.option("--dataset", default="fashion_mnist", show_default=True,
              help="fashion_mnist, cifar10, cifar100, imagefolder, hierarchy.")
@click.option("--data-dir", default=None, help="Dataset folder (default: the dataset's own default).")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE",
              help="Dataset option (repeat), e.g. n=8000 or img_size=32 for hierarchy.")
@click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE",
              help="Extra create_model kwarg (repeat), e.g. patch_size=4.")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Per process (torchrun: per GPU).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--weight-decay", type=float, default=0.05, show_default=True)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True)
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--clip-grad", type=float, default=1.0, show_default=True, help="Max gradient norm; 0: off.")
@click.option("--drop-path", type=float, default=0.0, show_default=True, help="Stochastic depth rate.")
@click.option("--limit", type=int, default=None, help="Train images (class-stratified subset); default all.")
@click.option("--test-limit", type=int, default=None, help="Test images (class-stratified subset); default all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes init, data order, augmentation, subsets.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--no-augment", is_flag=True, help="No random translation / flip.")
@click.option("--checkpoint-dir", default="checkpoints", show_default=True,
              help="Checkpoints go to <dir>/<model>-<dataset>-seed<seed>/last.pt.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint, in the same MLflow run.")
@click.option("--no-register", is_flag=True, help="Do not register the frozen model.")
@click.option("--max-steps", type=int, default=None, help="Stop (checkpointed) after this many optimizer steps.")
@click.option("--log-every", type=int, default=20, show_default=True, help="Steps per logged train loss.")
@click.option("--tracking-uri", default=None, metavar="URI")
def train_cmd(model, dataset, data_dir, data_options, model_options, epochs, batch_size, lr, weight_decay,
              warmup_epochs, label_smoothing, clip_grad, drop_path, limit, test_limit, seed, device, compile_,
              no_augment, checkpoint_dir, resume, no_register, max_steps, log_every, tracking_uri) -> None:
    """Train a model on fine labels (one MLflow run, checkpoint per epoch) and freeze it in the registry."""
    from experiments.train import TrainConfig, train

    cfg = TrainConfig(model=model, dataset=dataset, data_dir=data_dir, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                      clip_grad=clip_grad, drop_path=drop_path, limit=limit, test_limit=test_limit, seed=seed,
                      device=device, compile=compile_, augment=not no_augment, checkpoint_dir=checkpoint_dir,
                      resume=resume, register=not no_register, max_steps=max_steps, log_every=log_every,
                      data_options=_key_values(data_options, "--data-option"),
                      model_kwargs=_key_values(model_options, "--model-option"))
    res = train(cfg, tracking_uri)
    click.echo(_train_summary([res]))
    click.echo(f"tracking {res.tracking_uri} (look: probe ui)")


@main.command("demo")
@click.option("--limit", type=int, default=4000, show_default=True, help="Fashion-MNIST train images.")
@click.option("--test-limit", type=int, default=1000, show_default=True, help="Fashion-MNIST test images.")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--checkpoint-dir", default="checkpoints", show_default=True)
@click.option("--tracking-uri", default=None, metavar="URI")
def demo_cmd(limit, test_limit, epochs, seed, device, checkpoint_dir, tracking_uri) -> None:
    """The main job, offline on CPU in minutes: train Steps-DeiT-micro and DeiT-micro on Fashion-MNIST, freeze both."""
    from experiments.train import run_demo

    results = run_demo(tracking_uri, limit=limit, test_limit=test_limit, epochs=epochs, seed=seed,
                       checkpoint_dir=checkpoint_dir, device=device)
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
