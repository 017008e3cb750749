"""Hostile inputs: every payload decoder under fuzzing, configs of wrong types, data files with
bad rows, nodes that never reply or reply for another node.

A decoder may accept a payload (a mutation can still be a well-formed payload) or raise
`fedtune.errors.PayloadError`; anything else (IndexError, struct.error, MemoryError, a
numpy or torch error) is a bug the fuzzer reports.
"""

from __future__ import annotations

import io
import json
import re
import struct
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune import config
from fedtune.compression import CompressionConfig, build_codec, layout_of
from fedtune.compression.codec import VALID_CODECS, make_codec
from fedtune.errors import ConfigError, PayloadError
from fedtune.flower.client import handle_train
from fedtune.flower.local import LocalGrid
from fedtune.flower.records import PACKED, from_arrayrecord, pack, to_arrayrecord
from fedtune.flower.server import ServerLoop
from fedtune.zo.history import RoundEntry, SeedHistory
from fedtune.zo.pool import SeedPool
from fedtune.zo.wire import decode_downlink, decode_history, decode_uplink, encode_downlink, encode_uplink

DELTA = {
    "l.lora_A": torch.randn(3, 17, generator=torch.Generator().manual_seed(0)),
    "l.lora_B": torch.randn(17, 3, generator=torch.Generator().manual_seed(1)),
    "head": torch.randn(5, generator=torch.Generator().manual_seed(2)) * torch.tensor([1.0, 0, 1, 0, 1]),
}
LAYOUT = layout_of(DELTA)


def _codec(name):
    return make_codec(
        name,
        ratio=0.3,
        block_size=8 if "int" in name or "sign" in name else None,
        randk_unbiased=name.startswith("randk"),
    )


CODECS = {name: _codec(name) for name in VALID_CODECS}
CODECS["split:topk+int4|none"] = build_codec(CompressionConfig(codec="topk+int4", small_codec="none", small_numel=8))
CODECS["split:sign|fp16"] = build_codec(CompressionConfig(codec="sign", small_codec="fp16", small_numel=8))
PAYLOADS = {name: c.encode(DELTA, seed=3) for name, c in CODECS.items()}


def _decode_or_payload_error(decode, payload):
    try:
        out = decode(payload)
    except PayloadError:
        return None
    return out


def _mutated(data, payload: bytes) -> bytes:
    """Truncated, extended, byte-flipped, or with a u32 length/count field set past the end."""
    p = bytearray(payload)
    how = data.draw(st.sampled_from(["truncate", "extend", "flip", "u32"]))
    if how == "truncate":
        return bytes(p[: data.draw(st.integers(0, max(0, len(p) - 1)))])
    if how == "extend":
        return bytes(p) + data.draw(st.binary(min_size=1, max_size=64))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            p[data.draw(st.integers(0, len(p) - 1))] = data.draw(st.integers(0, 255))
        return bytes(p)
    at = data.draw(st.integers(0, max(0, len(p) - 4)))
    value = data.draw(st.sampled_from([len(p), len(p) + 1, 2**31, 2**32 - 1, 0x7FFF_FFFF, 1 << 20]))
    p[at : at + 4] = struct.pack("<I", value)[: len(p) - at]
    return bytes(p)


# --- compression codecs ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_round_trips_its_own_payload(name):
    out = CODECS[name].decode(PAYLOADS[name], LAYOUT, seed=3)
    assert {k: tuple(v.shape) for k, v in out.items()} == LAYOUT
    assert len(PAYLOADS[name]) <= CODECS[name].wire_size(LAYOUT)  # the server's size bound holds


