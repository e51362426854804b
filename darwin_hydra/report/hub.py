"""Optional upload of the child to the Hugging Face Hub (``export.push_to_hub=true``, off by default)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class HubPushError(RuntimeError):
    """The upload failed; the local child is untouched."""


def push_child(child_dir: Path, repo_id: str | None, private: bool = True) -> str:
    """Upload ``child_dir`` to ``repo_id`` (created if needed); returns the repo URL.

    Needs a token in the environment (``HF_TOKEN``) or from ``huggingface-cli login``; never from config.
    Offline (``HF_HUB_OFFLINE=1``) or on any Hub error it raises ``HubPushError`` and leaves the
    local child as it was (the upload only reads it).
    """
    if not repo_id:
        raise HubPushError("export.push_to_hub=true needs export.hub_repo_id=<user>/<name>")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubPushError(
            f"cannot push {child_dir} to {repo_id}: HF_HUB_OFFLINE is set (no network). The child is intact at "
            f"{child_dir}; push it later with `hf upload {repo_id} {child_dir}`"
        )
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(child_dir), repo_id=repo_id, repo_type="model",
                                 commit_message="darwin-hydra child")
    except Exception as e:  # network, auth, permissions: say so, keep the local child
        raise HubPushError(
            f"pushing {child_dir} to {repo_id} failed ({type(e).__name__}: {e}). The child is intact at {child_dir}; "
            f"retry with `hf upload {repo_id} {child_dir}`"
        ) from e
    log.info("pushed %s to %s", child_dir, repo_id)
    return str(getattr(info, "commit_url", repo_id))
