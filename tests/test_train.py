"""Local training details: mixed precision."""

import pytest
import torch

from fedtune import adapters, config, workspace
from fedtune.errors import ConfigError
from fedtune.train import evaluate, train_local


def _linear_output_dtypes(model):
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o.dtype)) for m in model.modules()
             if isinstance(m, torch.nn.Linear)]
    return seen, hooks


@pytest.mark.parametrize("mode,dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_mixed_precision_autocasts_the_forward_and_keeps_float32_weights(tiny_cfg, mode, dtype):
    cfg = tiny_cfg.replace(**{"train.mixed_precision": mode, "train.local_steps": 2})
    ws = workspace.get(cfg)
    adapters.set_state_(ws.model, ws.initial_state())
    seen, hooks = _linear_output_dtypes(ws.model)
    try:
        out = train_local(ws.model, ws.client_data(0), cfg.train, task=ws.task, pad_id=ws.pad_id,
                          device=ws.device, generator=torch.Generator().manual_seed(0))
        assert seen and set(seen) == {dtype}
        seen.clear()
        evaluate(ws.model, ws.test_data()[:8], task=ws.task, pad_id=ws.pad_id, device=ws.device,
                 mixed_precision=mode)
        assert seen and set(seen) == {dtype}
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(torch.tensor(out["train_loss"]))
    assert all(v.dtype == torch.float32 for v in adapters.get_state(ws.model).values())


def test_mixed_precision_rejects_unknown_mode(tiny_cfg):
    with pytest.raises(ConfigError, match="mixed_precision"):
        config.from_dict({**tiny_cfg.to_dict(), "train": {**tiny_cfg.to_dict()["train"], "mixed_precision": "fp8"}})
