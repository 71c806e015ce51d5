"""Pushing an export folder (adapter, GGUF files, Modelfile, model card) to the Hugging Face Hub.

The token comes from where `huggingface_hub` looks for it (the ``HF_TOKEN`` variable, else the one stored by
``hf auth login`` / ``huggingface-cli login``); it is handed to `huggingface_hub` and never printed, logged or
written into any file. The repo id and the token's presence are checked before any export work; an upload that
fails leaves the local export as it is and says, in one line, how to finish the upload.
"""

from __future__ import annotations

import re

from ..errors import ConfigError

LOGIN_FIX = "set HF_TOKEN to a write token (huggingface.co/settings/tokens), or run `hf auth login`"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class HubError(ConfigError):
    """The Hub part of an export went wrong; the local export is intact."""


def check_repo_id(repo_id) -> str:
    """`user/name` as the Hub accepts it; a one-line `HubError` with an example otherwise."""
    text = str(repo_id or "").strip()
    parts = text.split("/")
    problem = None
    if len(parts) != 2 or not all(parts):
        problem = "it must be 'user/name' (or 'org/name'), with exactly one '/'"
    elif not all(_ID.match(p) for p in parts):
        problem = "use only letters, digits, '-', '_' and '.', starting with a letter or digit"
    elif any(s in text for s in ("--", "..")) or text.endswith((".", "-")) or parts[1].endswith(".git"):
        problem = "'--' and '..' are not allowed, and the name cannot end with '.', '-' or '.git'"
    if problem is None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(text)
        except HFValidationError:
            problem = "the Hub does not accept this name"
    if problem:
        raise HubError(f"'{repo_id}' is not a Hub repo id: {problem}. Fix: e.g. --push-to-hub your-name/my-model.",
                       key="push_to_hub")  # fmt: skip
    return text


def find_token() -> str | None:
    """The token `huggingface_hub` would use (``HF_TOKEN``, else the stored login), or None."""
    from huggingface_hub import get_token

    return get_token()


def check_push(repo_id) -> str:
    """Everything that can refuse a push, checked before any export work. Returns the clean repo id."""
    repo_id = check_repo_id(repo_id)
    if not find_token():
        raise HubError(f"no Hugging Face token found, so nothing can be pushed to {repo_id}. Fix: {LOGIN_FIX}.",
                       key="push_to_hub")  # fmt: skip
    return repo_id


def push_folder(folder: str, repo_id: str, private: bool = False, api=None, message: str | None = None) -> str:
    """Create `repo_id` (a model repo, `private` if asked, kept when it exists) and upload every file of
    `folder` to it. Returns the repo's URL.

    Args:
        folder: The export folder (written and renamed into place before this is called).
        repo_id: ``user/name``.
        private: Create the repo private (an existing repo keeps its visibility).
        api: An object with `huggingface_hub.HfApi`'s `create_repo` and `upload_folder` (tests pass a fake).
        message: The commit message.

    Raises:
        HubError: one line naming the cause and the fix; the local folder is untouched.
    """
    repo_id = check_push(repo_id)
    token = find_token()
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, token=token, repo_type="model",
                          commit_message=message or "Upload from peft_magic", ignore_patterns=[".*"])  # fmt: skip
    except Exception as e:  # noqa: BLE001 - every failure becomes one line; the export stays on disk
        raise HubError(f"the upload to {repo_id} failed ({_reason(e, token)}); the export in '{folder}' is intact. "
                       f"Fix: {_fix(e)}, then upload it with `hf upload {repo_id} {folder}`.",
                       key="push_to_hub") from None  # fmt: skip
    return str(getattr(url, "url", None) or url or f"https://huggingface.co/{repo_id}")


def _reason(error: Exception, token: str | None) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if token:
        text = text.replace(token, "***")  # a message that echoes the request must not show the token
    first = text.split(". ")[0]
    return first[:160] + ("…" if len(first) > 160 else "")


def _fix(error: Exception) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    name = type(error).__name__
    if status == 401:
        return f"the token was refused: {LOGIN_FIX}"
    if status == 403:
        return "the token cannot write there: use a token with write access to that user or organisation"
    if "Offline" in name or "HF_HUB_OFFLINE" in str(error):
        return "unset HF_HUB_OFFLINE (the Hub is switched off in this environment) and check the connection"
    if isinstance(error, (ConnectionError, TimeoutError, OSError)) or "Connect" in name or "Timeout" in name:
        return "check the network connection"
    return "check the repo id and your rights on it"
