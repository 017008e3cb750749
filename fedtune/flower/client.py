"""The ClientApp's train handler: get the global adapter, train locally, send the delta.

Only the trainable part of the adapter leaves the client, as ``local - global``,
after (in this order) client-level DP clipping and noise, then compression with
optional error feedback. With heterogeneous LoRA ranks
(``aggregation.lora_mode = "hetero"``) a client trains a model at its own rank
(``aggregation.client_ranks``), cuts the global to that rank if the server sent
it at a higher one (`fedtune.aggregation.cut_to_rank`), and reports its rank in
the ``lora-rank`` metric. Every reply echoes the round it answers
(``server-round``), which the server checks. A simulated attacker
(`fedtune.attack`) runs this same path and changes what it sends after
training (its labels before it). The base model is loaded once per process
(:mod:`fedtune.workspace`); what must outlive a round (error-feedback residual,
the client's copy of the broadcast adapter, DP accountant, SCAFFOLD's control
variate c_i) lives in Flower's per-node ``context.state``.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune import adapters, attack, workspace
from fedtune.config import CAUSAL_LM, FedtuneConfig
from fedtune.delta import Delta, subtract
from fedtune.env import setup_environment
from fedtune.flower import protocol as P
from fedtune.flower.records import from_arrayrecord, pack, state_digest
from fedtune.seeds import derive_seed
from fedtune.train import label_counts, round_lr, train_local


def partition_id(context: Context, cfg: FedtuneConfig) -> int:
    node_cfg = context.node_config
    if "partition-id" not in node_cfg:
        raise ValueError(
            "node_config has no 'partition-id' (start the SuperNode with --node-config \"partition-id=N\")"
        )
    n = node_cfg.get("num-partitions")
    if n is not None and int(n) != cfg.federation.num_clients:
        raise ValueError(
            f"this federation has {n} SuperNodes but federation.num_clients is {cfg.federation.num_clients}; "
            "make them equal so the data is partitioned the same way everywhere"
        )
    return int(node_cfg["partition-id"])


def local_data(ws: workspace.Workspace, context: Context, cfg: FedtuneConfig) -> tuple[int, list[dict]]:
    """(partition id, training examples): a silo's own file (``data-path`` in the node config,
    deployment) or its partition of the run's dataset (simulation)."""
    data_path = context.node_config.get("data-path")
    if data_path:
        pid, data = int(context.node_config.get("partition-id", 0)), ws.file_data(str(data_path))
    else:
        pid = partition_id(context, cfg)
        data = ws.client_data(pid)
    plan = attack.client_attack(cfg, context.node_config, pid)
    if plan is not None and plan.kind == "label-flip":  # data poisoning: before any training
        if ws.task == CAUSAL_LM:
            raise ValueError("attack.kind 'label-flip': a causal LM's data has no labels to flip")
        data = attack.flip_labels(data, ws.num_labels)
    return pid, data


def class_counts(context: Context, cfg: FedtuneConfig) -> list[int]:
    """This silo's training examples per class, for ``federation.sampling = "label-balanced"``; they
    leave only when the run says so."""
    if cfg.federation.sampling != "label-balanced":
        raise ValueError(
            f"server asked for class counts but federation.sampling is {cfg.federation.sampling!r}, not 'label-balanced'"
        )
    ws = workspace.get(cfg)
    if ws.task == CAUSAL_LM:
        raise ValueError("server asked for class counts, and a causal LM's examples have no class")
    _, data = local_data(ws, context, cfg)
    return label_counts(data, ws.num_labels).tolist()


