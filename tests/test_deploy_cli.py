"""Tests for ``fedtune deploy``: the argv builders, and the commands with exec/subprocess faked.

The strings fedtune hands to Flower are checked with Flower's own parser
(``parse_config_args``, used by ``flwr run --run-config`` and
``flower-supernode --node-config``), then with fedtune's ``from_run_config``.
"""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import logging
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from flwr.common.config import parse_config_args

from fedtune import cli, config
from fedtune.deploy import cli as dcli
from fedtune.deploy.certs import create_ca, create_server_cert
from fedtune.deploy.probe import Probe, probe_superlink
from fedtune.env import flower_env, flower_executable
from fedtune.errors import ConfigError

from .conftest import ROOT

GUIDE = ROOT / "docs" / "run-across-organizations.md"


@pytest.fixture
def execs(monkeypatch):
    """Capture os.execve instead of replacing the test process; each call's env in ``calls.envs``."""

    class Calls(list):
        def __init__(self):
            super().__init__()
            self.envs: list[dict[str, str]] = []

    calls = Calls()

    def execve(path, argv, env):
        assert path == argv[0]
        calls.append(list(argv))
        calls.envs.append(dict(env))

    monkeypatch.setattr(dcli.os, "execve", execve)
    return calls


def _certs(tmp_path: Path) -> Path:
    assert cli.main(["deploy", "certs", "--out", str(tmp_path / "pki"), "--host", "sl.example.org"]) == 0
    return tmp_path / "pki"


# ---- pure builders ----------------------------------------------------------------


def test_server_hosts_always_adds_loopback_once():
    assert dcli.server_hosts(["sl.example.org"]) == ["sl.example.org", "127.0.0.1"]
    assert dcli.server_hosts(["127.0.0.1", "a", "a"]) == ["127.0.0.1", "a"]


def test_superlink_argv_tls_and_auth_by_default():
    argv = dcli.superlink_argv("/pki", host="0.0.0.0", port=19000)
    assert argv == [
        "flower-superlink",
        "--ssl-ca-certfile",
        "/pki/ca.crt",
        "--ssl-certfile",
        "/pki/server.pem",
        "--ssl-keyfile",
        "/pki/server.key",
        "--enable-supernode-auth",
        "--host",
        "0.0.0.0",
        "--port",
        "19000",
        "--disable-runtime-dependency-installation",
    ]


def test_superlink_argv_insecure_has_no_tls_or_auth():
    argv = dcli.superlink_argv("/pki", host="127.0.0.1", port=19000, insecure=True, database="/s.db")
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv
    assert not any(a.startswith("--ssl") for a in argv)
    assert argv[-2:] == ["--database", "/s.db"]


@pytest.mark.parametrize("port", [0, 70000, True, "19000"])
def test_bad_port_is_rejected(port):
    with pytest.raises(ConfigError, match="--port"):
        dcli.superlink_argv("/pki", host="0.0.0.0", port=port)


def test_supernode_argv_and_node_config_as_flower_parses_it():
    argv = dcli.supernode_argv(
        "sl.example.org:9092",
        ca_cert="/pki/ca.crt",
        private_key="/k/silo-1",
        partition_id=1,
        num_partitions=3,
        port=29101,
        data_path="/data/silo 1.csv",
    )
    assert argv[:3] == ["flower-supernode", "--superlink", "sl.example.org:9092"]
    assert argv[argv.index("--root-certificates") + 1] == "/pki/ca.crt"
    assert argv[argv.index("--auth-supernode-private-key") + 1] == "/k/silo-1"
    assert argv[-2:] == ["--port", "29101"] and "--insecure" not in argv
    node_cfg = argv[argv.index("--node-config") + 1]
    assert parse_config_args([node_cfg]) == {"partition-id": 1, "num-partitions": 3, "data-path": "/data/silo 1.csv"}


def test_supernode_insecure_refuses_a_key():
    with pytest.raises(ConfigError, match="--key"):
        dcli.supernode_argv(
            "h:1", ca_cert=None, private_key="/k", partition_id=0, num_partitions=1, port=2, insecure=True
        )
    argv = dcli.supernode_argv(
        "h:1", ca_cert=None, private_key=None, partition_id=0, num_partitions=1, port=2, insecure=True
    )
    assert "--insecure" in argv and "--auth-supernode-private-key" not in argv


@pytest.mark.parametrize("pid,n", [(3, 3), (-1, 3), (0, 0)])
def test_partition_out_of_range(pid, n):
    with pytest.raises(ConfigError, match="partition"):
        dcli.node_config(pid, n)


@pytest.mark.parametrize("address", ["https://h:1", "h", "h:0", "h:70000", "[zz]:1", "h :1", ""])
def test_bad_superlink_address(address):
    with pytest.raises(ConfigError, match="--superlink"):
        dcli.supernode_argv(address, ca_cert="c", private_key="k", partition_id=0, num_partitions=1, port=2)


@pytest.mark.parametrize("address", ["127.0.0.1:19000", "sl.example.org:443", "[::1]:8000"])
def test_good_superlink_address(address):
    assert (
        dcli.supernode_argv(address, ca_cert="c", private_key="k", partition_id=0, num_partitions=1, port=2)[2]
        == address
    )