@pytest.mark.filterwarnings("error::RuntimeWarning")
@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(CODECS)), st.data())
def test_codec_decoders_raise_only_payload_error_on_mutated_payloads(name, data):
    codec = CODECS[name]
    out = _decode_or_payload_error(lambda b: codec.decode(b, LAYOUT, seed=3), _mutated(data, PAYLOADS[name]))
    if out is not None:
        assert {k: tuple(v.shape) for k, v in out.items()} == LAYOUT
        assert all(torch.isfinite(v).all() for v in out.values())


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(CODECS)), st.binary(max_size=400), st.booleans())
def test_codec_decoders_raise_only_payload_error_on_random_bytes(name, blob, with_header):
    codec = CODECS[name]
    payload = PAYLOADS[name][:20] + blob if with_header else blob  # past the header checks too
    _decode_or_payload_error(lambda b: codec.decode(b, LAYOUT, seed=3), payload)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("name", ["int8", "topk+int4", "randk+int8", "randk"])
def test_a_huge_finite_float_anywhere_is_refused_without_an_overflow_warning(name):
    """3e38 written at every offset: where it lands on a scale, the decoded values overflow."""
    refused = set()
    for at in range(20, len(PAYLOADS[name]) - 3):
        payload = bytearray(PAYLOADS[name])
        payload[at : at + 4] = struct.pack("<f", 3e38)
        try:
            CODECS[name].decode(bytes(payload), LAYOUT, seed=3)
        except PayloadError as exc:
            refused.add("finite" if "not finite" in str(exc) else "other")
    assert "finite" in refused


def test_codec_decoders_refuse_what_is_not_bytes():
    for bad in (None, "text", 3, [1, 2]):
        with pytest.raises(PayloadError):
            CODECS["topk+int8"].decode(bad, LAYOUT, seed=3)


# --- FedKSeed payloads -----------------------------------------------------------------------

POOL = SeedPool(num_seeds=300, pool_seed=4)
HISTORY = SeedHistory(
    POOL,
    [
        RoundEntry(np.array([1, 5, 299], dtype=np.uint32), np.array([0.5, -1.0, 2.0], dtype=np.float32)),
        RoundEntry.from_dense(np.linspace(-1, 1, 300).astype(np.float32)),
        RoundEntry.empty(),
    ],
)
ZO = {
    "uplink": (encode_uplink([(3, 0.25), (299, -1.5), (3, 2.0)], POOL), lambda b: decode_uplink(b, POOL, 8)),
    "downlink": (encode_downlink(HISTORY, 0), lambda b: decode_downlink(b, POOL)),
    "history": (HISTORY.to_bytes(), lambda b: decode_history(b, POOL)),
    "history.from_bytes": (HISTORY.to_bytes(), lambda b: SeedHistory.from_bytes(b, POOL)),
}


def test_zo_payloads_round_trip():
    assert ZO["uplink"][1](ZO["uplink"][0]) == [(3, 0.25), (299, -1.5), (3, 2.0)]
    assert ZO["history"][1](ZO["history"][0]) == HISTORY
    first, entries = ZO["downlink"][1](ZO["downlink"][0])
    assert first == 1 and tuple(entries) == HISTORY.entries


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ZO)), st.data())
def test_zo_decoders_raise_only_payload_error_on_mutated_payloads(which, data):
    payload, decode = ZO[which]
    _decode_or_payload_error(decode, _mutated(data, payload))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(ZO)), st.binary(max_size=300), st.booleans())
def test_zo_decoders_raise_only_payload_error_on_random_bytes(which, blob, with_header):
    payload, decode = ZO[which]
    _decode_or_payload_error(decode, (payload[:20] + blob) if with_header else blob)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_seed_history_arrays_raise_only_payload_error(data):
    arrays = dict(HISTORY.to_arrays())
    key = data.draw(st.sampled_from(sorted(arrays)))
    arrays[key] = data.draw(
        st.sampled_from(
            [
                np.array([]),
                np.array([-1, 7]),
                np.array(["x"]),
                np.array([[1, 2], [3, 4]]),
                np.array([2**40]),
                np.array([0, 9, 2]),
                np.array([np.nan]),
                np.zeros(0, dtype=np.uint32),
            ]
        )
    )
    if data.draw(st.booleans()):
        arrays.pop(data.draw(st.sampled_from(sorted(arrays))))
    _decode_or_payload_error(lambda a: SeedHistory.from_arrays(a, POOL), arrays)


