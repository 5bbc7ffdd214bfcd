"""Frozen configs: what the CLI builds from its options and the library acts on.

Each field is declared once, here: whether it changes the numbers (`key`, so it reaches the cache
or result key) or not (`setting`), its bounds and its help text. The CLI turns these into options;
`__post_init__` validates. Environment variables are read in this module only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tlfeat import classifier_specs
from tlfeat.backbones.base import PENULTIMATE, POOLS, parse_layers
from tlfeat.constraints import Choice, Interval, NameList, Pattern, Positive, Text, key, setting, validate

# --------------------------------------------------------------------------- environment


def env(name: str, default: str = "") -> str:
    """An environment variable, or `default` when unset or empty."""
    return os.environ.get(name) or default


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "")
    return default if value == "" else value not in ("0", "false", "no")


def default_cache_dir() -> Path:
    return Path(env("TLFEAT_CACHE_DIR", "features_cache"))


def default_results_dir() -> Path:
    return Path(env("TLFEAT_RESULTS_DIR", "results"))


def tlfeat_home() -> Path:
    """Where tlfeat keeps downloads shared by all projects (`TLFEAT_HOME`, ~/.cache/tlfeat)."""
    if home := env("TLFEAT_HOME"):
        return Path(home).expanduser()
    xdg = env("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tlfeat"


def model_cache_dir() -> Path:
    """Where ONNX exports live (`TLFEAT_MODEL_CACHE`, default TLFEAT_HOME/models): one per user, shared
    by every cache folder and project, like torch's TORCH_HOME for weights."""
    if folder := env("TLFEAT_MODEL_CACHE"):
        return Path(folder).expanduser()
    return tlfeat_home() / "models"


def default_data_dir() -> Path:
    return Path(env("TLFEAT_DATA_DIR")).expanduser() if env("TLFEAT_DATA_DIR") else tlfeat_home() / "data"


