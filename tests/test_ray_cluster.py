"""`fedtune simulate` on an existing Ray cluster (``simulation.ray_address``).

A two-node cluster is started on this machine with Ray's own
``ray.cluster_utils.Cluster`` (a head and one more node, 1 CPU each, so
``cpus_per_client = 1`` fits one client actor per node). The simulation joins it
as a driver; each client's reply is stamped, by a ClientApp mod around fedtune's
ClientApp, with the Ray node that trained it (Ray's own
``get_runtime_context().get_node_id()``). The run must use both nodes and end
with the same adapter, bit for bit, and the same held-out metrics as the same
config and seeds run on one node: in this process, the same server loop and
ClientApp over fedtune's in-process ``LocalGrid``, independent of Ray (a one-node
Ray run as reference would cost another Ray start and model loads, ~60 s more on
2 shared cores).

Two clients are sampled per round: the sum of two updates does not depend on the
order their replies arrive in, so the two runs can be compared exactly.
"""

from __future__ import annotations

import pytest
import ray
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from ray.cluster_utils import Cluster
from safetensors.torch import load_file

from fedtune import config
from fedtune.errors import ConfigError, FedtuneError
from fedtune.flower import protocol as P
from fedtune.flower.apps import make_client_app
from fedtune.flower.local import LocalGrid
from fedtune.flower.server import ServerLoop
from fedtune.flower.simulation import backend_config, simulate

from .conftest import CONFIGS, metrics_rows

TRAIN = {
    "federation.num_clients": 4,
    "federation.fraction_train": 0.5,
    "federation.min_train_clients": 2,
    "federation.rounds": 2,
    "simulation.cpus_per_client": 1.0,
}


def node_tag(node_id: str) -> int:
    """A metric-sized tag of a Ray node id (its first 48 bits; exact in a float)."""
    return int(node_id[:12], 16)


def stamp_ray_node(msg: Message, ctx: Context, call_next) -> Message:
    """ClientApp mod: the reply's metrics say which Ray node trained it."""
    reply = call_next(msg, ctx)
    if reply.has_content() and P.METRICS in reply.content:
        reply.content[P.METRICS]["ray-node"] = node_tag(ray.get_runtime_context().get_node_id())
    return reply


def stamped_client_app(cfg) -> ClientApp:
    inner = make_client_app(cfg)
    app = ClientApp(mods=[stamp_ray_node])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        return inner(msg, ctx)

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return inner(msg, ctx)

    return app


def test_backend_config_joins_a_cluster_without_resource_arguments():
    local = config.load(CONFIGS / "tiny.toml", {"simulation.cpus": 3})
    joined = config.load(
        CONFIGS / "tiny.toml", {"simulation.ray_address": "10.0.0.5:6379", "simulation.gpus_per_client": 0.5}
    )
    assert backend_config(local)["init_args"]["num_cpus"] == 3 and "address" not in backend_config(local)["init_args"]
    init = backend_config(joined)["init_args"]
    assert init["address"] == "10.0.0.5:6379" and "num_cpus" not in init  # Ray refuses num_cpus when joining
    assert backend_config(joined)["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"simulation.ray_address": "ray.example.org"}, "simulation.ray_address: expected HOST:PORT"),
        ({"simulation.ray_address": "http://h:6379"}, "simulation.ray_address"),
        (
            {"simulation.ray_address": "h:6379", "simulation.cpus": 4},
            "simulation.cpus: must be 0 with simulation.ray_address",
        ),
    ],
)
def test_bad_ray_address_settings_are_refused(over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config.load(CONFIGS / "tiny.toml", over)
    assert config.load(CONFIGS / "tiny.toml", {"simulation.ray_address": "auto"}).simulation.ray_address == "auto"


def test_cli_flag_sets_the_address(monkeypatch, tmp_path):
    from fedtune import cli
    from fedtune.flower import simulation

    seen = []
    monkeypatch.setattr(simulation, "simulate", lambda cfg, out, **kw: seen.append(cfg))
    argv = ["simulate", "-c", str(CONFIGS / "tiny.toml"), "--out", str(tmp_path)]
    assert cli.main([*argv, "--ray-address", "head.example.org:6379"]) == 0
    assert cli.main(argv) == 0
    assert [c.simulation.ray_address for c in seen] == ["head.example.org:6379", ""]


@pytest.mark.slow
def test_simulation_on_a_two_node_ray_cluster_matches_a_one_node_run(tmp_path):
    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = {node_tag(cluster.head_node.node_id), node_tag(worker.node_id)}
        cfg = config.load(CONFIGS / "tiny.toml", {**TRAIN, "simulation.ray_address": cluster.address})
        out = tmp_path / "cluster"
        simulate(cfg, out, progress=lambda s: None, client_app=stamped_client_app(cfg))
        assert not ray.is_initialized()  # the driver disconnected; the cluster is still up
        ray.init(address=cluster.address, logging_level="ERROR")
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        with pytest.raises(FedtuneError, match="already connected to Ray"):
            simulate(cfg, tmp_path / "again", progress=lambda s: None)
        ray.shutdown()
    finally:
        cluster.shutdown()

    # the reference: the same config and seeds on one node, in this process
    one = tmp_path / "one-node"
    cfg_one = config.load(CONFIGS / "tiny.toml", TRAIN)
    ServerLoop(cfg_one, one, progress=lambda s: None).main(LocalGrid(4, make_client_app(cfg_one)))

    rows, ref = metrics_rows(out), metrics_rows(one)
    trained_on = [c["ray-node"] for r in rows[1:] for c in r["clients"]]
    assert len(trained_on) == 4 and set(trained_on) == nodes, (trained_on, nodes)  # both nodes trained clients
    assert [sorted(c["partition-id"] for c in r["clients"]) for r in rows[1:]] == [
        sorted(c["partition-id"] for c in r["clients"]) for r in ref[1:]
    ]
    assert "accuracy" in rows[-1]["eval"]
    assert [r.get("eval") for r in rows] == [r.get("eval") for r in ref]
    a = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
