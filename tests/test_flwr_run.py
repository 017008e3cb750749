"""Flower's own `flwr run` drives the app: a local SuperLink in simulation mode, set up as the README says."""

import json
import shlex
import shutil
import subprocess
import time

import pytest

from fedtune.env import flower_env, flower_executable

from .conftest import ROOT

pytestmark = pytest.mark.slow


def _kill_tree_matching(needle: str) -> None:
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if needle in " ".join(proc.info["cmdline"] or []):
                for child in proc.children(recursive=True):
                    child.kill()
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def test_flwr_run_local_simulation(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(
        ROOT,
        app,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "tests", "bench", "docs"
        ),
    )
    # the README's connection, added to the config.toml Flower writes on its first run
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    readme = (ROOT / "README.md").read_text().split("### With Flower's own CLI")[1]
    block = readme.split("```toml\n")[1].split("```")[0]
    assert "[superlink.fedtune-local]" in block and "[superlink]\n" not in block
    # and its command line: the node count and resources as the README passes them
    line = " ".join(x.strip().rstrip("\\") for x in readme.split("```bash\n")[1].split("```")[0].splitlines()[1:])
    readme_argv = shlex.split(line)
    assert readme_argv[:4] == ["flwr", "run", ".", "fedtune-local"]
    federation = readme_argv[readme_argv.index("--federation-config") + 1]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(DEFAULT_FLOWER_CONFIG_TOML + "\n" + block)
    out = tmp_path / "run"
    # flwr starts flower-superlink (and it flower-superexec, ...) by name: this environment's come first
    env = {
        **flower_env(),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39391",
        "FLWR_LOCAL_CONTROL_API_PORT": "39393",
    }
    flwr = flower_executable("flwr")
    try:
        res = subprocess.run(
            [
                flwr,
                "run",
                str(app),
                "fedtune-local",
                "--stream",
                "--federation-config",
                federation,
                "--run-config",
                f'overrides="output.dir={out} federation.rounds=2"',
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        # --stream exits 0 even when the ServerApp failed: the outputs are the evidence
        for _ in range(30):
            if (out / "summary.json").exists():
                break
            time.sleep(1)
        assert (out / "summary.json").exists(), res.stdout[-3000:] + res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["num_clients"] == 10
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["accepted"] == 10
        said = res.stdout + res.stderr  # Flower 1.41's warnings on how the simulation is configured
        assert "deprecated" not in said.lower(), said[-3000:]
    finally:
        _kill_tree_matching(str(home))
