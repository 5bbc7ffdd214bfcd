"""Analyses of cached features and fine-tuning runs: CKA and RSA against the papers' formulas written
here, embeddings, neighbour galleries, what each layer sees (real MobileNetV2), overfitting read from
curves, and `tlfeat export` reading back what the cache holds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tlfeat import cache
from tlfeat.analysis import similarity
from tlfeat.analysis.curves import overfitting
from tlfeat.analysis.study import Rep, align
from tlfeat.errors import TlfeatError
from tlfeat_cli.main import cli

from .robustness.helpers import assert_one_clear_line
from .robustness.helpers import cli as run_cli

# --------------------------------------------------------------------------- CKA and RSA, by the formulas


def hsic_biased(K: np.ndarray, L: np.ndarray) -> float:
    """Gretton et al. 2005: tr(K H L H) / (n - 1)^2, H = I - 11^T / n."""
    n = len(K)
    H = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(K @ H @ L @ H)) / (n - 1) ** 2


def hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. 2012, eq. 5: with the diagonals zeroed,
    [tr(K L) + 1^T K 1 1^T L 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n (n-3))."""
    n = len(K)
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    total = (
        np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ K @ L @ one)
    )
    return float(total / (n * (n - 3)))


def cka_reference(K: np.ndarray, L: np.ndarray, debiased: bool) -> float:
    h = hsic_unbiased if debiased else hsic_biased
    return h(K, L) / np.sqrt(h(K, K) * h(L, L))


def rbf_reference(X: np.ndarray, threshold: float) -> np.ndarray:
    d2 = np.array([[float(np.sum((a - b) ** 2)) for b in X] for a in X])
    sigma2 = threshold**2 * np.median(d2)
    return np.exp(-d2 / (2 * sigma2))


@pytest.fixture(scope="module")
def reps() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 12))
    Y = X @ rng.normal(size=(12, 7)) + 0.5 * rng.normal(size=(40, 7))  # related to X, not a copy
    return X, Y


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_equals_the_hsic_formulas(reps: tuple[np.ndarray, np.ndarray], debiased: bool) -> None:
    X, Y = reps
    linear = similarity.cka(X, Y, "linear", debiased)
    assert linear == pytest.approx(cka_reference(X @ X.T, Y @ Y.T, debiased), rel=1e-9)
    rbf = similarity.cka(X, Y, "rbf", debiased, threshold=0.8)
    assert rbf == pytest.approx(cka_reference(rbf_reference(X, 0.8), rbf_reference(Y, 0.8), debiased), rel=1e-9)
    assert 0 < linear < 1 and 0 < rbf < 1
    if not debiased:  # Kornblith et al.'s feature-space form of linear CKA: ||Yc^T Xc||^2 / (||Xc^T Xc|| ||Yc^T Yc||)
        Xc, Yc = X - X.mean(0), Y - Y.mean(0)
        form = np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
        assert linear == pytest.approx(form, rel=1e-9)


@pytest.mark.parametrize(("kernel", "debiased"), [("linear", False), ("linear", True), ("rbf", False), ("rbf", True)])
def test_cka_invariances(reps: tuple[np.ndarray, np.ndarray], kernel: str, debiased: bool) -> None:
    X, Y = reps
    Q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(12, 12)))
    base = similarity.cka(X, Y, kernel, debiased)
    assert similarity.cka(X, X, kernel, debiased) == pytest.approx(1.0)
    assert similarity.cka(X @ Q, Y, kernel, debiased) == pytest.approx(base, rel=1e-9)  # orthogonal transform
    assert similarity.cka(7.5 * X, Y, kernel, debiased) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    shuffled = np.random.default_rng(2).permutation(len(Y))
    assert similarity.cka(X, Y[shuffled], kernel, debiased) < base  # pairing images matters
    if kernel == "linear":  # linear CKA is not invariant to an arbitrary invertible map
        A = np.diag(np.linspace(0.1, 10, 12))
        assert similarity.cka(X @ A, Y, kernel, debiased) != pytest.approx(base, rel=1e-3)