# --- dense updates (Flower ArrayRecords) -----------------------------------------------------


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _record(data: bytes, dtype="float32", shape=(3, 4), stype="numpy.ndarray") -> ArrayRecord:
    return ArrayRecord({"w": Array(dtype=dtype, shape=shape, stype=stype, data=data)})


GOOD = _npy(np.arange(12, dtype=np.float32).reshape(3, 4))


def test_from_arrayrecord_reads_what_to_arrayrecord_writes():
    state = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.float64), "c": torch.tensor(2.0)}
    back = from_arrayrecord(to_arrayrecord(state))
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    big_endian = _npy(np.arange(12, dtype=">f4").reshape(3, 4))
    got = from_arrayrecord(_record(big_endian))["w"]
    assert got.dtype == torch.float32 and torch.equal(got, torch.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize(
    "record, why",
    [
        (_record(GOOD[:-1]), "needs 48 bytes of data, the array has 47"),
        (_record(GOOD + b"\0"), "the array has 49"),
        (_record(GOOD[:130]), "needs 48 bytes of data, the array has 2"),
        (_record(GOOD[:50]), "malformed .npy header"),
        (_record(GOOD[:10]), "malformed .npy header"),
        (_record(b"not an npy file at all"), "malformed .npy header"),
        (_record(GOOD, shape=(4, 3)), "the array fields float32 (4, 3)"),
        (_record(GOOD, dtype="float64"), "the array fields float64"),
        (_record(GOOD, stype="torch.Tensor"), "serialization type"),
        (_record(_npy(np.array(["a", "b"]))), "not a numeric dtype"),
        (_record(_npy(np.zeros(2, dtype=[("x", "<f4")]))), "not a numeric dtype"),
        (_record(_npy(np.zeros(2, dtype=np.longdouble)), dtype="float128", shape=(2,)), "could not be decoded"),
    ],
)
def test_from_arrayrecord_refuses_malformed_arrays(record, why):
    with pytest.raises(PayloadError, match=re.escape(why)):
        from_arrayrecord(record)


def test_from_arrayrecord_refuses_a_huge_claimed_shape_without_allocating():
    """A header claiming 10**12 float32s (4 TB) over 48 bytes: np.load would allocate them first."""
    body = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    padded = body + b" " * (118 - len(body)) + b"\n"
    raw = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(padded)) + padded + b"\0" * 48
    with pytest.raises(PayloadError, match="needs 4000000000000 bytes of data, the array has 48"):
        from_arrayrecord(_record(raw, shape=(10**12,)))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_from_arrayrecord_raises_only_payload_error_on_mutated_arrays(data):
    mutated = _mutated(data, GOOD)
    shape = data.draw(st.sampled_from([(3, 4), (12,), (0,), (2**40,)]))
    dtype = data.draw(st.sampled_from(["float32", "float64", "int8", "nonsense"]))
    out = _decode_or_payload_error(from_arrayrecord, _record(mutated, dtype=dtype, shape=shape))
    if out is not None:
        assert tuple(out["w"].shape) == shape


STATE = {"lora_A": torch.arange(12.0).reshape(3, 4), "lora_B": -torch.arange(8.0).reshape(4, 2)}
PACKED_BLOB = bytes(pack(STATE)[PACKED].numpy())  # the safetensors bytes inside the packed array


def _packed(blob: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))})


