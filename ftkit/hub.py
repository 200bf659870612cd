"""ModelScope and the Hugging Face hub: public datasets, models in the local caches, reachability.

Datasets are read only when a recipe names no local file; offline, that fails with a message that
says to point the recipe at a local copy. The cache look-ups read the file system only (no network,
no hub client imported), so `ftkit validate` and `--dry-run` can say where a model is at once.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ftkit.errors import DataError

#: Seconds to wait for a hub's host (or the proxy in front of it) to accept a connection. A
#: connected machine answers in well under one; offline, the hub clients retry for 20 s and more.
CONNECT_TIMEOUT_S = 3.0
MODELSCOPE_ENDPOINT = "https://modelscope.cn"


DATA_FIX = "download the data on a connected machine and set task.train_file to the file"


def load_hub_rows(spec: str, *, subset: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Rows of ``spec`` (``modelscope:ORG/NAME`` or ``huggingface:ORG/NAME``) as plain dicts.

    Offline, a one-line error within seconds (a cached Hugging Face dataset still loads): the hub
    clients would otherwise retry for 20 s and more, logging every attempt.
    """
    source, _, dataset_id = spec.partition(":")
    where = f"{spec} (subset {subset!r}, split {split!r})"
    if source == "modelscope":
        return _modelscope_rows(dataset_id, subset, split, where)
    if source == "huggingface":
        return _huggingface_rows(dataset_id, subset, split, where)
    raise DataError(f"unknown hub source {source!r} in {spec!r}: use modelscope:ORG/NAME or huggingface:ORG/NAME")


def _modelscope_rows(dataset_id: str, subset: str | None, split: str, where: str) -> list[dict[str, Any]]:
    try:
        # MsDataset needs extras that modelscope[datasets] would pin datasets to 4.x; imported
        # lazily so only users of hub data pay for (and need) it.
        from modelscope.msdatasets import MsDataset
    except ImportError as error:
        raise DataError(f"reading {where} needs ModelScope's dataset packages (missing: {error.name}); install "
                        f"them with pip (without letting it downgrade datasets), or {DATA_FIX}") from None
    why = unreachable(modelscope_endpoint())
    if why:
        raise DataError(f"could not load {where}: {why}; {DATA_FIX}")
    try:
        return [dict(row) for row in MsDataset.load(dataset_id, subset_name=subset, split=split)]
    except Exception as error:  # noqa: BLE001 - hub clients raise many unrelated types
        raise DataError(f"could not load {where} from ModelScope: {type(error).__name__}: {error}; "
                        f"{DATA_FIX}") from error


def _huggingface_rows(dataset_id: str, subset: str | None, split: str, where: str) -> list[dict[str, Any]]:
    import datasets
    from huggingface_hub import constants

    why = ("offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)" if datasets.config.HF_HUB_OFFLINE
           else unreachable(constants.ENDPOINT))
    try:
        with _datasets_offline(bool(why)):
            return [dict(row) for row in datasets.load_dataset(dataset_id, subset, split=split)]
    except Exception as error:  # noqa: BLE001 - hub clients raise many unrelated types
        cause = f"is not in the datasets cache and {why}" if why else \
            f"could not be loaded from the Hugging Face hub ({type(error).__name__}: {error})"
        raise DataError(f"{where} {cause}; {DATA_FIX}") from error


@contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """``datasets`` in offline mode for the block: its cache only, no retries.

    ``datasets`` reads ``HF_HUB_OFFLINE`` once, at import; its loaders check the module's
    setting at each call, which is what this switches (and puts back).
    """
    from datasets import config

    before = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = before


# -- models in the local caches ------------------------------------------------------------------

def modelscope_cache_root() -> Path:
    """Where ModelScope keeps downloads: ``$MODELSCOPE_CACHE``, else ``~/.cache/modelscope``."""
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()


def modelscope_config_dir() -> Path:
    """ModelScope's own folder (credentials, and a session file written on first contact)."""
    return Path(os.environ.get("MODELSCOPE_HOME") or Path.home() / ".modelscope").expanduser()


