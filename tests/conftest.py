"""Shared fixtures: one local SparkSession for the whole test run (Spark start-up is slow)."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def base_conf():
    """The default configuration with local[2] Spark and the rs engine."""
    from streamrank.config import load_config

    return load_config(None, ["spark.master=local[2]", "spark.shuffle_partitions=2", "spark.driver_memory=2g"], env={})


@pytest.fixture(scope="session")
def spark(base_conf):
    from streamrank.spark import build_session

    session = build_session(base_conf, app_name="streamrank-tests")
    yield session
    session.stop()


_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_DV_MAGIC = 1681511377


def _z85(data: bytes) -> str:
    data += b"\0" * (-len(data) % 4)
    chars = []
    for (word,) in struct.iter_unpack(">I", data):
        digits = []
        for _ in range(5):
            word, digit = divmod(word, 85)
            digits.append(_Z85[digit])
        chars.extend(reversed(digits))
    return "".join(chars)


def _roaring_bitmap_array(positions: list[int]) -> bytes:
    """Delta's serialized deletion vector: magic, then a 64-bit RoaringBitmapArray (portable
    format, array containers only: fewer than 4,097 positions per 65,536 rows)."""
    by_high: dict[int, list[int]] = {}
    for p in sorted(set(positions)):
        by_high.setdefault(p >> 32, []).append(p & 0xFFFFFFFF)
    out = struct.pack("<iq", _DV_MAGIC, len(by_high))
    for high, lows in sorted(by_high.items()):
        containers: dict[int, list[int]] = {}
        for low in lows:
            containers.setdefault(low >> 16, []).append(low & 0xFFFF)
        assert all(len(c) <= 4096 for c in containers.values()), "bitmap containers are not written here"
        keys = sorted(containers)
        header = struct.pack("<II", 12346, len(keys)) + b"".join(
            struct.pack("<HH", k, len(containers[k]) - 1) for k in keys)
        offset, offsets, body = len(header) + 4 * len(keys), [], b""
        for k in keys:
            offsets.append(offset + len(body))
            body += struct.pack(f"<{len(containers[k])}H", *containers[k])
        out += struct.pack("<I", high) + header + struct.pack(f"<{len(keys)}I", *offsets) + body
    return out


def delete_with_deletion_vector(table_uri: str, file_name: str, positions: list[int]) -> int:
    """Delete rows of one data file the way delta-spark's DELETE does on a table enabled for
    deletion vectors, and return the new version.

    The file stays; one commit removes its add action and adds it again with an inline
    deletion vector (Delta protocol: a RoaringBitmapArray of the row positions, Z85-encoded).
    delta-rs does not write deletion vectors and the delta-spark jars are not on this
    machine, so the tests write the log entry themselves; delta-rs decoding it back to the
    same positions is checked where it is used.
    """
    import deltalake

    table = deltalake.DeltaTable(table_uri)
    if "deletionVectors" not in (table.protocol().reader_features or []):
        table.alter.set_table_properties({"delta.enableDeletionVectors": "true"})
        table = deltalake.DeltaTable(table_uri)
    log_dir = Path(table_uri, "_delta_log")
    add = None
    for version in range(table.version() + 1):  # the live add action of the file
        for line in (log_dir / f"{version:020d}.json").read_text().splitlines():
            action = json.loads(line)
            if "add" in action and action["add"]["path"].endswith(file_name):
                add = action["add"]
            elif "remove" in action and action["remove"]["path"].endswith(file_name):
                add = None
    assert add is not None and not add.get("deletionVector"), f"{file_name} is not a live file without a vector"
    data = _roaring_bitmap_array(positions)
    now = int(time.time() * 1000)
    vector = {"storageType": "i", "pathOrInlineDv": _z85(data), "sizeInBytes": len(data),
              "cardinality": len(set(positions))}
    actions = [
        {"commitInfo": {"timestamp": now, "operation": "DELETE", "engineInfo": "streamrank-tests"}},
        {"remove": {"path": add["path"], "deletionTimestamp": now, "dataChange": True, "extendedFileMetadata": True,
                    "partitionValues": add["partitionValues"], "size": add["size"]}},
        {"add": {**add, "deletionVector": vector, "dataChange": True, "modificationTime": now}},
    ]
    version = table.version() + 1
    with open(log_dir / f"{version:020d}.json", "x") as f:  # "x": a commit never overwrites another
        f.write("".join(json.dumps(a) + "\n" for a in actions))
    return version


@pytest.fixture()
def conf(base_conf, tmp_path: Path):
    """Default conf pointed at a fresh warehouse and landing root under tmp_path."""
    return base_conf.with_overrides(
        {"warehouse.root": str(tmp_path / "warehouse"), "landing.root": str(tmp_path / "landing")}
    )


class ScoringWorld:
    """A seeded, untrained scoring model of the configured size (d=64, 2 layers, L=50), its
    vocabulary, and tomorrow's candidates (every third of 600 products): what the score
    stage's executors get, without a registry or a warehouse."""

    n_products, n_categories, n_hosts, seq_len = 600, 20, 30, 50

    def __init__(self) -> None:
        import datetime as dt
        import io

        import numpy as np
        import torch

        from streamrank.features import EVENT_TYPES
        from streamrank.model import ModelConfig, StreamRankModel
        from streamrank.score import Champion, build_candidates

        torch.manual_seed(0)
        mc = ModelConfig(n_products=self.n_products + 2, n_categories=self.n_categories + 2,
                         n_event_types=len(EVENT_TYPES) + 2, n_hosts=self.n_hosts + 2, d_model=64, n_heads=2,
                         n_layers=2, seq_len=self.seq_len)
        model = StreamRankModel(mc, product_category=np.concatenate(
            [[0, 1], 2 + np.arange(self.n_products) % self.n_categories]))
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        self.vocab = {
            "product": {"<pad>": 0, "<unk>": 1, **{f"p{i:04d}": i + 2 for i in range(self.n_products)}},
            "category": {"<pad>": 0, "<unk>": 1, **{f"c{i:02d}": i + 2 for i in range(self.n_categories)}},
            "event": {"<pad>": 0, "<unk>": 1, **{t: i + 2 for i, t in enumerate(EVENT_TYPES)}},
            "host": {"<pad>": 0, "<unk>": 1, **{f"h{i:03d}": i + 2 for i in range(self.n_hosts)}}}
        self.champion = Champion("t", "1", "r", buf.getvalue(), mc.to_dict(), self.vocab,
                                 {"method": "platt", "a": 1.0, "b": 0.0})
        slot = dt.datetime(2026, 11, 9, 12, tzinfo=dt.UTC)
        rows = [{"product_id": f"p{i:04d}", "stream_id": f"s{i % 20}", "host_id": f"h{i % self.n_hosts:03d}",
                 "slot_start": slot, "slot_hour": 14, "n_slots": 1, "category": f"c{i % self.n_categories:02d}",
                 "list_price": 10.0, "popularity": i % 7} for i in range(0, self.n_products, 3)]
        self.cands = build_candidates(rows, self.vocab["product"], self.vocab["category"], mc.n_products, False, [])
        self.n_pp = int(mc.n_pp_features)

    def histories(self, n: int, seed: int):
        """n random viewers' model inputs (left-padded histories of 0..L events, cold starts included)."""
        import numpy as np

        from streamrank.features import EVENT_TYPES

        rng = np.random.default_rng(seed)
        L = self.seq_len
        hist_len = rng.integers(0, L + 1, n)
        valid = np.arange(L)[None] >= (L - hist_len)[:, None]

        def ids(lo: int, hi: int):
            return np.where(valid, rng.integers(lo, hi, (n, L)), 0).astype(np.int64)

        return {"hist_product": ids(2, self.n_products + 2), "hist_category": ids(2, self.n_categories + 2),
                "hist_event": ids(2, len(EVENT_TYPES) + 2), "hist_dwell": ids(1, 8),
                "hist_dt": np.where(valid, rng.uniform(0, 200, (n, L)), 0).astype(np.float32),
                "hist_host": ids(2, self.n_hosts + 2), "hist_hour": ids(2, 26), "hist_len": hist_len.astype(np.int64),
                "pp_features": rng.normal(size=(n, self.n_pp)).astype(np.float32)}


@pytest.fixture(scope="session")
def scoring_world() -> ScoringWorld:
    return ScoringWorld()
