"""A real deployment on loopback: TLS, SuperNode authentication, a silo lost mid-run,
and a server killed after round 1 and resumed.

One SuperLink (with a ``--database``, so registrations survive its restart) and
four SuperNodes run as separate processes started through ``fedtune deploy``;
three keys are registered, the fourth is refused. Each SuperNode runs in
``--isolation process`` beside one long-lived ClientApp process
(``fedtune/deploy/worker.py``) that keeps the model loaded across rounds.

``test_deploy_server_killed_and_resumed``: run B goes two rounds of the tiny
config (``flwr run --stream``, two of the three silos sampled per round), but
the SuperLink (and with it the ServerApp) is SIGKILLed as soon as B's round-1
checkpoint is on disk, then restarted, and B is launched again with
``resume=true`` in its run config, so the ServerApp continues from the
checkpoint. B must end with the same adapter, bit for bit, the same sampled
silos and the same metrics as run A, the same config run uninterrupted in this
process (the same ServerApp and ClientApp over fedtune's in-process
``LocalGrid``; computed while the silos reconnect): a deployed run, killed and
resumed, computes what the config computes.

``test_deploy_refuses_supernodes``: SuperNodes that trust another CA, that are
started ``--insecure`` against the TLS SuperLink, or that dial a plain-HTTP server
over TLS stop before Flower starts (fedtune's TLS probe), in one ``fedtune: error:``
line; the unregistered fourth key has stopped after its refused activations.

``test_deploy_secure_aggregation``: one round of SecAgg+ (``aggregation.secure``)
with all three silos: the same apps switch to Flower's SecAgg+ workflow, four
message exchanges per round.

``test_deploy_tls_auth_dropout`` (last): four rounds with all
three silos; silo-3 is SIGKILLed (its whole process group: supervisor,
SuperNode, ClientApp worker, as when a machine dies) once it has received round
1 and started again at once with the same command: round 1 finishes with the
other two silos, and the restarted silo rejoins the same run as the same node
(its key is refused until the SuperLink has declared the dead process gone,
and asked again) and is sampled and accepted in a later round. Then silo-2,
still online, is unregistered: its ``fedtune deploy supernode`` stops with one
line saying what to do, no traceback.

The refused fourth SuperNode runs with ``--isolation subprocess`` (Flower's own
process model, no worker).

``flwr run --stream`` exits 0 even when the ServerApp failed, so the run's own
outputs (``summary.json``, ``metrics.jsonl``) and ``flwr ls`` are the evidence.
The tests share one deployment (module fixture); see docs/deploy-notes.md for the
flags and BENCHMARKS.md for how long the module takes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.deploy.certs import create_ca
from fedtune.deploy.cli import connection_toml, run_argv

from .conftest import ROOT, metrics_rows

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FEDTUNE = [sys.executable, "-m", "fedtune", "deploy"]
# A healthy round of warm silos takes 2-6 s on 2 loaded cores (BENCHMARKS.md), a silo's
# first round ~10 s (its worker, torch already imported while idle, builds the model). A
# round with a killed silo ends when the SuperLink reports it NODE_UNAVAILABLE (no heartbeat
# for 2 intervals: 20 s with fedtune's SuperNode, 60 s with Flower's own) or at the round
# timeout.
ROUND_TIMEOUT = 90.0
# A first round (cold silos, or the restarted one) must fit; a round with a killed silo ends
# before, at its NODE_UNAVAILABLE, unless the restarted silo takes the node back in the instant
# between the SuperLink's verdict and the ServerApp's next poll (then at this timeout)
RESTART_ROUND_TIMEOUT = 30.0


def _free_port(lo: int, hi: int) -> int:
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def _wait_for(predicate, timeout: float, what: str, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in logs)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


class Procs:
    """Processes this test started, each leading its own process group."""

    def __init__(self, env: dict[str, str], logdir: Path):
        self.env, self.logdir, self.procs, self.gone = env, logdir, {}, []

    def start(self, name: str, argv: list[str], home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        home.mkdir(exist_ok=True)
        if name in self.procs:
            self.gone.append(self.procs.pop(name))
        log = (self.logdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {}), "FLWR_HOME": str(home)},
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self._killpg(self.procs[name], sig)

    @staticmethod
    def _killpg(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group we created: this process and its children only
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        procs = [*self.gone, *self.procs.values()]
        for proc in reversed(procs):
            self._killpg(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._killpg(proc, signal.SIGKILL)  # stragglers in the group (SuperExec, app processes)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _kill_matching(parts: list[str]) -> None:
    """SIGKILL every process whose command line contains all of ``parts``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(p in cmd for p in parts):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