def torch_home() -> Path:
    """torch's hub folder without importing torch (the rule of `torch.hub.get_dir`)."""
    base = env("TORCH_HOME") or os.path.join(env("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(base).expanduser() / "hub"


def hf_hub_cache() -> Path:
    """Hugging Face's hub cache (timm, open_clip and transformers share it), found without importing it."""
    if value := env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE"):
        return Path(value).expanduser()
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def open_clip_cache() -> Path:
    """Where open_clip keeps weights it downloads from a URL (its default, `~/.cache/clip`)."""
    return Path(env("TLFEAT_OPEN_CLIP_CACHE", "~/.cache/clip")).expanduser()


def hub_offline() -> bool:
    """No download from any model hub: TLFEAT_OFFLINE, or Hugging Face's own HF_HUB_OFFLINE."""
    return offline() or env_flag("HF_HUB_OFFLINE")


def cores() -> int:
    """CPUs this process may use (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def offline() -> bool:
    """TLFEAT_OFFLINE=1: never try torchvision's downloads of weights and datasets (tests, machines
    behind a package mirror). Files carried by registry packages are still fetched from the index."""
    return env_flag("TLFEAT_OFFLINE")


def flush_every() -> int:
    """Images per saved block: the most an interrupted run can lose (TLFEAT_FLUSH_EVERY)."""
    try:
        return max(1, int(env("TLFEAT_FLUSH_EVERY", "1024")))
    except ValueError:
        return 1024


MAX_IMAGE_MB = 256  # a larger file is no photo PIL would decode (its bomb limit is about 179 megapixels)


def max_image_bytes() -> int:
    """The largest image file (or shard member) read, in bytes (TLFEAT_MAX_IMAGE_MB, default 256)."""
    text = env("TLFEAT_MAX_IMAGE_MB", str(MAX_IMAGE_MB))
    try:
        mb = float(text)
    except ValueError:
        mb = math.nan
    if not (0 < mb < 2**40):  # NaN, infinite, zero or negative: refused, never silently the default
        from tlfeat.errors import TlfeatError, printable

        raise TlfeatError(
            f"TLFEAT_MAX_IMAGE_MB={printable(text[:40])!r} is not a positive number of megabytes; set it to one "
            f"such as {MAX_IMAGE_MB} (the default), or unset it"
        )
    return max(int(mb * 2**20), 1)


def pin_malloc() -> bool:
    return env_flag("TLFEAT_PIN_MALLOC", True)


def results_key() -> bytes | None:
    """TLFEAT_RESULTS_KEY: a secret that signs saved classifiers (HMAC), kept outside the results folder."""
    value = env("TLFEAT_RESULTS_KEY")
    return value.encode() if value else None


# --------------------------------------------------------------------------- shared bounds

SEED = Interval(int, 0, 2**32 - 1)
IMAGE_SIZE = Interval(int, 16, 2048, nullable=True)
LIMIT = Interval(int, 1, 10**9, nullable=True)
EPOCHS = Interval(int, 1, 10_000)
REPEATS = Interval(int, 1, 1000)
BATCH = Interval(int, 1, 65536)
BATCH_OR_AUTO = Interval(int, 1, 65536, nullable=True)
WORKERS = Interval(int, 0, 256, nullable=True)
DEVICE = Pattern(r"cpu|cuda(:\d+)?|mps", "cpu, cuda, cuda:N or mps")
DEVICES = Pattern(r"cpu|cuda(:\d+(,\d+)*)?|mps", "cpu, cuda, cuda:N or mps, or several GPUs as cuda:0,1,...")
NAME = Text()
OPTIONAL_NAME = Text(nullable=True)
ON_ERROR = ("fail", "skip")
BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16")
DECODES = ("auto", "cpu", "device")
TRAIN_PRECISIONS = ("fp32", "bf16")
ENGINES = ("local", "ray")
AUGMENTS = ("auto", "none", "flip", "crop", "standard")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("step", "cosine")
CLASSIFIERS = classifier_specs.classifiers()
KERNELS = classifier_specs.kernels()
PROTOCOLS = tuple(classifier_specs.PROTOCOLS)
ROUTES = ("auto", "memory", "streaming")
TABLE_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "macro_f1")  # what `fit --metric` can show

_LIMIT_HELP = "Fixed stratified subset of N training images (the test split stays whole; see --test-limit)."
_TEST_LIMIT_HELP = "Fixed stratified subset of N images of every evaluation split (default: all of them)."


def _paths(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and not isinstance(value, Path):
            object.__setattr__(config, name, Path(value))


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction request. `key` fields change the numbers and are in the cache key."""

    model: str = key(
        help="Model: a torchvision name (resnet50), or timm:NAME, open_clip:ARCH/TAG, hf:ORG/NAME, custom:MODULE:FUNCTION (see `tlfeat models`).",
        check=NAME,
        cli="--model",
    )
    data: str = key(help="Dataset name (see `tlfeat datasets`), an image folder, or shards.", check=NAME)
    splits: tuple[str, ...] | None = setting(None, help="Split(s) to extract; default: every split.", cli="--split")
    layer: str | None = key(
        None,
        help="Layer(s) to pool instead of the penultimate one, comma-separated; a+b+c extracts each part (fit then concatenates them).",
        check=NameList(nullable=True),
    )
    pool: str | None = key(
        None,
        help="Transformers: pool the tokens as cls, mean (of the patch tokens, registers left out) or cls+mean (default: the model's own).",
        check=Choice(POOLS, nullable=True),
    )
    weights_id: str | None = key(
        None, help="Weights entry (torchvision default IMAGENET1K_V1; see `tlfeat models`).", check=OPTIONAL_NAME
    )
    weights_file: Path | None = key(
        None, help="Explicit weights file (safetensors, a state dict or a tlfeat checkpoint).", cli="--weights"
    )
    untrained: bool = key(False, help="Random weights (seeded): a no-transfer baseline, marked as such.")
    seed: int = key(0, help="Seed for --untrained weights.", check=SEED)
    image_size: int | None = key(
        None, help="Crop size in pixels (default: the weights' own, e.g. 224).", check=IMAGE_SIZE
    )
    limit: int | None = key(None, help=_LIMIT_HELP, check=LIMIT)
    test_limit: int | None = key(None, help=_TEST_LIMIT_HELP, check=LIMIT)
    subset_seed: int = key(0, help="Seed of the --limit subsets (compare --resample varies it).", check=SEED)
    label_field: str = key("cls", help="Shards and Parquet: the field that holds the label.", check=NAME)
    fast_decode: bool = key(
        True,
        help="Decode JPEGs of 8x the resize or more at reduced size (DCT scaling), down to 4x the resize: features at cosine >= 0.999 to torchvision's, decoding 3.9x faster on 4000 x 3000 photos. --no-fast-decode: exactly torchvision's decode.",
        flag="--no-fast-decode",
    )
    precision: str = key("fp32", help="fp32, or bf16/fp16 (GPU autocast, torch backend).", check=Choice(PRECISIONS))
    backend: str = key(
        help="Inference engine (env TLFEAT_BACKEND). auto: ONNX Runtime on CPU where installed, else torch.",
        check=Choice(BACKENDS),
        factory=lambda: env("TLFEAT_BACKEND", "auto"),
    )
    device: str = key(
        "cpu",
        help="cpu, cuda, cuda:1, mps, or several GPUs: cuda:0,1,2,3 (one model replica each, one output, the same bits).",
        check=DEVICES,
    )
    decode: str = key(
        "auto",
        help="Where JPEGs are decoded and resized: cpu (PIL, in worker processes), device (decode_jpeg: nvJPEG on a "
        "GPU; resize, crop and normalise there too; other formats go to the CPU workers), auto (device on CUDA with "
        "--engine local, else cpu).",
        check=Choice(DECODES),
    )
    batch_size: int | None = setting(
        None, help="Images per batch (default 64; on CUDA, from the GPU's free memory).", check=BATCH_OR_AUTO
    )
    workers: int | None = setting(
        None,
        help="Decoding processes (default: one per core, at most 4; on CUDA, one per core but one).",
        check=WORKERS,
    )
    on_error: str = setting(
        "fail",
        help="An unreadable image: stop, naming it (finished blocks are kept), or skip and record it.",
        check=Choice(ON_ERROR),
    )
    update: bool = setting(
        True, help="Refuse to update a set whose images changed; name the changes.", flag="--no-update"
    )
    verify_content: bool = setting(False, help="Compare image contents, not only sizes and times, with the cache.")
    engine: str = setting("local", help="local, or ray: extract on a Ray cluster.", check=Choice(ENGINES))
    address: str | None = setting(
        None, help="Ray: 'auto' or ray://host:10001 (default: start Ray here).", check=OPTIONAL_NAME
    )
    num_workers: int | None = setting(
        None, help="Ray: model replicas (default: one per 2 CPUs).", check=Interval(int, 1, 4096, nullable=True)
    )
    gpus_per_worker: float = setting(0.0, help="Ray: GPUs per model replica.", check=Interval(float, 0, 64))
    cache_dir: Path = setting(help="Where feature files live (env TLFEAT_CACHE_DIR).", factory=default_cache_dir)
    data_dir: Path = setting(help="Where named datasets are read from (env TLFEAT_DATA_DIR).", factory=default_data_dir)
    progress: bool = setting(True, cli=None)

    def __post_init__(self) -> None:
        _paths(self, "weights_file", "cache_dir", "data_dir")
        from tlfeat.backbones.base import split_variant

        name, untrained = split_variant(self.model)
        if untrained:  # compare's MODEL:untrained is MODEL with --untrained
            object.__setattr__(self, "model", name)
            object.__setattr__(self, "untrained", True)
        if self.splits is not None:  # --split train --split train asks for one split
            object.__setattr__(self, "splits", tuple(dict.fromkeys(self.splits)))
        validate(self)
        self._check_devices()

    def _check_devices(self) -> None:
        from tlfeat.errors import TlfeatError

        indices = self.device.partition(":")[2].split(",")
        if len(set(indices)) < len(indices):
            raise TlfeatError(f"--device {self.device} names a GPU twice; list each one once")
        if self.engine == "ray" and len(indices) > 1:
            raise TlfeatError(
                "--engine ray places replicas itself: use --device cuda with --num-workers and --gpus-per-worker"
            )
        if self.decode == "device" and self.engine == "ray":
            raise TlfeatError("--decode device runs with --engine local; with --engine ray use --decode cpu")
        if self.decode == "device" and self.device == "mps":
            raise TlfeatError("--decode device needs --device cpu or cuda (torchvision decodes no JPEG on mps)")

    def devices(self) -> list[str]:
        """One device per model replica: cuda:0,1 -> [cuda:0, cuda:1]."""
        head, _, indices = self.device.partition(":")
        return [f"{head}:{i}" for i in indices.split(",")] if indices else [self.device]

    def resolved_decode(self) -> str:
        """cpu or device: what --decode auto means here (device on CUDA, when this process runs the network)."""
        if self.decode != "auto":
            return self.decode
        return "device" if self.device.startswith("cuda") and self.engine == "local" else "cpu"

    def layers(self) -> list[str | None]:
        """The layers asked for: [None] for the penultimate one."""
        return parse_layers(self.layer)

    def split_limit(self, split: str) -> int | None:
        """`--limit` applies to training images, `--test-limit` to every evaluation split."""
        return self.limit if split == "train" else self.test_limit

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir)


