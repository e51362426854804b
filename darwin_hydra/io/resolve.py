"""Where a parent's weights are: a local directory, a ``zoo://`` model, or a Hub id.

Hub ids resolve through huggingface_hub's cache (``snapshot_download``), downloading only when
allowed (``parents.allow_download=true`` and not ``HF_HUB_OFFLINE``) and only the files a merge
needs: safetensors weights, JSON (config, index, tokenizer) and tokenizer files. Nothing here
imports model code: ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# What a merge needs from a Hub repo (never *.bin pickles unless asked, never code).
ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "merges.txt",
    "vocab.txt",
]
PICKLE_PATTERNS = ["pytorch_model*.bin"]
# Duplicates in other formats that some repos carry beside the transformers weights (Mistral, Llama).
IGNORE_PATTERNS = ["consolidated*", "original/*", "*.pth", "*.pt", "*.gguf", "onnx/*"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(FileNotFoundError):
    """A parent could not be found locally and was not (or could not be) downloaded."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (the environment now wins over what huggingface_hub read at import)."""
    if "HF_HUB_OFFLINE" in os.environ:
        return _truthy(os.environ["HF_HUB_OFFLINE"])
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def check_model_dir(path: Path, what: str | None = None) -> Path:
    """``path`` if it is a checkpoint directory (config.json and weights), else a clear error naming it."""
    what = what or str(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{what}: no such directory")
    problems = []
    if not (path / "config.json").is_file():
        problems.append("no config.json")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    if not has_weights:
        problems.append("no weights (*.safetensors or pytorch_model*.bin)")
    if problems:
        raise ModelNotFoundError(
            f"{what} ({path}) is not a model checkpoint: {' and '.join(problems)}. "
            "Point parents.father / parents.mother / parents.base at a directory saved with save_pretrained."
        )
    return path


def _looks_local(spec: str) -> bool:
    """A path rather than a Hub id (``org/name`` or ``name``)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec or not _HUB_ID.match(spec)


def resolve_model(
    spec: str,
    *,
    allow_download: bool = False,
    revision: str | None = None,
    zoo_resolver: Callable[[str], Path] | None = None,
    cache_dir: str | Path | None = None,
    allow_pickle: bool = False,
) -> Path:
    """The local directory of a model given as a path, ``zoo://name`` or a Hub id (``org/name``).

    - an existing local directory -> itself (error naming it when it lacks config.json or weights);
    - ``zoo://...`` -> ``zoo_resolver(spec)``;
    - otherwise a Hub id -> ``snapshot_download`` from the huggingface_hub cache (``cache_dir``, default
      the usual HF cache), with ``local_files_only`` unless ``allow_download`` and not ``HF_HUB_OFFLINE``.
      A model that is not there raises ``ModelNotFoundError`` naming it and saying how to get it.
    """
    spec = str(spec).strip()
    if not spec:
        raise ValueError("empty model spec: set parents.father / parents.mother to a directory, zoo:// or Hub id")
    if spec.startswith("zoo://"):
        if zoo_resolver is None:
            raise ValueError(f"{spec}: zoo:// models need the zoo (run through darwin-hydra, which builds it)")
        return check_model_dir(Path(zoo_resolver(spec)), spec)
    local = Path(spec).expanduser()
    if local.exists():
        return check_model_dir(local.absolute(), spec)
    if _looks_local(spec):
        raise ModelNotFoundError(f"{spec}: no such directory (and not a Hub id of the form org/name)")
    return _from_hub(spec, allow_download=allow_download, revision=revision, cache_dir=cache_dir, allow_pickle=allow_pickle)


def _from_hub(repo_id: str, *, allow_download: bool, revision: str | None, cache_dir, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    offline = hub_offline()
    local_only = not allow_download or offline
    at = f"@{revision}" if revision else ""
    patterns = ALLOW_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    if not local_only:
        why = "the Hub could not be reached"
    else:
        why = "HF_HUB_OFFLINE is set" if offline else "parents.allow_download=false"
    if local_only:
        how = (
            "unset HF_HUB_OFFLINE and set parents.allow_download=true"
            if offline
            else "set parents.allow_download=true"
        )
        fix = (
            f"Download it first (`hf download {repo_id}{' --revision ' + revision if revision else ''}`), "
            f"or {how}, or point parents.father / parents.mother at a local directory."
        )
    else:
        fix = "Check the id and revision, your network and HF_TOKEN (gated models need access granted on the Hub)."
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=patterns,
            ignore_patterns=IGNORE_PATTERNS,
            local_files_only=local_only,
        )
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        raise ModelNotFoundError(
            f"model {repo_id}{at} is not in the Hugging Face cache and cannot be downloaded now ({why}). {fix}"
        ) from e
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError, hf_errors.GatedRepoError) as e:
        raise ModelNotFoundError(f"model {repo_id}{at}: {type(e).__name__}: {str(e).splitlines()[0]}. {fix}") from e
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise ModelNotFoundError(f"model {repo_id}{at} could not be fetched: {str(e).splitlines()[0]}. {fix}") from e
    log.info("%s%s -> %s", repo_id, at, path)
    try:
        return check_model_dir(Path(path), f"model {repo_id}{at}")
    except ModelNotFoundError as e:
        raise ModelNotFoundError(
            f"{e} The cached snapshot is incomplete or the repo has no safetensors weights"
            + ("" if allow_pickle else " (pickle .bin weights are only fetched with parents.allow_pickle=true)")
            + f". {fix}"
        ) from e