def receive_global(msg: Message, context: Context, cfg: FedtuneConfig, base: Delta | None = None) -> Delta:
    """The adapter to start from: a full record, or compressed broadcasts applied to our copy
    (with no copy yet: to ``base``, the seeded initial adapter's travelling keys, version 0)."""
    content = msg.content
    if P.ARRAYS in content:
        state = from_arrayrecord(content[P.ARRAYS])
    else:
        from fedtune.compression import build_codec

        down = content[P.DOWNLINK]
        if P.GLOBAL_COPY in context.state:
            state = from_arrayrecord(context.state[P.GLOBAL_COPY])
            have = int(context.state[P.CLIENT_META]["version"])
        elif "base-digest" in down and base is not None:
            state, have = {k: v.clone() for k, v in base.items()}, 0
            if state_digest(state) != bytes(down["base-digest"]):
                raise ValueError(
                    "the server's version 0 of the adapter differs from this client's seeded initial adapter "
                    "(another model, adapter or train.seed?); it sends the full adapter next time"
                )
        else:
            raise ValueError("server sent a compressed broadcast but this client holds no adapter copy")
        if int(down["from-version"]) != have:
            raise ValueError(f"broadcast starts at version {down['from-version']} but this client holds {have}")
        codec = build_codec(cfg.compression, "downlink")
        layout = {k: tuple(state[k].shape) for k in sorted(state)}
        for payload in down["payloads"]:
            step = codec.decode(payload, layout, seed=0)
            for k, v in step.items():
                state[k] = state[k] + v
    if cfg.compression.downlink != "none":
        # packed (one array): the context travels between SuperNode and worker with every message
        context.state[P.GLOBAL_COPY] = pack(state)
        context.state[P.CLIENT_META] = ConfigRecord({"version": int(msg.content[P.CONFIG]["version"])})
    return state


def encode_update(delta: Delta, context: Context, cfg: FedtuneConfig, round_seed: int, *, feedback: bool = True):
    """Uplink record for ``delta``: dense fp32 arrays, or a codec payload (with error feedback,
    unless ``feedback`` is False)."""
    comp = cfg.compression
    if comp.codec == "none":
        return pack(delta)
    from fedtune.compression import build_codec, compensate, residual_after

    codec = build_codec(comp, "uplink")
    ef = comp.error_feedback and feedback
    residual = from_arrayrecord(context.state[P.EF_RESIDUAL]) if ef and P.EF_RESIDUAL in context.state else None
    target = compensate(delta, residual)
    payload = codec.encode(target, seed=round_seed)
    if ef:
        layout = {k: tuple(v.shape) for k, v in target.items()}
        context.state[P.EF_RESIDUAL] = pack(residual_after(target, codec.decode(payload, layout, seed=round_seed)))
    # no key names: the codec header carries a checksum of the keys and shapes the server checks
    return ConfigRecord({"codec": codec.name, "payload": payload})


def _train_dp_sgd(
    ws, model, data, cfg: FedtuneConfig, context: Context, gen: torch.Generator, extra_loss, pid: int
) -> dict:
    """One round of DP-SGD (opacus) over the trainable adapter; the accountant persists in context.state."""
    from functools import partial

    from torch.utils.data import DataLoader

    from fedtune.data import collate
    from fedtune.privacy import make_private
    from fedtune.train import make_optimizer

    loader = DataLoader(
        data, batch_size=cfg.train.batch_size, collate_fn=partial(collate, pad_id=ws.pad_id, task=ws.task)
    )
    prev = context.state[P.DP_STATE] if P.DP_STATE in context.state else None
    total = None
    if cfg.privacy.target_epsilon is not None:
        total = cfg.federation.rounds * cfg.train.local_steps
    counts, released = _private_label_counts(ws, model, data, cfg, context, pid)
    pt = make_private(
        model,
        make_optimizer(model, cfg.train),
        loader,
        cfg.privacy,
        generator=gen,
        total_steps=total,
        accountant_state=dict(prev) if prev is not None else None,
        released=released,
    )
    if counts is not None and P.DP_LABELS not in context.state:  # first round: the release is spent now
        pt.accountant.record(*released[0])
        context.state[P.DP_STATE] = ConfigRecord(pt.accountant.state_dict())  # kept even if the round fails
        context.state[P.DP_LABELS] = ConfigRecord({"counts": counts})
    try:
        metrics = train_local(
            pt.model,
            data,
            cfg.train,
            task=ws.task,
            pad_id=ws.pad_id,
            device=ws.device,
            generator=gen,
            optimizer=pt.optimizer,
            batches=_cycle(pt.data_loader),
            extra_loss=extra_loss,
            clip=False,
            label_counts=counts,
        )
        context.state[P.DP_STATE] = ConfigRecord(pt.accountant.state_dict())
        metrics["dp-epsilon"] = float(pt.accountant.epsilon(cfg.privacy.delta))
        metrics["dp-noise-multiplier"] = float(pt.noise_multiplier)
        metrics["dp-sample-rate"] = float(pt.sample_rate)
    finally:
        pt.close()
    return metrics