def modelscope_cached_model(model_id: str, revision: str | None = None) -> Path | None:
    """The folder of ``model_id`` in the ModelScope cache (one with a config.json), else None.

    Probes the layouts modelscope 1.40 (modelscope-hub 0.5) reuses offline: the older SDKs'
    folders (dots in the name written ``___``), then ``models/OWNER--NAME/snapshots/`` at
    ``revision``, else at master or main, else its only snapshot (tests/test_offline.py checks
    that modelscope finds the same folder).
    """
    root = modelscope_cache_root()
    owner, _, name = model_id.partition("/")
    names = (name.replace(".", "___"), name)
    candidates = [base / owner / n for base in (root / "models", root / "hub" / "models", root, root / "hub")
                  for n in names]
    snapshots = root / "models" / model_id.replace("/", "--") / "snapshots"
    candidates += [snapshots / revision] if revision else [snapshots / "master", snapshots / "main"]
    found = [folder for folder in candidates if (folder / "config.json").is_file()]
    if not found and not revision and snapshots.is_dir():
        only = [folder for folder in snapshots.iterdir() if (folder / "config.json").is_file()]
        found = only if len(only) == 1 else []
    return found[0] if found else None


def huggingface_cache_root() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("HF_HOME") or cache / "huggingface").expanduser() / "hub"


def huggingface_cached_model(model_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of ``model_id`` in the Hugging Face cache (one with a config.json), else None.

    As ``huggingface_hub`` resolves it offline: ``refs/REVISION`` (main by default) names the
    commit whose ``snapshots/COMMIT`` folder holds the files; a commit hash is its own folder.
    """
    repo = huggingface_cache_root() / f"models--{model_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit if commit else None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def model_revision(folder: Path) -> dict[str, str]:
    """Which revision of a model a run used, for its manifest; fast: no weights are read.

    ``commit``: the hub's commit hash, when ``folder`` is a Hugging Face cache snapshot
    (``snapshots/COMMIT``). ``fingerprint``: always, a SHA-256 over the files' names and sizes and
    the text of config.json and of the weights index, the same for the same files wherever they are.
    """
    import hashlib
    import re

    digest = hashlib.sha256()
    files = sorted(path for path in folder.rglob("*")
                   if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    for path in files:
        name = path.relative_to(folder).as_posix()
        digest.update(f"{name}\0{path.stat().st_size}\n".encode())
        if name in ("config.json", "model.safetensors.index.json"):
            digest.update(path.read_bytes())
    found = {"fingerprint": f"sha256:{digest.hexdigest()}"}
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        found["commit"] = folder.name
    return found


# -- downloads -----------------------------------------------------------------------------------

def modelscope_endpoint() -> str:
    """The address the ModelScope client calls: ``$MODELSCOPE_ENDPOINT``, ``$MODELSCOPE_DOMAIN`` or modelscope.cn."""
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN", "").strip()
    endpoint = endpoint or MODELSCOPE_ENDPOINT
    return endpoint if "://" in endpoint else f"https://{endpoint}"


def unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached, or None when its host (or the proxy for it) accepts a connection.

    One TCP connection with a short timeout, made before a download: offline, the hub clients
    otherwise retry with back-off for 20 s or more, logging every attempt, before they give up.
    """
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    if not url.hostname:
        return None  # not an address to check: the client reports it
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxies = urllib.request.getproxies()  # the *_proxy variables requests honours too
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{host}:{port} cannot be reached ({error.strerror or str(error) or type(error).__name__})"
    return None


def quiet_modelscope() -> None:
    """ModelScope logs each retry as a timestamped WARNING; ftkit reports a failed download in one line.

    ``MODELSCOPE_LOG_LEVEL``, when set, is the user's choice and is left alone.
    """
    if not os.environ.get("MODELSCOPE_LOG_LEVEL"):
        logging.getLogger("modelscope_hub").setLevel(logging.ERROR)


@contextmanager
def removed_on_failure(folder: Path, names: Sequence[str] | None = None) -> Iterator[None]:
    """Remove what a failed (or interrupted) download added under ``folder``.

    The new paths naming the model (one of ``names`` in a part of the path below ``folder``; all
    new paths when ``names`` is None), and the new folders that held them once empty, ``folder``
    included: a half-downloaded snapshot would look cached next time. Other new paths are kept, as
    another process may be downloading into the same cache.
    """
    before = _paths_under(folder) | ({folder} if folder.exists() else set())
    try:
        yield
    except BaseException:
        for path in sorted(_paths_under(folder) - before, key=lambda p: len(p.parts), reverse=True):
            if names is not None and not any(name in part for part in path.relative_to(folder).parts
                                             for name in names):
                continue
            with suppress(OSError):  # gone already: never hide the download's own error
                _remove(path)
            for parent in path.parents:
                if parent in before:
                    break
                with suppress(OSError):  # not empty: it holds something else now
                    parent.rmdir()
        raise


def _paths_under(folder: Path) -> set[Path]:
    return {Path(parent) / name for parent, dirs, files in os.walk(folder) for name in (*dirs, *files)}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