def test_debiased_cka_corrects_the_bias_of_wide_random_features() -> None:
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(30, 500)), rng.normal(size=(30, 500))  # independent: true CKA 0
    assert similarity.cka(X, Y, debiased=False) > 0.5  # the biased estimate is far from 0
    assert abs(similarity.cka(X, Y, debiased=True)) < 0.1


def test_rsa_equals_scipy_rdms_and_spearman(reps: tuple[np.ndarray, np.ndarray]) -> None:
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    X, Y = reps
    for distance in ("correlation", "cosine"):
        assert np.allclose(similarity.rdm(X, distance), pdist(X, distance))
        expected = spearmanr(pdist(X, distance), pdist(Y, distance)).statistic
        assert similarity.rsa(X, Y, distance) == pytest.approx(expected, rel=1e-9)
    assert similarity.rsa(X, 3 * X + 1) == pytest.approx(1.0)  # correlation distance ignores scale and offset
    M = similarity.matrix([X, Y, X[:, :5]], "rsa")
    assert np.allclose(M, M.T) and np.allclose(np.diag(M), 1)
    assert M[0, 1] == pytest.approx(similarity.rsa(X, Y))
    C = similarity.matrix([X, Y], "cka", kernel="rbf", debiased=True)
    assert C[0, 1] == pytest.approx(similarity.cka(X, Y, "rbf", True))


def test_align_pairs_rows_by_image_id() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4)).astype(np.float32)
    y = np.repeat(np.arange(3), 10)
    ids = [f"img{i}" for i in range(30)]
    order = rng.permutation(30)[:25]  # another file: other order, 5 images missing
    a = Rep("m", "a", cache.FeatureSet(X, y, ids, ["x", "y", "z"]))
    b = Rep("m2", "b", cache.FeatureSet(2 * X[order], y[order], [ids[i] for i in order], ["x", "y", "z"]))
    (Xa, Xb), labels, kept = align([a, b], n_images=100, seed=0)
    assert len(kept) == 25 and np.allclose(Xb, 2 * Xa) and set(kept) == {ids[i] for i in order}
    (Xa, _), labels, kept = align([a, b], n_images=12, seed=0)
    assert len(kept) == 12 and np.bincount(labels).min() >= 3  # stratified


def test_constant_features_are_undefined_for_every_estimator_and_refused_before_writing(tmp_path: Path) -> None:
    from tlfeat.analysis.study import write_embedding, write_similarity

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 8))
    flat = np.full((20, 8), 0.25) + 1e-9 * rng.normal(size=(20, 8))  # blank images: the same features, bar float noise
    estimators = [
        {"measure": "cka", "kernel": "linear", "debiased": True},
        {"measure": "cka", "kernel": "linear", "debiased": False},
        {"measure": "cka", "kernel": "rbf", "debiased": True},
        {"measure": "rsa", "distance": "correlation"},
    ]
    for options in estimators:
        M = similarity.matrix([X, flat], **options)  # type: ignore[arg-type]
        assert np.isnan(M[0, 1]) and np.isnan(M[1, 1]) and M[0, 0] == pytest.approx(1.0), options
    assert np.isnan(similarity.cka(X, flat)) and np.isnan(similarity.rsa(flat, X))
    # features on a tiny scale that do vary (a random-weight MobileNetV2's are near 1e-10) are not constant
    assert not similarity.constant(1e-10 * X) and similarity.cka(1e-10 * X, X) == pytest.approx(1.0)
    y = np.repeat(np.arange(2), 10)
    ids = [f"img{i}" for i in range(20)]
    reps = [Rep("m", "a", cache.FeatureSet(X.astype(np.float32), y, ids, ["x", "y"])),
            Rep("m", "b", cache.FeatureSet(flat.astype(np.float32), y, ids, ["x", "y"]))]  # fmt: skip
    for write in (
        lambda out: write_similarity(reps, "cka", {}, 10, 0, out, "t"),
        lambda out: write_embedding(reps, ("pca", "tsne"), 10, 0, out, "t"),  # t-SNE on these crashed the process
    ):
        with pytest.raises(TlfeatError, match="m b: all 10 sampled images have the same features"):
            write(tmp_path / "out")
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- overfitting