def _private_label_counts(ws, model, data, cfg: FedtuneConfig, context: Context, pid: int):
    """Logit adjustment under DP-SGD: the client's label counts through the Gaussian
    mechanism (``privacy.label_noise``), drawn once and kept in ``context.state``.

    Returns ``(counts, released)``: counts None and nothing released when logit
    adjustment is off; ``released`` is the one accountant entry the release costs.
    """
    from fedtune.privacy import noisy_label_counts
    from fedtune.train import num_labels

    if cfg.train.logit_adjustment <= 0 or ws.task == CAUSAL_LM:
        return None, []
    released = [(float(cfg.privacy.label_noise), 1.0, 1)]
    if P.DP_LABELS in context.state:
        return [float(c) for c in context.state[P.DP_LABELS]["counts"]], released
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "dp-labels", pid))
    return noisy_label_counts(
        [int(d["label"]) for d in data], num_labels(model), cfg.privacy.label_noise, gen
    ), released


def _cycle(loader):
    while True:
        yield from loader


def handle_train(msg: Message, context: Context, cfg: FedtuneConfig) -> Message:
    if P.PROTOTYPES in msg.content:  # adapter.head_init = "prototypes": the class means asked before round 1
        from fedtune.flower.prototypes import handle_prototype_stats

        return handle_prototype_stats(msg, context, cfg)
    if cfg.train.mode == "zo":
        from fedtune.flower.zo_client import handle_train_zo

        return handle_train_zo(msg, context, cfg)
    setup_environment()
    torch.set_num_threads(cfg.simulation.threads_per_client)
    ws = workspace.get(cfg)
    conf = msg.content[P.CONFIG]
    pid, data = local_data(ws, context, cfg)
    rnd = int(conf["server-round"])
    # the server sends the trainable keys; frozen ones are the seeded initial values on every party
    initial = ws.initial_state()
    base = {k: initial[k] for k in ws.trainable_keys()}  # the keys that travel: version 0 of the broadcast
    global_state = {**initial, **receive_global(msg, context, cfg, base)}
    model, rank = ws.model, None
    if cfg.aggregation.lora_mode == "hetero":
        from fedtune.aggregation import LoraScaling, cut_to_rank

        rank = cfg.aggregation.client_rank(pid, cfg.adapter.r)
        model = ws.model_for_rank(rank)
        global_state = cut_to_rank(global_state, rank, LoraScaling.from_peft_config(model.peft_config["default"]))
    if cfg.train.lr_schedule != "constant":
        cfg = cfg.replace(**{"train.lr": round_lr(cfg.train, rnd, cfg.federation.rounds)})
    mu = float(conf.get("proximal-mu", 0.0))
    correct = None
    if cfg.aggregation.server_optimizer == "scaffold":
        c_i, correct = _scaffold_start(msg, context, model, global_state)
    delta, metrics = _train_delta(ws, model, data, cfg, context, global_state, rnd, pid, mu, correct)
    if correct is not None:
        from fedtune.aggregation.scaffold import client_control_update

        # from the gradients this node trained on (an attack below changes what it sends, not its c_i)
        c_i_next, delta_c = client_control_update(c_i, _by_state_key(model, correct.mean_gradient(), c_i))
    privacy = cfg.privacy
    if privacy.mode == "client-local":
        # local DP: clip and noise before anything leaves (compression is post-processing)
        from fedtune.privacy import add_gaussian_noise, clip_delta, local_noise_std

        delta, _ = clip_delta(delta, privacy.clip_norm)
        noise_gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, "dp-local", rnd, pid))
        delta = add_gaussian_noise(delta, local_noise_std(privacy.noise_multiplier, privacy.clip_norm), noise_gen)
        # the server is not trusted here: nothing computed from the data leaves in the clear
        # (not the unclipped norm, not the training loss), only the noised update and the count
        metrics = {}
    if rank is not None:
        metrics["lora-rank"] = rank  # the server learns which cut to send this node next round
    # a simulated attacker (fedtune.attack) turns what it would send into what the attack says
    plan = attack.client_attack(cfg, context.node_config, pid)
    if plan is not None and plan.kind in attack.MODEL_POISONING:
        colluders = None
        if plan.kind in attack.COLLUDING:
            colluders = [
                delta
                if p == pid
                else _train_delta(ws, model, ws.client_data(p), cfg, context, global_state, rnd, p, mu)[0]
                for p in attack.attackers(plan, cfg.federation.num_clients)
            ]
        delta = attack.poison(
            plan,
            delta,
            rnd=rnd,
            partition_id=pid,
            colluders=colluders,
            num_clients=cfg.federation.num_clients,
            rule=attack.ServerRule.of(cfg.aggregation),
        )
    seed = int(conf.get("round-seed", 0))
    update = encode_update(delta, context, cfg, seed)
    if plan is not None and plan.kind in ("nan", "wrong-layout", "oversized"):
        # the hostile payload replaces the update; the error-feedback residual stays an honest client's
        update = encode_update(
            attack.poison(plan, delta, rnd=rnd, partition_id=pid), context, cfg, seed, feedback=False
        )
    if plan is not None and plan.kind == "replay":
        update = _replayed(update, context)
    reply = RecordDict(
        {
            P.UPDATE: update,
            # server-round: the round this reply answers, which the server checks
            P.METRICS: MetricRecord(
                {
                    "num-examples": len(data),
                    "partition-id": pid,
                    "server-round": attack.claimed_round(plan, rnd),
                    **metrics,
                }
            ),
        }
    )
    if correct is not None:
        reply[P.SCAFFOLD_DELTA_C] = pack(delta_c)
        # the paper's client keeps c_i+ whatever the server does with its reply
        context.state[P.SCAFFOLD_CI] = pack(c_i_next)
    return Message(reply, reply_to=msg)


