"""Upload an exported folder to the Hugging Face Hub with huggingface_hub, failing early with one clear line."""
from __future__ import annotations

from pathlib import Path

from nanotronix.errors import UserError


def check_hub_access(repo_id: str) -> None:
    """Before any work: a repo id of the form owner/name, online mode, and a token."""
    import huggingface_hub
    from huggingface_hub import constants

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--push-to-hub: {repo_id!r} is not a repository id of the form owner/name")
    if constants.HF_HUB_OFFLINE:
        raise UserError("--push-to-hub: Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set); "
                        "unset it or upload the exported folder later")
    if not huggingface_hub.get_token():
        raise UserError("--push-to-hub: no Hugging Face token: run `hf auth login` or set HF_TOKEN")


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo if needed and upload the folder; return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload nanotronix export")
    except Exception as e:  # network, authentication, permission: one line, the export stays on disk
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {reason}); the export is "
                        f"complete in {folder}") from None
    return str(url)