@dataclass(frozen=True)
class FitConfig:
    """A classifier on cached features; selectors pick the feature sets, `key` fields the classifier."""

    clf: str = key("logreg", help=classifier_specs.clf_help(), check=Choice(CLASSIFIERS))
    kernel: str = key("linear", help="SVM kernel: linear or rbf (rbf for small data).", check=Choice(KERNELS))
    C: float | None = key(
        None,
        help=(
            "Inverse regularisation strength on standardised features (larger: less regularisation; logreg and "
            "linear add ||W||^2 / (2 C n) to the mean cross-entropy, the SVM is liblinear's C). Default: chosen on "
            "a validation split of train (CV on small sets) along a warm-started path."
        ),
        check=Positive(nullable=True),
        cli="--C",
    )
    epochs: int = key(50, help="Epochs of the linear head.", check=EPOCHS)
    lr: float = key(1e-2, help="Learning rate of the linear head.", check=Positive())
    k: int = key(
        20,
        help="knn: neighbours that vote (DINO's 10, 20, 100 and 200 are all recorded).",
        check=Interval(int, 1, 10_000),
    )
    temperature: float = key(
        0.07, help="knn: T of the vote weights exp(cosine / T).", check=Positive(high=100.0), cli="--knn-temperature"
    )
    protocol: str | None = key(
        None,
        help="A paper's evaluation protocol (sets the classifier): clip (CLIP's logistic-regression probe), dinov2 (DINOv2's linear layer over a grid of learning rates).",
        check=Choice(PROTOCOLS, nullable=True),
    )
    shots: int | None = key(
        None,
        help="Fit on N training images per class (k-shot), drawn by a hash of the image ids.",
        check=Interval(int, 1, 1_000_000, nullable=True),
    )
    shot_draw: int = key(0, help="Which draw of the --shots images (another seed of the hash).", check=SEED)
    seed: int = key(0, help="Seed of the C search's split or folds and of the linear head.", check=SEED)
    cv_folds: int = key(5, help="Folds of the C search on small training sets.", check=Interval(int, 2, 20))
    route: str = key("auto", help="memory, streaming (features larger than RAM), or auto.", check=Choice(ROUTES))
    model: str | None = setting(None, help="Only features of this model.", check=OPTIONAL_NAME)
    data: str | None = setting(None, help="Only this dataset.", check=OPTIONAL_NAME)
    layer: str | None = setting(None, help="Only features of this layer.", check=OPTIONAL_NAME)
    weights_id: str | None = setting(
        None, help="Only features of these weights (e.g. untrained:seed0).", check=OPTIONAL_NAME
    )
    image_size: int | None = setting(None, help="Only features at this crop size.", check=IMAGE_SIZE)
    limit: int | None = setting(None, help="Only features of this --limit.", check=LIMIT)
    test_limit: int | None = setting(None, help="Only features of this --test-limit.", check=LIMIT)
    subset_seed: int | None = setting(
        None, help="Only features of this --subset-seed.", check=Interval(int, 0, 2**32 - 1, nullable=True)
    )
    memory_gb: float | None = setting(
        None,
        help="Memory the fit may use; larger feature sets stream from disk.",
        check=Positive(nullable=True, high=1e5),
    )
    refit: bool = setting(False, help="Fit again even when this exact fit is saved (the old result is kept).")
    cache_dir: Path = setting(help="Where feature files live (env TLFEAT_CACHE_DIR).", factory=default_cache_dir)
    results_dir: Path = setting(help="Where results are saved (env TLFEAT_RESULTS_DIR).", factory=default_results_dir)

    def __post_init__(self) -> None:
        _paths(self, "cache_dir", "results_dir")
        validate(self)
        from tlfeat.errors import TlfeatError

        if self.protocol is not None:
            wanted = classifier_specs.PROTOCOLS[self.protocol].clf
            if self.clf not in (wanted, _default(FitConfig, "clf")):
                raise TlfeatError(f"--protocol {self.protocol} fits --clf {wanted}, not --clf {self.clf}")
            if self.C is not None:
                raise TlfeatError(f"--protocol {self.protocol} chooses its own hyperparameters; drop --C")
            object.__setattr__(self, "clf", wanted)
        if self.shots is None and self.shot_draw != _default(FitConfig, "shot_draw"):
            raise TlfeatError(
                f"--shot-draw {self.shot_draw} needs --shots N (which draw of N training images per class)"
            )
        spec = classifier_specs.spec_of(self.clf, self.kernel)
        unused = [
            name
            for name in classifier_specs.OPTIONS
            if name not in spec.options and getattr(self, name) not in (None, _default(FitConfig, name))
        ]
        if unused:
            from dataclasses import fields

            from tlfeat.constraints import option_name

            option = option_name(next(f for f in fields(self) if f.name == unused[0]))
            raise TlfeatError(f"{option} does not apply to --clf {spec.method}")

    @property
    def spec(self) -> classifier_specs.ClassifierSpec:
        return classifier_specs.spec_of(self.clf, self.kernel)

    @property
    def method(self) -> str:
        """The method's name in records and reports: `svm-rbf`, `knn`, `protocol:clip`."""
        from tlfeat.records import Method

        return str(Method.frozen(self.clf, self.kernel, self.protocol))

    def selectors(self) -> dict[str, Any]:
        names = ("layer", "weights_id", "image_size", "limit", "test_limit", "subset_seed")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


