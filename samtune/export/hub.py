"""Upload an exported folder (or a run's adapter folder) to the Hugging Face Hub through huggingface_hub.

The token comes from where huggingface_hub looks (``HF_TOKEN``, ``hf auth login``'s stored token). Any failure
of the network or the Hub (no connection, no token, no write access) is one line naming the repository; the
folder on disk stays as written.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from samtune.errors import UserError

# huggingface_hub raises its HTTP client's errors for a missing connection; HfHubHTTPError derives from that
# client's HTTPError, so it names the base class without importing the client by name.
_NETWORK_ERRORS = (OSError, *[c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError"])


class HubUploadError(UserError):
    """The Hub could not be reached or refused the upload."""


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload ``folder`` to it; returns its URL."""
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="Upload samtune export"
        )
    except _NETWORK_ERRORS as error:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        raise HubUploadError(
            f"--push-to-hub {repo_id}: upload failed ({type(error).__name__}: {reason}); {folder} is written, "
            "push it later with `hf upload` or this command again"
        ) from error
    return f"https://huggingface.co/{repo_id}"
