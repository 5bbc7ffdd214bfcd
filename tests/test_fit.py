from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import check_estimator

from tlfeat import ExtractConfig, cache, extract, metrics
from tlfeat.classifiers import LinearHead, LogReg, make_classifier
from tlfeat.errors import TlfeatError
from tlfeat.fitting import FitConfig, fit, load_classifier
from tlfeat.records import RunRecord
from tlfeat_cli.main import cli

from .conftest import make_tree

FLOOR = 0.90


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MobileNetV2 (ImageNet) features of 500 + 450 digits images at 112 px."""
    root = tmp_path_factory.mktemp("digits_cache")
    extract(
        ExtractConfig(
            model="mobilenet_v2", data="digits", limit=500, image_size=112, workers=0, cache_dir=root, progress=False
        )
    )
    return root


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory: pytest.TempPathFactory, digits_cache: Path) -> Path:
    """The pretrained features plus the same extraction from random weights."""
    root = tmp_path_factory.mktemp("mixed_cache")
    for path in digits_cache.glob("*.h5"):
        shutil.copyfile(path, root / path.name)
    extract(
        ExtractConfig(
            model="mobilenet_v2",
            data="digits",
            limit=500,
            image_size=112,
            untrained=True,
            workers=0,
            cache_dir=root,
            progress=False,
        )
    )
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    ("clf", "kw"),
    [("logreg", {}), ("svm", {"C": 0.1}), ("linear", {"epochs": 30, "C": 0.1}), ("svm", {"kernel": "rbf", "C": 10.0})],
)
def test_pretrained_features_clear_an_accuracy_floor(digits_cache: Path, tmp_path: Path, clf: str, kw: dict) -> None:
    # Measured: random-weight MobileNetV2 features do as well on digits (0.93-0.96), so this floor
    # checks the classifiers, not transfer; test_weights_and_reference checks the ImageNet weights.
    [res] = fit(FitConfig(clf=clf, data="digits", cache_dir=digits_cache, results_dir=tmp_path, **kw))
    m = res.record.metrics
    assert m["accuracy"] >= FLOOR, m["accuracy"]
    # Measured on this subset: 0.996-0.999 for the linear classifiers, 0.989 for the RBF SVM, whose
    # one-vs-one margins rank a class less cleanly than probabilities do.
    assert m["roc_auc"] > 0.98, m["roc_auc"]
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == res.record.n_test == 450
    low, high = m["accuracy_ci95"]
    assert low < m["accuracy"] < high and high - low < 0.1
    if "C" not in kw:
        assert res.record.details["cv"]["chosen_by"].startswith("5-fold cross-validation on 500 training images")
        assert res.record.params["C"] in res.record.details["cv"]["grid"]


def test_metrics_agree_with_scikit_learn_and_record_round_trips(digits_cache: Path, tmp_path: Path) -> None:
    [res] = fit(FitConfig(clf="logreg", data="digits", C=0.1, cache_dir=digits_cache, results_dir=tmp_path))
    record = json.loads(res.path.read_text())
    assert record == json.loads(res.record.to_json())
    assert RunRecord.from_dict(record).to_json() == res.record.to_json()
    assert record["params"]["C"] == 0.1 and record["details"]["cv"]["chosen_by"] == "user"
    assert record["provenance"]["classifier"]["format"] == "tlfeat-linear-v1"  # arrays, no pickle

    test = cache.read(Path(record["provenance"]["features"]["test"]["path"]))
    pipeline = load_classifier(res.path)
    y_pred = pipeline.predict(test.X)
    proba = pipeline.predict_proba(test.X)
    m = record["metrics"]
    # The record holds the metrics of what the saved classifier predicts (evaluate itself: test_metrics_by_hand).
    assert m["predictions"]["y_pred"] == y_pred.tolist() and m["predictions"]["y_true"] == test.y.tolist()
    assert m == metrics.evaluate(test.y, y_pred, proba, test.class_names, test.ids)
    assert m["accuracy"] == np.mean(test.y == y_pred) > 0.9

    again = fit(FitConfig(clf="logreg", data="digits", C=0.1, cache_dir=digits_cache, results_dir=tmp_path))
    assert again[0].reused and again[0].record.created == record["created"]


def test_metrics_by_hand() -> None:
    """8 test images, 3 classes; every figure worked out by hand, none by scikit-learn."""
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 2, 2, 2, 0])
    scores = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.8, 0.1, 0.1],
            [0.6, 0.3, 0.1],
            [0.1, 0.8, 0.1],
            [0.2, 0.4, 0.4],
            [0.3, 0.1, 0.6],
            [0.1, 0.2, 0.7],
            [0.7, 0.2, 0.1],
        ]
    )
    m = metrics.evaluate(y_true, y_pred, scores, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[3, 0, 0], [0, 1, 1], [1, 0, 2]]  # rows: true class, columns: predicted
    assert m["accuracy"] == 6 / 8
    # Wilson, 6 of 8: centre (0.75 + z^2/16) / (1 + z^2/8), half-width z sqrt(0.75 x 0.25 / 8 + z^2/256) / (1 + z^2/8)
    assert m["accuracy_ci95"] == pytest.approx([0.40928, 0.92852], abs=1e-5)
    # recall 3/3, 1/2, 2/3; precision 3/4 (column 0 holds 4), 1/1, 2/3
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert [m["per_class"][c]["recall"] for c in "abc"] == pytest.approx([1, 1 / 2, 2 / 3])
    assert [m["per_class"][c]["precision"] for c in "abc"] == pytest.approx([3 / 4, 1, 2 / 3])
    assert [m["per_class"][c]["support"] for c in "abc"] == [3, 2, 3]
    # F1 = 2pr / (p + r): 6/7, 2/3, 2/3
    assert m["macro_f1"] == pytest.approx((6 / 7 + 2 / 3 + 2 / 3) / 3)
    # One-vs-rest AUC = share of (positive, negative) pairs ranked right, ties half: class a 14 of 15
    # (0.6 < 0.7); b 12 of 12; c 12.5 of 15 (0.1 beats 0.05, ties three 0.1s, loses to 0.4).
    assert m["roc_auc"] == pytest.approx((14 / 15 + 1 + 12.5 / 15) / 3)
    assert m["chance_accuracy"] == 3 / 8 and m["near_chance"] is None


def test_tampered_classifier_file_is_not_loaded(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = fit(FitConfig(clf="logreg", data="digits", C=1.0, cache_dir=digits_cache, results_dir=tmp_path))[0]
    (res.path.parent / "classifier.npz").write_bytes(b"anything")
    with pytest.raises(TlfeatError, match="does not match the sha256"):
        load_classifier(res.path)
    # A model that has to be pickled (an RBF SVM) is signed with TLFEAT_RESULTS_KEY when it is set.
    monkeypatch.setenv("TLFEAT_RESULTS_KEY", "secret kept elsewhere")
    rbf = fit(FitConfig(clf="svm", kernel="rbf", C=1.0, data="digits", cache_dir=digits_cache, results_dir=tmp_path))[0]
    assert rbf.record.provenance["classifier"]["format"] == "joblib" and load_classifier(rbf.path) is not None
    monkeypatch.setenv("TLFEAT_RESULTS_KEY", "another key")
    with pytest.raises(TlfeatError, match="not signed with TLFEAT_RESULTS_KEY"):
        load_classifier(rbf.path)


class _Planted:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (self.marker, "unpickled"))  # type: ignore[return-value]


def test_a_pickled_rbf_svm_is_loaded_only_when_its_sha256_matches(digits_cache: Path, tmp_path: Path) -> None:
    import pickle

    rbf = fit(FitConfig(clf="svm", kernel="rbf", C=1.0, data="digits", cache_dir=digits_cache, results_dir=tmp_path))[0]
    saved = rbf.record.provenance["classifier"]
    assert saved["format"] == "joblib" and "hmac_sha256" not in saved  # no TLFEAT_RESULTS_KEY: the sha256 alone
    y_pred = load_classifier(rbf.path).predict(cache.read(Path(rbf.record.provenance["features"]["test"]["path"])).X)
    assert y_pred.tolist() == rbf.record.metrics["predictions"]["y_pred"]
    marker = tmp_path / "marker"
    (rbf.path.parent / saved["file"]).write_bytes(pickle.dumps(_Planted(marker)))  # a valid pickle, not the one saved
    with pytest.raises(TlfeatError, match="does not match the sha256 in its record"):
        load_classifier(rbf.path)
    assert not marker.exists(), "the replaced pickle was loaded"


@pytest.mark.parametrize("kw", [{"clf": "svm"}, {"clf": "linear", "epochs": 5}, {"clf": "logreg"}], ids=str)
def test_linear_classifiers_are_arrays_loaded_without_unpickling(
    digits_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict[str, object]
) -> None:
    import pickle

    [res] = fit(FitConfig(C=0.1, data="digits", cache_dir=digits_cache, results_dir=tmp_path, **kw))  # type: ignore[arg-type]
    saved = res.record.provenance["classifier"]
    assert saved["file"] == "classifier.npz" and saved["format"] == "tlfeat-linear-v1"

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("something was unpickled")

    for name in ("load", "loads", "Unpickler", "_Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    test = cache.read(Path(res.record.provenance["features"]["test"]["path"]))
    assert load_classifier(res.path).predict(test.X).tolist() == res.record.metrics["predictions"]["y_pred"]


def test_linear_head_is_a_scikit_learn_estimator() -> None:
    check_estimator(LinearHead(epochs=5))


def test_logreg_is_a_scikit_learn_estimator() -> None:
    check_estimator(LogReg())


def _blobs(k: int, n: int = 400, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)) + rng.normal(0, 1.5, (k, d))[y]  # overlapping classes: a finite optimum
    return X.astype(np.float32), y


def test_logreg_reaches_scikit_learns_optimum() -> None:
    from sklearn.linear_model import LogisticRegression

    X, y = _blobs(4)
    ours = LogReg(C=0.5, tol=1e-9, block_rows=64).fit(X, y)  # 7 blocks over 2 threads
    ref = LogisticRegression(C=0.5, tol=1e-9, max_iter=10_000).fit(X.astype(np.float64), y)
    assert np.allclose(ours.coef_, ref.coef_, atol=2e-3) and np.allclose(ours.intercept_, ref.intercept_, atol=2e-3)
    assert np.allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-3)
    assert np.array_equal(ours.predict(X), ref.predict(X))


def test_binary_logreg_is_binomial_logistic_regression_at_twice_c() -> None:
    from sklearn.linear_model import LogisticRegression

    X, y = _blobs(2)
    ours = LogReg(C=0.5, tol=1e-9).fit(X, y)
    # Two symmetric weight rows, each penalised: the same model as one binomial row with C doubled.
    ref = LogisticRegression(C=1.0, tol=1e-9, max_iter=10_000).fit(X.astype(np.float64), y)
    assert np.allclose(ours.decision_function(X), ref.decision_function(X), atol=2e-3)


def test_logreg_threads_and_blocks_do_not_change_the_model() -> None:
    X, y = _blobs(3, n=1000)
    one = LogReg(n_threads=1, block_rows=10_000).fit(X, y)
    split = LogReg(n_threads=2, block_rows=97).fit(X, y)
    again = LogReg(n_threads=2, block_rows=97).fit(X, y)
    assert np.array_equal(split.coef_, again.coef_)  # a fixed thread count is deterministic
    assert np.allclose(one.coef_, split.coef_, atol=1e-3) and np.array_equal(one.predict(X), split.predict(X))


def test_logreg_warns_when_iterations_run_out() -> None:
    from sklearn.exceptions import ConvergenceWarning

    X, y = _blobs(3)
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        LogReg(max_iter=2).fit(X, y)


def test_pipelines_clone_and_grid_search() -> None:
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 1, (30, 5)), rng.normal(2, 1, (30, 5))])
    y = np.repeat([0, 1], 30)
    for name in ("logreg", "svm", "linear"):
        search = GridSearchCV(clone(make_classifier(name, epochs=10)), {"clf__C": [0.1, 1.0]}, cv=3).fit(X, y)
        assert search.score(X, y) > 0.9


def test_linear_head_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
    a = LinearHead(epochs=3).fit(X, y).coef_
    b = LinearHead(epochs=3).fit(X, y).coef_
    assert np.array_equal(a, b)


def test_fit_errors(tmp_path: Path, digits_cache: Path) -> None:
    runner = CliRunner()
    cases = [
        (
            ["fit", "--clf", "knnn", "--cache-dir", str(digits_cache)],
            "--clf must be one of logreg, svm, linear, knn, got 'knnn'",
        ),
        (["fit", "--clf", "knn", "--C", "1", "--cache-dir", str(digits_cache)], "--C does not apply to --clf knn"),
        (["fit", "--k", "5", "--cache-dir", str(digits_cache)], "--k does not apply to --clf logreg"),
        (
            ["fit", "--protocol", "clip", "--clf", "svm", "--cache-dir", str(digits_cache)],
            "--protocol clip fits --clf logreg, not --clf svm",
        ),
        (["fit", "--model", "vgg16", "--cache-dir", str(digits_cache)], "no cached features for --model vgg16"),
        (
            ["fit", "--clf", "logreg", "--kernel", "rbf", "--cache-dir", str(digits_cache)],
            "--kernel rbf does not apply to --clf logreg",
        ),
        (["fit", "--C", "-1", "--cache-dir", str(digits_cache)], "--C must be a finite number in (0, 1e+06], got -1"),
        (
            ["fit", "--metric", "f1", "--cache-dir", str(digits_cache)],
            "'f1' is not one of 'accuracy', 'balanced_accuracy', 'roc_auc', 'macro_f1'",
        ),
    ]
    for args, message in cases:
        result = runner.invoke(cli, [*args, "--results-dir", str(tmp_path)])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1


def test_missing_test_split_and_one_class(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t", per_class=2)
    extract(
        ExtractConfig(
            model="resnet18",
            data=str(tree),
            splits=("train",),
            untrained=True,
            image_size=32,
            workers=0,
            cache_dir=tmp_path / "c",
            progress=False,
        )
    )
    with pytest.raises(TlfeatError, match=r"no train\+test pair \(only: train\)"):
        fit(FitConfig(cache_dir=tmp_path / "c", results_dir=tmp_path / "r"))

    one = make_tree(tmp_path / "one", per_class=3, classes=("only",))
    extract(
        ExtractConfig(
            model="resnet18",
            data=str(one),
            untrained=True,
            image_size=32,
            workers=0,
            cache_dir=tmp_path / "c1",
            progress=False,
        )
    )
    with pytest.raises(TlfeatError, match="hold one class only"):
        fit(FitConfig(cache_dir=tmp_path / "c1", results_dir=tmp_path / "r"))
    assert not (tmp_path / "r" / "fits").exists()  # nothing half-written


def test_cli_json_goes_to_stdout_and_table_to_stderr(mixed_cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "fit",
            "--clf",
            "logreg",
            "--C",
            "1",
            "--json",
            "--cache-dir",
            str(mixed_cache),
            "--results-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert {r["weights_id"] for r in records} == {"IMAGENET1K_V1", "untrained:seed0"}
    assert all({"accuracy", "balanced_accuracy", "roc_auc"} <= set(r["metrics"]) for r in records)
    assert "accuracy (model \\ dataset)" in result.stderr
    listing = runner.invoke(cli, ["results", "--results-dir", str(tmp_path)])
    assert listing.exit_code == 0
    assert len([line for line in listing.output.splitlines() if line.startswith("logreg ")]) == 2
