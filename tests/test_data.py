import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import data
from fedtune.config import CAUSAL_LM, CLASSIFICATION, DataConfig
from fedtune.errors import ConfigError


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 400),
    clients=st.integers(1, 12),
    method=st.sampled_from(["iid", "dirichlet", "pathological"]),
    seed=st.integers(0, 2**31),
    n_labels=st.integers(2, 5),
)
def test_partition_is_a_partition(n, clients, method, seed, n_labels):
    labels = np.random.default_rng(seed).integers(0, n_labels, n).tolist()
    n_labels = len(set(labels))
    parts = data.partition(labels, clients, method, seed=seed, alpha=0.5, labels_per_client=min(2, n_labels))
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(n)) and len(parts) == clients
    assert parts == data.partition(labels, clients, method, seed=seed, alpha=0.5, labels_per_client=min(2, n_labels))


def test_pathological_gives_k_labels_per_client():
    labels = [i % 4 for i in range(400)]
    parts = data.partition(labels, 8, "pathological", seed=1, labels_per_client=1)
    assert all(len({labels[i] for i in p}) == 1 for p in parts)


def test_dirichlet_small_alpha_skews_labels():
    labels = [i % 2 for i in range(2000)]

    def skew(a):
        return np.mean(
            [
                abs(np.mean([labels[i] for i in p]) - 0.5)
                for p in data.partition(labels, 10, "dirichlet", seed=0, alpha=a, min_size=1)
            ]
        )

    assert skew(0.1) > skew(100.0) + 0.2


def test_rotten_tomatoes_split_matches_reference_sizes():
    s = data.split(DataConfig(), CLASSIFICATION)
    assert (len(s.train), len(s.test)) == (6824, 1706)
    assert {e["label"] for e in s.test} == {0, 1}
    again = data.split(DataConfig(), CLASSIFICATION)
    assert [e["text"] for e in again.test[:50]] == [e["text"] for e in s.test[:50]]


def test_test_split_never_reaches_clients():
    cfg = DataConfig(max_train_examples=0)
    s = data.split(cfg, CLASSIFICATION)
    parts = data.client_indices(cfg, s, 10, CLASSIFICATION)
    assert sum(len(p) for p in parts) == len(s.train)  # only train indices are partitioned


def test_chatterbot_domains():
    cfg = DataConfig(dataset="chatterbot", partition="domain", domains=("science", "history", "sports"))
    s = data.split(cfg, CAUSAL_LM)
    assert {e["domain"] for e in s.test} == {"science", "history", "sports"}
    parts = data.client_indices(cfg, s, 3, CAUSAL_LM)
    assert all(len({s.train[i]["domain"] for i in p}) == 1 for p in parts)


def test_local_csv_jsonl(tmp_path):
    (tmp_path / "d.csv").write_text("review,stars\ngood,pos\nbad,neg\nfine,pos\nugly,neg\n")
    cfg = DataConfig(dataset=str(tmp_path / "d.csv"), text_column="review", label_column="stars", test_fraction=0.25)
    s = data.split(cfg, CLASSIFICATION)
    assert s.labels == ("neg", "pos") and len(s.train) == 3
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = data.split(DataConfig(dataset=str(tmp_path / "d.jsonl"), partition="iid"), CAUSAL_LM)
    assert len(s.train) + len(s.test) == 4
    msgs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in msgs))
    s = data.split(DataConfig(dataset=str(tmp_path / "m.jsonl"), partition="iid", test_fraction=0.34), CAUSAL_LM)
    assert s.train[0]["response"] == "hello"


def test_bad_data_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        data.split(DataConfig(dataset=str(tmp_path / "missing.csv")), CLASSIFICATION)
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=r"no column\(s\) data.text_column = 'text'.*columns are \['a', 'b'\]"):
        data.split(DataConfig(dataset=str(tmp_path / "d.csv")), CLASSIFICATION)
    with pytest.raises(ConfigError, match="unknown domain"):
        data.split(DataConfig(dataset="chatterbot", domains=("astrology",)), CAUSAL_LM)
    with pytest.raises(ConfigError, match="neither a bundled dataset"):
        data.split(DataConfig(dataset="imdbb"), CLASSIFICATION)


# --- the label count comes from the data ---------------------------------------------------------

