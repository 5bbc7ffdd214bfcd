"""`compare --layers` over models with different layers: a layer some models lack is swept for the
others (one note line per model), a layer no model has is one problem per model, each said once."""

from __future__ import annotations

import pytest

from tlfeat.compare import cells, check, extract_config, skipped_layers
from tlfeat.config import CompareConfig
from tlfeat.errors import TlfeatError


def test_a_layer_some_models_lack_is_swept_for_the_others() -> None:
    cfg = CompareConfig(
        models=("mobilenet_v2", "resnet18:untrained", "resnet18"),
        datas=("digits",),
        methods=("knn",),
        layers=("features.13", "penultimate", "layer3+penultimate"),
    )
    check(cfg)  # no error: each layer is some model's
    assert skipped_layers(cfg) == [
        "note: mobilenet_v2 has no layer layer3+penultimate: swept for the other models only",
        "note: resnet18 has no layer features.13: swept for the other models only",
    ]
    swept = {(c.model, c.layer) for c in cells(cfg) if c.layer}
    assert swept == {
        ("mobilenet_v2", "features.13"),
        ("resnet18:untrained", "layer3+penultimate"),
        ("resnet18", "layer3+penultimate"),
    }
    by_model = {c.model: extract_config(cfg, c).layer for c in cells(cfg) if not c.layer}
    assert by_model == {
        "mobilenet_v2": "penultimate,features.13",
        "resnet18:untrained": "penultimate,layer3+penultimate",
        "resnet18": "penultimate,layer3+penultimate",
    }


def test_a_layer_no_model_has_is_an_error_said_once_per_model() -> None:
    cfg = CompareConfig(
        models=("mobilenet_v2", "resnet18:untrained", "resnet18"),
        datas=("digits",),
        methods=("knn",),
        layers=("features.99", "penultimate"),
    )
    with pytest.raises(TlfeatError) as caught:
        check(cfg)
    text = str(caught.value)
    assert text.startswith("2 problem(s), nothing was run: ")
    assert text.count("model 'resnet18' has no layer 'features.99'") == 1
    assert text.count("model 'mobilenet_v2' has no layer 'features.99'") == 1
