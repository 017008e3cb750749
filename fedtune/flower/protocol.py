"""Names of the records fedtune's ServerApp and ClientApp exchange.

Server -> client (train): ``config`` (ConfigRecord: server-round, round-seed,
version, proximal-mu) and either ``arrays`` (the full adapter, ArrayRecord; with
heterogeneous LoRA ranks, the global cut to the node's rank once it is known) or
``downlink`` (ConfigRecord: from-version, keys, payloads = compressed broadcasts
the client applies to its copy). With ``aggregation.server_optimizer = "scaffold"``
also ``scaffold-c`` (the server's control variate c, packed like the adapter).

Before round 1 with ``adapter.head_init = "prototypes"`` (`fedtune.flower.prototypes`):
``prototypes`` (ConfigRecord: ``request`` down, ``stats`` up); in zeroth-order rounds
the head itself rides in a node's first ``zo`` downlink (``head``).

Client -> server: ``update`` (ArrayRecord of the fp32 delta, or ConfigRecord with
a codec ``payload``) and ``metrics`` (MetricRecord with num-examples; with
heterogeneous LoRA ranks also ``lora-rank``, the rank the client trained at); under
SCAFFOLD also ``scaffold-delta-c`` (the client's delta_c_i = c_i+ - c_i, packed).
"""

ARRAYS = "arrays"
CONFIG = "config"
DOWNLINK = "downlink"
UPDATE = "update"
METRICS = "metrics"
ZO = "zo"
PROTOTYPES = "prototypes"
SCAFFOLD_C = "scaffold-c"
SCAFFOLD_DELTA_C = "scaffold-delta-c"

# per-node context.state
GLOBAL_COPY = "fedtune.global-copy"
CLIENT_META = "fedtune.client-meta"
EF_RESIDUAL = "fedtune.ef-residual"
DP_STATE = "fedtune.dp-accountant"
DP_LABELS = "fedtune.dp-label-counts"  # the noisy label counts of logit adjustment under DP-SGD
SCAFFOLD_CI = "fedtune.scaffold.c_i"  # this client's SCAFFOLD control variate, packed
ZO_STATE = "fedtune.zo"
ZO_HEAD = "fedtune.zo.head"  # the prototype head, part of this node's initial model (adapter.head_init)
