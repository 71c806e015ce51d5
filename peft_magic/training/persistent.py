"""Where checkpoints survive the session: Google Drive on Colab (when mounted), /kaggle/working on Kaggle.

When `train.output_dir` is not set, a run writes to ``<root>/peft_runs/NAME`` with the root chosen here, and the
panel says where (`output_note`), so that a run cut by the platform's time limit can be resumed in the next
session (`%%peft_train NAME --resume`, or `train.resume: auto`).
"""

from __future__ import annotations

import os
import sys

KAGGLE_WORKING = "/kaggle/working"
DRIVE_ROOT = "/content/drive/MyDrive"  # where `drive.mount('/content/drive')` puts the user's Drive
COLAB_ENV = ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_BACKEND_VERSION")


def on_colab() -> bool:
    return "google.colab" in sys.modules or any(k in os.environ for k in COLAB_ENV)


def on_kaggle() -> bool:
    return os.path.isdir(KAGGLE_WORKING)


def default_root() -> str:
    """The folder that ``peft_runs/NAME`` goes under when `train.output_dir` is not set."""
    if on_colab() and os.path.isdir(DRIVE_ROOT):
        return DRIVE_ROOT
    if on_kaggle():
        return KAGGLE_WORKING
    return "."


def output_note(output_dir: str | None) -> str | None:
    """One line for the panel about where checkpoints go on Colab and Kaggle (None elsewhere)."""
    if not output_dir:
        return None
    path = os.path.abspath(output_dir)
    if path.startswith(os.path.abspath(DRIVE_ROOT) + os.sep):
        return f"{output_dir} (Google Drive: kept after the session ends; --resume continues there)"
    if on_kaggle() and path.startswith(os.path.abspath(KAGGLE_WORKING) + os.sep):
        return f"{output_dir} (/kaggle/working: kept in the notebook's output when you save a version)"
    if on_colab():
        return (f"{output_dir} (lost when the Colab session ends: mount Drive with "
                "`from google.colab import drive; drive.mount('/content/drive')` to keep checkpoints there)")  # fmt: skip
    return None