def _history(train: list[float], val: list[float]) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "train_loss": t, "val_loss": v} for i, (t, v) in enumerate(zip(train, val, strict=True))]


def test_overfitting_by_hand() -> None:
    # Validation loss lowest at epoch 3 (0.30), then 0.32, 0.35, 0.41; training loss falls throughout.
    h = _history([1.0, 0.6, 0.4, 0.3, 0.2, 0.1], [0.8, 0.5, 0.30, 0.32, 0.35, 0.41])
    found = overfitting(h, kept_epoch=5)
    assert found is not None and (found.started, found.min_epoch, found.last_epoch) == (4, 3, 6)
    assert (found.val_loss_min, found.val_loss_last, found.train_loss_at_min, found.train_loss_last) == (
        0.30,
        0.41,
        0.4,
        0.1,
    )
    assert (
        "overfitting from epoch 4" in found.sentence()
        and "epoch 5 (best validation accuracy, after" in found.sentence()
    )
    assert overfitting(h[:5]) is None  # 2 epochs after the minimum: not several
    assert overfitting(_history([1.0, 0.6, 0.4, 0.3, 0.2, 0.1], [0.8, 0.5, 0.3, 0.301, 0.302, 0.303])) is None  # +1%
    assert (
        overfitting(_history([1.0, 0.6, 0.4, 0.4, 0.45, 0.5], [0.8, 0.5, 0.3, 0.32, 0.35, 0.41])) is None
    )  # train rose
    assert (
        overfitting(_history([1.0, 0.6, 0.4, 0.3, 0.2, 0.1], [0.8, 0.5, 0.3, 0.35, 0.29, 0.41])) is None
    )  # new minimum
    assert overfitting(_history([1, 0.5, 0.3, 0.2], [0.9, 0.6, 0.4, 0.3])) is None  # still improving


# --------------------------------------------------------------------------- the commands on a real cache


@pytest.fixture
def two_models(tiny_features: Path) -> Path:
    return tiny_features


