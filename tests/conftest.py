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


def metrics_rows(out: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` in ``out``, one dict per line."""
    import json

    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def run_capturing_updates(cfg, out):
    """A federated run in one process; returns (loop, node id -> (its reply's update as a delta, num-examples)).

    The update is captured as the client sends it: the server later swaps a reply's content for the
    decoded arrays."""
    from fedtune.flower import protocol as P
    from fedtune.flower.client import handle_train
    from fedtune.flower.local import LocalGrid
    from fedtune.flower.records import from_arrayrecord
    from fedtune.flower.server import ServerLoop

    sent = {}

    def client(msg, ctx):
        reply = handle_train(msg, ctx, cfg)
        sent[ctx.node_id] = (from_arrayrecord(reply.content[P.UPDATE]), int(reply.content[P.METRICS]["num-examples"]))
        return reply

    loop = ServerLoop(cfg, out, progress=lambda s: None)
    loop.main(LocalGrid(cfg.federation.num_clients, client))
    return loop, sent