def test_register_argv():
    assert dcli.register_argv("/k/silo-1.pub", "prod") == ["flwr", "supernode", "register", "/k/silo-1.pub", "prod"]
    assert dcli.register_argv("k.pub", "prod", name="silo-1")[-2:] == ["--name", "silo-1"]
    with pytest.raises(ConfigError, match="--connection"):
        dcli.register_argv("k.pub", "a b")


def test_run_config_round_trips_through_flwr_and_fedtune():
    overrides = ["output.dir=/tmp/a b", "federation.num_clients=3", "train.lr=2e-3", "data.partition=iid"]
    argv = dcli.run_argv("app", "prod", config="simulations/configs/tiny.toml", overrides=overrides)
    assert argv[:5] == ["flwr", "run", "app", "prod", "--stream"]
    assert shlex.split(shlex.join(argv)) == argv  # the printed line is the argv
    run_config = parse_config_args([argv[argv.index("--run-config") + 1]])
    assert set(run_config) == {"config", "overrides"}  # the two keys pyproject declares
    cfg = config.from_run_config(run_config, base_dir=ROOT)
    assert cfg.output.dir == "/tmp/a b" and cfg.federation.num_clients == 3
    assert cfg.train.lr == 2e-3 and cfg.data.partition == "iid" and cfg.model.name == "tiny-bert"


def test_an_unset_travels_through_flwr_to_the_server_apps_config():
    long = "simulations/configs/smollm2-chatterbot-long.toml"
    overrides = ["aggregation.server_optimizer=fedavg", "~aggregation.server_lr"]
    argv = dcli.run_argv("app", "prod", config=long, overrides=overrides)
    run_config = parse_config_args([argv[argv.index("--run-config") + 1]])
    cfg = config.from_run_config(run_config, base_dir=ROOT)
    assert cfg.aggregation.server_optimizer == "fedavg" and cfg.aggregation.server_lr is None
    assert cfg.train.local_steps == 20  # the rest of the file (and its base) still holds


def test_resume_travels_as_the_declared_run_config_key_and_reaches_the_server_app(tmp_path):
    argv = dcli.run_argv("app", "prod", overrides=[f"output.dir={tmp_path}"], resume=True)
    run_config = parse_config_args([argv[argv.index("--run-config") + 1]])
    assert run_config["resume"] is True
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(run_config) <= set(declared) and declared["resume"] is False
    assert config.from_run_config(run_config, base_dir=ROOT).output.dir == str(tmp_path)  # not a config key

    from flwr.app import Context, RecordDict

    from fedtune.flower.apps import resume_flag

    ctx = lambda rc: Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)  # noqa: E731
    assert resume_flag(ctx(run_config)) is True and resume_flag(ctx({})) is False
    with pytest.raises(ConfigError, match="resume"):
        resume_flag(ctx({"resume": "maybe"}))


def test_run_line_resume_needs_an_output_dir(capsys, tmp_path):
    assert cli.main(["deploy", "run-line", "--connection", "prod", "--app", str(ROOT), "--resume"]) == 2
    assert "output.dir" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "deploy",
                "run-line",
                "--connection",
                "prod",
                "--app",
                str(ROOT),
                "--resume",
                "-s",
                f"output.dir={tmp_path}",
            ]
        )
        == 0
    )
    assert "resume=true" in capsys.readouterr().out


def test_run_argv_without_config_or_overrides():
    assert dcli.run_argv(".", "prod", stream=False) == ["flwr", "run", ".", "prod"]


@pytest.mark.parametrize("item", ['output.name="x"', "output.name=it's", "output.dir=C:\\x", "lr=1", "~lr"])
def test_run_config_rejects_what_flwr_cannot_carry(item):
    with pytest.raises(ConfigError, match="--set|--unset"):
        dcli.run_config_arg(None, [item])


def test_connection_toml(tmp_path):
    doc = tomllib.loads(dcli.connection_toml("prod", "sl.example.org:8000", tmp_path / "ca.crt"))
    conn = doc["superlink"]["prod"]
    assert conn["address"] == "sl.example.org:8000" and Path(conn["root-certificates"]).is_absolute()
    doc = tomllib.loads(dcli.connection_toml("dev", "127.0.0.1:8000", None, insecure=True))
    assert doc["superlink"]["dev"] == {"address": "127.0.0.1:8000", "insecure": True}


# ---- commands ---------------------------------------------------------------------


