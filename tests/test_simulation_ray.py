"""End-to-end runs on Flower's simulation engine (Ray) and through the `fedtune` CLI."""

import json
import os
import subprocess
import sys

import pytest

from fedtune import config
from fedtune.flower.simulation import simulate

from .conftest import CONFIGS, ROOT

pytestmark = pytest.mark.slow


def test_one_hundred_virtual_clients(tmp_path):
    cfg = config.load(
        CONFIGS / "tiny.toml",
        {
            "federation.num_clients": 100,
            "federation.fraction_train": 0.1,
            "federation.rounds": 2,
            "data.partition": "iid",
            "data.max_train_examples": 2000,
            "train.local_steps": 1,
            "federation.min_available_clients": 100,
        },
    )
    lines = []
    summary = simulate(cfg, tmp_path, progress=lines.append)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["sampled"] == 10 and r["accepted"] == 10 for r in rows[1:])
    nodes = [set(r["bytes_up_per_client"]) for r in rows[1:]]
    assert nodes[0] != nodes[1]  # a fresh sample each round
    assert summary["num_clients"] == 100
    assert any("round 2/2" in s for s in lines)


def _cli(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fedtune", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def test_cli_simulate_writes_a_run(tmp_path):
    out = tmp_path / "run"
    res = _cli("simulate", "--config", str(CONFIGS / "tiny.toml"), "--set", "federation.rounds=1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "round 1/1" in res.stdout and "held-out accuracy" in res.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "train.lrr=1"], "train.lrr: unknown key"),
        (["--set", "data.dataset=/nonexistent/reviews.csv"], "file not found: /nonexistent/reviews.csv"),
        (["--set", "data.text_column=review"], "no column(s) data.text_column = 'review'"),
        (["--set", "model.name=/nonexistent/model"], "not a model directory"),
        (["--config", "/nonexistent.toml"], "config file not found"),
        (["--set", 'model.quantization="4bit"'], "needs a CUDA device"),
    ],
)
def test_cli_bad_input_gives_one_clear_message(tmp_path, args, needle):
    if "data.text_column=review" in args:
        (tmp_path / "d.csv").write_text("text_body,label\nok,1\nbad,0\n")
        args = [*args, "--set", f"data.dataset={tmp_path / 'd.csv'}"]
    base = [] if "--config" in args else ["--config", str(CONFIGS / "tiny.toml")]
    res = _cli("simulate", *base, *args, "--out", str(tmp_path / "o"), timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "summary.json").exists()