# The recipes fine-tuning starts from when the user leaves a field unset: transfer (a pretrained
# backbone) and scratch (random weights, which need a larger learning rate, momentum SGD with a
# warm-up and a cosine decay, and more epochs to learn anything).
RECIPES: dict[str, dict[str, Any]] = {
    "transfer": {
        "optimizer": "adam",
        "lr": 1e-3,
        "schedule": "step",
        "warmup_epochs": 0,
        "weight_decay": 0.0,
        "epochs": 25,
        "precise_bn": 0,
    },
    "scratch": {
        "optimizer": "sgd",
        "lr": 0.05,
        "schedule": "cosine",
        "warmup_epochs": 1,
        "weight_decay": 5e-4,
        "epochs": 50,
        "precise_bn": 20,
    },
}


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Fields left as None take the strategy's recipe, recorded once resolved."""

    model: str = key(
        help="Model (torchvision name, timm:NAME, open_clip:ARCH/TAG, hf:ORG/NAME...).", check=NAME, cli="--model"
    )
    data: str = key(help="Dataset name or image folder.", check=NAME)
    strategy: str = key(
        "full", help="full, head, freeze:K, discriminative[:RATIO] or scratch (random weights).", check=NAME
    )
    epochs: int | None = key(
        None, help="Epochs (default 25; scratch 50).", check=Interval(int, 1, 10_000, nullable=True)
    )
    lr: float | None = key(
        None,
        help="Learning rate of the head (default 1e-3 with Adam; scratch 0.05 with SGD).",
        check=Positive(nullable=True),
    )
    optimizer: str | None = key(
        None, help="adam or sgd (momentum 0.9); default adam, scratch sgd.", check=Choice(OPTIMIZERS, nullable=True)
    )
    schedule: str | None = key(
        None,
        help="step (lr / 10 every --step-size epochs) or cosine; default step, scratch cosine.",
        check=Choice(SCHEDULES, nullable=True),
    )
    step_size: int = key(7, help="step schedule: divide the learning rate by 10 every N epochs.", check=EPOCHS)
    gamma: float = key(0.1, help="step schedule: the factor.", check=Positive(high=1.0), cli=None)
    warmup_epochs: int | None = key(
        None, help="Epochs of linear warm-up (default 0; scratch 1).", check=Interval(int, 0, 100, nullable=True)
    )
    weight_decay: float | None = key(
        None, help="L2 weight decay (default 0; scratch 5e-4).", check=Interval(float, 0, 1, nullable=True)
    )
    batch_size: int = key(32, help="Images per step.", check=Interval(int, 1, 4096))
    augment: str = key(
        "auto",
        help="none, flip, crop, standard (crop + flip); auto: no flip for digits and MNIST-like data.",
        check=Choice(AUGMENTS),
    )
    precise_bn: int | None = key(
        None,
        help="Batches that recompute BatchNorm statistics before each evaluation (default 0; scratch 20).",
        check=Interval(int, 0, 10_000, nullable=True),
    )
    image_size: int | None = key(None, help="Crop size in pixels (default: the weights' own).", check=IMAGE_SIZE)
    limit: int | None = key(None, help=_LIMIT_HELP, check=LIMIT)
    test_limit: int | None = key(None, help=_TEST_LIMIT_HELP, check=LIMIT)
    subset_seed: int = key(0, help="Seed of the --limit subsets.", check=SEED)
    label_field: str = key("cls", help="Shards and Parquet: the field that holds the label.", check=NAME)
    seed: int = key(0, help="Seed of the head, the shuffling and the augmentation.", check=SEED)
    weights_id: str | None = key(
        None, help="Weights entry (torchvision default IMAGENET1K_V1; see `tlfeat models`).", check=OPTIONAL_NAME
    )
    weights_file: Path | None = key(
        None, help="Start from this file, e.g. best.pt of an earlier fine-tune.", cli="--weights"
    )
    untrained: bool = key(False, help="Random backbone weights (what scratch always uses).")
    precision: str = key(
        "fp32",
        help="fp32, or bf16: autocast of the forward pass and the loss (for GPUs).",
        check=Choice(TRAIN_PRECISIONS),
    )
    augment_on: str = key(
        "auto",
        help="Where training crops, flips and normalisation happen: cpu (in the loader workers), device (on the "
        "GPU, from uint8 images the workers resize), auto (device on CUDA).",
        check=Choice(DECODES),
    )
    workers: int | None = setting(
        None,
        help="DataLoader worker processes (default: one per core, at most 4; on CUDA, one per core but one).",
        check=WORKERS,
    )
    device: str = setting("cpu", help="cpu, cuda, cuda:1 or mps.", check=DEVICE)
    resume: bool = setting(False, help="Continue an interrupted run of the same configuration.")
    keep_last: bool = setting(False, help="Keep last.pt (with optimizer state) once the run completes.")
    data_dir: Path = setting(help="Where named datasets are read from (env TLFEAT_DATA_DIR).", factory=default_data_dir)
    results_dir: Path = setting(help="Where results are saved (env TLFEAT_RESULTS_DIR).", factory=default_results_dir)
    progress: bool = setting(True, cli=None)

    def __post_init__(self) -> None:
        _paths(self, "weights_file", "data_dir", "results_dir")
        validate(self)
        from tlfeat.strategies import parse

        strategy = parse(self.strategy)
        object.__setattr__(self, "strategy", str(strategy))
        if strategy.kind == "scratch":  # random weights whatever else was said: one key for one run
            object.__setattr__(self, "untrained", True)
            object.__setattr__(self, "weights_id", None)
            object.__setattr__(self, "weights_file", None)
        recipe = RECIPES["scratch" if strategy.kind == "scratch" else "transfer"]
        for name, value in recipe.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    @property
    def learning_rate(self) -> float:
        return float(self.lr or 0.0)

    def resolved_augment_on(self) -> str:
        """cpu or device: what --augment-on auto means here (device on CUDA)."""
        if self.augment_on != "auto":
            return self.augment_on
        return "device" if self.device.startswith("cuda") else "cpu"

    def split_limit(self, split: str) -> int | None:
        return self.limit if split == "train" else self.test_limit