def test_certs_command_puts_loopback_in_the_san(tmp_path, capsys):
    pki = _certs(tmp_path)
    cert = x509.load_pem_x509_certificate((pki / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["sl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    out = capsys.readouterr().out
    assert 'address = "sl.example.org:8000"' in out
    assert cli.main(["deploy", "certs", "--out", str(pki), "--host", "x"]) == 2  # refuses to overwrite


def test_keys_command(tmp_path):
    assert cli.main(["deploy", "keys", "--out", str(tmp_path), "--name", "silo-1", "--name", "silo-2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silo-1", "silo-1.pub", "silo-2", "silo-2.pub"]


def test_superlink_command_execs_flower(tmp_path, execs, capsys):
    pki = _certs(tmp_path)
    assert cli.main(["deploy", "superlink", "--certs", str(pki), "--port", "19001"]) == 0
    (argv,) = execs
    assert Path(argv[0]).name == "flower-superlink" and Path(argv[0]).is_absolute()
    assert argv[1:] == dcli.superlink_argv(pki, host="0.0.0.0", port=19001)[1:]
    assert f"fedtune: running: {shlex.join(argv)}" in capsys.readouterr().out


def test_superlink_command_refuses_a_port_in_use_in_one_line(tmp_path, execs, capsys):
    import socket

    pki = _certs(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["deploy", "superlink", "--certs", str(pki), "--host", "127.0.0.1", "--port", str(port)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"fedtune: error: --port: {port} on 127.0.0.1 is in use") and not execs
    assert cli.main(["deploy", "superlink", "--certs", str(pki), "--host", "127.0.0.1", "--port", str(port)]) == 0


def test_superlink_command_needs_certs_unless_insecure(tmp_path, execs, capsys):
    assert cli.main(["deploy", "superlink"]) == 2  # plain text only when asked for
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fedtune: error: --certs") and "--insecure" in line and "fedtune deploy certs" in line
    assert cli.main(["deploy", "superlink", "--certs", str(tmp_path)]) == 2
    assert "server.pem" in capsys.readouterr().err and not execs
    assert cli.main(["deploy", "superlink", "--insecure"]) == 0
    assert "--insecure" in execs[0] and execs[0][execs[0].index("--host") + 1] == "127.0.0.1"


def test_supernode_command_supervises_supernode_and_worker(tmp_path, execs, monkeypatch):
    pki = _certs(tmp_path)
    assert cli.main(["deploy", "keys", "--out", str(tmp_path / "k"), "--name", "silo-1"]) == 0
    argv_in = [
        "deploy",
        "supernode",
        "--superlink",
        "sl.example.org:8000",
        "--certs",
        str(pki),
        "--key",
        str(tmp_path / "k" / "silo-1"),
        "--partition-id",
        "0",
        "--num-partitions",
        "2",
        "--port",
        "29100",
    ]
    supervised, probed = [], []
    monkeypatch.setattr(dcli, "supervise", lambda node, worker, **kw: supervised.append((node, worker)) or 0)
    # no SuperLink at sl.example.org: the TLS probe (tested below against real servers) is recorded
    monkeypatch.setattr(dcli, "probe_superlink", lambda *a, **kw: probed.append(a) or Probe("ok", "TLS"))
    assert cli.main(argv_in) == 0 and not execs
    assert probed == [("sl.example.org:8000", pki / "ca.crt")]
    ((node, worker),) = supervised
    # Flower's SuperNode through fedtune's launcher (shorter polling), with flower-supernode's arguments
    assert node[:2] == [sys.executable, str(Path(dcli.__file__).with_name("supernode.py"))]
    assert node[node.index("--root-certificates") + 1] == str(pki / "ca.crt")
    assert node[node.index("--isolation") + 1] == "process"
    assert worker == dcli.worker_argv(29100, parent_pid=os.getpid())
    assert worker[worker.index("--runtime-api-address") + 1] == "127.0.0.1:29100"
    # --flower-polling: the unmodified flower-supernode, same arguments
    assert cli.main(argv_in + ["--flower-polling"]) == 0
    flower_node = supervised[1][0]
    assert Path(flower_node[0]).name == "flower-supernode" and Path(flower_node[0]).is_absolute()
    assert flower_node[1:] == node[2:]
    # Flower's own process model: exec the SuperNode, nothing to supervise
    assert cli.main(argv_in + ["--isolation", "subprocess", "--flower-polling"]) == 0
    (argv,) = execs
    assert Path(argv[0]).name == "flower-supernode" and argv[argv.index("--isolation") + 1] == "subprocess"
    assert cli.main(argv_in + ["--isolation", "subprocess"]) == 0
    assert execs[1][1] == node[1] and execs[1][execs[1].index("--isolation") + 1] == "subprocess"
    assert execs.envs[1]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == dcli.SUPEREXEC_POLL_S  # Flower's setting
    assert len(supervised) == 2
    assert cli.main(argv_in + ["--data-path", str(tmp_path / "missing.csv")]) == 2
    assert cli.main([*argv_in[:5], str(tmp_path / "nope"), *argv_in[6:]]) == 2


def test_flower_executables_come_from_fedtunes_environment_without_it_on_path(tmp_path, execs, monkeypatch):
    # `.venv/bin/fedtune deploy superlink` with the venv not activated: flower-superlink must be
    # this environment's, and the children it starts by name (flower-superexec) must be found too
    bin_dir = Path(sysconfig.get_path("scripts"))
    assert (bin_dir / "flower-superexec").is_file(), "flwr is installed in this environment"
    bare = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir())
    monkeypatch.setenv("PATH", bare)
    assert shutil.which("flower-superexec") is None  # the broken setting this guards against

    assert cli.main(["deploy", "superlink", "--insecure", "--port", "19002"]) == 0
    (argv,), (env,) = execs, execs.envs
    assert Path(argv[0]) == bin_dir / "flower-superlink"
    assert env["PATH"].split(os.pathsep)[0] == str(bin_dir) and env["PATH"].endswith(bare)
    assert shutil.which("flower-superexec", path=env["PATH"]) == str(bin_dir / "flower-superexec")

    # a real child given that environment finds Flower's executables by name
    found = subprocess.run(
        _py("import shutil; print(shutil.which('flwr-serverapp'))"),
        env=flower_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == str(bin_dir / "flwr-serverapp")
    assert flower_executable("flwr") == str(bin_dir / "flwr")
    assert flower_env({"PATH": f"{bin_dir}{os.pathsep}/bin"})["PATH"] == f"{bin_dir}{os.pathsep}/bin"  # no duplicate


def test_supernode_argv_isolation_and_worker_argv():
    kw = dict(ca_cert="c", private_key="k", partition_id=0, num_partitions=1, port=2)
    assert "--isolation" not in dcli.supernode_argv("h:1", **kw)
    assert dcli.supernode_argv("h:1", isolation="process", **kw)[-2:] == ["--isolation", "process"]
    with pytest.raises(ConfigError, match="--isolation"):
        dcli.supernode_argv("h:1", isolation="thread", **kw)
    argv = dcli.worker_argv(9094, python="/py")
    assert argv[0] == "/py" and Path(argv[1]) == Path(dcli.__file__).with_name("worker.py")
    assert argv[2:] == ["--runtime-api-address", "127.0.0.1:9094"]
    assert dcli.worker_argv(9094, parent_pid=7)[-2:] == ["--parent-pid", "7"]
    with pytest.raises(ConfigError, match="--port"):
        dcli.worker_argv(0)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_supervise_returns_the_supernode_status_and_stops_the_worker(tmp_path):
    pid_file = tmp_path / "worker.pid"
    worker = _py(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    node = _py(f"import os, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.05)\nraise SystemExit(3)")
    assert dcli.supervise(node, worker, poll=0.05) == 3
    assert _gone(int(pid_file.read_text()))  # stopped and reaped, not left behind


def test_supervise_restarts_a_dying_worker_then_gives_up(tmp_path):
    pid_file = tmp_path / "node.pid"
    node = _py(f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    count = tmp_path / "count"
    worker = _py(f"open({str(count)!r}, 'a').write('x'); raise SystemExit(1)")
    assert dcli.supervise(node, worker, max_restarts=2, poll=0.05) == 1
    assert count.read_text() == "xxx"  # first start + 2 restarts
    assert not pid_file.exists() or _gone(int(pid_file.read_text()))


def test_register_command_runs_flwr_and_prints_the_run_line(tmp_path, monkeypatch, capsys):
    seen = []

    class Done:
        returncode = 0

    monkeypatch.setattr(dcli.subprocess, "run", lambda argv, check, env: seen.append(argv) or Done())
    pub = tmp_path / "silo-1.pub"
    pub.write_text("ecdsa-sha2-nistp384 AAAA silo-1\n")
    assert cli.main(["deploy", "register", str(pub), "--connection", "prod"]) == 0
    assert seen[0][1:] == ["supernode", "register", str(pub), "prod", "--name", "silo-1"]
    # the closing hint is the guide's step 6 (run-line), not a bare `flwr run` of flwr-run.toml's 10 clients
    out = capsys.readouterr().out
    hint = next(line.strip() for line in out.splitlines() if line.strip().startswith("fedtune deploy run-line"))
    assert "flwr run" not in out.replace("flwr run` line", "")
    assert shlex.split(hint)[:5] == ["fedtune", "deploy", "run-line", "--connection", "prod"]
    step6 = GUIDE.read_text().split("### 6.")[1]
    assert "fedtune deploy run-line --connection fedtune" in step6 and "--config" in hint and "--config" in step6
    assert "step 6" in out
    assert cli.main(["deploy", "register", str(tmp_path / "none.pub"), "--connection", "prod"]) == 2


def test_run_line_validates_the_config(capsys):
    assert (
        cli.main(["deploy", "run-line", "--connection", "prod", "--app", str(ROOT), "-s", "federation.rounds=3"]) == 0
    )
    line = capsys.readouterr().out.strip()
    assert shlex.split(line)[:4] == ["flwr", "run", str(ROOT), "prod"]
    assert cli.main(["deploy", "run-line", "--connection", "prod", "--app", str(ROOT), "-s", "federation.bogus=3"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_run_line_passes_secure_aggregation_but_not_resume(capsys):
    secure = ["-s", "aggregation.secure=secagg+", "-s", "federation.fraction_train=1.0"]
    assert cli.main(["deploy", "run-line", "--connection", "prod", "--app", str(ROOT), *secure]) == 0
    assert "aggregation.secure" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "deploy",
                "run-line",
                "--connection",
                "prod",
                "--app",
                str(ROOT),
                *secure,
                "-s",
                "output.dir=runs/x",
                "--resume",
            ]
        )
        == 2
    )
    assert "secagg+" in capsys.readouterr().err


# ---- the SuperNode launcher's polling ------------------------------------------------


def test_poll_clock_shortens_flowers_sleeps_while_a_run_is_active():
    from fedtune.deploy.supernode import FIRST_IDLE_S, MAX_IDLE_S, REPLY_CHECK_S, PollClock

    slept: list[float] = []
    clock = PollClock(sleep=slept.append)
    for _ in range(10):
        clock.sleep(3)  # Flower: after a pull that found no message
    assert slept == [min(FIRST_IDLE_S * 2**i, MAX_IDLE_S) for i in range(10)]
    assert slept[0] == 0.02 and slept[-1] == 3.0  # idle: as rarely as Flower's loop
    slept.clear()
    clock.activity()  # a pull brought a message: fast again
    clock.sleep(3)
    clock.sleep(0.5)  # Flower: waiting for the ClientApp's reply
    clock.sleep(1.25)  # anything else is Flower's own
    assert slept == [FIRST_IDLE_S, REPLY_CHECK_S, 1.25]
    assert clock.monotonic is time.monotonic
    with pytest.raises(ValueError, match="first"):
        PollClock(first=5.0)


def test_poll_clock_stays_fast_while_a_run_is_active_then_slows_to_flowers_pace():
    from fedtune.deploy.supernode import BUSY_CAP_S, BUSY_WINDOW_S, MAX_IDLE_S, PollClock

    now, slept = [1000.0], []
    clock = PollClock(sleep=slept.append, clock=lambda: now[0])
    clock.activity()  # a round's message
    for _ in range(12):  # the server aggregates and evaluates: the next round is due
        clock.sleep(3)
        now[0] += slept[-1]
    assert max(slept) == BUSY_CAP_S == 0.25 and slept[-3:] == [BUSY_CAP_S] * 3
    now[0] += BUSY_WINDOW_S  # no message for a minute: the run is over
    for _ in range(6):
        clock.sleep(3)
    assert slept[-1] == MAX_IDLE_S and slept[-6] == BUSY_CAP_S


def test_install_wraps_the_loop_and_refuses_a_module_it_does_not_know():
    import types

    from fedtune.deploy import supernode as launcher

    pulled, fetched = iter([None, 7]), []
    loop = types.SimpleNamespace(
        time=time,
        _pull_and_store_message=lambda **kw: next(pulled),
        pull_objects=lambda ids, pull_object_fn, **kw: fetched.append(kw) or {},
    )
    slept: list[float] = []
    clock = launcher.PollClock(sleep=slept.append)
    assert launcher.install(loop, clock)
    assert loop.time is clock
    assert loop._pull_and_store_message(state=None) is None
    loop.time.sleep(3)
    loop.time.sleep(3)
    assert loop._pull_and_store_message(state=None) == 7  # a message: the next idle sleep is short again
    loop.time.sleep(3)
    assert slept == [0.02, 0.04, 0.02]
    loop.pull_objects(["a"], pull_object_fn=None)
    assert fetched == [
        {"initial_backoff": launcher.OBJECT_FIRST_BACKOFF_S, "backoff_cap": launcher.OBJECT_BACKOFF_CAP_S}
    ]
    assert not launcher.install(types.SimpleNamespace(time=time), launcher.PollClock())


def test_flowers_supernode_loop_is_the_one_the_launcher_expects():
    # the launcher maps flwr 1.41's own sleep values; a Flower upgrade that changes them must fail here
    import inspect

    import flwr.supernode.start_client_internal as loop

    src = inspect.getsource(loop)
    assert loop.time is time and callable(loop._pull_and_store_message) and callable(loop.pull_objects)
    assert src.count("time.sleep(3)") == 1 and src.count("time.sleep(0.5)") == 2
    # ... and the connection's values it replaces: the heartbeat each module reads at call time,
    # the retry invoker's attributes, the SuperLink's bounds and its code for a refused activation
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as connection
    from flwr.common import constant
    from flwr.supercore.error.base import ApiErrorCode

    from fedtune.deploy import supernode as launcher

    assert connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 30
    assert "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" in inspect.getsource(heartbeat.HeartbeatSender)
    assert inspect.getsource(connection).count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") == 2
    assert "retry_invoker = make_simple_http_retry_invoker()" in inspect.getsource(connection)
    invoker = connection.make_simple_http_retry_invoker()
    assert callable(invoker.wait_gen_factory) and callable(invoker.should_giveup) and callable(invoker.on_success)
    assert constant.HEARTBEAT_MIN_INTERVAL == launcher.HEARTBEAT_S and constant.HEARTBEAT_PATIENCE == 2
    assert constant.MAX_RETRY_DELAY == 20 > launcher.RECONNECT_CAP_S
    assert ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED == launcher.ACTIVATION_FAILED
    res = subprocess.run(
        [sys.executable, str(Path(dcli.__file__).with_name("supernode.py")), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=flower_env(),
    )
    assert res.returncode == 0 and "--superlink" in res.stdout and "fedtune: flwr" not in res.stderr


# ---- what a newcomer meets: one line saying what to do --------------------------------


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_database_in_a_missing_folder_is_one_line(tmp_path, execs, capsys):
    pki = _certs(tmp_path)
    capsys.readouterr()
    missing = tmp_path / "srv" / "fedtune" / "superlink.db"
    assert cli.main(["deploy", "superlink", "--certs", str(pki), "--database", str(missing)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fedtune: error: --database") and f"mkdir -p {missing.parent}" in line and not execs
    missing.parent.mkdir(parents=True)
    assert cli.main(["deploy", "superlink", "--certs", str(pki), "--database", str(missing)]) == 0
    assert execs[0][-2:] == ["--database", str(missing)]


def test_a_supernode_that_stops_itself_says_why(tmp_path, capfd):
    # Flower's SuperNode exits 0 ("terminated gracefully") when the SuperLink answers 401 (unregistered)
    node, worker = _py("import time; time.sleep(0.3)"), _py("import time; time.sleep(60)")
    assert dcli.supervise(node, worker, poll=0.05, key="keys/hospital-a") == 1  # not asked to stop: a failure
    line = _one_line(capfd.readouterr().err)
    assert "no longer accepts its key" in line and "fedtune deploy register keys/hospital-a.pub" in line
    node = _py("raise SystemExit(1)")
    assert dcli.supervise(node, worker, poll=0.05, key="keys/hospital-a") == 1
    line = _one_line(capfd.readouterr().err)
    assert "status 1" in line and "Failed to activate SuperNode" in line and "keys/hospital-a.pub" in line


def test_an_unauthorized_heartbeat_is_one_line_not_a_traceback(capsys):
    import threading
    import types

    import httpx

    from fedtune.deploy.supernode import UNAUTHORIZED_MESSAGE, quiet_unauthorized

    request = httpx.Request("POST", "https://127.0.0.1:8000/api/v0/fleet/send-node-heartbeat")
    err = httpx.HTTPStatusError("401 Unauthorized", request=request, response=httpx.Response(401, request=request))
    passed = []
    hook = quiet_unauthorized(passed.append)
    hook(types.SimpleNamespace(exc_value=err))
    assert _one_line(capsys.readouterr().err) == UNAUTHORIZED_MESSAGE and not passed
    # the heartbeat's other answer to a dropped key (flwr 1.41's sender raises this on success = False)
    hook(
        types.SimpleNamespace(
            exc_value=RuntimeError("Heartbeat failed unexpectedly. The SuperLink does not recognize this SuperNode.")
        )
    )
    assert _one_line(capsys.readouterr().err) == UNAUTHORIZED_MESSAGE and not passed
    other = types.SimpleNamespace(exc_value=ValueError("x"))
    hook(other)
    another = types.SimpleNamespace(exc_value=RuntimeError("x"))
    hook(another)
    assert passed == [other, another]  # anything else: the default hook's traceback
    # a real thread dying of it prints the line only
    threading_hook = threading.excepthook
    threading.excepthook = quiet_unauthorized(threading_hook)
    try:

        def heartbeat():
            raise err

        t = threading.Thread(target=heartbeat)
        t.start()
        t.join()
    finally:
        threading.excepthook = threading_hook
    assert _one_line(capsys.readouterr().err) == UNAUTHORIZED_MESSAGE


def _toml_blocks(text: str) -> list[str]:
    return [b.split("```", 1)[0] for b in text.split("```toml\n")[1:]]


def test_the_documented_flwr_connections_paste_into_one_config_flower_accepts(tmp_path, monkeypatch, capsys):
    # Flower writes a default $FLWR_HOME/config.toml on first use ([superlink], [superlink.local], ...);
    # the README's and the guide's tables are added to it, and Flower parses every connection without
    # a deprecation warning (the simulation's size goes on `flwr run --federation-config`, as the
    # README's command line does; tests/test_flwr_run.py runs that line)
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.local_superlink import _check_deprecated_option_only_usage
    from flwr.cli.run.run import _parse_deprecated_options

    blocks = _toml_blocks((ROOT / "README.md").read_text()) + _toml_blocks(GUIDE.read_text())
    assert len(blocks) >= 2  # the README's local simulation, the guide's connection
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(DEFAULT_FLOWER_CONFIG_TOML + "\n" + "\n".join(blocks))
    doc = tomllib.loads((home / "config.toml").read_text())  # no table declared twice
    monkeypatch.setenv("FLWR_HOME", str(home))
    names = [n for n, v in doc["superlink"].items() if isinstance(v, dict)]
    assert {"fedtune", "fedtune-local"} <= set(names)
    capsys.readouterr()
    for name in names:
        conn = read_superlink_connection(name)
        _check_deprecated_option_only_usage(conn)  # what `flwr run` checks first ...
        _parse_deprecated_options(conn)  # ... and then (`options.` fields: use --federation-config)
        assert conn.address and conn.options is None, name
    assert "deprecated" not in capsys.readouterr().out.lower()


# ---- a SuperNode that does not speak the SuperLink's TLS: one line, before Flower starts -------


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_error(404)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a probe hangs up after the status line; the server's traceback is noise


@contextlib.contextmanager
def _server(pki: Path | None = None, *, port: int = 0):
    """A real HTTP server on 127.0.0.1 (HTTPS with ``pki``'s server.pem/.key); yields its port."""
    srv = _Server(("127.0.0.1", port), _Quiet)
    if pki is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def two_cas(tmp_path):
    """The SuperLink's PKI (``fedtune deploy certs``: its CA signed server.pem) and another CA."""
    pki = _certs(tmp_path)
    other = create_ca(tmp_path / "other", "fedtune-ca")  # same name, another key: only the signature differs
    return pki, other.cert


def test_probe_tells_the_ca_the_superlink_uses_from_another(two_cas):
    pki, other_ca = two_cas
    with _server(pki) as port:
        address = f"127.0.0.1:{port}"
        assert probe_superlink(address, pki / "ca.crt") == Probe(
            "ok", f"TLS with {address}, certificate verified with {pki / 'ca.crt'}"
        )
        wrong = probe_superlink(address, other_ca)
        assert wrong.verdict == "refused" and "did not sign" in wrong.message and "--certs" in wrong.message
        assert "unable to get local issuer certificate" in wrong.message  # OpenSSL's own words
        plain = probe_superlink(address, None)  # --insecure: Flower would retry this forever
        assert plain.verdict == "refused" and "speaks TLS" in plain.message and "--certs" in plain.message
    junk = pki / "server.key"  # not a CA certificate
    bad = probe_superlink("127.0.0.1:1", junk)
    assert bad.verdict == "refused" and bad.message.startswith(f"--certs: {junk} is not a readable PEM CA")


def test_probe_checks_the_name_dialed_against_the_certificate(tmp_path):
    ca = create_ca(tmp_path / "pki")
    create_server_cert(ca, tmp_path / "pki", ["sl.example.org"])  # no 127.0.0.1 in its SAN
    with _server(tmp_path / "pki") as port:
        found = probe_superlink(f"127.0.0.1:{port}", ca.cert)
    assert found.verdict == "refused" and "does not name 127.0.0.1" in found.message
    assert "fedtune deploy certs --host 127.0.0.1" in found.message


def test_probe_tells_plain_http_from_tls_and_from_nothing(two_cas):
    pki, _ = two_cas
    with _server() as port:  # a plain-HTTP server, as `fedtune deploy superlink --insecure` runs
        address = f"127.0.0.1:{port}"
        assert probe_superlink(address, None) == Probe("ok", f"plain HTTP with {address}")
        tls = probe_superlink(address, pki / "ca.crt")
        assert tls.verdict == "refused" and "speaks plain HTTP" in tls.message and "--insecure" in tls.message
    port = _free_port()  # nothing listens: no verdict, Flower keeps trying
    for ca in (pki / "ca.crt", None):
        found = probe_superlink(f"127.0.0.1:{port}", ca, timeout=2.0)
        assert found.verdict == "unknown" and "no connection" in found.message


def _supernode_args(address: str, *tls: str) -> list[str]:
    return [
        "deploy",
        "supernode",
        "--superlink",
        address,
        *tls,
        "--partition-id",
        "0",
        "--num-partitions",
        "1",
        "--port",
        "29100",
    ]


def test_a_supernode_that_does_not_speak_the_superlinks_tls_stops_in_one_line(
    tmp_path, two_cas, execs, monkeypatch, capsys
):
    pki, other_ca = two_cas
    assert cli.main(["deploy", "keys", "--out", str(tmp_path / "k"), "--name", "silo-1"]) == 0
    key = str(tmp_path / "k" / "silo-1")
    supervised = []
    monkeypatch.setattr(dcli, "supervise", lambda node, worker, **kw: supervised.append((node, kw)) or 0)
    capsys.readouterr()
    with _server(pki) as tls_port, _server() as plain_port:
        tls, plain = f"127.0.0.1:{tls_port}", f"127.0.0.1:{plain_port}"
        cases = [
            (_supernode_args(tls, "--certs", str(other_ca), "--key", key), "did not sign"),
            (_supernode_args(tls, "--insecure"), "speaks TLS"),
            (_supernode_args(plain, "--certs", str(pki), "--key", key), "speaks plain HTTP"),
            (_supernode_args(tls, "--key", key), "--certs and --key are required unless --insecure"),
        ]
        for argv, what in cases:
            for isolation in ("process", "subprocess"):
                assert cli.main([*argv, "--isolation", isolation]) == 2, argv
                line = _one_line(capsys.readouterr().err)  # no "running:", no --insecure warning first
                assert line.startswith("fedtune: error: ") and what in line, line
        assert not execs and not supervised  # no Flower process was started
        # the matching settings start it, with the probe for the supervisor
        assert cli.main([*_supernode_args(tls, "--certs", str(pki), "--key", key)]) == 0
        assert cli.main([*_supernode_args(plain, "--insecure")]) == 0
    (_, kw_tls), (node, kw_plain) = supervised
    assert kw_tls["watch"] is False and kw_plain["watch"] is False and "--insecure" in node
    assert kw_plain["probe"]().verdict == "unknown"  # the servers are gone now


def test_the_supervisor_stops_a_supernode_whose_superlink_turns_out_to_speak_tls(two_cas, capfd):
    # started --insecure while the SuperLink was down: Flower would retry the TLS SuperLink forever
    pki, _ = two_cas
    port = _free_port()
    node, worker = _py("import time; time.sleep(60)"), _py("import time; time.sleep(60)")
    probe = lambda: probe_superlink(f"127.0.0.1:{port}", None, timeout=1.0)  # noqa: E731
    assert probe().verdict == "unknown"
    up: list[contextlib.AbstractContextManager] = []

    def superlink_comes_up():
        up.append(_server(pki, port=port))
        up[0].__enter__()

    timer = threading.Timer(1.0, superlink_comes_up)  # the supervisor needs the main thread (signals)
    t0 = time.monotonic()
    timer.start()
    try:
        assert dcli.supervise(node, worker, poll=0.05, probe=probe, watch=True, probe_every=0.1) == 1
    finally:
        timer.cancel()
        for server in up:
            server.__exit__(None, None, None)
    assert time.monotonic() - t0 >= 1.0  # nothing answered before: the SuperNode kept trying
    line = _one_line(capfd.readouterr().err)
    assert line.startswith("fedtune: error: the SuperLink at") and "speaks TLS" in line


def test_a_supernode_that_failed_on_tls_is_explained_by_the_probe(two_cas, capfd):
    # the SuperLink came up with another CA after the start: Flower exits 1 ("SSL/TLS handshake
    # error detected", exit code 305); the line says which CA, not "not registered"
    pki, other_ca = two_cas
    with _server(pki) as port:
        probe = lambda: probe_superlink(f"127.0.0.1:{port}", other_ca)  # noqa: E731
        worker = _py("import time; time.sleep(60)")
        assert dcli.supervise(_py("raise SystemExit(1)"), worker, poll=0.05, probe=probe) == 1
    line = _one_line(capfd.readouterr().err)
    assert "did not sign" in line and "Failed to activate" not in line


# ---- the launcher's recovery settings --------------------------------------------------


def _refused_activation():
    import httpx

    request = httpx.Request("POST", "https://127.0.0.1:8000/v1/fleet/activate-node")
    # what flwr 1.41's SuperLink answers (FlowerError.to_json of FLEET_NODE_ACTIVATION_FAILED)
    response = httpx.Response(412, request=request, json={"code": 2004, "detail": "Failed to activate SuperNode."})
    return httpx.HTTPStatusError("412 Precondition Failed", request=request, response=response)


def test_a_refused_activation_is_asked_again_within_the_patience_then_given_up():
    from flwr.supercore.retry import make_simple_http_retry_invoker

    from fedtune.deploy.supernode import activation_refused, capped_backoff, patient_invoker

    refused = _refused_activation()
    assert activation_refused(refused) and not activation_refused(ValueError("x"))
    assert list(zip(range(5), capped_backoff(1.0, 5.0))) == [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (4, 5.0)]

    # a node still counted online: refused twice, then accepted (Flower's own invoker, short waits)
    said: list[str] = []
    answers = iter([refused, refused, "node 7"])

    def activate():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    invoker = patient_invoker(make_simple_http_retry_invoker, cap=0.01, say=said.append)
    assert invoker.invoke(activate) == "node 7"
    assert len(said) == 2 and "not registered" in said[0] and "still counts this node online" in said[0]
    assert said[1].startswith("fedtune: the SuperLink activated this SuperNode")

    # a key that is not registered: refused until the patience is spent, then Flower's error
    now = [0.0]

    def never():
        now[0] += 10.0
        raise refused

    said.clear()
    invoker = patient_invoker(
        make_simple_http_retry_invoker, patience=25.0, cap=0.01, clock=lambda: now[0], say=said.append
    )
    with pytest.raises(type(refused)):
        invoker.invoke(never)
    assert now[0] == 40.0 and len(said) == 1  # refused at 10, 20, 30 (past 10 + 25): given up
    # while refused, the next attempt comes within ACTIVATION_RETRY_S; otherwise Flower's
    # exponential back-off, capped at RECONNECT_CAP_S
    import httpx

    from fedtune.deploy.supernode import ACTIVATION_RETRY_S, RECONNECT_CAP_S

    invoker = patient_invoker(make_simple_http_retry_invoker, say=said.append)
    waits = invoker.wait_gen_factory()
    assert invoker.should_giveup(refused) is False and next(waits) == ACTIVATION_RETRY_S == 2.0
    assert invoker.should_giveup(httpx.ConnectError("connection refused")) is False  # the SuperLink is down
    assert [next(waits) for _ in range(5)] == [1.0, 2.0, 4.0, RECONNECT_CAP_S, RECONNECT_CAP_S]
    # anything else is Flower's decision: a 404 is not retried

    request = httpx.Request("POST", "https://x/")
    other = httpx.HTTPStatusError("404", request=request, response=httpx.Response(404, request=request))
    assert patient_invoker(make_simple_http_retry_invoker).should_giveup(other) is True


def test_install_connection_sets_heartbeat_and_retries_or_changes_nothing():
    import types

    from fedtune.deploy import supernode as launcher

    factory = launcher.capped_backoff  # any callable: install only wraps it
    conn = types.SimpleNamespace(HEARTBEAT_DEFAULT_INTERVAL=30, make_simple_http_retry_invoker=factory)
    beat = types.SimpleNamespace(HEARTBEAT_DEFAULT_INTERVAL=30)
    assert launcher.install_connection(conn, beat)
    assert conn.HEARTBEAT_DEFAULT_INTERVAL == beat.HEARTBEAT_DEFAULT_INTERVAL == launcher.HEARTBEAT_S == 10
    assert conn.make_simple_http_retry_invoker.func is launcher.patient_invoker
    other = types.SimpleNamespace(HEARTBEAT_DEFAULT_INTERVAL=15, make_simple_http_retry_invoker=factory)
    assert not launcher.install_connection(other, types.SimpleNamespace(HEARTBEAT_DEFAULT_INTERVAL=30))
    assert other.HEARTBEAT_DEFAULT_INTERVAL == 15 and other.make_simple_http_retry_invoker is factory


def test_setup_environment_leaves_transformers_unimported_and_quiet_once_imported():
    """`fedtune deploy` commands start fast: no transformers import just to set its verbosity."""
    code = (
        "import sys\n"
        "from fedtune.env import setup_environment\n"
        "setup_environment()\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers.utils import logging\n"
        "print(logging.get_verbosity(), logging.is_progress_bar_enabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(logging.ERROR), "False"]
