"""``fedtune report``: the table, the PNG plots, and one-line errors for bad input."""

import json
import struct

import pytest

from fedtune.centralized import run_centralized
from fedtune.cli import main
from fedtune.report import client_losses, load_run, table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


def _fake_run(path, finals, *, bytes_per_round=1000, summary=True, epsilon=None, clients=True):
    """A run directory written by hand: round r evaluates to finals[r]."""
    path.mkdir(parents=True)
    rows = []
    for rnd, acc in enumerate(finals):
        row = {"round": rnd, "eval": {"accuracy": acc, "loss": 1 - acc}, "bytes_up": 0, "bytes_down": 0}
        if rnd:
            row.update(
                bytes_up=bytes_per_round, bytes_down=2 * bytes_per_round, seconds=1.5, train={"train_loss": 1.0 / rnd}
            )
            if clients:
                row["clients"] = [{"node": 11, "train_loss": 1.2 / rnd}, {"node": 7, "train_loss": 0.8 / rnd}]
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        priv = {"settings": {"mode": "client-central" if epsilon else "none"}, "epsilon": epsilon}
        (path / "summary.json").write_text(
            json.dumps(
                {
                    "final": rows[-1]["eval"],
                    "rounds": len(finals) - 1,
                    "rounds_completed": len(finals) - 1,
                    "total_bytes_up": bytes_per_round * (len(finals) - 1),
                    "total_bytes_down": 2 * bytes_per_round * (len(finals) - 1),
                    "seconds": 10.0,
                    "privacy": priv,
                }
            )
        )
    return path


def test_table_side_by_side_with_ratios_to_the_first(tmp_path):
    a = load_run(_fake_run(tmp_path / "central", [0.5, 0.7, 0.8], bytes_per_round=0, clients=False))
    b = load_run(_fake_run(tmp_path / "fed", [0.5, 0.6, 0.72], epsilon=2.5))
    text = table([a, b], "accuracy")
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "centralized" in lines["kind"] and "federated" in lines["kind"]
    assert "0.8000" in lines["final accuracy"] and "0.7200 (0.9x)" in lines["final accuracy"]
    assert "0.8000 (r2)" in lines["best accuracy (round)"]
    assert lines["uplink"].endswith("0.000 MB     0.002 MB") and lines["downlink"].endswith("0.004 MB")  # no ratio to 0
    assert "2.500" in lines["epsilon"] and "-" in lines["epsilon"]
    assert text.splitlines()[-1] == "(x): ratio to central"
    # lower-is-better metrics pick the minimum as best
    assert "0.2000 (r2)" in table([a], "loss")


def test_report_reads_a_centralized_run_prints_and_writes_pngs(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg.replace(**{"federation.rounds": 2, "train.local_steps": 1, "output.save_adapter": False})
    central = tmp_path / "central"
    run_centralized(cfg, central)
    fed = _fake_run(tmp_path / "fed", [0.5, 0.55, 0.6])
    out = tmp_path / "plots"
    assert main(["report", str(central), str(fed), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "final accuracy" in printed and "centralized" in printed and "(x): ratio to central" in printed
    for name in ("metric_vs_round.png", "bytes_vs_metric.png", "client_loss.png"):
        _assert_png(out / name)
        assert f"wrote {out / name}" in printed
    # one run, no --out: the plots go into the run directory
    assert main(["report", str(central)]) == 0
    for name in ("metric_vs_round.png", "bytes_vs_metric.png", "client_loss.png"):
        _assert_png(central / name)


def test_report_of_an_unfinished_run_and_no_plots(tmp_path, capsys):
    run = _fake_run(tmp_path / "live", [0.5, 0.6], summary=False)
    assert main(["report", str(run), "--no-plots", "--metric", "loss"]) == 0
    printed = capsys.readouterr().out
    assert "missing (unfinished run)" in printed and "final loss" in printed and "wrote" not in printed
    assert not list(run.glob("*.png"))


def test_client_losses_per_client_and_mean(tmp_path):
    run = load_run(_fake_run(tmp_path / "r", [0.5, 0.6, 0.7]))
    per, mean = client_losses(run)
    # named in node-id order: node 7 is client 0
    assert per == {"client 0": [(1, 0.8), (2, 0.4)], "client 1": [(1, 1.2), (2, 0.6)]}
    assert mean == [(1, 1.0), (2, 0.5)]
    rows = [{"round": 1, "clients": [{"node": 99, "partition-id": 3.0, "train_loss": 0.5}]}]
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert client_losses(load_run(tmp_path / "r"))[0] == {"client 3": [(1, 0.5)]}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "nope", "run directory not found"),
        (lambda p: p, "is not a run directory: it has no metrics.jsonl"),
        (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is not a directory"),
        (lambda p: (p / "metrics.jsonl").write_text("{oops\n") and p, "line 1 is not valid JSON"),
        (lambda p: (p / "metrics.jsonl").write_text("") is not None and p, "holds no rounds yet"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, make, message):
    target = make(tmp_path)
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune: error: ") and message in err and err.count("\n") == 1


def test_unknown_metric_is_an_error(tmp_path, capsys):
    run = _fake_run(tmp_path / "r", [0.5, 0.6])
    assert main(["report", str(run), "--metric", "bleu"]) == 2
    err = capsys.readouterr().err
    assert "--metric 'bleu'" in err and "accuracy" in err and err.count("\n") == 1
