"""``fedtune deploy ...``: thin wrappers over Flower's deployment commands.

Every command that starts a Flower process builds its argv with a pure function
(``superlink_argv``, ``supernode_argv``, ``worker_argv``, ``register_argv``,
``run_argv``), prints it, and runs it, so what fedtune does can always be redone
by hand. The flags are the ones verified in ``docs/deploy-notes.md`` (flwr 1.41):
TLS and SuperNode authentication by default, plain text only with an explicit
``--insecure``.

``fedtune deploy supernode`` starts the SuperNode with ``--isolation process``
and, next to it, one long-lived ClientApp process (:mod:`fedtune.deploy.worker`)
that keeps torch and the base model loaded across rounds; it supervises both and
stops both, by PID, when either ends or it is signalled. ``--isolation
subprocess`` is Flower's default (a fresh ``flwr-clientapp`` per message). The
SuperNode is Flower's own, run through :mod:`fedtune.deploy.supernode` (short
polling while a run is active) unless ``--flower-polling`` is given. Before it
starts, one TLS handshake with the SuperLink (:mod:`fedtune.deploy.probe`) stops a
SuperNode that trusts another CA or disagrees on ``--insecure``, in one line.

Nothing here imports ``flwr``; ``fedtune.cli`` registers the subcommands with
:func:`register`. A failure a user can fix ends in one line saying what to do.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from fedtune.deploy.probe import Probe, probe_superlink
from fedtune.env import flower_env, flower_executable
from fedtune.errors import ConfigError, FedtuneError

__all__ = [
    "connection_toml",
    "deploy_env",
    "fast_polling_argv",
    "node_config",
    "node_exit_message",
    "register",
    "register_hint",
    "register_argv",
    "run_argv",
    "run_config_arg",
    "server_hosts",
    "superlink_argv",
    "supernode_argv",
    "worker_argv",
]

CA_CERT = "ca.crt"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
# The SuperLink's own SuperExec dials 127.0.0.1:<port> over TLS, so the server
# certificate must name 127.0.0.1 whatever address the silos use (deploy-notes §1).
LOOPBACK = "127.0.0.1"
SUPERLINK_PORT = 8000  # flower-superlink's own default
ISOLATION_MODES = ("process", "subprocess")  # flower-supernode --isolation
# Flower's SuperExec (the SuperLink's, launching the ServerApp of each run; a SuperNode's with
# --isolation subprocess, one ClientApp per message) polls for tasks every 1 s by default
SUPEREXEC_POLL_S = "0.1"
# While the SuperLink has not answered the TLS probe (fedtune.deploy.probe), ask again this often
PROBE_EVERY_S = 2.0

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d+)$")


# ---- pure argv builders -----------------------------------------------------------


def server_hosts(hosts: Sequence[str]) -> list[str]:
    """The SAN list for the server certificate: ``hosts`` in order, without
    duplicates, with ``127.0.0.1`` appended when missing."""
    out: list[str] = []
    for h in [*hosts, LOOPBACK]:
        h = h.strip()
        if h and h not in out:
            out.append(h)
    return out


def superlink_argv(
    certs_dir: str | os.PathLike[str],
    *,
    host: str,
    port: int,
    insecure: bool = False,
    database: str | os.PathLike[str] | None = None,
    exe: str = "flower-superlink",
) -> list[str]:
    """``flower-superlink`` with TLS (``ca.crt``, ``server.pem``, ``server.key`` from
    ``certs_dir``) and SuperNode authentication, or plain text with ``insecure``.

    The ServerApp always runs in the current environment: runtime dependency
    installation (``uv sync`` of the app's dependencies) is disabled.
    """
    _check_port("--port", port)
    argv = [exe]
    if insecure:
        argv.append("--insecure")
    else:
        d = Path(certs_dir)
        argv += [
            "--ssl-ca-certfile",
            str(d / CA_CERT),
            "--ssl-certfile",
            str(d / SERVER_CERT),
            "--ssl-keyfile",
            str(d / SERVER_KEY),
            "--enable-supernode-auth",
        ]
    argv += ["--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    return argv


def node_config(partition_id: int, num_partitions: int, data_path: str | None = None) -> str:
    """The ``--node-config`` string the fedtune ClientApp reads (TOML values)."""
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(f"--num-partitions: expected a positive integer, got {num_partitions!r}")
    if isinstance(partition_id, bool) or not isinstance(partition_id, int) or not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"--partition-id: expected an integer in [0, {num_partitions - 1}] "
            f"(--num-partitions is {num_partitions}), got {partition_id!r}"
        )
    items = [f"partition-id={partition_id}", f"num-partitions={num_partitions}"]
    if data_path is not None:
        if '"' in data_path or "\\" in data_path:
            raise ConfigError(f"--data-path: must not contain '\"' or '\\', got {data_path!r}")
        items.append(f'data-path="{data_path}"')
    return " ".join(items)


def supernode_argv(
    superlink: str,
    *,
    ca_cert: str | os.PathLike[str] | None,
    private_key: str | os.PathLike[str] | None,
    partition_id: int,
    num_partitions: int,
    port: int,
    data_path: str | None = None,
    insecure: bool = False,
    isolation: str | None = None,
    exe: str = "flower-supernode",
) -> list[str]:
    """``flower-supernode`` dialing ``superlink`` (``HOST:PORT``) over TLS, signing its
    requests with ``private_key``; ``port`` is its local Runtime API (one per host).

    ``isolation="process"`` makes the SuperNode launch no ClientApp itself: an
    executor started beside it (:func:`worker_argv`) claims the tasks.
    """
    _check_address("--superlink", superlink)
    _check_port("--port", port)
    if isolation is not None and isolation not in ISOLATION_MODES:
        raise ConfigError(f"--isolation: expected one of {', '.join(ISOLATION_MODES)}, got {isolation!r}")
    argv = [exe, "--superlink", superlink]
    if insecure:
        if private_key is not None:
            raise ConfigError("--key: SuperNode authentication needs TLS; drop --key or --insecure")
        argv.append("--insecure")
    else:
        if ca_cert is None or private_key is None:
            raise ConfigError("--certs and --key are required unless --insecure is given")
        argv += ["--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(private_key)]
    argv += ["--node-config", node_config(partition_id, num_partitions, data_path), "--port", str(port)]
    if isolation is not None:
        argv += ["--isolation", isolation]
    return argv


def fast_polling_argv(flower_argv: Sequence[str], *, python: str | None = None) -> list[str]:
    """``flower-supernode ARGS`` as ``python .../fedtune/deploy/supernode.py ARGS``: Flower's own
    SuperNode with its fixed 3-s idle sleep shortened while a run is active (see that module)."""
    return [python or sys.executable, str(Path(__file__).with_name("supernode.py")), *flower_argv[1:]]


def worker_argv(port: int, *, parent_pid: int | None = None, python: str | None = None) -> list[str]:
    """The long-lived ClientApp process for the SuperNode whose Runtime API is on
    ``127.0.0.1:port`` (its ``--port``); it exits when ``parent_pid`` is gone."""
    _check_port("--port", port)
    argv = [
        python or sys.executable,
        str(Path(__file__).with_name("worker.py")),
        "--runtime-api-address",
        f"{LOOPBACK}:{port}",
    ]
    if parent_pid is not None:
        argv += ["--parent-pid", str(parent_pid)]
    return argv


def register_argv(
    public_key: str | os.PathLike[str], connection: str, *, name: str | None = None, exe: str = "flwr"
) -> list[str]:
    """``flwr supernode register KEY.pub CONNECTION [--name NAME]``."""
    _check_connection(connection)
    argv = [exe, "supernode", "register", str(public_key), connection]
    if name:
        argv += ["--name", name]
    return argv


def run_config_arg(config: str | None = None, overrides: Sequence[str] = (), *, resume: bool = False) -> str:
    """The ``--run-config`` value for fedtune's declared keys (``config``, ``overrides``, ``resume``).

    ``overrides`` are fedtune ``SECTION.KEY=VALUE`` (or ``~SECTION.KEY``) items. They travel in one
    TOML string that fedtune splits with ``shlex``; flwr reads ``--run-config``
    with a regex that allows no escaped quotes, so items must not contain quotes
    or backslashes; an item with spaces is single-quoted inside the string.
    """
    parts: list[str] = []
    if config is not None:
        if '"' in config or "\\" in config or any(c.isspace() for c in config):
            raise ConfigError(f"--config: path must not contain spaces, '\"' or '\\', got {config!r}")
        parts.append(f'config="{config}"')
    from fedtune.config import parse_overrides

    items = []
    for item in overrides:
        parse_overrides([item])  # SECTION.KEY=VALUE or ~SECTION.KEY, else refused naming the item
        if any(c in item for c in "\"'\\"):
            raise ConfigError(f"--set {item!r}: quotes and backslashes cannot pass through flwr --run-config")
        items.append(f"'{item}'" if any(c.isspace() for c in item) else item)
    if items:
        joined = " ".join(items)
        parts.append(f'overrides="{joined}"')
    if resume:
        parts.append("resume=true")
    return " ".join(parts)


def run_argv(
    app: str | os.PathLike[str],
    connection: str,
    *,
    config: str | None = None,
    overrides: Sequence[str] = (),
    stream: bool = True,
    exe: str = "flwr",
    resume: bool = False,
) -> list[str]:
    """``flwr run APP CONNECTION [--stream] [--run-config '...']``."""
    _check_connection(connection)
    argv = [exe, "run", str(app), connection]
    if stream:
        argv.append("--stream")
    rc = run_config_arg(config, overrides, resume=resume)
    if rc:
        argv += ["--run-config", rc]
    return argv


def connection_toml(name: str, address: str, ca_cert: str | os.PathLike[str] | None, *, insecure: bool = False) -> str:
    """A ``[superlink.NAME]`` table for ``$FLWR_HOME/config.toml`` (the flwr CLI's connections)."""
    _check_connection(name)
    _check_address("address", address)
    lines = [f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    else:
        if ca_cert is None:
            raise ConfigError("root-certificates: a CA certificate is required unless insecure")
        lines.append(f'root-certificates = "{Path(ca_cert).resolve()}"')  # flwr wants it absolute
    return "\n".join(lines) + "\n"


# ---- checks -----------------------------------------------------------------------


def _check_port(flag: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{flag}: expected a port number in [1, 65535], got {port!r}")


def _check_address(flag: str, address: str) -> None:
    m = _HOST_PORT.match(address or "")
    if not m:
        raise ConfigError(f"{flag}: expected HOST:PORT (no scheme, IPv6 as [addr]:port), got {address!r}")
    if m.group(1).startswith("["):
        try:
            ipaddress.IPv6Address(m.group(1)[1:-1])
        except ValueError:
            raise ConfigError(f"{flag}: {m.group(1)!r} is not an IPv6 address") from None
    _check_port(flag, int(m.group(2)))


def _check_connection(name: str) -> None:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name or ""):
        raise ConfigError(f"--connection: expected a connection name from $FLWR_HOME/config.toml, got {name!r}")


def _need_files(*paths: Path, hint: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FedtuneError(f"missing {', '.join(missing)}; {hint}")


def _announce(argv: Sequence[str]) -> None:
    print(f"fedtune: running: {shlex.join(argv)}", flush=True)


def deploy_env() -> dict[str, str]:
    """The environment of every process these commands start: this environment's Flower first on
    PATH (`flower_env`), and Flower's SuperExec polling for tasks every `SUPEREXEC_POLL_S` s
    instead of 1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``; a value the caller set wins)."""
    env = flower_env()
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    return env


def _exec(argv: list[str]) -> int:
    """Replace this process, so signals and the PID reach the Flower process itself."""
    argv = [argv[0] if os.path.isabs(argv[0]) else flower_executable(argv[0]), *argv[1:]]
    _announce(argv)
    try:
        os.execve(argv[0], argv, deploy_env())
    except OSError as err:
        raise FedtuneError(f"cannot start {argv[0]}: {err.strerror or err}") from err
    return 0  # pragma: no cover


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM this child when the supervisor dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start(argv: list[str]) -> subprocess.Popen:
    _announce(argv)
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    try:
        return subprocess.Popen(argv, env=deploy_env(), preexec_fn=preexec)  # noqa: PLW1509 - single-threaded here
    except OSError as err:
        raise FedtuneError(f"cannot start {argv[0]}: {err.strerror or err}") from err


def _stop(procs: Sequence[subprocess.Popen], grace: float = 15.0) -> None:
    """SIGTERM each (the SuperNode then deactivates itself at the SuperLink), SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def node_exit_message(rc: int, key: str | None = None) -> str:
    """One line on a SuperNode that ended without being asked to, saying what to do."""
    pub = f"{key}.pub" if key else "this silo's .pub key"
    if rc == 0:  # Flower's SuperNode stops itself, "gracefully", when the SuperLink answers 401
        return (
            f"fedtune: the SuperNode stopped: the SuperLink no longer accepts its key (unregistered, or a "
            f"SuperLink restarted without --database); have the coordinator run `fedtune deploy register "
            f"{pub}`, then start this SuperNode again"
        )
    return (
        f"fedtune: the SuperNode exited with status {rc} (its messages are above); if it says 'Failed to "
        f"activate SuperNode' (code 2004), the coordinator has not registered {pub} (`fedtune deploy register`), "
        f"or the SuperLink still counted this node online from a process stopped uncleanly within the last "
        f"minute: start it again"
    )


def supervise(
    node_argv: list[str],
    worker: list[str],
    *,
    max_restarts: int = 3,
    poll: float = 0.2,
    key: str | None = None,
    probe: Callable[[], Probe] | None = None,
    watch: bool = False,
    probe_every: float = PROBE_EVERY_S,
) -> int:
    """Run the SuperNode and its ClientApp worker until the SuperNode ends or a
    signal arrives; restart a worker that dies (a crash in training code), at most
    ``max_restarts`` times a minute. Returns 0 when stopped by SIGINT/SIGTERM/SIGHUP,
    else the SuperNode's exit status (1 if it stopped itself with 0: it was not asked
    to), after one line saying why (`node_exit_message`; ``key``: the silo's private
    key, for the hint).

    ``probe`` checks the SuperLink's TLS (`probe_superlink`). With ``watch`` (the
    SuperLink had not answered before the start) it runs every ``probe_every`` s
    until the SuperLink answers; a mismatch Flower would retry forever (an
    ``--insecure`` SuperNode, a TLS SuperLink) then stops both processes with its
    line. When the SuperNode fails, a probe that finds a mismatch gives the line.
    """
    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        stop_signal.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    refused: list[str] = []
    done = threading.Event()
    if probe is not None and watch:
        threading.Thread(target=_watch, args=(probe, probe_every, done, refused), name="tls-probe", daemon=True).start()
    node = _start(node_argv)
    procs = [node]
    rc = 1
    try:
        procs.append(_start(worker))
        restarts: list[float] = []
        while not stop_signal:
            if refused:
                print(f"fedtune: error: {refused[0]}", file=sys.stderr, flush=True)
                rc = 1
                break
            if node.poll() is not None:
                time.sleep(poll)  # a Ctrl-C reaches the SuperNode and this process together
                if stop_signal:
                    rc = 0
                    break
                rc = node.returncode
                found = probe() if probe is not None and rc != 0 else None
                if found is not None and found.verdict == "refused":
                    print(f"fedtune: error: {found.message}", file=sys.stderr, flush=True)
                else:
                    print(node_exit_message(rc, key), file=sys.stderr, flush=True)
                rc = rc or 1
                break
            if procs[1].poll() is not None:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > max_restarts:
                    print(
                        f"fedtune: the ClientApp worker exited {len(restarts)} times within a minute "
                        f"(last status {procs[1].returncode}); stopping the SuperNode",
                        file=sys.stderr,
                        flush=True,
                    )
                    rc = 1
                    break
                print(
                    f"fedtune: the ClientApp worker exited with status {procs[1].returncode}; restarting it",
                    file=sys.stderr,
                    flush=True,
                )
                procs[1] = _start(worker)
            time.sleep(poll)
        else:
            rc = 0
    finally:
        done.set()
        _stop(procs)
        for s, h in old.items():
            signal.signal(s, h)
    return rc


def _watch(probe: Callable[[], Probe], every: float, done: threading.Event, refused: list[str]) -> None:
    """Probe until the SuperLink answers (or ``done``); a mismatch goes to ``refused``."""
    while not done.wait(every):
        found = probe()
        if found.verdict == "refused":
            refused.append(found.message)
        if found.verdict != "unknown":
            return


# ---- commands ---------------------------------------------------------------------


def cmd_certs(args) -> int:
    from fedtune.deploy.certs import create_ca, create_server_cert

    hosts = server_hosts(args.host)
    out = Path(args.out)
    print(f"fedtune: creating CA and server certificate in {out} for {', '.join(hosts)}", flush=True)
    ca = create_ca(out, args.ca_name, days=args.days, overwrite=args.overwrite)
    srv = create_server_cert(ca, out, hosts, days=args.days, overwrite=args.overwrite)
    print(f"  {ca.cert}   give to every silo and to the flwr CLI (root-certificates)")
    print(f"  {ca.key}    keep offline; never copy to the SuperLink host")
    print(f"  {srv.cert}, {srv.key}   SuperLink only")
    address = f"{hosts[0] if ':' not in hosts[0] else '[' + hosts[0] + ']'}:{args.port}"
    print("\nflwr CLI connection (add to $FLWR_HOME/config.toml, default ~/.flwr/config.toml):\n")
    print(connection_toml("fedtune", address, ca.cert))
    return 0


def cmd_keys(args) -> int:
    from fedtune.deploy.certs import create_supernode_keys

    for name in args.name:
        files = create_supernode_keys(args.out, name, overwrite=args.overwrite)
        print(
            f"fedtune: SuperNode key {files.private_key} (keep it in the silo), "
            f"public key {files.public_key} (send it to the coordinator)",
            flush=True,
        )
    return 0


def cmd_superlink(args) -> int:
    host = args.host or (LOOPBACK if args.insecure else "0.0.0.0")
    certs = Path(args.certs) if args.certs else None
    if not args.insecure:
        if certs is None:
            raise ConfigError("--certs: required unless --insecure (create it with `fedtune deploy certs`)")
        _need_files(
            certs / CA_CERT,
            certs / SERVER_CERT,
            certs / SERVER_KEY,
            hint="create them with `fedtune deploy certs --out DIR --host NAME`",
        )
    else:
        print("fedtune: WARNING: --insecure: plain-text traffic and no SuperNode authentication", file=sys.stderr)
    if args.database is not None:
        _check_database(args.database)
    _check_port_free(host, args.port)
    return _exec(
        superlink_argv(certs or ".", host=host, port=args.port, insecure=args.insecure, database=args.database)
    )


def _check_port_free(host: str, port: int) -> None:
    """A Fleet API port already taken makes flower-superlink log uvicorn's error and exit; say so in one line."""
    import errno
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                return  # not ours to judge (an address of another machine, ...): Flower says what it says
            raise FedtuneError(
                f"--port: {port} on {host} is in use (another SuperLink still running?); stop it or pick another port"
            ) from None


def _check_database(database: str) -> None:
    """A SQLite file whose folder is missing makes flower-superlink die in a long SQLAlchemy traceback."""
    if database.startswith(":"):  # Flower's in-memory names
        return
    folder = Path(database).expanduser().absolute().parent
    if not folder.is_dir():
        raise FedtuneError(
            f"--database: folder {folder} does not exist; create it (mkdir -p {folder}) "
            "or give a file in an existing folder"
        )
    if not os.access(folder, os.W_OK):
        raise FedtuneError(f"--database: folder {folder} is not writable by this user; choose another folder")


def cmd_supernode(args) -> int:
    ca = key = None
    if not args.insecure:
        if not args.certs or not args.key:
            raise ConfigError(
                "--certs and --key are required unless --insecure is given (the coordinator's ca.crt, "
                "and this silo's key from `fedtune deploy keys`)"
            )
        ca = Path(args.certs)
        if ca.is_dir():
            ca = ca / CA_CERT
        key = Path(args.key)
        _need_files(ca, key, hint="get ca.crt from the coordinator; create the key with `fedtune deploy keys`")
    if args.data_path is not None:
        if not Path(args.data_path).exists():
            raise FedtuneError(f"--data-path: {args.data_path} does not exist on this machine")
    argv = supernode_argv(
        args.superlink,
        ca_cert=ca,
        private_key=key if not args.insecure else args.key,
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
        port=args.port,
        data_path=args.data_path,
        insecure=args.insecure,
        isolation=args.isolation,
    )
    # a TLS mismatch stops here, before Flower starts: Flower would exit with its exit code 305
    # (another CA; TLS against a plain-text SuperLink) or retry forever (--insecure against TLS)
    probe = partial(probe_superlink, args.superlink, ca)
    first = probe()
    if first.verdict == "refused":
        raise FedtuneError(first.message)
    if args.insecure:
        print("fedtune: WARNING: --insecure: plain-text traffic, no SuperNode authentication", file=sys.stderr)
    if first.verdict == "unknown":
        print(
            f"fedtune: {first.message}: starting the SuperNode anyway (it keeps trying; TLS is checked "
            "when the SuperLink answers)",
            file=sys.stderr,
            flush=True,
        )
    argv = [flower_executable(argv[0]), *argv[1:]] if args.flower_polling else fast_polling_argv(argv)
    if args.isolation == "subprocess":
        return _exec(argv)
    return supervise(
        argv,
        worker_argv(args.port, parent_pid=os.getpid()),
        key=args.key,
        probe=probe,
        watch=first.verdict == "unknown",
    )


def cmd_register(args) -> int:
    pub = Path(args.public_key)
    _need_files(pub, hint="ask the silo for the .pub file written by `fedtune deploy keys`")
    argv = register_argv(pub, args.connection, name=args.name or pub.name.removesuffix(".pub"))
    argv[0] = flower_executable(argv[0])
    _announce(argv)
    rc = subprocess.run(argv, check=False, env=flower_env()).returncode
    if rc == 0:
        print(register_hint(args.connection))
    return rc


def register_hint(connection: str) -> str:
    """What to do once a silo is registered: step 6 of docs/run-across-organizations.md."""
    run_line = [
        "fedtune",
        "deploy",
        "run-line",
        "--connection",
        connection,
        "--config",
        "CONFIG.toml",
        "-s",
        "federation.num_clients=N",
        "-s",
        "output.dir=DIR",
    ]
    return (
        f"fedtune: when every silo is online (`flwr supernode list {connection}`), validate the run and "
        f"print its `flwr run` line (docs/run-across-organizations.md, step 6):\n  {shlex.join(run_line)}"
    )


def cmd_run_line(args) -> int:
    app = Path(args.app)
    cfg = _check_run_config(app, args.config, args.overrides)
    if args.resume and cfg.aggregation.secure != "none":
        raise ConfigError("--resume: not supported with aggregation.secure = 'secagg+'")
    if args.resume and not cfg.output.dir:
        raise ConfigError(
            "--resume: set output.dir (the run directory holding the checkpoint), e.g. --set output.dir=runs/x"
        )
    print(
        shlex.join(
            run_argv(
                args.app,
                args.connection,
                config=args.config,
                overrides=args.overrides,
                stream=not args.no_stream,
                resume=args.resume,
            )
        )
    )
    return 0


def _check_run_config(app: Path, config_file: str | None, overrides: Sequence[str]):
    """Validate the config the ServerApp will load, here, before anything is sent; return it."""
    from fedtune import config

    pyproject = app / "pyproject.toml"
    if not pyproject.is_file():
        raise FedtuneError(f"--app: {app} has no pyproject.toml (point it at the fedtune app directory)")
    if config_file is None:
        declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        config_file = declared.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}).get("config")
    path = None
    if config_file:
        path = Path(config_file) if Path(config_file).is_absolute() else app / config_file
    return config.load(path, config.parse_overrides(list(overrides)))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fedtune deploy {certs,keys,superlink,supernode,register,run-line}``."""
    from fedtune.cli import add_unset_arg

    deploy = sub.add_parser("deploy", help="run across organizations: certificates, SuperLink, SuperNodes")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)

    p = dsub.add_parser("certs", help="create a CA and the SuperLink's TLS certificate (coordinator)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="DNS name or IP the silos dial (repeatable); 127.0.0.1 is always added",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--ca-name", default="fedtune-ca", help="CA common name")
    p.add_argument("--port", type=int, default=SUPERLINK_PORT, help="port for the printed connection (default 8000)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_certs)

    p = dsub.add_parser("keys", help="create SuperNode authentication keys (each silo)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", action="append", required=True, help="key name, e.g. silo-1 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_keys)

    p = dsub.add_parser("superlink", help="start the SuperLink with TLS and SuperNode authentication (coordinator)")
    p.add_argument("--certs", help="directory with ca.crt, server.pem, server.key")
    p.add_argument("--host", help="listen address (default 0.0.0.0; 127.0.0.1 with --insecure)")
    p.add_argument(
        "--port", type=int, default=SUPERLINK_PORT, help="HTTPS port for silos and the flwr CLI (default 8000)"
    )
    p.add_argument("--database", help="SQLite file: registrations and runs survive a restart")
    p.add_argument("--insecure", action="store_true", help="plain text, no SuperNode authentication (testing only)")
    p.set_defaults(func=cmd_superlink)

    p = dsub.add_parser("supernode", help="start this silo's SuperNode")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    p.add_argument("--certs", help="the coordinator's ca.crt, or a directory holding it")
    p.add_argument("--key", help="this silo's private key (from `fedtune deploy keys`)")
    p.add_argument("--partition-id", type=int, required=True, help="this silo's partition, 0-based")
    p.add_argument("--num-partitions", type=int, required=True, help="number of silos (= federation.num_clients)")
    p.add_argument("--data-path", help="local data for this silo (passed as node_config data-path)")
    p.add_argument("--port", type=int, required=True, help="local Runtime API port; unique per SuperNode on a host")
    p.add_argument(
        "--isolation",
        choices=ISOLATION_MODES,
        default="process",
        help="process (default): one long-lived ClientApp process keeps the model loaded across "
        "rounds; subprocess: Flower's default, a fresh flwr-clientapp process per message",
    )
    p.add_argument(
        "--flower-polling",
        action="store_true",
        help="run flower-supernode unmodified: 3 s between pulls when idle, also between the rounds "
        "of a run (default: fedtune's launcher pulls again within 20 ms after a message, "
        "slowing to 3 s while none comes)",
    )
    p.add_argument("--insecure", action="store_true", help="plain text, no authentication (testing only)")
    p.set_defaults(func=cmd_supernode)

    p = dsub.add_parser("register", help="register a silo's public key with the SuperLink (coordinator)")
    p.add_argument("public_key", metavar="KEY.pub")
    p.add_argument("--connection", required=True, help="connection name in $FLWR_HOME/config.toml")
    p.add_argument("--name", help="SuperNode name (default: the key's file name)")
    p.set_defaults(func=cmd_register)

    p = dsub.add_parser("run-line", help="validate a run's config and print the `flwr run` line (coordinator)")
    p.add_argument("--connection", required=True, help="connection name in $FLWR_HOME/config.toml")
    p.add_argument("--app", default=".", help="fedtune app directory (default: .)")
    p.add_argument("--config", "-c", help="fedtune TOML config, relative to the app directory")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="fedtune override (repeatable)",
    )
    add_unset_arg(p)
    p.add_argument("--no-stream", action="store_true", help="return once the run is submitted")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output.dir from its last complete round (after a server crash)",
    )
    p.set_defaults(func=cmd_run_line)
