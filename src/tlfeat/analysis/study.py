"""`tlfeat analyze cka|rsa|embed|neighbours` and `compare --analyses`: analyses of cached features.

Each reads feature sets from the cache (nothing is extracted here), puts the images they share in
one order (by id, so two models' files of the same split line up whatever order they were written
in), takes a stratified sample of at most `images` of them (by a hash of the ids), and writes PNG
and CSV files plus `index.json`, the list a report reads to show them.

`--out` is a new or empty folder, or one tlfeat made (it carries tlfeat's marker, which lists the
files tlfeat wrote there), and never inside the dataset folder; a file of the same name that tlfeat did
not write is never replaced. In the CSVs, an id or class name that a spreadsheet would run as a
formula gets a leading `'` (as in the report's CSVs).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlfeat import cache, datasets, fsio
from tlfeat.analysis import plots, similarity
from tlfeat.backbones.base import PENULTIMATE
from tlfeat.errors import TlfeatError, formula_safe

if TYPE_CHECKING:
    from tlfeat.config import AnalyzeConfig, CompareConfig

log = logging.getLogger(__name__)

INDEX = "index.json"
UNTRAINED = ":untrained"


@dataclass
class Rep:
    """One representation: a model's features at one layer."""

    model: str  # as given: "resnet18" or "resnet18:untrained"
    layer: str
    fs: cache.FeatureSet

    @property
    def label(self) -> str:
        return f"{self.model} {self.layer}"


# --------------------------------------------------------------------------- loading and aligning


def load(cfg: AnalyzeConfig, split: str | None = None) -> list[Rep]:
    """Every (model, layer) asked for, from the cache: one clear error naming what is missing."""
    from tlfeat.extraction import load_features

    out = []
    for model in cfg.models:
        name, untrained = (model[: -len(UNTRAINED)], True) if model.endswith(UNTRAINED) else (model, False)
        for layer in cfg.layers:
            fs = load_features(
                name, cfg.data, split or cfg.split, cfg.cache_dir, layer=layer,
                weights_id="untrained:seed0" if untrained else cfg.weights_id, image_size=cfg.image_size,
                limit=cfg.limit, test_limit=cfg.test_limit, subset_seed=cfg.subset_seed,
            )  # fmt: skip
            out.append(Rep(model, layer, fs))
    return out


def align(reps: Sequence[Rep], n_images: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """Rows of the images every representation holds, in the first one's order, sampled by class."""
    first = reps[0].fs
    common = set(first.ids)
    for r in reps[1:]:
        common &= set(r.fs.ids)
    ids = [i for i in first.ids if i in common]
    if len(ids) < 4:
        raise TlfeatError(
            f"the feature sets share {len(ids)} images ({', '.join(r.label for r in reps)}); "
            "compare features of the same dataset split"
        )
    position = {i: k for k, i in enumerate(first.ids)}
    y = first.y[[position[i] for i in ids]]
    keep = datasets.stratified_subset(y, n_images, seed=seed, ids=ids)
    ids = [ids[k] for k in keep]
    out = []
    for r in reps:
        where = {i: k for k, i in enumerate(r.fs.ids)}
        out.append(np.asarray(r.fs.X[np.asarray([where[i] for i in ids])], dtype=np.float32))
        labels = r.fs.y[[where[i] for i in ids]]
        if not np.array_equal(labels, y[keep]):
            raise TlfeatError(f"{r.label}: the same images carry other labels than in {reps[0].label}")
    flat = [r.label for r, x in zip(reps, out, strict=True) if similarity.constant(x)]
    if flat:  # CKA and RSA would be 0/0, t-SNE may crash the process: refused before anything is written
        raise TlfeatError(
            f"{', '.join(flat)}: all {len(ids)} sampled images have the same features (zero variance), so "
            "similarities and embeddings are undefined; check the images (all blank?) or choose other layers"
        )
    return out, y[keep], ids


# --------------------------------------------------------------------------- writing


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")[:80]


def _take(folder: Path, *names: str) -> None:
    """The files an analysis writes, claimed in `folder` before anything is written (see fsio.take)."""
    fsio.take(folder, [*names, INDEX], "tlfeat analyze")


def add_to_index(folder: Path, entry: dict[str, Any]) -> None:
    """List a written analysis in `folder/index.json` (an entry with the same png replaces the old one)."""
    path = Path(folder) / INDEX
    try:
        items = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        items = []
    items = [i for i in items if isinstance(i, dict) and i.get("png") != entry.get("png")] + [entry]
    fsio.atomic_write(path, json.dumps(items, indent=2))


def read_index(folder: Path) -> list[dict[str, Any]]:
    """The analyses listed in `folder/index.json` whose PNG is there (what a report shows)."""
    try:
        items = json.loads((Path(folder) / INDEX).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict) and (Path(folder) / str(i.get("png", ""))).is_file()]


