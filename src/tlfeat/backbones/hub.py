"""Hugging Face's hub cache, read without huggingface_hub (timm, open_clip and transformers share it).

Layout: `<cache>/models--ORG--NAME/snapshots/<revision>/<file>`, each file a link to
`blobs/<digest>`; `refs/main` names the revision. A large (LFS) file's blob is named by its sha256,
the digest the hub publishes: a file whose content disagrees with its blob name is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

from tlfeat import config
from tlfeat.backbones.base import Located
from tlfeat.errors import TlfeatError

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def repo_folder(repo_id: str) -> Path:
    return config.hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))


def snapshot(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id` (the revision `refs/main` names, else the newest), or None."""
    folder = repo_folder(repo_id)
    snaps = folder / "snapshots"
    if not snaps.is_dir():
        return None
    try:
        main = (folder / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    if main and (snaps / main).is_dir():
        return snaps / main
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def cached_repos() -> list[str]:
    """Every model repository in the cache, as `org/name`."""
    root = config.hf_hub_cache()
    if not root.is_dir():
        return []
    return sorted(p.name[len("models--") :].replace("--", "/", 1) for p in root.glob("models--*") if p.is_dir())


def find(repo_id: str, filenames: tuple[str, ...], folder: Path | None = None) -> Located | None:
    """The first of `filenames` in the cached snapshot of `repo_id` (or in `folder`), its sha256 checked
    against its blob's name where the hub published one."""
    from tlfeat import offline

    base = folder if folder is not None else snapshot(repo_id)
    if base is None:
        return None
    for name in filenames:
        path = base / name
        if not path.is_file():
            continue
        blob = path.resolve()
        digest = offline.sha256_known(path)
        if SHA256.match(blob.name) and blob.name != digest:
            raise TlfeatError(
                f"{path} has sha256 {digest[:12]}..., but the hub published {blob.name[:12]}... for it; "
                f"delete {repo_folder(repo_id)} and fetch it again"
            )
        return Located(path, "local" if folder is not None else "hf-cache", digest)
    return None


def download(repo_id: str, filenames: tuple[str, ...], extra: tuple[str, ...] = ()) -> Located:
    """Fetch the first of `filenames` that the repository has (and the `extra` files beside it)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise TlfeatError(
            "downloading from the Hugging Face hub needs huggingface_hub; pip install huggingface_hub"
        ) from exc
    errors = []
    for name in filenames:
        try:
            hf_hub_download(repo_id, name, cache_dir=str(config.hf_hub_cache()))
        except Exception as exc:  # noqa: BLE001 - a missing file or no network: try the next name
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        for other in extra:
            try:
                hf_hub_download(repo_id, other, cache_dir=str(config.hf_hub_cache()))
            except Exception:  # noqa: BLE001, S112 - optional files (a processor config) may be absent
                continue
        found = find(repo_id, (name,))
        if found is not None:
            return Located(found.path, "download", found.sha256)
    raise TlfeatError(f"could not download {repo_id} from the Hugging Face hub ({'; '.join(errors)})")
