import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fedtune.env import setup_environment  # noqa: E402

setup_environment()
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "simulations" / "configs"


@pytest.fixture
def tiny_cfg():
    from fedtune import config

    return config.load(CONFIGS / "tiny.toml")


# Property tests draw the same examples on every run: CI must not flake on a new draw.
from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("fedtune", derandomize=True, deadline=None)
_hsettings.load_profile("fedtune")