@dataclass(frozen=True)
class CompareConfig:
    """Models x datasets x methods x repeats; the fit and fine-tune options pass through."""

    models: tuple[str, ...] = key(help="Comma-separated model names, e.g. mobilenet_v2,resnet50.", cli="--models")
    datas: tuple[str, ...] = key(help="Comma-separated dataset names or folders.", cli="--data")
    methods: tuple[str, ...] = key(
        ("logreg", "finetune:full"),
        help=(
            f"Comma-separated: {', '.join(classifier_specs.frozen_methods())}, finetune:STRATEGY, scratch, "
            "chain:DATASET:STRATEGY (fine-tune on DATASET first, then on the target)."
        ),
    )
    repeats: int = key(
        1, help="Runs per configuration (seeds seed..seed+N-1); mean, spread and intervals.", check=REPEATS
    )
    resample: bool = key(False, help="Each repeat also draws its own --limit subset of training images.")
    layers: tuple[str, ...] = key(
        (),
        help="Feature layers to sweep with the first frozen method (one pass over the images); a+b is their concatenation. A layer some models lack is swept for the others (one note line says so).",
    )
    shots: tuple[int, ...] = key(
        (),
        help="k-shot curves: each frozen method also on N training images per class, for each N (e.g. 1,2,4,8,16).",
    )
    shot_draws: int = key(5, help="Draws of the --shots images per N (by a hash of the ids).", check=REPEATS)
    epochs: int | None = key(
        None, help="Fine-tuning epochs (default: the recipe's).", check=Interval(int, 1, 10_000, nullable=True)
    )
    scratch_epochs: int | None = key(
        None,
        help="Epochs of scratch runs (default: the scratch recipe's).",
        check=Interval(int, 1, 10_000, nullable=True),
    )
    lr: float | None = key(
        None, help="Fine-tuning learning rate (default: the recipe's).", check=Positive(nullable=True)
    )
    batch_size: int = key(32, help="Fine-tuning batch size.", check=Interval(int, 1, 4096))
    optimizer: str | None = key(
        None, help="Fine-tuning optimizer (default: the recipe's).", check=Choice(OPTIMIZERS, nullable=True)
    )
    augment: str = key(
        "auto", help="Fine-tuning augmentation: auto, none, flip, crop, standard.", check=Choice(AUGMENTS)
    )
    C: float | None = key(
        None, help="C of the frozen classifiers (default: cross-validated).", check=Positive(nullable=True), cli="--C"
    )
    image_size: int | None = key(None, help="Crop size in pixels for every method.", check=IMAGE_SIZE)
    limit: int | None = key(None, help=_LIMIT_HELP, check=LIMIT)
    test_limit: int | None = key(None, help=_TEST_LIMIT_HELP, check=LIMIT)
    label_field: str = key("cls", help="Shards and Parquet: the field that holds the label.", check=NAME)
    seed: int = key(0, help="First seed.", check=SEED)
    on_error: str = setting("fail", help="Unreadable images while extracting: fail or skip.", check=Choice(ON_ERROR))
    workers: int | None = setting(None, help="Decoding processes.", check=WORKERS)
    analyses: tuple[str, ...] = setting(
        (),
        help="Representation analyses for the report, on the test images: cka, rsa (between the swept layers and models), embed, neighbours.",
    )
    analysis_images: int = setting(
        1000, help="Test images the --analyses use at most (stratified).", check=Interval(int, 10, 20_000)
    )
    out: Path = setting(Path("reports/run"), help="Report folder (its report points to the runs in --results-dir).")
    replace: bool = setting(
        False,
        help="Let this comparison replace the report of a different one in --out (its runs stay in the result store).",
    )
    results_dir: Path = setting(
        help="Where runs are saved, beside every fit and fine-tune (env TLFEAT_RESULTS_DIR).",
        factory=default_results_dir,
    )
    cache_dir: Path = setting(help="Where feature files live (env TLFEAT_CACHE_DIR).", factory=default_cache_dir)
    data_dir: Path = setting(help="Where named datasets are read from (env TLFEAT_DATA_DIR).", factory=default_data_dir)
    progress: bool = setting(True, cli=None)
    command: str = setting("", cli=None)

    def __post_init__(self) -> None:
        _paths(self, "out", "results_dir", "cache_dir", "data_dir")
        for name in ("models", "datas", "methods", "layers", "analyses"):
            value = getattr(self, name)
            split = _split_datas if name == "datas" else _split
            object.__setattr__(self, name, tuple(value) if not isinstance(value, str) else split(value))
        object.__setattr__(self, "shots", _counts("--shots", self.shots))
        validate(self)
        from tlfeat.errors import TlfeatError

        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise TlfeatError(f"--analyses: unknown {', '.join(unknown)}; valid: {', '.join(ANALYSES)}")

    @property
    def runs_dir(self) -> Path:
        """The project's one result store: `tlfeat results` lists these runs and `fit` reuses their fits."""
        return Path(self.results_dir)


