"""Jobs never reach for the model hub: compute nodes are offline, and a hub lookup there
waits about half a minute before it fails. Backbones come from local folders or the cache
that ``jobs/prefetch_models.py`` fills on the login node.

The hub library reads these variables when it is imported, so they are set before Python
starts (``cluster.job_env``, for every Slurm and local job) or first thing in an entry
point (``offline_by_default``); a value the user exported wins.
"""
from __future__ import annotations

import os

OFFLINE_HUB_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def offline_by_default() -> None:
    """Call before anything imports transformers or huggingface_hub."""
    for key, value in OFFLINE_HUB_ENV.items():
        os.environ.setdefault(key, value)