class Deployment:
    """A SuperLink and silo-1..3 on loopback, TLS and SuperNode authentication on."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.app = tmp / "app"
        self.app.mkdir()
        shutil.copy(ROOT / "pyproject.toml", self.app)
        for d in ("fedtune", "server", "clients", "simulations"):
            shutil.copytree(ROOT / d, self.app / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        logs = tmp / "logs"
        logs.mkdir()
        self.env = {
            **os.environ,
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.pki, self.keys = tmp / "pki", tmp / "keys"
        self.port = _free_port(19000, 19899)
        self.cli_home = tmp / "home-cli"
        self.cli_env = {**self.env, "FLWR_HOME": str(self.cli_home)}
        self.procs = Procs(self.env, logs)
        self.node_ids: dict[str, int] = {}
        self.runtime_ports: dict[str, int] = {}  # each SuperNode's --port (its local Runtime API)
        self.timings: dict[str, float] = {}

    def setup(self) -> None:
        t0 = time.monotonic()
        names = [x for name in ("silo-1", "silo-2", "silo-3", "rogue") for x in ("--name", name)]
        made = [
            subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for argv in (
                [*FEDTUNE, "certs", "--out", str(self.pki), "--host", "localhost"],
                [*FEDTUNE, "keys", "--out", str(self.keys), *names],
            )
        ]
        for proc in made:
            text, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, text
        self.cli_home.mkdir()
        (self.cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "e2e"\n\n' + connection_toml("e2e", f"127.0.0.1:{self.port}", self.pki / "ca.crt")
        )
        self.start_superlink()
        self.timings["superlink_ready"] = time.monotonic() - t0
        self.start_supernode("rogue", 0, isolation="subprocess")  # Flower's process model: no worker

        regs = [
            subprocess.Popen(
                [*FEDTUNE, "register", str(self.keys / f"silo-{i}.pub"), "--connection", "e2e"],
                env=self.cli_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in (1, 2, 3)
        ]
        # the silos start while their keys are being registered, so that their start-up (Flower,
        # torch in the worker) overlaps the registration's: a key the SuperLink does not know yet
        # is refused at activation and asked again (for 25 s, by fedtune's SuperNode: the
        # unregistered key's, and a restarted silo's until the SuperLink lets its dead process go;
        # test_deploy_refuses_supernodes checks that the unregistered one stopped)
        for i in (1, 2, 3):
            self.start_supernode(f"silo-{i}", i - 1)
        for reg in regs:
            text, _ = reg.communicate(timeout=60)
            assert reg.returncode == 0 and "registered successfully" in text, text

        def all_online() -> bool:
            for i in (1, 2, 3):
                m = re.search(r"SuperNode ID: (\d+)", _tail(self.procs.log(f"silo-{i}"), 100_000))
                if m:
                    self.node_ids[f"silo-{i}"] = int(m.group(1))
            return len(self.node_ids) == 3

        _wait_for(all_online, 90, "three SuperNodes", [self.procs.log(f"silo-{i}") for i in (1, 2, 3)])
        for i in (1, 2, 3):  # --isolation process, with the ClientApp worker beside it
            log = _tail(self.procs.log(f"silo-{i}"), 100_000)
            assert "--isolation process" in log and "worker.py --runtime-api-address" in log, log
        rogue_log = _tail(self.procs.log("rogue"), 100_000)
        assert "--isolation subprocess" in rogue_log and "worker.py" not in rogue_log
        self.timings["nodes_online"] = time.monotonic() - t0

    def start_superlink(self, env: dict[str, str] | None = None) -> None:
        offset = _size(self.procs.log("superlink"))
        self.procs.start(
            "superlink",
            [
                *FEDTUNE,
                "superlink",
                "--certs",
                str(self.pki),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(self.tmp / "superlink.db"),
            ],
            self.tmp / "home-superlink",
            env,
        )
        _wait_for(
            lambda: b"Uvicorn running on https" in self.procs.log("superlink").read_bytes()[offset:],
            60,
            "the SuperLink",
            [self.procs.log("superlink")],
        )

    def supernode_argv(self, name: str, partition: int, isolation: str | None = None) -> list[str]:
        """``fedtune deploy supernode`` for silo ``name``; the same line again for a restart."""
        port = self.runtime_ports.setdefault(name, _free_port(29000, 29899))
        return [
            *FEDTUNE,
            "supernode",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--certs",
            str(self.pki),
            "--key",
            str(self.keys / name),
            "--partition-id",
            str(partition),
            "--num-partitions",
            "3",
            "--port",
            str(port),
            *(["--isolation", isolation] if isolation else []),
        ]

    def start_supernode(self, name: str, partition: int, isolation: str | None = None) -> None:
        self.procs.start(name, self.supernode_argv(name, partition, isolation), self.tmp / f"home-{name}")

    def online(self) -> int:
        listed = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "e2e", "--format", "json"],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return listed.stdout.count('"online"')

    @staticmethod
    def run_overrides(out: Path, overrides: tuple[str, ...] = (), round_timeout: float = ROUND_TIMEOUT) -> list[str]:
        return [
            f"output.dir={out}",
            "federation.num_clients=3",
            "federation.min_train_clients=2",
            f"federation.round_timeout={round_timeout}",
            "federation.rounds=2",
            *overrides,
        ]

    def start_run(
        self,
        name: str,
        out: Path,
        *,
        round_timeout: float = ROUND_TIMEOUT,
        overrides: tuple[str, ...] = (),
        resume: bool = False,
    ) -> subprocess.Popen:
        argv = run_argv(
            self.app,
            "e2e",
            config="simulations/configs/tiny.toml",
            overrides=self.run_overrides(out, overrides, round_timeout),
            exe=str(BIN / "flwr"),
            resume=resume,
        )
        return self.procs.start(name, argv, self.cli_home)

    def finish(self, name: str, timeout: float) -> None:
        try:
            self.procs.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish\n" + _tail(self.procs.log(name)) + _tail(self.procs.log("superlink")))

    def runs(self) -> str:
        ls = subprocess.run(
            [str(BIN / "flwr"), "ls", "e2e", "--format", "json"],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return ls.stdout


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    dep = Deployment(tmp_path_factory.mktemp("deploy"))
    try:
        dep.setup()
        yield dep
    finally:
        dep.procs.stop_all()
        print("deploy e2e timings:", json.dumps({k: round(v, 1) for k, v in dep.timings.items()}))


def _uninterrupted_in_process(out: Path, overrides: list[str]) -> None:
    """Run A: the deployment's config, uninterrupted, with its ServerApp and ClientApp in this process."""
    from fedtune import config
    from fedtune.flower.apps import make_client_app
    from fedtune.flower.local import LocalGrid
    from fedtune.flower.server import ServerLoop

    cfg = config.load(ROOT / "simulations" / "configs" / "tiny.toml", config.parse_overrides(overrides))
    ServerLoop(cfg, out, progress=lambda s: None).main(LocalGrid(cfg.federation.num_clients, make_client_app(cfg)))