ANALYSES = ("cka", "rsa", "embed", "neighbours")  # what `compare --analyses` can add to a report


def _counts(option: str, value: Any) -> tuple[int, ...]:
    """Comma-separated whole numbers of at least 1, sorted, once each."""
    from tlfeat.errors import TlfeatError

    parts = _split(value) if isinstance(value, str) else tuple(value)
    try:
        numbers = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise TlfeatError(f"{option} must be comma-separated whole numbers, e.g. 1,2,4,8,16; got {value!r}") from None
    if any(n < 1 for n in numbers):
        raise TlfeatError(f"{option} must be whole numbers of at least 1; got {value!r}")
    return tuple(sorted(set(numbers)))


def _output_folder(path: Path) -> None:
    """--out must be a folder (or not exist yet): one clear line instead of "File exists" later."""
    from tlfeat.errors import TlfeatError

    if path.exists() and not path.is_dir():
        raise TlfeatError(f"--out {path} is a file; give a folder to write into")


def _default(cls: type, name: str) -> Any:
    from dataclasses import fields

    return next(f.default for f in fields(cls) if f.name == name)


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class AnalyzeConfig:
    """`tlfeat analyze cka|rsa|embed|neighbours`: analyses of cached features (nothing is extracted)."""

    models: tuple[str, ...] = setting(
        help="Model(s) whose cached features to analyse, comma-separated; MODEL:untrained for random weights.",
        cli="--model",
    )
    data: str = setting(help="Dataset the features were extracted from (as given to extract).", check=NAME)
    layers: tuple[str, ...] = setting((PENULTIMATE,), help="Cached layers to analyse.")
    split: str = setting("test", help="Split whose images are analysed.", check=NAME)
    images: int = setting(
        1000,
        help="Images analysed at most (stratified by class, by a hash of the ids).",
        check=Interval(int, 10, 20_000),
    )
    kernel: str = setting("linear", help="CKA kernel: linear or rbf.", check=Choice(("linear", "rbf")))
    debiased: bool = setting(True, help="CKA with the plain (biased) HSIC estimator.", flag="--biased")
    threshold: float = setting(
        1.0, help="RBF CKA: bandwidth as a multiple of the median distance.", check=Positive(), cli="--rbf-threshold"
    )
    distance: str = setting(
        "correlation",
        help="RSA dissimilarity: correlation or cosine distance.",
        check=Choice(("correlation", "cosine")),
    )
    methods: tuple[str, ...] = setting(("pca", "tsne"), help="Embeddings: pca, tsne, umap (umap-learn installed).")
    queries: int = setting(6, help="Neighbours: query images (test split).", check=Interval(int, 1, 100))
    k: int = setting(5, help="Neighbours: closest training images shown per query.", check=Interval(int, 1, 50))
    seed: int = setting(0, help="Seed of the image sample and of t-SNE.", check=SEED)
    weights_id: str | None = setting(
        None, help="Only features of these weights (e.g. untrained:seed0).", check=OPTIONAL_NAME
    )
    image_size: int | None = setting(None, help="Only features at this crop size.", check=IMAGE_SIZE)
    limit: int | None = setting(None, help="Only training features of this --limit.", check=LIMIT)
    test_limit: int | None = setting(None, help="Only evaluation features of this --test-limit.", check=LIMIT)
    subset_seed: int | None = setting(
        None, help="Only features of this --subset-seed.", check=Interval(int, 0, 2**32 - 1, nullable=True)
    )
    out: Path = setting(Path("analyses"), help="Folder for the PNG and CSV files.")
    cache_dir: Path = setting(help="Where feature files live (env TLFEAT_CACHE_DIR).", factory=default_cache_dir)
    data_dir: Path = setting(help="Where named datasets are read from (env TLFEAT_DATA_DIR).", factory=default_data_dir)

    def __post_init__(self) -> None:
        _paths(self, "out", "cache_dir", "data_dir")
        _output_folder(self.out)
        for name in ("models", "layers", "methods"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if not isinstance(value, str) else _split(value))
        validate(self)
        from tlfeat.errors import TlfeatError

        if not self.models or not self.layers:
            raise TlfeatError("--model and --layers each need at least one name")
        unknown = [m for m in self.methods if m not in EMBEDDINGS]
        if unknown:
            raise TlfeatError(f"--methods: unknown embedding {unknown[0]!r}; valid: {', '.join(EMBEDDINGS)}")


