"""Process environment: offline hub, quiet libraries, no telemetry; Flower's executables."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import warnings
from collections.abc import Mapping
from pathlib import Path

from fedtune.errors import FedtuneError


def setup_environment(*, allow_hub: bool | None = None) -> None:
    """Set the variables that keep a run offline and quiet; the user's settings win.

    Hub access stays off unless ``FEDTUNE_ALLOW_HUB=1`` (the machines fedtune is
    built for have no internet, and a silent download is never wanted).
    """
    if allow_hub is None:
        allow_hub = os.environ.get("FEDTUNE_ALLOW_HUB", "0") == "1"
    if not allow_hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file in")
    # transformers reads its verbosity (and, through huggingface_hub, the progress-bar switch)
    # when imported; importing it here only to set them would cost every `fedtune deploy`
    # command ~0.7 s of CPU
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # imported already: tell it directly
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def scripts_dirs() -> list[Path]:
    """Where this environment's console scripts (``flwr``, ``flower-superlink``, ...) live.

    ``sysconfig``'s scripts directory first, then the interpreter's own directory
    when that differs (an interpreter symlinked into a venv); duplicates dropped.
    """
    dirs: list[Path] = []
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if d and Path(d) not in dirs:
            dirs.append(Path(d))
    return dirs


def flower_executable(name: str) -> str:
    """The path of Flower's executable ``name`` installed with fedtune, else the first on PATH.

    ``.venv/bin/fedtune deploy ...`` must start the Flower of its own environment
    even when that environment is not activated (its ``bin`` not on PATH).
    """
    for d in scripts_dirs():
        exe = d / name
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    found = shutil.which(name)
    if not found:
        raise FedtuneError(f"{name} not found; install flwr in this environment (pip install 'flwr==1.41.*')")
    return found


def flower_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this environment's scripts
    directories first on PATH.

    Flower's processes start each other by name (``flower-superlink`` starts
    ``flower-superexec``, which starts ``flwr-serverapp``; ``flwr run`` on a local
    connection starts ``flower-superlink``): a child given this environment finds
    the same installation as its parent, activated or not.
    """
    env = dict(os.environ if base is None else base)
    first = [str(d) for d in scripts_dirs()]
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p not in first]
    env["PATH"] = os.pathsep.join(first + rest)
    return env