def test_analyze_cka_rsa_heat_maps_and_csv_hold_the_reference_values(two_models: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = [
        "--data",
        "digits",
        "--test-limit",
        "150",
        "--cache-dir",
        str(two_models),
        "--out",
        str(tmp_path),
        "--images",
        "120",
    ]
    out = runner.invoke(
        cli, ["analyze", "cka", "--model", "resnet18:untrained", "--layers", "layer2,layer3,penultimate", *common]
    )
    assert out.exit_code == 0, out.output
    with open(tmp_path / "cka-digits-resnet18-untrained.csv") as fh:
        values = {(r["layer_a"], r["layer_b"]): float(r["cka"]) for r in csv.DictReader(fh)}
    sets = {fs.meta["layer"]: fs for fs in map(cache.read, two_models.glob("resnet18__digits*test*.h5"))}
    X, _, ids = align([Rep("r", k, v) for k, v in sets.items()], 120, 0)
    ref = {k: x.astype(np.float64) for k, x in zip(sets, X, strict=True)}
    expected = cka_reference(ref["layer2"] @ ref["layer2"].T, ref["layer3"] @ ref["layer3"].T, debiased=True)
    assert values[("layer2", "layer3")] == pytest.approx(expected, abs=1e-6) and values[("layer3", "layer3")] == 1.0
    out = runner.invoke(
        cli,
        [
            "analyze",
            "rsa",
            "--model",
            "resnet18:untrained,mobilenet_v2:untrained",
            "--layers",
            "penultimate",
            "--distance",
            "cosine",
            *common,
        ],
    )
    assert out.exit_code == 0, out.output
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["kind"] for e in index] == ["cka", "rsa"] and all((tmp_path / e["png"]).is_file() for e in index)
    with open(tmp_path / index[1]["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["model_a"], r["model_b"]) for r in rows} >= {("resnet18:untrained", "mobilenet_v2:untrained")}
    missing = runner.invoke(cli, ["analyze", "cka", "--model", "resnet18:untrained", "--layers", "layer1", *common])
    assert missing.exit_code == 2 and missing.output.startswith("error: ") and "layer" in missing.output


@pytest.mark.slow
def test_analyze_embed_and_neighbours(two_models: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    common = [
        "--model",
        "resnet18:untrained",
        "--data",
        "digits",
        "--cache-dir",
        str(two_models),
        "--out",
        str(tmp_path),
    ]
    out = runner.invoke(
        cli, ["analyze", "embed", *common, "--layers", "layer3,penultimate", "--methods", "pca,tsne", "--images", "90"]
    )
    assert out.exit_code == 0, out.output
    with open(tmp_path / "embed-digits-resnet18-untrained-pca.csv") as fh:
        points = list(csv.DictReader(fh))
    assert len(points) == 2 * 90 and {p["layer"] for p in points} == {"layer3", "penultimate"}
    # PCA by hand: the first principal component's scores have the largest variance of any direction
    xs = np.array([float(p["x"]) for p in points if p["layer"] == "penultimate"])
    ys = np.array([float(p["y"]) for p in points if p["layer"] == "penultimate"])
    assert xs.var() >= ys.var() and abs(np.corrcoef(xs, ys)[0, 1]) < 1e-6
    umap = runner.invoke(cli, ["analyze", "embed", *common, "--methods", "umap"])
    assert umap.exit_code == 2 and "umap-learn" in umap.output  # an optional extra, said clearly
    out = runner.invoke(cli, ["analyze", "neighbours", *common, "--queries", "4", "--k", "3", "--images", "100"])
    assert out.exit_code == 0, out.output
    with open(tmp_path / "neighbours-digits-resnet18-untrained-penultimate.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * 3 and [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    train = cache.read(next(two_models.glob("resnet18__digits__train__*.h5")))
    test = cache.read(next(two_models.glob("resnet18__digits__test__*.h5")))
    q = test.ids.index(rows[0]["query_id"])
    sims = (train.X / np.linalg.norm(train.X, axis=1, keepdims=True)) @ (test.X[q] / np.linalg.norm(test.X[q]))
    assert [train.ids[i] for i in np.argsort(-sims)[:3]] == [r["neighbour_id"] for r in rows[:3]]
    assert float(rows[0]["cosine"]) == pytest.approx(float(sims.max()), abs=1e-5)


@pytest.mark.slow
def test_analyze_layers_real_mobilenet_and_untrained_vgg(tmp_path: Path) -> None:
    import torch
    from PIL import Image

    from tlfeat.analysis.views import network, stages
    from tlfeat.config import LayerViewConfig

    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 120, 3)) * 255).astype(np.uint8)).save(photo)
    cfg = LayerViewConfig(model="mobilenet_v2", image=photo, out=tmp_path / "mnv2")
    model, resolved = network(cfg)
    assert resolved.pretrained
    x = torch.from_numpy(rng.normal(size=(1, 3, 224, 224)).astype(np.float32))
    found = stages(model, x)
    assert [s.name for s in found] == ["features.1", "features.3", "features.6", "features.13", "features.18"]
    with torch.no_grad():
        assert np.allclose(found[1].output, model.features[:4](x)[0].numpy(), atol=1e-5)  # the 56 px stage
    out = run_cli("analyze", "layers", "--model", "mobilenet_v2", "--image", photo, "--out", tmp_path / "mnv2")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mnv2" / "mobilenet_v2-filters.png").is_file()
    assert (tmp_path / "mnv2" / "mobilenet_v2-activations.png").is_file()
    vgg = run_cli(
        "analyze",
        "layers",
        "--model",
        "vgg16",
        "--untrained",
        "--image-size",
        "64",
        "--image",
        photo,
        "--out",
        tmp_path / "vgg",
    )
    assert vgg.returncode == 0 and (tmp_path / "vgg" / "vgg16-activations.png").is_file(), vgg.stderr
    blocks = [line.split("block ")[1] for line in vgg.stdout.splitlines() if "block " in line]
    assert blocks == [
        "features.3: 64 x 64 x 64", "features.8: 128 x 32 x 32", "features.15: 256 x 16 x 16",
        "features.22: 512 x 8 x 8", "features.29: 512 x 4 x 4", "features.30: 512 x 2 x 2",
    ]  # fmt: skip
    assert_one_clear_line(
        run_cli("analyze", "layers", "--model", "vgg16", "--untrained", "--image", tmp_path / "none.jpg"),
        "--image",
        "not a file",
    )