EMBEDDINGS = ("pca", "tsne", "umap")


@dataclass(frozen=True)
class LayerViewConfig:
    """`tlfeat analyze layers`: a network's first-layer filters and its activation maps of one photo."""

    model: str = setting(help="torchvision model name.", check=NAME, cli="--model")
    image: Path = setting(help="The photo to show the network.")
    weights_id: str | None = setting(
        None, help="torchvision weights entry (default IMAGENET1K_V1).", check=OPTIONAL_NAME
    )
    weights_file: Path | None = setting(None, help="Explicit weights file.", cli="--weights")
    untrained: bool = setting(False, help="Random weights (seeded).")
    image_size: int | None = setting(None, help="Crop size in pixels (default: the weights' own).", check=IMAGE_SIZE)
    channels: int = setting(8, help="Channels shown per block (the most active).", check=Interval(int, 1, 64))
    out: Path = setting(Path("analyses"), help="Folder for the PNG files.")

    def __post_init__(self) -> None:
        _paths(self, "image", "weights_file", "out")
        _output_folder(self.out)
        validate(self)


@dataclass(frozen=True)
class ExportConfig:
    """`tlfeat export`: a cached feature set with ids and labels, for tools that don't read HDF5."""

    model: str = setting(help="Model whose cached features to export.", check=NAME, cli="--model")
    data: str = setting(help="Dataset the features were extracted from (as given to extract).", check=NAME)
    out: Path = setting(help="Folder to write into.")
    format: str = setting(
        "npy", help="npy (features.npy + labels), parquet, or csv.", check=Choice(("npy", "parquet", "csv"))
    )
    splits: tuple[str, ...] | None = setting(
        None, help="Split(s) to export; default: every cached split.", cli="--split"
    )
    layer: str | None = setting(None, help="Only features of this layer.", check=OPTIONAL_NAME)
    weights_id: str | None = setting(
        None, help="Only features of these weights (e.g. untrained:seed0).", check=OPTIONAL_NAME
    )
    image_size: int | None = setting(None, help="Only features at this crop size.", check=IMAGE_SIZE)
    limit: int | None = setting(None, help="Only training features of this --limit.", check=LIMIT)
    test_limit: int | None = setting(None, help="Only evaluation features of this --test-limit.", check=LIMIT)
    subset_seed: int | None = setting(
        None, help="Only features of this --subset-seed.", check=Interval(int, 0, 2**32 - 1, nullable=True)
    )
    block_rows: int = setting(16384, help="Rows read and written at a time (memory stays flat).", check=BATCH)
    cache_dir: Path = setting(help="Where feature files live (env TLFEAT_CACHE_DIR).", factory=default_cache_dir)

    def __post_init__(self) -> None:
        _paths(self, "out", "cache_dir")
        _output_folder(self.out)
        if self.splits is not None:
            object.__setattr__(self, "splits", tuple(dict.fromkeys(self.splits)))
        validate(self)


def _split_datas(value: str) -> tuple[str, ...]:
    """Datasets: commas inside brace patterns and between the splits of one mapping do not separate."""
    from tlfeat.datasets.spec import split_list

    return split_list(value)


def with_changes(config: Any, **changes: Any) -> Any:
    """A copy of a frozen config with some fields changed (validated again)."""
    return replace(config, **changes)
