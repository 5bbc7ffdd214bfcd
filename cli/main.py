"""`tlfeat` commands. Each parses options, builds a config, calls one library function and prints
a short summary. Heavy imports (torch) happen inside the commands so `tlfeat --help` is instant."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from tlfeat.errors import TlfeatError


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _one_line(exc: Exception) -> str:
    """The user's line, also when a DataLoader worker re-raised it with its traceback inside."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split("Error: ", 1)[-1] if "Error: " in last else last
    return text.strip()


INTERNAL_ERROR = 70  # EX_SOFTWARE: not the user's fault; tests treat it as a failure


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TlfeatError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            from tlfeat.cache import as_write_failed

            clear = as_write_failed(Path(exc.filename or "output"), exc)
            if clear is not None:  # disk full, read-only, no permission: one line that says so
                click.echo(f"error: {_one_line(clear)}", err=True)
                sys.exit(clear.exit_code)
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {exc.strerror or exc}{where} (run with -v for details)", err=True)
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            sys.exit(2)
        except KeyboardInterrupt:
            if fn.__name__ == "finetune":
                hint = "the last completed epoch is saved; run the same command with --resume to continue"
            else:
                hint = "completed work is kept; run the same command again to resume"
            click.echo(f"interrupted: {hint}", err=True)
            sys.exit(130)
        except Exception as exc:  # a bug in tlfeat: still one line, with the way to the traceback
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            click.echo(
                f"internal error: {type(exc).__name__}: {_one_line(exc)} (rerun with -vv for the traceback)", err=True
            )
            sys.exit(INTERNAL_ERROR)

    return wrapper


# Bounds on numbers, so a typo (a negative size, 10**20 epochs) fails at once with click's usage line.
SEED = click.IntRange(0, 2**32 - 1)
IMAGE_SIZE = click.IntRange(16, 2048)
LIMIT = click.IntRange(1, 10**9)
EPOCHS = click.IntRange(1, 10_000)
REPEATS = click.IntRange(1, 1000)


class _PositiveFloat(click.ParamType):
    """A finite number > 0 and <= 1e6 (click's FloatRange lets nan through)."""

    name = "positive number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (math.isfinite(number) and 0 < number <= 1e6):
            self.fail(f"{value!r} is not a finite number in (0, 1e6]", param, ctx)
        return number


POSITIVE = _PositiveFloat()

cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TLFEAT_CACHE_DIR",
    default="features_cache",
    show_default=True,
    help="Where feature files live (env TLFEAT_CACHE_DIR).",
)
data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TLFEAT_DATA_DIR",
    default=None,
    help="Where named datasets are read from and downloaded to (env TLFEAT_DATA_DIR; default ~/.cache/tlfeat/data).",
)
on_error_option = click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="An unreadable image while extracting: stop, naming it (finished blocks are kept), or skip it "
    "and record it in the cache (`tlfeat ls --skipped`; counted in fits and reports).",
)


