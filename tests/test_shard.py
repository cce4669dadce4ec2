"""Shards: self-describing, compact, mapped to examples by id (not row order), verified before use."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.shard import ShardError, build_table, read_shard, write_shard

N, NT, C = 500, 200, 10
META = {"campaign": "c", "spec_hash": "abc", "run": 4, "n_train": N, "n_test": NT}


def make(seed=0, margins=True):
    rng = np.random.default_rng(seed)
    y_tr, y_te = rng.integers(0, C, N), rng.integers(0, C, NT)
    mask = rng.random(N) < 0.7
    p_tr = np.where(rng.random(N) < 0.9, y_tr, rng.integers(0, C, N))
    p_te = np.where(rng.random(NT) < 0.8, y_te, rng.integers(0, C, NT))
    values = {"margin": (rng.normal(2, 3, N).astype(np.float32), rng.normal(1, 3, NT).astype(np.float32)),
              "probability": (rng.random(N).astype(np.float32), rng.random(NT).astype(np.float32))}
    return dict(mask=mask, train_pred=p_tr, test_pred=p_te, train_labels=y_tr, test_labels=y_te,
                num_classes=C, values=values if margins else None)


def read(path, **kw):
    args = dict(campaign="c", spec_hash="abc", run=4, n_train=N, n_test=NT)
    args.update(kw)
    return read_shard(path, **args)


def test_round_trip(tmp_path):
    a = make()
    path = tmp_path / "run-000004.parquet"
    write_shard(path, build_table(meta=META, **a))
    d = read(path, mask=a["mask"])
    np.testing.assert_array_equal(d.mask, a["mask"])
    np.testing.assert_array_equal(d.train_correct, a["train_pred"] == a["train_labels"])
    np.testing.assert_array_equal(d.test_correct, a["test_pred"] == a["test_labels"])
    np.testing.assert_array_equal(d.test_pred, a["test_pred"])
    for name in ("margin", "probability"):  # float16
        np.testing.assert_allclose(d.train_values[name], a["values"][name][0], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(d.test_values[name], a["values"][name][1], rtol=1e-3, atol=1e-3)
    assert d.meta["run"] == 4 and d.meta["format"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run-000004.parquet"]  # no temporary left


def test_without_margins(tmp_path):
    a = make(margins=False)
    write_shard(tmp_path / "s.parquet", build_table(meta=META, **a))
    d = read(tmp_path / "s.parquet")
    assert d.train_values == {} and d.test_values == {}


def test_row_order_is_never_trusted(tmp_path):
    a = make()
    table = build_table(meta=META, **a)
    perm = np.random.default_rng(1).permutation(table.num_rows)
    pq.write_table(table.take(pa.array(perm)), tmp_path / "s.parquet")
    d = read(tmp_path / "s.parquet", mask=a["mask"])
    np.testing.assert_array_equal(d.train_pred, a["train_pred"])
    np.testing.assert_array_equal(d.test_pred, a["test_pred"])


def test_at_most_three_bytes_per_row_at_cifar_scale(tmp_path):
    # perf.md's realistic case: 50,000 train + 10,000 test rows, 100 classes, float16 margins
    rng = np.random.default_rng(0)
    n, nt, c = 50_000, 10_000, 100
    y_tr, y_te = rng.integers(0, c, n), rng.integers(0, c, nt)
    mask = rng.random(n) < 0.7
    p_tr = np.where(rng.random(n) < np.where(mask, 0.995, 0.75), y_tr, rng.integers(0, c, n))
    p_te = np.where(rng.random(nt) < 0.75, y_te, rng.integers(0, c, nt))
    table = build_table(mask, p_tr, p_te, y_tr, y_te, c, {**META, "n_train": n, "n_test": nt},
                        {"margin": (rng.normal(3, 2, n).astype(np.float32), rng.normal(2, 2, nt).astype(np.float32))})
    write_shard(tmp_path / "s.parquet", table)
    assert (tmp_path / "s.parquet").stat().st_size / (n + nt) <= 3.0


@pytest.mark.parametrize("field,value,match", [
    ("campaign", "other", r"metadata campaign is 'other', expected 'c' \(a shard of another campaign or spec\)"),
    ("spec_hash", "zzz", r"metadata spec_hash is 'zzz'"),
    ("run", 5, r"metadata run is 5, expected 4"),
])
def test_foreign_shards_are_refused(tmp_path, field, value, match):
    write_shard(tmp_path / "s.parquet", build_table(meta={**META, field: value}, **make()))
    with pytest.raises(ShardError, match=match):
        read(tmp_path / "s.parquet")


def test_truncated_shard(tmp_path):
    path = tmp_path / "s.parquet"
    write_shard(path, build_table(meta=META, **make()))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated or corrupt"):
        read(path)


def test_corrupted_page_is_detected(tmp_path):
    path = tmp_path / "s.parquet"
    write_shard(path, build_table(meta=META, **make()))
    data = bytearray(path.read_bytes())
    for k in range(200, 260):  # inside the first column chunk's data pages, before the footer
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError):
        read(path)


def test_mask_differs_from_plan(tmp_path):
    a = make()
    write_shard(tmp_path / "s.parquet", build_table(meta=META, **a))
    other = a["mask"].copy()
    other[:3] = ~other[:3]
    with pytest.raises(ShardError, match=r"in_subset differs from the plan's subset of run 4 in 3 examples"):
        read(tmp_path / "s.parquet", mask=other)


def test_malformed_rows(tmp_path):
    table = build_table(meta=META, **make())
    pq.write_table(table.slice(0, table.num_rows - 1), tmp_path / "short.parquet")
    with pytest.raises(ShardError, match=r"699 rows, expected 500 train \+ 200 test = 700"):
        read(tmp_path / "short.parquet")
    dup = table.set_column(1, "example", pa.array(np.zeros(table.num_rows, np.int32)))
    pq.write_table(dup, tmp_path / "dup.parquet")
    with pytest.raises(ShardError, match=r"train rows do not cover examples 0..499 exactly once"):
        read(tmp_path / "dup.parquet")


def test_not_a_longtail_shard(tmp_path):
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(ShardError, match="not a longtail shard"):
        read(tmp_path / "x.parquet")


def test_full_logits_only_when_asked(tmp_path):
    a = make()
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(N, C)).astype(np.float32), rng.normal(size=(NT, C)).astype(np.float32))
    write_shard(tmp_path / "s.parquet", build_table(meta=META, **{**a, "values": {**a["values"], "logits": logits}}))
    d = read(tmp_path / "s.parquet")
    np.testing.assert_allclose(d.train_values["logits"], logits[0], atol=2e-3)  # float16
    np.testing.assert_allclose(d.test_values["logits"], logits[1], atol=2e-3)
    write_shard(tmp_path / "t.parquet", build_table(meta=META, **a))
    assert "logits" not in read(tmp_path / "t.parquet").train_values
    assert (tmp_path / "s.parquet").stat().st_size > (tmp_path / "t.parquet").stat().st_size + (N + NT) * C