def _scaffold_start(msg: Message, context: Context, model, global_state: Delta):
    """SCAFFOLD (`fedtune.aggregation.scaffold`): (c_i, the gradient correction c - c_i for ``model``).

    c comes with the global adapter; c_i is this node's, zero at its first round. The
    correction is keyed like the adapter state; it reaches the model's parameters by
    being loaded as one (`adapters.set_state_`, the one mapping of state keys to
    parameters), after which the global is loaded back.
    """
    from fedtune.aggregation.scaffold import LocalCorrection, correction, zeros_like

    c = from_arrayrecord(msg.content[P.SCAFFOLD_C])
    c_i = from_arrayrecord(context.state[P.SCAFFOLD_CI]) if P.SCAFFOLD_CI in context.state else zeros_like(c)
    adapters.set_state_(model, {**global_state, **correction(c, c_i)})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    corr = {n: p.detach().clone() for n, p in params.items()}
    adapters.set_state_(model, global_state)
    return c_i, LocalCorrection(params, corr)


def _by_state_key(model, by_name: Delta, like: Delta) -> Delta:
    """``by_name`` (keyed by ``model``'s parameter names) keyed like the adapter state ``like``: loaded into
    the parameters and read back as adapter state (`adapters.get_state`), the model's weights restored."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(by_name[n])
        state = adapters.get_state(model)
        for n, p in params.items():
            p.copy_(saved[n])
    return {k: state[k].to(torch.float32) for k in like}


def _train_delta(
    ws,
    model,
    data,
    cfg: FedtuneConfig,
    context: Context,
    global_state: Delta,
    rnd: int,
    pid: int,
    mu: float,
    before_step=None,
) -> tuple[Delta, dict]:
    """Train ``model`` from ``global_state`` on ``data`` as partition ``pid`` in round ``rnd``:
    (local - global over the trainable keys, training metrics). ``before_step`` goes to
    `train_local` (SCAFFOLD's correction)."""
    adapters.set_state_(model, global_state)
    gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, rnd, pid))  # the batch order
    extra_loss = None
    if mu > 0:
        from fedtune.aggregation import proximal_term

        anchors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        extra_loss = lambda: proximal_term(named, anchors, mu)  # noqa: E731
    if cfg.privacy.mode == "sample":
        metrics = _train_dp_sgd(ws, model, data, cfg, context, gen, extra_loss, pid)
    else:
        metrics = train_local(
            model,
            data,
            cfg.train,
            task=ws.task,
            pad_id=ws.pad_id,
            device=ws.device,
            generator=gen,
            extra_loss=extra_loss,
            before_step=before_step,
        )
    keys = adapters.trainable_keys(model)
    local = adapters.get_state(model)
    return subtract({k: local[k] for k in keys}, {k: global_state[k] for k in keys}), metrics


def _replayed(update, context: Context):
    """A replaying attacker's update: the one it sent the first time, kept in ``context.state``."""
    import copy

    if attack.REPLAY_STATE not in context.state:
        context.state[attack.REPLAY_STATE] = copy.deepcopy(update)
        return update
    return copy.deepcopy(context.state[attack.REPLAY_STATE])


__all__ = ["handle_train", "partition_id", "local_data", "receive_global", "encode_update"]
