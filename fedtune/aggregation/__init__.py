"""Server-side aggregation of PEFT adapter states: LoRA-aware means, update checks, FedProx.

Pure functions on ``dict[str, Tensor]``; no Flower import. Robust rules and
server optimizers named in `AggregationConfig` are Flower's strategies.
"""

from fedtune.aggregation.aggregator import Aggregator, ExactLoRA, FactoredHeteroLoRA, FFALoRA, NaiveLoRA
from fedtune.aggregation.config import AggregationConfig
from fedtune.aggregation.fedprox import proximal_term
from fedtune.aggregation.hetero import cut_to_rank, hetero_round, hetero_update
from fedtune.aggregation.lora import (
    AggregationReport,
    LayerReport,
    LoraScaling,
    dense_mean,
    dense_svds,
    factors_for_rank,
    ffa_mean,
    lora_layers,
    naive_mean,
    product_space_mean,
    refactor,
    to_dense,
)
from fedtune.aggregation.validation import Layout, validate_update

__all__ = [
    "AggregationConfig",
    "AggregationReport",
    "Aggregator",
    "ExactLoRA",
    "FactoredHeteroLoRA",
    "FFALoRA",
    "LayerReport",
    "Layout",
    "LoraScaling",
    "NaiveLoRA",
    "cut_to_rank",
    "dense_mean",
    "dense_svds",
    "factors_for_rank",
    "ffa_mean",
    "hetero_round",
    "hetero_update",
    "lora_layers",
    "naive_mean",
    "product_space_mean",
    "proximal_term",
    "refactor",
    "to_dense",
    "validate_update",
]
