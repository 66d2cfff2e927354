"""Where qhelpers caches converted models, sweeps and adapter zoos."""
from __future__ import annotations

import os
from pathlib import Path


#: Environment variable naming the folder that holds converted embedded models.
CACHE_ENV = "QHELPERS_CACHE"

def qhelpers_cache_dir(kind: str) -> Path:
    """The folder for cached artefacts of one ``kind`` (``sweeps``, ``lora_zoos``, ...):
    ``$QHELPERS_CACHE/<kind>`` when that variable is set, else ``~/.cache/qhelpers/<kind>``."""
    env = os.environ.get(CACHE_ENV)
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "qhelpers") / kind


def models_cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qhelpers" / "models"