def write_similarity(
    reps: Sequence[Rep], measure: str, options: dict[str, Any], n_images: int, seed: int, folder: Path, title: str
) -> dict[str, Any]:
    """The matrix of CKA or RSA between every two representations: heat map, CSV and index entry."""
    X, y, _ = align(reps, n_images, seed)
    values = similarity.matrix(X, measure, **options)
    labels = [r.label if len({r.model for r in reps}) > 1 else r.layer for r in reps]
    what = _describe(measure, options)
    stem = _slug(
        f"{measure}-{datasets.short_name(str(reps[0].fs.meta.get('dataset')))}-{'-'.join(dict.fromkeys(r.model for r in reps))}"
    )
    _take(folder, f"{stem}.png", f"{stem}.csv")
    png = plots.heatmap(values, labels, f"{title}\n{what}, {len(y)} images", folder / f"{stem}.png", measure.upper())
    rows = [
        [reps[i].model, reps[i].layer, reps[j].model, reps[j].layer, f"{values[i, j]:.6f}"]
        for i in range(len(reps))
        for j in range(len(reps))
    ]
    fsio.atomic_write(folder / f"{stem}.csv", _csv(["model_a", "layer_a", "model_b", "layer_b", measure], rows))
    entry = {
        "kind": measure, "title": title, "png": png.name, "csv": f"{stem}.csv", "images": len(y),
        "note": f"{what} between every two representations of the same {len(y)} images (1 on the diagonal).",
    }  # fmt: skip
    add_to_index(folder, entry)
    return entry


def _describe(measure: str, options: dict[str, Any]) -> str:
    if measure == "cka":
        kernel = "RBF" if options.get("kernel") == "rbf" else "linear"
        return f"{kernel} CKA, {'debiased' if options.get('debiased', True) else 'biased'} HSIC"
    return f"RSA: Spearman between RDMs of {options.get('distance', 'correlation')} distance"


def write_embedding(
    reps: Sequence[Rep], methods: Sequence[str], n_images: int, seed: int, folder: Path, title: str
) -> list[dict[str, Any]]:
    """Per method, one panel per representation of the same images, coloured by class; CSV of the points."""
    X, y, ids = align(reps, n_images, seed)
    names = list(reps[0].fs.class_names)
    stem = _slug(
        f"embed-{datasets.short_name(str(reps[0].fs.meta.get('dataset')))}-{'-'.join(dict.fromkeys(r.model for r in reps))}"
    )
    _take(folder, *(f"{stem}-{m}{suffix}" for m in methods for suffix in (".png", ".csv")))
    entries = []
    for method in methods:
        panels = [(r.label, project(x, method, seed)) for r, x in zip(reps, X, strict=True)]
        png = plots.embeddings(
            panels, y, names, f"{title}: {method.upper()}, {len(y)} images", folder / f"{stem}-{method}.png"
        )
        rows = [[r.model, r.layer, method, formula_safe(i), formula_safe(names[int(c)]), f"{p[0]:.5g}", f"{p[1]:.5g}"] for r, (_, pts) in zip(reps, panels, strict=True) for i, c, p in zip(ids, y, pts, strict=True)]  # fmt: skip
        fsio.atomic_write(
            folder / f"{stem}-{method}.csv", _csv(["model", "layer", "method", "id", "class", "x", "y"], rows)
        )
        entry = {
            "kind": "embed", "title": f"{title}: {method.upper()}", "png": png.name, "csv": f"{stem}-{method}.csv",
            "images": len(y), "note": f"{method.upper()} of each layer's features, coloured by class.",
        }  # fmt: skip
        add_to_index(folder, entry)
        entries.append(entry)
    return entries