class _OneLineGroup(click.Group):
    """Usage mistakes (bad option values, unknown options) also come as one `error:` line."""

    def main(self, args: Any = None, prog_name: str | None = None, *a: Any, **kw: Any) -> Any:
        if kw.get("standalone_mode", True) is False:
            return super().main(args, prog_name, *a, **kw)
        kw["standalone_mode"] = False
        try:
            rv = super().main(args, prog_name, *a, **kw)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else (prog_name or "tlfeat")
            click.echo(f"error: {exc.format_message()} (see `{where} --help`)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="Log what happens (-v info, -vv debug).")
@click.version_option(package_name="tlfeat")
def cli(verbose: int) -> None:
    """Transfer learning on images with frozen pretrained CNNs.

    \b
    tlfeat models                                    list backbones
    tlfeat extract --model mobilenet_v2 --data digits  cache features (works offline)
    tlfeat ls                                        list cached feature sets
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Every torchvision classifier, not only the studied ones.")
@click.option("--layers", "layers_of", metavar="MODEL", help="List the layer names MODEL accepts for --layer.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def models(show_all: bool, layers_of: str | None, as_json: bool) -> None:
    """List backbones: feature dim, layer used, weights entry, weights found locally."""
    from tlfeat import backbones, weights

    if layers_of:
        names = backbones.layer_names(backbones.build(layers_of, device="meta"))
        click.echo(json.dumps(names) if as_json else "\n".join(names))
        return
    names = backbones.available_models() if show_all else backbones.STUDIED
    rows = []
    for name in names:
        fam = backbones.family(name)
        wid = backbones.default_weights_id(name)
        path, source = weights.locate(name, wid)
        if path is not None:
            local = source
        elif source.startswith("registry:"):
            local = f"{source} (fetched on first use)"
        else:
            local = "no (download, --weights FILE or --untrained)"
        rows.append(
            {
                "model": name,
                "feature_dim": backbones.feature_dim(name),
                "layer": f"input of {fam.head}",
                "weights_id": wid,
                "weights_local": local,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(_table([list(r.values()) for r in rows], ["model", "dim", "layer", "weights", "weights found locally"]))
    if not show_all:
        click.echo(f"\n{len(backbones.available_models())} models in all: `tlfeat models --all`.")


@cli.command("datasets")
@data_dir_option
@_user_errors
def datasets_cmd(data_dir: Path | None) -> None:
    """List named datasets and where each is read from. Any image folder tree works too."""
    from tlfeat import datasets

    root = data_dir or datasets.default_data_dir()
    rows = [(d.name, d.description, d.where(root)) for d in datasets.named_datasets().values()]
    click.echo(_table(rows, ["name", "what", "read from"]))
    click.echo(
        "\nAny folder works too: root/train/<class>/*, root/val|test/<class>/*, or root/<class>/* "
        "(split 80/20, stratified, fixed seed)."
    )


@cli.command()
@click.option("--model", "-m", required=True, help="torchvision model name, e.g. resnet50 (see `tlfeat models`).")
@click.option("--data", "-d", required=True, help="Dataset name (see `tlfeat datasets`) or an image folder.")
@click.option("--split", "splits", multiple=True, help="Split(s) to extract; default: all the dataset has.")
@click.option(
    "--layer", default=None, help="Named layer to pool instead of the penultimate one (`tlfeat models --layers MODEL`)."
)
@click.option(
    "--weights-id", default=None, help="torchvision weights entry, e.g. IMAGENET1K_V2 (default IMAGENET1K_V1)."
)
@click.option(
    "--weights",
    "weights_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Explicit weights file (torchvision state dict or a tlfeat fine-tune checkpoint).",
)
@click.option("--untrained", is_flag=True, help="Random weights (seeded): a no-transfer baseline, marked as such.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for --untrained weights.")
@click.option(
    "--image-size", type=IMAGE_SIZE, default=None, help="Crop size in pixels (default: the weights' own, e.g. 224)."
)
@click.option("--limit", type=LIMIT, default=None, help="Fixed stratified subset of N images per split.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option(
    "--workers", type=click.IntRange(0, 64), default=None, help="DataLoader worker processes (default: CPUs - 1)."
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, mps.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "onnxruntime"]),
    envvar="TLFEAT_BACKEND",
    default="auto",
    show_default=True,
    help="Inference engine (env TLFEAT_BACKEND). auto: ONNX Runtime on CPU where installed, else torch.",
)
@on_error_option
@cache_dir_option
@data_dir_option
@_user_errors
def extract(
    model: str,
    data: str,
    splits: tuple[str, ...],
    layer: str | None,
    weights_id: str | None,
    weights_file: Path | None,
    untrained: bool,
    seed: int,
    image_size: int | None,
    limit: int | None,
    batch_size: int,
    workers: int | None,
    device: str,
    quiet: bool,
    backend: str,
    on_error: str,
    cache_dir: Path,
    data_dir: Path | None,
) -> None:
    """Run a frozen pretrained CNN over a dataset once and cache its features to HDF5."""
    from tlfeat import ExtractConfig
    from tlfeat import extract as run

    cfg = ExtractConfig(
        model=model,
        data=data,
        splits=splits or None,
        layer=layer,
        weights_id=weights_id,
        weights_file=weights_file,
        untrained=untrained,
        seed=seed,
        image_size=image_size,
        limit=limit,
        batch_size=batch_size,
        workers=workers,
        device=device,
        cache_dir=cache_dir,
        data_dir=data_dir,
        progress=not quiet,
        backend=backend,
        on_error=on_error,
    )
    for fs in run(cfg):
        m = fs.meta
        how = (
            "cached, no work done"
            if fs.reused
            else f"computed in {m['extract_seconds']:.1f}s, {m['images_per_second']:.0f} img/s"
        )
        click.echo(f"{m['split']:>5}: {fs.X.shape[0]} x {fs.X.shape[1]}  {how} [{m.get('backend')}]  -> {fs.path}")
        if m["skipped"]:
            click.echo(f"       skipped {len(m['skipped'])} unreadable image(s), listed by `tlfeat ls --skipped`:")
            for item in m["skipped"][:5]:
                click.echo(f"         {item['error']}")
    if not fs.meta.get("pretrained", True):
        click.echo(f"note: UNTRAINED weights ({fs.meta['weights_id']}): a no-transfer baseline, not ImageNet features")


@cli.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--quick", is_flag=True, help="Skip the features checksum (structure is still checked).")
@click.option("--skipped", "show_skipped", is_flag=True, help="List the images each set skipped (--on-error skip).")
@cache_dir_option
@_user_errors
def ls_cmd(as_json: bool, quick: bool, show_skipped: bool, cache_dir: Path) -> None:
    """List cached feature sets with their provenance; damaged files are marked."""
    from tlfeat import cache

    entries = cache.scan(cache_dir, verify=not quick)
    skipped = {e.path: _skipped(e.path) for e in entries if e.status == "ok" and e.attrs.get("n_skipped")}
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "path": str(e.path),
                        "status": e.status,
                        "problem": e.problem,
                        **e.attrs,
                        "skipped": skipped.get(e.path, []),
                    }
                    for e in entries
                ],
                indent=2,
                default=str,
            )
        )
        return
    if not entries:
        click.echo(f"no cached features in {cache_dir}; run `tlfeat extract --model mobilenet_v2 --data digits`")
        return
    rows = []
    for e in entries:
        a = e.attrs
        wid = str(a.get("weights_id", "?"))
        rows.append(
            (
                a.get("model", "?"),
                Path(str(a.get("dataset", "?"))).name,
                a.get("split", "?"),
                a.get("n_done", "?") if e.status != "ok" else a.get("n_images", "?"),
                a.get("n_skipped") or "-",
                a.get("layer", "?"),
                wid if a.get("pretrained", True) else f"{wid} (UNTRAINED)",
                a.get("image_size", "?"),
                a.get("backend", "?"),
                a.get("limit") or "-",
                e.status.upper() if e.status == "damaged" else e.status,
                f"{_size(e.path) / 1e6:.1f}",
                str(a.get("created", ""))[:19],
                e.path.name,
            )
        )
    click.echo(
        _table(
            rows,
            [
                "model",
                "dataset",
                "split",
                "n",
                "skipped",
                "layer",
                "weights",
                "size",
                "backend",
                "limit",
                "status",
                "MB",
                "created",
                "file",
            ],
        )
    )
    for e in entries:
        if e.status == "damaged":
            click.echo(f"DAMAGED: {e.problem}")
    if show_skipped:
        for path, items in skipped.items():
            click.echo(f"{path.name}: {len(items)} skipped")
            for item in items:
                click.echo(f"  {item['id']}: {item['error']}")


def _skipped(path: Path) -> list[dict[str, str]]:
    from tlfeat import cache

    try:
        return cache.read(path, verify=False).meta["skipped"]
    except TlfeatError:
        return []


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return path.stat().st_size


results_dir_option = click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="TLFEAT_RESULTS_DIR",
    default="results",
    show_default=True,
    help="Where fit and fine-tune results are saved (env TLFEAT_RESULTS_DIR).",
)


def _print_table(records: list[dict[str, Any]], metric: str, err: bool) -> str:
    from tlfeat.fitting import table

    rows, cols, cells = table(records, metric)
    body = [[r] + [_fmt(cells.get((r, c))) for c in cols] for r in rows]
    text = _table(body, [f"{metric} (model \\ dataset)"] + cols)
    click.echo(text, err=err)
    return text


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


@cli.command()
@click.option("--clf", default="logreg", show_default=True, help="logreg, svm or linear.")
@click.option("--model", "-m", default=None, help="Only this model (default: every cached one).")
@click.option("--data", "-d", default=None, help="Only this dataset (default: every cached one).")
@click.option("--layer", default=None, help="Only features of this layer (default: every cached one).")
@click.option(
    "--C", "C", type=POSITIVE, default=None, help="Inverse regularisation strength (default: chosen by 3-fold CV)."
)
@click.option("--kernel", default="linear", show_default=True, help="SVM kernel: linear or rbf (rbf for small data).")
@click.option("--epochs", type=EPOCHS, default=50, show_default=True, help="Epochs of the linear head.")
@click.option("--lr", type=POSITIVE, default=1e-2, show_default=True, help="Learning rate of the linear head.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--metric", default="accuracy", show_default=True, help="Metric shown in the table.")
@click.option("--refit", is_flag=True, help="Fit again even when this exact fit is saved (the old result is kept).")
@click.option("--json", "as_json", is_flag=True, help="Records as JSON on stdout; the table goes to stderr.")
@cache_dir_option
@results_dir_option
@_user_errors
def fit(
    clf: str,
    model: str | None,
    data: str | None,
    layer: str | None,
    C: float | None,
    kernel: str,
    epochs: int,
    lr: float,
    seed: int,
    metric: str,
    refit: bool,
    as_json: bool,
    cache_dir: Path,
    results_dir: Path,
) -> None:
    """Train a classifier on cached features and report test metrics."""
    from tlfeat.fitting import FitConfig
    from tlfeat.fitting import fit as run

    cfg = FitConfig(
        clf=clf,
        model=model,
        data=data,
        layer=layer,
        C=C,
        kernel=kernel,
        epochs=epochs,
        lr=lr,
        seed=seed,
        refit=refit,
        cache_dir=cache_dir,
        results_dir=results_dir,
    )
    results = run(cfg)
    for res in results:
        r = res.record
        m, t = r["metrics"], r["timings"]
        auc = "-" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        how = (
            "reused"
            if res.reused
            else f"fit {t['fit_seconds']:.2f}s (+CV {t['cv_seconds']:.1f}s), predict {t['predict_seconds']:.2f}s"
        )
        untrained = "" if r["pretrained"] else " [UNTRAINED backbone]"
        click.echo(
            f"{r['clf']} {r['model']}/{Path(r['dataset']).name} ({r['layer']}){untrained}: accuracy "
            f"{m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, ROC AUC {auc}, C={r['params']['C']:g}; "
            f"{how}  -> {res.path.parent}",
            err=as_json,
        )
    if len(results) > 1 or as_json:
        text = _print_table([r.record for r in results], metric, err=as_json)
        out = Path(results_dir) / "tables" / f"fit-{clf}-{metric}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        click.echo(json.dumps([r.record for r in results], indent=2, default=str))


@cli.command()
@click.option("--model", "-m", default=None, help="Only this model.")
@click.option("--data", "-d", default=None, help="Only this dataset (name or folder name).")
@click.option("--clf", "--method", "method", default=None, help="Only this classifier / method.")
@click.option("--json", "as_json", is_flag=True, help="Print the full records as JSON.")
@results_dir_option
@_user_errors
def results(model: str | None, data: str | None, method: str | None, as_json: bool, results_dir: Path) -> None:
    """List saved results (fits and fine-tunes), filtered."""
    from tlfeat.fitting import load_records

    records = [
        r
        for r in load_records(results_dir)
        if (not model or r["model"] == model)
        and (not method or r["method"] == method)
        and (not data or data in (r["dataset"], Path(r["dataset"]).name))
    ]
    if as_json:
        click.echo(json.dumps(records, indent=2, default=str))
        return
    if not records:
        click.echo(f"no results in {results_dir} match; run `tlfeat fit` first")
        return
    rows = [
        (
            r["method"],
            r["model"],
            Path(r["dataset"]).name,
            r["layer"],
            r["n_train"],
            r["n_test"],
            _fmt(r["metrics"]["accuracy"]),
            _fmt(r["metrics"]["roc_auc"]),
            f"{r['timings']['train_seconds']:.2f}",
            str(r["created"])[:19],
            Path(r["_path"]).parent.name,
        )
        for r in records
    ]
    click.echo(
        _table(
            rows,
            [
                "method",
                "model",
                "dataset",
                "layer",
                "n_train",
                "n_test",
                "accuracy",
                "roc_auc",
                "train_s",
                "created",
                "run",
            ],
        )
    )


@cli.command()
@click.option("--model", "-m", required=True, help="torchvision model name.")
@click.option("--data", "-d", required=True, help="Dataset name or image folder.")
@click.option(
    "--strategy",
    "-s",
    default="full",
    show_default=True,
    help="full, head, freeze:K, discriminative[:RATIO] or scratch (random weights, no transfer).",
)
@click.option("--epochs", type=EPOCHS, default=25, show_default=True)
@click.option("--lr", type=POSITIVE, default=None, help="Learning rate of the head (default 1e-3).")
@click.option("--optimizer", default="adam", show_default=True, help="adam or sgd (momentum 0.9).")
@click.option(
    "--step-size", type=EPOCHS, default=7, show_default=True, help="Divide the learning rate by 10 every N epochs."
)
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--image-size", type=IMAGE_SIZE, default=None, help="Crop size in pixels (default: the weights' own).")
@click.option("--limit", type=LIMIT, default=None, help="Fixed stratified subset of N images per split.")
@click.option(
    "--repeats", type=REPEATS, default=1, show_default=True, help="Runs with seeds seed..seed+N-1; mean and spread."
)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--weights-id", default=None, help="torchvision weights entry (default IMAGENET1K_V1).")
@click.option(
    "--weights",
    "weights_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Start from this file, e.g. best.pt of an earlier fine-tune (multi-stage transfer).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same configuration.")
@click.option(
    "--keep-last",
    is_flag=True,
    help="Keep last.pt (final epoch with optimizer state) after the run completes; by default only best.pt stays.",
)
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="DataLoader worker processes.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Final record(s) as JSON on stdout.")
@data_dir_option
@results_dir_option
@_user_errors
def finetune(
    model: str,
    data: str,
    strategy: str,
    epochs: int,
    lr: float | None,
    optimizer: str,
    step_size: int,
    batch_size: int,
    image_size: int | None,
    limit: int | None,
    repeats: int,
    seed: int,
    weights_id: str | None,
    weights_file: Path | None,
    resume: bool,
    keep_last: bool,
    workers: int | None,
    device: str,
    quiet: bool,
    as_json: bool,
    data_dir: Path | None,
    results_dir: Path,
) -> None:
    """Train the backbone end to end with a new head, for comparison with frozen features."""
    from tlfeat.finetune import FinetuneConfig, summarize
    from tlfeat.finetune import finetune as run

    cfg = FinetuneConfig(
        model=model,
        data=data,
        strategy=strategy,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        step_size=step_size,
        batch_size=batch_size,
        image_size=image_size,
        limit=limit,
        seed=seed,
        weights_id=weights_id,
        weights_file=weights_file,
        resume=resume,
        keep_last=keep_last,
        workers=workers,
        device=device,
        data_dir=data_dir,
        results_dir=results_dir,
        progress=not quiet,
    )
    results = run(cfg, repeats=repeats)
    for res in results:
        r = res.record
        m = r["metrics"]
        auc = "-" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        how = "reused" if res.reused else f"trained {r['timings']['train_seconds']:.1f}s"
        click.echo(
            f"{r['method']} {r['model']}/{Path(r['dataset']).name} seed {r['seed']}: test accuracy "
            f"{m['accuracy']:.4f}, ROC AUC {auc} (best epoch {r['best_epoch']}/{r['params']['epochs']}, "
            f"{r['trainable_params']:,}/{r['total_params']:,} params trained); {how}  -> {res.path.parent}",
            err=as_json,
        )
    summary = summarize(results)
    if len(results) > 1:
        click.echo(
            f"{len(results)} runs: accuracy {summary['accuracy_mean']:.4f} +- {summary['accuracy_std']:.4f}, "
            f"train time {summary['train_seconds_mean']:.1f} +- {summary['train_seconds_std']:.1f} s",
            err=as_json,
        )
    if as_json:
        records = [r.record for r in results]
        click.echo(
            json.dumps(
                records[0] if len(records) == 1 else {"runs": records, "summary": summary}, indent=2, default=str
            )
        )


def _csv_list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@cli.command()
@click.option("--models", required=True, help="Comma-separated model names, e.g. mobilenet_v2,resnet50.")
@click.option("--data", "datas", required=True, help="Comma-separated dataset names or folders.")
@click.option(
    "--methods",
    default="logreg,finetune:full",
    show_default=True,
    help="Comma-separated: logreg, svm, svm-rbf, linear, finetune:STRATEGY, scratch.",
)
@click.option("--repeats", type=REPEATS, default=1, show_default=True, help="Seeds per configuration; mean and spread.")
@click.option("--layers", default=None, help="Comma-separated feature layers to sweep with the first frozen method.")
@click.option("--epochs", type=EPOCHS, default=25, show_default=True, help="Fine-tuning epochs.")
@click.option("--image-size", type=IMAGE_SIZE, default=None, help="Crop size in pixels for every method.")
@click.option("--limit", type=LIMIT, default=None, help="Fixed stratified subset of N images per split.")
@click.option("--workers", type=click.IntRange(0, 64), default=None)
@click.option("--seed", type=SEED, default=0, show_default=True)
@on_error_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/run"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print every row as JSON on stdout.")
@cache_dir_option
@data_dir_option
@_user_errors
def compare(
    models: str,
    datas: str,
    methods: str,
    repeats: int,
    layers: str | None,
    epochs: int,
    image_size: int | None,
    limit: int | None,
    workers: int | None,
    seed: int,
    on_error: str,
    out: Path,
    as_json: bool,
    cache_dir: Path,
    data_dir: Path | None,
) -> None:
    """Which model and which transfer method win on your data, at what cost: one command."""
    from tlfeat.compare import CompareConfig, command_line
    from tlfeat.compare import compare as run

    cfg = CompareConfig(
        models=_csv_list(models),
        datas=_csv_list(datas),
        methods=_csv_list(methods),
        repeats=repeats,
        out=out,
        layers=_csv_list(layers),
        epochs=epochs,
        image_size=image_size,
        limit=limit,
        cache_dir=cache_dir,
        data_dir=data_dir,
        workers=workers,
        seed=seed,
        on_error=on_error,
        command=command_line(),
    )
    folder = run(cfg, echo=lambda line: click.echo(line, err=as_json))
    _report_summary(folder, as_json)


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print every row as JSON on stdout.")
@_user_errors
def report(folder: Path, as_json: bool) -> None:
    """Rebuild a comparison report from its saved results, recomputing nothing."""
    from tlfeat.report import build

    build(folder)
    _report_summary(folder, as_json)


def _report_summary(folder: Path, as_json: bool) -> None:
    from tlfeat.report import recommendation, rows

    items = rows(folder)
    if as_json:
        click.echo(
            json.dumps([{k: v for k, v in r.items() if not k.startswith("_")} for r in items], indent=2, default=str)
        )
    for line in recommendation(items):
        click.echo(line.replace("**", ""), err=as_json)
    click.echo(f"report: {folder / 'report.html'} (also report.md, rows.csv, plots/)", err=as_json)


def main() -> None:
    cli(prog_name="tlfeat")


if __name__ == "__main__":
    main()
