"""Simulated clients run at the driver's priority, not at Ray's default nice 15 (which starved them
behind any other job on the machine until a round passed federation.round_timeout with no reply)."""

import json
import os

import pytest

from fedtune import config
from fedtune.flower.apps import make_client_app
from fedtune.flower.simulation import simulate

from .conftest import CONFIGS

pytestmark = pytest.mark.slow


def test_simulated_clients_run_at_the_drivers_priority(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    seen = tmp_path / "nice.jsonl"

    def record_priority(msg, ctx, call_next):  # a Flower client mod: runs in the client's process
        with open(seen, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "nice": os.nice(0)}) + "\n")
        return call_next(msg, ctx)

    cfg = config.load(CONFIGS / "tiny.toml", {"federation.rounds": 1, "train.local_steps": 1})
    simulate(cfg, tmp_path / "run", progress=lambda s: None, client_app=make_client_app(cfg, mods=[record_priority]))
    rows = [json.loads(x) for x in seen.read_text().splitlines()]
    assert rows and {r["pid"] for r in rows} != {os.getpid()}  # the clients ran in Ray's worker processes
    assert {r["nice"] for r in rows} == {os.nice(0)}