def test_deploy_server_killed_and_resumed(deployment):
    dep = deployment
    assert not dep.procs.gone, "run this test before the one that kills silo-3"
    # two of the three silos per round, the same two in both runs (sampling is seeded by
    # (seed, round) over the silos ordered by partition id): a sum of two updates does not
    # depend on the order replies arrive in, so the two runs can be compared bit for bit
    over = ("federation.fraction_train=0.5",)

    # B: the SuperLink and its ServerApp die once round 1's checkpoint is written
    broken = dep.tmp / "run-resumed"
    t0 = time.monotonic()
    dep.start_run("run-broken", broken, overrides=over)
    meta = broken / "checkpoint" / "meta.json"
    _wait_for(
        lambda: meta.is_file() and json.loads(meta.read_text())["round"] >= 1,
        300,
        "round 1's checkpoint",
        [dep.procs.log("run-broken"), dep.procs.log("superlink")],
    )
    dep.procs.kill("superlink")  # SuperLink, its SuperExec and the flwr-serverapp process
    # a flwr-serverapp outside that process group would reconnect to the restarted SuperLink
    # and carry on with round 2: kill it too, as when the server machine dies
    _kill_matching(["flwr-serverapp", f":{dep.port}"])
    assert json.loads(meta.read_text())["round"] == 1, "the server got past round 1 before it was killed"
    assert not (broken / "summary.json").exists()
    dep.procs.kill("run-broken")  # its `flwr run --stream` would keep retrying the dead SuperLink
    dep.timings["resume_killed_after"] = time.monotonic() - t0

    t1 = time.monotonic()
    reconnects = {
        i: _tail(dep.procs.log(f"silo-{i}"), 1_000_000).count("Connection successful after") for i in (1, 2, 3)
    }
    dep.start_superlink()
    # the operator stops the dead run (the guide's recovery step): its round-2 messages, already
    # at the SuperLink, are then refused at once instead of holding the silos that pulled them
    # until the SuperLink gives up on the dead ServerApp (~20 s)
    dead_run = re.search(r"Successfully started run (\d+)", _tail(dep.procs.log("run-broken"), 100_000)).group(1)
    stop = subprocess.Popen(
        [str(BIN / "flwr"), "stop", dead_run, "e2e"],
        env=dep.cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # A, while the silos' back-off runs (fedtune's SuperNode tries again within 5 s): it needs
    # the CPU, the wait does not
    whole = dep.tmp / "run-whole"
    _uninterrupted_in_process(whole, dep.run_overrides(whole, over))
    dep.timings["resume_reference_in_process"] = time.monotonic() - t1
    # each silo logs Flower's reconnection; `flwr supernode list` (a CLI start each time) is
    # asked only then, or every 10 s
    asked = [time.monotonic()]

    def back_online() -> bool:
        logged = all(
            _tail(dep.procs.log(f"silo-{i}"), 1_000_000).count("Connection successful after") > n
            for i, n in reconnects.items()
        )
        if logged or time.monotonic() - asked[0] > 10:
            asked[0] = time.monotonic()
            return dep.online() == 3
        return False

    _wait_for(back_online, 120, "the silos to reconnect", [dep.procs.log(f"silo-{i}") for i in (1, 2, 3)])
    stop.wait(timeout=60)
    dep.timings["resume_superlink_back_and_silos_online"] = time.monotonic() - t1
    dep.start_run("run-resume", broken, overrides=over, resume=True)  # --run-config resume=true
    dep.finish("run-resume", 300)
    dep.timings["resume_resumed_wall"] = time.monotonic() - t1
    assert "resumed after round 1" in _tail(dep.procs.log("run-resume"), 100_000), _tail(dep.procs.log("run-resume"))

    a, b = metrics_rows(whole), metrics_rows(broken)
    assert [r["round"] for r in b] == [0, 1, 2]  # nothing lost, nothing twice
    for rows in (a, b):
        assert [(r["sampled"], r["accepted"]) for r in rows[1:]] == [(2, 2), (2, 2)]
    silos = [[sorted(c["partition-id"] for c in r["clients"]) for r in rows[1:]] for rows in (a, b)]
    assert silos[0] == silos[1]
    assert {c["node"] for r in b[1:] for c in r["clients"]} <= set(dep.node_ids.values())
    sa, sb = json.loads((whole / "summary.json").read_text()), json.loads((broken / "summary.json").read_text())
    assert sb["rounds_completed"] == sa["rounds_completed"] == 2
    assert sb["final"] == sa["final"]
    assert sb["total_bytes_up"] == sa["total_bytes_up"]
    assert [r["eval"] for r in b if "eval" in r] == [r["eval"] for r in a if "eval" in r]
    wa = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(broken / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0)
    print(
        "deploy e2e resume:",
        json.dumps(
            {
                "round_seconds_whole": [round(r.get("seconds", 0.0), 1) for r in a[1:]],
                "round_seconds_resumed": [round(r.get("seconds", 0.0), 1) for r in b[1:]],
                "final": sb["final"],
            }
        ),
    )


def test_deploy_refuses_supernodes(deployment):
    """A SuperNode the SuperLink must not admit stops, and says why in one line.

    Trusting another CA, ``--insecure`` against the TLS SuperLink (which Flower would
    retry forever) and TLS against a plain-HTTP server (silo-1's local Runtime API,
    Flower's own uvicorn app without TLS, as a SuperLink started ``--insecure`` runs)
    are found by fedtune's TLS probe before Flower starts; the unregistered key
    started with the deployment is refused at activation, asked again for the
    launcher's patience, then stops as Flower does."""
    dep = deployment
    t0 = time.monotonic()
    other = create_ca(dep.tmp / "pki-other").cert  # another CA, with the same name as the SuperLink's
    link, plain = f"127.0.0.1:{dep.port}", f"127.0.0.1:{dep.runtime_ports['silo-1']}"
    key = ["--key", str(dep.keys / "silo-1")]
    cases = {
        "other-ca": (["--superlink", link, "--certs", str(other), *key], "did not sign"),
        "insecure": (["--superlink", link, "--insecure"], "speaks TLS"),
        "tls-to-plain": (["--superlink", plain, "--certs", str(dep.pki), *key], "speaks plain HTTP"),
    }
    for name, (args, _) in cases.items():
        dep.procs.start(
            name,
            [
                *FEDTUNE,
                "supernode",
                *args,
                "--partition-id",
                "0",
                "--num-partitions",
                "3",
                "--port",
                str(_free_port(29000, 29899)),
            ],
            dep.tmp / f"home-{name}",
        )
    for name, (_, what) in cases.items():
        assert dep.procs.procs[name].wait(timeout=60) == 2, _tail(dep.procs.log(name))
        text = _tail(dep.procs.log(name))
        lines = [x for x in text.splitlines() if x.strip()]
        assert len(lines) == 1 and "Traceback" not in text, text  # not even fedtune's "running:" line
        assert lines[0].startswith("fedtune: error: ") and what in lines[0], text
    dep.timings["refused_tls_mismatches"] = time.monotonic() - t0

    assert dep.procs.procs["rogue"].wait(timeout=60) != 0
    rogue_log = _tail(dep.procs.log("rogue"), 100_000)
    assert "Failed to activate SuperNode" in rogue_log, rogue_log
    assert "fedtune: the SuperLink refused to activate this SuperNode (code 2004)" in rogue_log, rogue_log
    assert "No SuperNode found with the given public key" in _tail(dep.procs.log("superlink"), 1_000_000)


def test_deploy_secure_aggregation(deployment):
    """SecAgg+ across the three silos: the same ServerApp/ClientApp, on Flower's legacy workflow."""
    dep = deployment
    out = dep.tmp / "run-secagg"
    before = _tail(dep.procs.log("silo-1"), 1_000_000).count("Receiving: train message")
    t0 = time.monotonic()
    # with the codec SecAgg+ composes with: every silo masks the same random 10% of each tensor
    over = (
        "aggregation.secure=secagg+",
        "federation.fraction_train=1.0",
        "federation.rounds=1",
        "compression.codec=randk",
        "compression.ratio=0.1",
    )
    dep.start_run("run-secagg", out, overrides=over)
    dep.finish("run-secagg", 240)
    dep.timings["secagg_run_wall"] = time.monotonic() - t0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["aggregation"]["secure"] == "secagg+"
    assert summary["aggregation"]["strategy"].startswith("SecAgg+") and summary["mode"] == "secagg+"
    rows = metrics_rows(out)
    assert [(r["round"], r.get("accepted")) for r in rows] == [(0, None), (1, 3)]
    assert {c["node"] for c in rows[1]["clients"]} == set(dep.node_ids.values())
    seen = _tail(dep.procs.log("silo-1"), 1_000_000).count("Receiving: train message")
    assert seen - before >= 4, (seen, before)  # SecAgg+'s 4 stages: setup, share keys, masked vectors, unmask
    stages = rows[1]["bytes_by_stage"]
    assert set(stages) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    # the masked vectors are the k kept values, not the whole adapter: under 10% + headers of its fp32 size
    dense = sum(4 * v.numel() for v in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())
    assert stages["collect_masked_vectors"]["up"] / 3 < 0.1 * dense + 2_000, (stages, dense)
    print(
        "deploy e2e secagg:",
        json.dumps({"round_seconds": [round(r.get("seconds", 0.0), 1) for r in rows[1:]], "final": summary["final"]}),
    )


def test_deploy_tls_auth_dropout(deployment):
    dep = deployment
    out = dep.tmp / "run-dropout"
    seen = _size(dep.procs.log("silo-3"))
    t_run = time.monotonic()
    # four rounds: silo-3 dies in round 1 and is started again at once, with the same command;
    # the SuperLink reports the dead process (NODE_UNAVAILABLE, ending round 1) and accepts the
    # key again 2 heartbeat intervals after its last heartbeat (20 s with fedtune's SuperNode),
    # and a later round samples the restarted silo, whose worker builds the model again: the
    # round timeout covers that first round
    dep.start_run("run-dropout", out, round_timeout=RESTART_ROUND_TIMEOUT, overrides=("federation.rounds=4",))

    # kill silo-3 once it has taken round 1's message (its first of this run), before it can answer
    def silo3_in_round1() -> bool:
        return b"Receiving: train message" in dep.procs.log("silo-3").read_bytes()[seen:]

    _wait_for(
        silo3_in_round1, 120, "silo-3 to receive round 1", [dep.procs.log("run-dropout"), dep.procs.log("silo-3")]
    )
    dep.procs.kill("silo-3")
    t_kill = time.monotonic()
    dep.timings["dropout_killed_after_run_start"] = t_kill - t_run
    restarted = _size(dep.procs.log("silo-3"))
    dep.start_supernode("silo-3", 2)  # the same `fedtune deploy supernode` line: same key, same port
    dep.finish("run-dropout", 4 * RESTART_ROUND_TIMEOUT + 120)
    dep.timings["dropout_run_wall"] = time.monotonic() - t_run
    # the coordinator unregisters silo-2 while it is online (checked below), and lists the runs
    seen2 = _size(dep.procs.log("silo-2"))
    unregister = subprocess.Popen(
        [str(BIN / "flwr"), "supernode", "unregister", str(dep.node_ids["silo-2"]), "e2e"],
        env=dep.cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    runs = dep.runs()
    assert "finished:completed" in runs, runs + _tail(dep.procs.log("run-dropout"))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 4 and summary["num_clients"] == 3
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    silo3, alive = dep.node_ids["silo-3"], {dep.node_ids["silo-1"], dep.node_ids["silo-2"]}
    # the restarted SuperNode is the same node to the SuperLink: its key is bound to the node ID
    again = dep.procs.log("silo-3").read_bytes()[restarted:].decode(errors="replace")
    assert [int(x) for x in re.findall(r"SuperNode ID: (\d+)", again)] == [silo3], again[-4000:]
    assert "Traceback" not in again, again[-4000:]
    # round 1: all three sampled, silo-3's update missing and silo-3 named: either the SuperLink's
    # NODE_UNAVAILABLE error reply (its source is the SuperLink, not silo-3; the loop maps it to
    # the node it was sent to), or no reply at all (round timeout: the restarted silo took the
    # node back in the instant between the SuperLink's verdict and the ServerApp's next poll), or,
    # when it was killed while uploading its reply, Flower's word that the reply's objects never came
    # (the other silos' replies still count: transport.send_and_receive pulls once more at the timeout)
    gone = ("Node Unavailable", "no reply within federation.round_timeout", "Reply message objects are unavailable")
    r1 = rows[1]
    assert r1["sampled"] == 3 and r1["accepted"] == 2
    assert {c["node"] for c in r1["clients"]} == alive
    assert [rej["node"] for rej in r1["rejected"]] == [silo3], r1["rejected"]
    assert all(any(g in rej["reason"] for g in gone) for rej in r1["rejected"]), r1["rejected"]
    # a later round samples silo-3 again and takes its update (partition 2, as before); until
    # then the rounds run with the two others, and from then on with all three
    back = next((r["round"] for r in rows[2:] if silo3 in {c["node"] for c in r["clients"]}), None)
    assert back is not None, [(r["round"], r["clients"], r["rejected"]) for r in rows[1:]]
    for r in rows[2:]:
        nodes = {c["node"]: c["partition-id"] for c in r["clients"]}
        assert set(nodes) == (alive | {silo3} if r["round"] >= back else alive), (back, r)
        assert r["round"] < back or nodes[silo3] == 2
        assert all(rej["node"] == silo3 for rej in r["rejected"]), r["rejected"]
    assert rows[4]["sampled"] == rows[4]["accepted"] == 3 and not rows[4]["rejected"]
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0

    # silo-2, unregistered while online, stops, in one line saying what to do, and its supervisor
    # exits non-zero (it was not asked to stop)
    said, _ = unregister.communicate(timeout=60)
    assert unregister.returncode == 0 and "unregistered successfully" in said, said
    rc = dep.procs.procs["silo-2"].wait(timeout=90)
    after = dep.procs.log("silo-2").read_bytes()[seen2:].decode(errors="replace")
    lines = [x for x in after.splitlines() if x.startswith("fedtune: ") and "fedtune deploy register" in x]
    assert rc != 0 and lines, after
    # the first word the silo's owner reads says what happened and what to do
    assert "no longer accepts its key" in lines[0] or "refused this SuperNode's key" in lines[0], after
    # Flower's SuperNode sometimes gets interrupted inside its own graceful exit after the 401 (a
    # KeyboardInterrupt while joining its HTTP thread: exit status 254 and a second, generic line);
    # otherwise the stop is clean: status 1, no traceback, and only the one line
    if "KeyboardInterrupt" not in after:
        assert rc == 1 and "Traceback" not in after, after
        assert all("no longer accepts its key" in x or "refused this SuperNode's key" in x for x in lines), after
    print(
        "deploy e2e dropout:",
        json.dumps(
            {
                "round_seconds": [round(r.get("seconds", 0.0), 1) for r in rows[1:]],
                "sampled": [r["sampled"] for r in rows[1:]],
                "accepted": [r["accepted"] for r in rows[1:]],
                "rejected": [r["rejected"] for r in rows[1:]],
                "silo3_back_in_round": back,
                "silo3_activation_asked_again": "refused to activate this SuperNode" in again,
                "final": summary["final"],
            }
        ),
    )
