"""Checkpoint after every round; --resume continues with nothing lost or counted twice."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedtune.errors import FedtuneError
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.server import ServerLoop


class Crash(BaseException):
    pass


class CrashingGrid(LocalGrid):
    def __init__(self, *a, crash_round, **kw):
        super().__init__(*a, **kw)
        self.crash_round = crash_round

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and int(messages[0].content["config"].get("server-round", 0)) == self.crash_round:
            raise Crash("server killed")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("optimizer", ["fedavg", "fedavgm", "fedavg+swa"])
def test_resume_matches_an_uninterrupted_run(tiny_cfg, tmp_path, optimizer):
    over = {
        "federation.rounds": 3,
        "federation.fraction_train": 0.5,
        "aggregation.server_optimizer": optimizer.removesuffix("+swa"),
    }
    if optimizer == "fedavgm":
        over["aggregation.server_momentum"] = 0.9
    if optimizer.endswith("+swa"):  # the average so far is part of the checkpoint
        over["aggregation.swa_start"] = 1
    cfg = tiny_cfg.replace(**over)
    fn = lambda m, c: handle_train(m, c, cfg)  # noqa: E731
    whole = ServerLoop(cfg, tmp_path / "whole", progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, fn))

    out = tmp_path / "broken"
    with pytest.raises(Crash):
        ServerLoop(cfg, out, progress=lambda s: None).main(CrashingGrid(cfg.federation.num_clients, fn, crash_round=3))
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["round"] == 2
    assert not (out / "summary.json").exists()
    resumed = ServerLoop(cfg, out, progress=lambda s: None, resume=True).main(LocalGrid(cfg.federation.num_clients, fn))

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # nothing lost, nothing twice
    assert resumed["total_bytes_up"] == whole["total_bytes_up"]
    assert resumed["final"] == whole["final"]
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_refuses_a_different_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 1})
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(4, lambda m, c: handle_train(m, c, cfg)))
    other = cfg.replace(**{"train.lr": 0.5})
    with pytest.raises(FedtuneError, match="config differs"):
        ServerLoop(other, tmp_path, progress=lambda s: None, resume=True).main(
            LocalGrid(4, lambda m, c: handle_train(m, c, other))
        )


def test_a_fresh_run_refuses_a_directory_holding_an_unfinished_run(tiny_cfg, tmp_path):
    """Nothing is lost: a crashed run's checkpoint is not overwritten by a run started without resume."""
    cfg = tiny_cfg.replace(**{"federation.rounds": 3})
    fn = lambda m, c: handle_train(m, c, cfg)  # noqa: E731
    with pytest.raises(Crash):
        ServerLoop(cfg, tmp_path, progress=lambda s: None).main(
            CrashingGrid(cfg.federation.num_clients, fn, crash_round=2)
        )
    before = (tmp_path / "checkpoint" / "adapter_state.safetensors").read_bytes()
    with pytest.raises(FedtuneError, match="unfinished run.*round 1"):
        ServerLoop(cfg, tmp_path, progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, fn))
    assert (tmp_path / "checkpoint" / "adapter_state.safetensors").read_bytes() == before
    ServerLoop(cfg, tmp_path, progress=lambda s: None, resume=True).main(LocalGrid(cfg.federation.num_clients, fn))
    assert (tmp_path / "summary.json").is_file()
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(
        LocalGrid(cfg.federation.num_clients, fn)
    )  # finished: may rerun