def test_pack_is_one_uint8_array_that_reads_back_exactly():
    state = {**STATE, "head": torch.randn(2, dtype=torch.float64), "scalar": torch.tensor(3.0)}
    record = pack(state)
    assert list(record) == [PACKED] and record[PACKED].dtype == "uint8" and len(record[PACKED].shape) == 1
    back = from_arrayrecord(record)
    assert list(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    # the safetensors blob is what safetensors' own reader sees: 8-byte header length, JSON header, data
    import json

    (n,) = struct.unpack("<Q", PACKED_BLOB[:8])
    header = json.loads(PACKED_BLOB[8 : 8 + n])
    assert header["lora_A"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": header["lora_A"]["data_offsets"]}
    assert len(PACKED_BLOB) == 8 + n + 4 * (12 + 8)


@pytest.mark.parametrize(
    "record, why",
    [
        (_packed(PACKED_BLOB[:-1]), "could not be decoded"),
        (_packed(PACKED_BLOB + b"\0"), "could not be decoded"),
        (_packed(b"not safetensors"), "could not be decoded"),
        (ArrayRecord({PACKED: Array(np.zeros(3, dtype=np.float32))}), "a packed record holds a 1-d uint8 array"),
        (ArrayRecord({PACKED: Array(np.zeros((2, 2), dtype=np.uint8))}), "a packed record holds a 1-d uint8 array"),
        (ArrayRecord({PACKED: pack(STATE)[PACKED], "w": Array(np.zeros(2, np.float32))}), "holds only"),
    ],
)
def test_from_arrayrecord_refuses_malformed_packed_records(record, why):
    with pytest.raises(PayloadError, match=re.escape(why)):
        from_arrayrecord(record)


def test_a_packed_header_claiming_a_huge_tensor_is_refused_without_allocating():
    """10**12 float32s claimed over 8 bytes of data: safetensors checks offsets and shape against the buffer."""
    header = b'{"w":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,8]}}'
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 8
    with pytest.raises(PayloadError, match="could not be decoded"):
        from_arrayrecord(_packed(blob))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_from_arrayrecord_raises_only_payload_error_on_mutated_packed_records(data):
    out = _decode_or_payload_error(from_arrayrecord, _packed(_mutated(data, PACKED_BLOB)))
    if out is not None:  # a flip inside the tensor data, or one the header tolerates: still a tensor dict
        assert all(isinstance(v, torch.Tensor) for v in out.values())


# --- configuration of the wrong types -------------------------------------------------------


def test_a_config_file_with_wrong_types_reports_every_one(tmp_path):
    (tmp_path / "bad.toml").write_text(
        '[federation]\nrounds = "five"\n[train]\nlr = true\n[attack]\nkind = "scale"\nfactor = [1]\n'
        "partition_ids = [0]\n"
    )
    with pytest.raises(ConfigError) as err:
        config.load(tmp_path / "bad.toml")
    text = str(err.value)
    for expected in (
        "federation.rounds: expected an integer, got 'five'",
        "train.lr: expected a number, got True",
        "attack.factor: expected a number, got [1]",
    ):
        assert expected in text, text


# --- data files with bad rows -------------------------------------------------------------


def _data_cfg(tmp_path, text, name="bad.csv"):
    (tmp_path / name).write_text(text)
    return config.DataConfig(dataset=str(tmp_path / name))


@pytest.mark.parametrize(
    "rows, why",
    [
        (
            "text,label\ngood one,1\n,0\nfine,1\n",
            "1 bad row(s) (rows count from 1 after the header): row 2: empty text (column 'text')",
        ),
        ("text,label\ngood one,1\nbad label,positive\nfine,0\n", "row 2: label 'positive' is not an integer"),
        ("text,label\ngood one,1\nno label\nfine,0\n", "row 2: no label (column 'label')"),
        ("text,label\ngood one,1\nminus,-1\nfine,0\n", "row 2: label '-1' is negative"),
        (
            "text,label\ngood one,1\nblank,\nfine,0\n,\n",
            "2 bad row(s) (rows count from 1 after the header): row 2: no "
            "label (column 'label'); row 4: empty text (column 'text'); "
            "row 4: no label",
        ),
    ],
)
def test_a_data_file_with_a_bad_row_names_the_row(tmp_path, rows, why):
    from fedtune import data

    with pytest.raises(ConfigError, match=re.escape(why)):
        data.load_examples(_data_cfg(tmp_path, rows), "classification")


def test_a_jsonl_data_file_with_a_bad_row_names_the_row(tmp_path):
    from fedtune import data

    lines = [
        json.dumps({"text": "ok", "label": 0}),
        json.dumps({"text": "ok", "label": 1}),
        json.dumps({"text": None, "label": 1}),
    ]
    with pytest.raises(ConfigError, match="row 3: empty text"):
        data.load_examples(_data_cfg(tmp_path, "\n".join(lines) + "\n", "bad.jsonl"), "classification")


def test_label_names_are_still_accepted(tmp_path):
    from fedtune import data

    ex = data.load_examples(_data_cfg(tmp_path, "text,label\na,neg\nb,pos\nc,neg\n"), "classification")
    assert [e["label"] for e in data.encode_labels(ex)[0]] == [0, 1, 0]


# --- nodes that never reply, or reply for another ---------------------------------------------


class ImpostorGrid(LocalGrid):
    """Real message ids; node ``impostor`` also answers the message sent to ``victim`` (which stays
    silent), and node ``twice`` answers its own message twice."""

    def __init__(self, *args, impostor, victim, twice, **kwargs):
        super().__init__(*args, **kwargs)
        self.impostor, self.victim, self.twice = impostor, victim, twice

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for i, m in enumerate(messages):  # as a real grid does at push time
            m.metadata.__dict__["_message_id"] = f"msg-{time.monotonic_ns()}-{i}"
        honest = [m for m in messages if m.metadata.dst_node_id != self.victim]
        replies = super().send_and_receive(honest, timeout=timeout)
        for m in messages:
            if m.metadata.message_type != MessageType.TRAIN:
                continue
            if m.metadata.dst_node_id == self.victim:  # the impostor trains on its own data, replies to it
                reply = self.client_fn(m, self.contexts[self.impostor])
                reply.metadata.__dict__["_src_node_id"] = self.impostor
                replies.append(reply)
            if m.metadata.dst_node_id == self.twice:
                replies.append(self.client_fn(m, self.contexts[self.twice]))
        return replies


def test_a_node_replying_for_another_is_rejected_and_counted_once(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"federation.rounds": 1})
    grid = ImpostorGrid(
        cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg), impostor=1001, victim=1002, twice=1003
    )
    summary = ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert summary["rounds_completed"] == 1
    reasons = [(r["node"], r["reason"]) for r in row["rejected"]]
    assert (1001, "replied for node 1002; that reply is dropped") in reasons
    assert (1003, "replied twice; that reply is dropped") in reasons
    assert any(n == 1002 and "no reply within federation.round_timeout" in why for n, why in reasons)
    assert len(reasons) == 3
    assert sorted(c["node"] for c in row["clients"]) == [1000, 1001, 1003] and row["accepted"] == 3


def test_a_reply_from_a_node_that_was_not_sampled_goes_to_the_node_the_message_was_for(tiny_cfg, tmp_path):
    """The SuperLink answers for an unreachable node (src 0): the loop's existing mapping still holds."""
    cfg = tiny_cfg.replace(**{"federation.rounds": 1})

    class Grid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"m{i}"
            replies = super().send_and_receive(messages[1:], timeout=timeout)
            self.unreachable = messages[0].metadata.dst_node_id
            meta = Metadata(
                run_id=1,
                message_id="",
                src_node_id=0,
                dst_node_id=0,
                reply_to_message_id=messages[0].metadata.message_id,
                group_id="",
                created_at=time.time(),
                ttl=60.0,
                message_type=MessageType.TRAIN,
            )
            from flwr.app import Error

            return [Message(Error(code=3, reason="node unavailable"), metadata=meta), *replies]

    grid = Grid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
    ServerLoop(cfg, tmp_path, progress=lambda s: None).main(grid)
    row = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["rejected"] == [{"node": grid.unreachable, "reason": "node unavailable"}] and row["accepted"] == 3