# --------------------------------------------------------------------------- export


def test_export_npy_parquet_csv_hold_the_cache(two_models: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    train = cache.read(next(two_models.glob("mobilenet_v2__digits__train__*.h5")))
    base = [
        "export",
        "--model",
        "mobilenet_v2",
        "--data",
        "digits",
        "--weights-id",
        "untrained:seed0",
        "--cache-dir",
        str(two_models),
    ]
    for fmt in ("npy", "parquet", "csv"):
        out = CliRunner().invoke(cli, [*base, "--format", fmt, "--out", str(tmp_path / fmt), "--block-rows", "7"])
        assert out.exit_code == 0, out.output
    X = np.load(tmp_path / "npy" / "train_features.npy")
    assert np.array_equal(X, train.X) and np.array_equal(np.load(tmp_path / "npy" / "train_labels.npy"), train.y)
    with open(tmp_path / "npy" / "train_ids.csv") as fh:
        assert [r["id"] for r in csv.DictReader(fh)] == train.ids
    table = pq.read_table(tmp_path / "parquet" / "train.parquet")
    assert table.column("id").to_pylist() == train.ids and table.num_rows == len(train)
    assert np.array_equal(np.column_stack([table.column(f"f{j:04d}").to_numpy() for j in range(X.shape[1])]), train.X)
    with open(tmp_path / "csv" / "train.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:4] == ["id", "label", "class", "f0000"]
    assert np.array_equal(np.array([[np.float32(v) for v in r[3:]] for r in rows[1:]]), train.X)  # 9 digits round-trip
    meta = json.loads((tmp_path / "csv" / "meta.json").read_text())
    splits = meta["formats"]["csv"]["splits"]
    assert splits["train"]["content_sha256"] == train.sha256 and sorted(splits) == ["test", "train"]
    assert_one_clear_line(
        run_cli("export", "--model", "vgg16", "--data", "digits", "--out", tmp_path / "x", "--cache-dir", two_models),
        "no cached features of vgg16",
    )


def test_missing_features_advise_an_extract_that_makes_them(two_models: Path, tmp_path: Path) -> None:
    from tlfeat import load_features
    from tlfeat.errors import CacheMismatch

    # MODEL:untrained is loaded as extract and compare write it
    fs = load_features("resnet18:untrained", "digits", split="test", cache_dir=two_models, image_size=16)
    assert fs.meta["weights_id"] == "untrained:seed0" and fs.meta["layer"] == "penultimate"
    for data, size, command in (
        ("fashion-mnist", 16, "`tlfeat extract --model resnet18:untrained --data fashion-mnist --image-size 16`"),
        ("digits", 24, "`tlfeat extract --model resnet18:untrained --data digits --image-size 24`"),
    ):
        with pytest.raises(CacheMismatch, match=command):
            load_features("resnet18:untrained", data, split="test", cache_dir=two_models, image_size=size)
    out = CliRunner().invoke(
        cli,
        ["analyze", "cka", "--model", "resnet18:untrained,mobilenet_v2", "--data", "digits", "--image-size", "24",
         "--cache-dir", str(two_models), "--out", str(tmp_path / "out")],
    )  # fmt: skip
    assert out.exit_code == 2, out.output
    assert "`tlfeat extract --model resnet18:untrained --data digits --image-size 24`" in out.output