def project(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates: PCA (by SVD); t-SNE or UMAP on the first 50 principal components."""
    Xc = np.asarray(X, dtype=np.float64) - X.mean(axis=0)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    if method == "pca":
        return U[:, :2] * S[:2]
    reduced = U[:, :50] * S[:50]
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(X) - 1) / 3))
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        raise TlfeatError("UMAP needs umap-learn: pip install 'tlfeat[umap]' (or use --methods pca,tsne)") from None
    return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(reduced))


def write_neighbours(
    train: Rep,
    test: Rep,
    data_dir: Path | None,
    queries: int,
    k: int,
    seed: int,
    folder: Path,
    title: str,
    sample: int = 1000,
) -> dict[str, Any]:
    """For a few test images, the k most similar training images (cosine) as a gallery; and over a sample
    of test images, how many of each one's k neighbours share its class."""
    from tlfeat.knn import KNNProbe

    probe = KNNProbe(k=k).fit_rows(train.fs.X, train.fs.y)
    names = list(train.fs.class_names)
    picked = datasets.stratified_subset(test.fs.y, min(sample, len(test.fs.y)), seed=seed, ids=test.fs.ids)
    sims, idx = probe.kneighbors(np.asarray(test.fs.X[picked]))
    same = probe.classes_[probe.labels_[idx]] == test.fs.y[picked][:, None]
    purity = float(same.mean())
    shown = datasets.stratified_subset(test.fs.y[picked], queries, seed=seed, ids=[test.fs.ids[i] for i in picked])
    images = _Images(str(test.fs.meta.get("dataset")), data_dir)
    rows, table = [], []
    for q in shown:
        qi = int(picked[q])
        qid, qlabel = test.fs.ids[qi], int(test.fs.y[qi])
        found = []
        for rank, (s, j) in enumerate(zip(sims[q], idx[q], strict=True), start=1):
            label = int(probe.classes_[probe.labels_[j]])
            found.append(
                {
                    "image": images.get("train", train.fs.ids[j]),
                    "label": names[label],
                    "similarity": float(s),
                    "same": label == qlabel,
                }
            )
            table.append(
                [formula_safe(qid), formula_safe(names[qlabel]), rank, formula_safe(train.fs.ids[j]),
                 formula_safe(names[label]), f"{s:.5f}", int(label == qlabel)]
            )  # fmt: skip
        rows.append({"image": images.get(test.fs.split, qid), "label": names[qlabel], "neighbours": found})
    stem = _slug(f"neighbours-{datasets.short_name(str(test.fs.meta.get('dataset')))}-{test.model}-{test.layer}")
    _take(folder, f"{stem}.png", f"{stem}.csv")
    png = plots.gallery(
        rows,
        f"{title}\n{purity:.1%} of the {k} nearest training images share the test image's class ({len(picked)} test images)",
        folder / f"{stem}.png",
    )
    header = ["query_id", "query_class", "rank", "neighbour_id", "neighbour_class", "cosine", "same_class"]
    fsio.atomic_write(folder / f"{stem}.csv", _csv(header, table))
    entry = {
        "kind": "neighbours", "title": title, "png": png.name, "csv": f"{stem}.csv", "images": len(picked),
        "purity": purity, "k": k,
        "note": f"Each row: a test image, then its {k} nearest training images by cosine similarity (green: same "
        f"class, red: another). Over {len(picked)} test images, {purity:.1%} of the neighbours share the class.",
    }  # fmt: skip
    add_to_index(folder, entry)
    return entry


class _Images:
    """Images of a dataset by id, loaded once per split, as thumbnails."""

    def __init__(self, dataset: str, data_dir: Path | None) -> None:
        self.dataset, self.data_dir = dataset, data_dir
        self.splits: dict[str, tuple[Any, dict[str, int]]] = {}

    def get(self, split: str, image_id: str, size: int = 96) -> np.ndarray:
        if split not in self.splits:
            images = datasets.load_split(datasets.data_of(self.dataset), split, self.data_dir)
            self.splits[split] = (images, {i: k for k, i in enumerate(images.ids)})
        images, where = self.splits[split]
        img = images.image(where[image_id])
        img.thumbnail((size, size))
        return np.asarray(img)


# --------------------------------------------------------------------------- the commands


def refuse_inside(cfg: AnalyzeConfig) -> None:
    """An --out inside the dataset folder: its PNGs would be read as a class of the dataset next time."""
    from tlfeat.extraction import refuse_inside

    refuse_inside(datasets.canonical(cfg.data), Path(cfg.out), "--out")


def similarity_command(cfg: AnalyzeConfig, measure: str) -> dict[str, Any]:
    refuse_inside(cfg)
    reps = load(cfg)
    options = {"kernel": cfg.kernel, "debiased": cfg.debiased, "threshold": cfg.threshold, "distance": cfg.distance}
    title = f"{measure.upper()} on {datasets.short_name(datasets.canonical(cfg.data))} ({cfg.split})"
    return write_similarity(reps, measure, options, cfg.images, cfg.seed, Path(cfg.out), title)


def embed_command(cfg: AnalyzeConfig) -> list[dict[str, Any]]:
    refuse_inside(cfg)
    reps = load(cfg)
    title = f"{', '.join(cfg.models)} on {datasets.short_name(datasets.canonical(cfg.data))} ({cfg.split})"
    return write_embedding(reps, cfg.methods, cfg.images, cfg.seed, Path(cfg.out), title)


def neighbours_command(cfg: AnalyzeConfig) -> list[dict[str, Any]]:
    refuse_inside(cfg)
    tests, trains = load(cfg, cfg.split), load(cfg, "train")
    out = []
    for test, train in zip(tests, trains, strict=True):
        title = f"Nearest training images, {test.label} features, {datasets.short_name(datasets.canonical(cfg.data))}"
        out.append(
            write_neighbours(train, test, cfg.data_dir, cfg.queries, cfg.k, cfg.seed, Path(cfg.out), title, cfg.images)
        )
    return out


# --------------------------------------------------------------------------- compare --analyses


def for_compare(cfg: CompareConfig, out: Path) -> dict[str, str]:
    """The analyses `compare --analyses` asked for, on each dataset's test images, into OUT/analyses/.
    The features are those the comparison extracted (extracted now where no frozen cell asked for them).
    Returns the failed ones with their error."""
    from tlfeat.compare import Cell, extract_config, model_layers
    from tlfeat.errors import first_line
    from tlfeat.extraction import extract

    folder = Path(out) / "analyses"
    failures: dict[str, str] = {}
    for data in cfg.datas:
        reps: dict[str, list[Rep]] = {"test": [], "train": []}
        try:
            for model in cfg.models:
                layers = [layer for layer in model_layers(cfg, model) if "+" not in layer]  # as given: shallow to deep
                layers += [] if PENULTIMATE in layers else [PENULTIMATE]
                found = extract(extract_config(cfg, Cell(model, data, "logreg", cfg.seed)))
                for split in reps:
                    by_layer = {str(fs.meta.get("layer")): fs for fs in found if fs.split == split}
                    reps[split] += [Rep(model, layer, by_layer[layer]) for layer in layers]
        except Exception as exc:  # noqa: BLE001 - an analysis never stops the report
            failures[f"features of {datasets.short_name(datasets.canonical(data))}"] = (
                f"{type(exc).__name__}: {first_line(exc)}"
            )
            continue
        name = datasets.short_name(datasets.canonical(data))
        for analysis in cfg.analyses:
            try:
                _compare_analysis(analysis, cfg, reps, folder, name)
            except Exception as exc:  # noqa: BLE001
                failures[f"{analysis} on {name}"] = f"{type(exc).__name__}: {first_line(exc)}"
    return failures


def _compare_analysis(analysis: str, cfg: CompareConfig, reps: dict[str, list[Rep]], folder: Path, name: str) -> None:
    """One of `compare --analyses` on one dataset: CKA and RSA between every swept layer of every model,
    an embedding per model, the neighbour gallery of each model's penultimate features."""
    n, seed = cfg.analysis_images, cfg.seed
    if analysis in ("cka", "rsa"):
        options: dict[str, Any] = (
            {"kernel": "linear", "debiased": True} if analysis == "cka" else {"distance": "correlation"}
        )
        models = list(dict.fromkeys(r.model for r in reps["test"]))
        between = f"{models[0]}'s layers" if len(models) == 1 else "layers and models"
        title = f"{analysis.upper()} between {between}, {name} (test)"
        write_similarity(reps["test"], analysis, options, n, seed, folder, title)
    elif analysis == "embed":
        for model in cfg.models:
            here = [r for r in reps["test"] if r.model == model]
            write_embedding(here, ("pca", "tsne"), n, seed, folder, f"{model} on {name} (test)")
    elif analysis == "neighbours":
        for train, test in zip(reps["train"], reps["test"], strict=True):
            if test.layer == PENULTIMATE:
                title = f"Nearest training images, {test.label} features, {name}"
                write_neighbours(train, test, cfg.data_dir, 6, 5, seed, folder, title, n)