FOUR = {
    "fruit": ["apple", "banana", "cherry"],
    "metal": ["iron", "copper", "silver"],
    "animal": ["horse", "tiger", "rabbit"],
    "color": ["purple", "orange", "yellow"],
}


def four_label_csv(path, n=240):
    """Texts of 4 words, each word naming its class: a task a tiny model can learn in a few rounds."""
    rng = np.random.default_rng(0)
    names = sorted(FOUR)
    rows = ["text,label"]
    for i in range(n):
        label = names[i % 4]
        rows.append(" ".join(rng.choice(FOUR[label], 4)) + f",{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_label_count_is_the_data_s_and_a_conflicting_num_labels_is_refused(tmp_path):
    cfg = DataConfig(dataset=str(four_label_csv(tmp_path / "four.csv")))
    s = data.split(cfg, CLASSIFICATION)
    assert s.labels == ("animal", "color", "fruit", "metal")  # sorted names, id = position
    assert {e["label"] for e in s.train} == {0, 1, 2, 3}
    assert data.num_labels(s, None, cfg.dataset) == 4 == data.num_labels(s, 4, cfg.dataset)
    for wrong in (2, 5):
        with pytest.raises(ConfigError) as exc:
            data.num_labels(s, wrong, cfg.dataset)
        assert exc.value.problems == (
            f"model.num_labels: data.dataset {cfg.dataset!r} has 4 labels (animal, color, fruit, metal), so the "
            f"classifier needs 4; unset model.num_labels to take the count from the data (got {wrong})",
        )
    # the bundled datasets keep their two labels
    assert data.num_labels(data.split(DataConfig(), CLASSIFICATION), None, "rotten_tomatoes") == 2
    (tmp_path / "one.csv").write_text("text,label\na,x\nb,x\nc,x\n")
    with pytest.raises(ConfigError, match="data.label_column: .* has 1 distinct label"):
        data.num_labels(data.split(DataConfig(dataset=str(tmp_path / "one.csv")), CLASSIFICATION), None, "one.csv")


def test_a_csv_with_four_string_labels_runs_federated_without_num_labels_and_learns(tmp_path, tiny_cfg):
    """Was `IndexError: Target 3 is out of bounds` mid-run: the head stayed at 2 outputs."""
    from fedtune import workspace
    from fedtune.flower.client import handle_train
    from fedtune.flower.local import LocalGrid
    from fedtune.flower.server import ServerLoop

    cfg = tiny_cfg.replace(
        **{
            "data.dataset": str(four_label_csv(tmp_path / "four.csv")),
            "data.partition": "iid",
            "data.max_train_examples": 0,
            "data.max_test_examples": 0,
            "federation.rounds": 4,
            "train.local_steps": 15,
            "train.lr": 2e-2,
        }
    )
    assert cfg.model.num_labels is None
    workspace.check_data(cfg)  # what simulate and check-config check first
    ws = workspace.get(cfg)
    assert ws.num_labels == 4 and ws.model.config.num_labels == 4
    grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    summary = ServerLoop(cfg, tmp_path / "run", progress=lambda s: None).main(grid)
    final = summary["final"]
    assert final["examples"] == 48
    assert final["accuracy"] >= 0.6  # chance is 0.25
    assert final["loss"] < 0.6 * math.log(4)  # the uniform prediction's loss is log 4


def test_a_conflicting_num_labels_is_refused_before_the_run(tmp_path, tiny_cfg, capsys):
    from fedtune import cli, workspace

    csv_path = four_label_csv(tmp_path / "four.csv")
    cfg = tiny_cfg.replace(**{"data.dataset": str(csv_path), "model.num_labels": 2})
    with pytest.raises(ConfigError, match=r"model.num_labels: .* has 4 labels .* \(got 2\)"):
        workspace.check_data(cfg)
    argv = [
        "check-config",
        "--config",
        "simulations/configs/tiny.toml",
        "--set",
        f"data.dataset={str(csv_path)!r}",
        "--set",
        "model.num_labels=2",
    ]
    assert cli.main(argv) == 2
    assert "model.num_labels: data.dataset" in capsys.readouterr().err
    assert cli.main([*argv[:-1], "model.num_labels=4"]) == 0
    assert cli.main([*argv, "--config-only"]) == 0  # the data-free checks alone cannot know
