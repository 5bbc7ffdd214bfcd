"""Probes on cached features: kNN (DINO's eval_knn), the C search, the CLIP and DINOv2 protocols,
concatenated layers and k-shot subsets, each against a reference written here from the papers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tlfeat import cache, protocols, selection
from tlfeat.classifier_specs import SPECS, ClassifierSpec, Params
from tlfeat.classifiers import LogReg
from tlfeat.fitting import FitConfig, fit, load_classifier, shot_subset
from tlfeat.knn import KNNProbe
from tlfeat_cli.main import cli

# --------------------------------------------------------------------------- kNN


def dino_knn_reference(train: np.ndarray, train_y: np.ndarray, test: np.ndarray, k: int, T: float, n_classes: int):
    """DINO's eval_knn, one test image at a time with plain loops: L2-normalise, cosine similarities,
    the k most similar, votes exp(s / T) summed per class; returns (predictions, normalised votes)."""
    preds, probs = [], []
    for q in test:
        qn = q / max(np.sqrt(sum(v * v for v in q)), 1e-12)
        sims = []
        for j, t in enumerate(train):
            tn = t / max(np.sqrt(sum(v * v for v in t)), 1e-12)
            sims.append((float(sum(a * b for a, b in zip(qn, tn, strict=True))), j))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * n_classes
        for s, j in sims[:k]:
            votes[int(train_y[j])] += np.exp(s / T)
        total = sum(votes)
        preds.append(int(np.argmax(votes)))
        probs.append([v / total for v in votes])
    return np.array(preds), np.array(probs)


def test_knn_by_hand_the_temperature_decides() -> None:
    # Query (1, 0.2): cosine 0.9806 to (1, 0) [class 0], 0.8321 to (1, 1) and 0.1961 to (0, 1) [class 1].
    train, y, query = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([0, 1, 1]), np.array([[1.0, 0.2]])
    sims, idx = KNNProbe(k=3).fit(train, y).kneighbors(query)
    assert idx.tolist() == [[0, 2, 1]] and sims[0] == pytest.approx([0.98058, 0.83205, 0.19612], abs=1e-5)
    # T = 0.07: e^14.01 for class 0 against e^11.89 + e^2.80 for class 1: class 0.
    assert KNNProbe(k=3, temperature=0.07).fit(train, y).predict(query).tolist() == [0]
    # T = 1: e^0.981 = 2.666 for class 0 against e^0.832 + e^0.196 = 3.515 for class 1: class 1.
    proba = KNNProbe(k=3, temperature=1.0).fit(train, y).predict_proba(query)
    assert proba[0] == pytest.approx([2.666 / 6.181, 3.515 / 6.181], abs=1e-3)
    assert KNNProbe(k=1, temperature=1.0).fit(train, y).predict(query).tolist() == [0]


@pytest.mark.parametrize("k", [1, 3, 10, 25])
def test_knn_equals_dinos_algorithm_written_with_loops(k: int) -> None:
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(4, 8))
    train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    train = centres[train_y] + rng.normal(scale=1.5, size=(60, 8))
    test = centres[test_y] + rng.normal(scale=1.5, size=(25, 8))
    ref_pred, ref_prob = dino_knn_reference(train, train_y, test, k, 0.07, 4)
    for block_rows in (7, 8192):  # blocks of 7 rows: the running top-k is merged across blocks
        probe = KNNProbe(k=k, temperature=0.07, block_rows=block_rows).fit(train, train_y)
        assert np.array_equal(probe.predict(test), ref_pred)
        assert np.allclose(probe.predict_proba(test), ref_prob, atol=1e-5)
    by_k = KNNProbe(k=k).fit(train, train_y).proba_by_k(test, [1, k, 200])
    assert sorted(by_k) == sorted({1, k, 60})  # k beyond the training set is capped at its size
    assert np.allclose(by_k[k], ref_prob, atol=1e-5)


@pytest.fixture
def small_cache(tiny_features: Path) -> Path:
    return tiny_features


def test_fit_knn_records_dinos_four_ks_and_streams_the_same(small_cache: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        cli,
        [
            "fit",
            "--clf",
            "knn",
            "--model",
            "resnet18",
            "--layer",
            "penultimate",
            "--cache-dir",
            str(small_cache),
            "--results-dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    [record] = json.loads(out.stdout)
    assert "k=20, T=0.07 (k=10:" in out.stderr
    knn = record["details"]["knn"]
    assert sorted(knn["accuracy_by_k"], key=int) == ["10", "20", "100", "150"]  # k = 200 is capped at 150 images
    assert knn["accuracy_by_k"]["20"] == record["metrics"]["accuracy"]
    train = cache.read(next(small_cache.glob("resnet18__digits__train__*.h5")))
    test = cache.read(next(small_cache.glob("resnet18__digits__test__*.h5")))
    assert train.meta["layer"] == "penultimate"
    for k in (20, 100):
        pred, _ = dino_knn_reference(train.X[:, :64], train.y, test.X[:3, :64], k, 0.07, 10)  # a slice, for speed
        assert np.array_equal(KNNProbe(k=k).fit(train.X[:, :64], train.y).predict(test.X[:3, :64]), pred)
    probe = KNNProbe(k=100).fit(train.X, train.y)
    assert float(np.mean(probe.predict(test.X) == test.y)) == knn["accuracy_by_k"]["100"]
    [streamed] = fit(
        FitConfig(
            clf="knn",
            model="resnet18",
            layer="penultimate",
            route="streaming",
            cache_dir=small_cache,
            results_dir=tmp_path / "s",
        )
    )
    assert streamed.record.details["route"] == "streaming"
    assert streamed.record.metrics["predictions"] == record["metrics"]["predictions"]
    loaded = load_classifier(streamed.path)  # the probe keeps the cache file's name and checksum, not a copy
    assert np.array_equal(loaded.predict(test.X), np.asarray(record["metrics"]["predictions"]["y_pred"]))


# --------------------------------------------------------------------------- the C search


def test_grid_extension_continues_the_grids_spacing() -> None:
    assert selection.grid_extension([1e-4, 3e-4, 1e-3, 3e-3, 0.01], upward=True) == [0.03, 0.1]
    assert selection.grid_extension([1e-4, 3e-4, 1e-3, 3e-3, 0.01], upward=False) == [1e-5, 3e-5]
    assert selection.grid_extension([0.1, 1.0, 10.0, 100.0], upward=True) == [1000.0]


def test_search_plan_is_a_validation_split_on_enough_images_else_cv() -> None:
    y = np.repeat(np.arange(10), 800)  # 8000 images: 1600 held out
    ids = [f"i{i}" for i in range(len(y))]
    [fold], how = selection.plan(y, ids, seed=0, n_folds=5)
    assert len(fold.val) == 1600 and len(np.intersect1d(fold.fit, fold.val)) == 0 and "validation split" in how
    assert np.bincount(y[fold.val]).tolist() == [160] * 10  # stratified
    big = np.repeat(np.arange(10), 6000)
    [fold], _ = selection.plan(big, [f"i{i}" for i in range(len(big))], seed=0, n_folds=5)
    assert len(fold.val) == 10_000  # at most 10,000
    folds, how = selection.plan(y[:2000], ids[:2000], seed=0, n_folds=5)
    assert len(folds) == 5 and how.startswith("5-fold cross-validation on 2000")
    assert selection.plan(np.array([0, 0, 1]), ["a", "b", "c"], seed=0, n_folds=5) is None


def _blobs(n: int, d: int = 20, noise: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n // 3)
    X = (rng.normal(size=(3, d))[y] + rng.normal(scale=noise, size=(len(y), d))).astype(np.float32)
    return X, y, [f"s{i}" for i in range(len(y))]


def test_warm_started_path_scores_equal_cold_fits() -> None:
    X, y, ids = _blobs(600)
    spec = SPECS["logreg"]
    grid = [1e-3, 1e-2, 0.1, 1.0]
    fold = selection.folds(y, 3, seed=0)[0]
    data = [selection._fold_data(spec, X, y, ids, fold, 0)]
    path = selection.Path(spec, Params(), data)
    path.run(grid)
    Xf, yf, Xv, yv = data[0]
    for C in grid:
        cold = LogReg(C=C).fit(Xf, yf)
        assert path.scores[C] == [float(np.mean(cold.predict(Xv) == yv))]
    warm = path.last[0]
    assert warm.C == 1.0 and np.allclose(warm.coef_, LogReg(C=1.0).fit(Xf, yf).coef_, atol=2e-3)


class Monotone:
    """A stand-in classifier whose validation accuracy grows (or falls) with log C, row by row: it
    predicts the nearest class centre, wrong on the rows whose index % 100 is beyond its share."""

    def __init__(self, C: float = 1.0, rising: bool = True) -> None:
        self.C, self.rising = C, rising

    def set_params(self, **kw: float) -> Monotone:
        self.__dict__.update(kw)
        return self

    def fit(self, X: np.ndarray, y: np.ndarray) -> Monotone:
        self.centres_ = np.stack([X[y == c].mean(0) for c in range(3)])
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        share = np.clip((np.log10(self.C) + 7) / 10, 0, 1)
        share = share if self.rising else 1 - share
        right = np.argmin(((X[:, None, :] - self.centres_[None]) ** 2).sum(-1), axis=1)
        return np.where(np.arange(len(X)) % 100 < 100 * share, right, (right + 1) % 3)


def test_best_c_on_an_edge_widens_the_grid_then_warns(caplog: pytest.LogCaptureFixture) -> None:
    X, y, ids = _blobs(300, noise=0.5)
    rising = ClassifierSpec("m", "m", "linear", "", lambda p: Monotone(p.C), ("C",), (1e-6, 3e-6))
    with caplog.at_level(logging.WARNING, logger="tlfeat.selection"):
        found = selection.choose_C(rising, Params(), X, y, ids, seed=0, n_folds=3)
    assert found["grid"] == [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4]  # widened upward twice, a decade each time
    assert found["on_edge"] and found["C"] == 3e-4 and "edge of the searched grid" in caplog.text
    falling = ClassifierSpec("m", "m", "linear", "", lambda p: Monotone(p.C, rising=False), ("C",), (0.1, 1.0, 10.0))
    down = selection.choose_C(falling, Params(), X, y, ids, seed=0, n_folds=3)
    assert down["grid"] == [0.001, 0.01, 0.1, 1.0, 10.0] and down["C"] == 0.001 and down["on_edge"]
    inside = selection.choose_C(SPECS["logreg"], Params(), *_blobs(300, noise=6.0), seed=0, n_folds=3)
    assert not inside["on_edge"] and min(inside["grid"]) < inside["C"] < max(inside["grid"])
    assert inside["cv_accuracy"][inside["grid"].index(inside["C"])] == max(inside["cv_accuracy"])
    flat = ClassifierSpec("m", "m", "linear", "", lambda p: Monotone(1e3), ("C",), (0.1, 1.0, 10.0))  # every C ties
    plateau = selection.choose_C(flat, Params(), X, y, ids, seed=0, n_folds=3)
    assert plateau["grid"] == [0.1, 1.0, 10.0] and plateau["C"] == 1.0 and not plateau["on_edge"]


# --------------------------------------------------------------------------- protocols


def test_clip_protocol_binary_search_and_refit_on_train_plus_val() -> None:
    X, y, ids = _blobs(300, d=10, noise=4.0)
    pipeline, details = protocols.clip(X, y, ids, seed=0)
    exps = sorted(round(8 * np.log10(c)) for c in details["grid"])
    assert set(range(-48, 49, 16)) <= set(exps) and len(exps) <= 7 + 8  # 7 starts, then at most 2 per halving
    best = round(8 * np.log10(details["C"]))
    assert {best - 1, best + 1} & set(range(-48, 49)) <= set(exps)  # refined down to 1/8 decade around the peak
    accs = dict(zip(exps, details["val_accuracy"], strict=True))
    assert accs[best] == max(accs.values())
    assert details["n_fit"] + details["n_val"] == len(y) and not details["standardised"]
    ref = LogReg(C=details["C"], max_iter=1000).fit(X, y)  # refitted on every training image, raw features
    assert np.allclose(pipeline[-1].coef_, ref.coef_) and "scale" not in pipeline.named_steps


def test_dinov2_heads_follow_torch_sgd_with_momentum_and_a_cosine_schedule() -> None:
    import torch

    X, y, _ = _blobs(150, d=6)
    lrs, iterations, k = (1e-3, 0.1), 12, 3
    W, b = protocols.train_heads(X, y, k, lrs, iterations, seed=3)
    # The reference: one torch Linear per learning rate, torch's SGD and CosineAnnealingLR, fed the same
    # initial weights and batches (the sampler's draws repeated from the same generator).
    rng = np.random.default_rng(3)
    W0 = (rng.standard_normal((6, len(lrs) * k)) * 0.01).astype(np.float32)
    heads = [torch.nn.Linear(6, k) for _ in lrs]
    for h, head in enumerate(heads):
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(W0[:, h * k : (h + 1) * k].T.copy()))
            head.bias.zero_()
    opt = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr * 128 / 256} for head, lr in zip(heads, lrs, strict=True)],
        momentum=0.9,
        weight_decay=0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=0)
    order, pos = rng.permutation(len(y)), 0
    for _ in range(iterations):
        if pos + 128 > len(y):
            order, pos = rng.permutation(len(y)), 0
        idx = order[pos : pos + 128]
        pos += 128
        xb, yb = torch.from_numpy(X[idx]), torch.from_numpy(y[idx])
        loss = sum(torch.nn.functional.cross_entropy(head(xb), yb) for head in heads)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for h, head in enumerate(heads):
        assert np.allclose(W[:, h * k : (h + 1) * k], head.weight.detach().numpy().T, atol=1e-5)
        assert np.allclose(b[h * k : (h + 1) * k], head.bias.detach().numpy(), atol=1e-5)


def test_protocols_through_fit_are_in_the_key_and_the_record(small_cache: Path, tmp_path: Path) -> None:
    base = dict(cache_dir=small_cache, results_dir=tmp_path, model="resnet18")
    [plain] = fit(FitConfig(**base, C=1.0, layer="penultimate"))  # type: ignore[arg-type]
    [clip] = fit(FitConfig(**base, protocol="clip", layer="penultimate"))  # type: ignore[arg-type]
    assert clip.record.method == "protocol:clip" and clip.path != plain.path
    assert clip.record.details["protocol"]["name"] == "clip" and clip.record.config["protocol"] == "clip"
    assert "protocol-clip" in clip.path.parent.name
    assert clip.record.params["C"] == clip.record.details["protocol"]["C"]
    train = cache.read(next(small_cache.glob("resnet18__digits__train__*.h5")))
    assert np.allclose(load_classifier(clip.path).predict_proba(train.X[:5]), LogReg(C=clip.record.params["C"], max_iter=1000).fit(train.X, train.y).predict_proba(train.X[:5]), atol=1e-6)  # fmt: skip


# --------------------------------------------------------------------------- concatenated layers, k-shot


def test_concatenated_layers_fit_the_parts_side_by_side(small_cache: Path, tmp_path: Path) -> None:
    base = dict(cache_dir=small_cache, results_dir=tmp_path, C=0.1, model="resnet18")
    [both] = fit(FitConfig(**base, layer="layer3+penultimate"))  # type: ignore[arg-type]
    [part] = fit(FitConfig(**base, layer="layer3"))  # type: ignore[arg-type]
    assert both.record.layer == "layer3+penultimate" and both.record.details["n_features"] == 256 + 512
    assert both.path != part.path
    parts = both.record.provenance["features"]["train"]["parts"]
    assert [p["layer"] for p in parts] == ["layer3", "penultimate"]
    sets = {
        s: {fs.meta["layer"]: fs for fs in map(cache.read, small_cache.glob(f"resnet18__*__{s}__*.h5"))}
        for s in ("train", "test")
    }
    Xtr = np.hstack([sets["train"]["layer3"].X, sets["train"]["penultimate"].X])
    Xte = np.hstack([sets["test"]["layer3"].X, sets["test"]["penultimate"].X])
    from tlfeat.classifiers import make_classifier
    from tlfeat.fitting import pairs

    [pair] = pairs(FitConfig(cache_dir=small_cache, model="resnet18", layer="layer3+penultimate"))
    (train, test), (lazy_train, _) = pair.read(lazy=False), pair.read(lazy=True)
    assert np.array_equal(train.X, Xtr) and np.array_equal(test.X, Xte) and train.ids == sets["train"]["layer3"].ids
    assert np.array_equal(lazy_train.X[[5, 1, 7]], Xtr[[5, 1, 7]]) and lazy_train.X.shape == Xtr.shape
    ref = make_classifier("logreg", C=0.1).fit(Xtr, sets["train"]["layer3"].y).predict(Xte)
    assert both.record.metrics["predictions"]["y_pred"] == ref.tolist()
    [streamed] = fit(
        FitConfig(**{**base, "results_dir": tmp_path / "s"}, layer="layer3+penultimate", route="streaming")
    )  # type: ignore[arg-type]
    assert streamed.record.details["route"] == "streaming" and streamed.record.n_train == both.record.n_train
    out = CliRunner().invoke(cli, ["fit", "--layer", "layer1+penultimate", "--cache-dir", str(small_cache), "--results-dir", str(tmp_path)])  # fmt: skip
    assert out.exit_code == 2 and "no cached features" in out.output and "--layer layer1" in out.output, out.output


def test_k_shot_subsets_are_n_per_class_fixed_per_draw(small_cache: Path, tmp_path: Path) -> None:
    y = np.array([0] * 10 + [1] * 10 + [2] * 2)
    ids = [f"x{i}" for i in range(len(y))]
    a, again, other = shot_subset(y, 3, 0, ids), shot_subset(y, 3, 0, ids), shot_subset(y, 3, 1, ids)
    assert np.bincount(y[a]).tolist() == [3, 3, 2] and np.array_equal(a, again) and not np.array_equal(a, other)
    moved = shot_subset(y[::-1], 3, 0, ids[::-1])  # chosen by id, not by position
    assert sorted(ids[::-1][i] for i in moved) == sorted(ids[i] for i in a)
    [run] = fit(
        FitConfig(
            cache_dir=small_cache, results_dir=tmp_path, shots=2, shot_draw=1, model="resnet18", layer="penultimate"
        )
    )
    assert run.record.n_train == 20 and run.record.details["shots"] == {
        "per_class": 2,
        "draw": 1,
        "n_train": 20,
        "short_classes": {},
    }
    assert run.record.details["cv"]["chosen_by"].startswith("2-fold cross-validation on 20")  # folds <= per class
    [one] = fit(FitConfig(cache_dir=small_cache, results_dir=tmp_path, shots=1, model="resnet18", layer="penultimate"))
    assert one.record.n_train == 10 and one.record.details["cv"]["chosen_by"].startswith("default")
    assert "-2shot-draw1" in run.path.parent.name
