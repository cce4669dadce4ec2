"""The run shard: one Parquet file per finished run, self-describing, verified before it is trusted.

One row per evaluated example, train rows then test rows:

    split      dictionary<int8, string>  "train" | "test"
    example    int32    index in the dataset's original order (within its split)
    in_subset  bool     train rows: did this run train on it; null on test rows
    correct    bool     pred == label
    pred       int16    predicted label (int32 beyond 32,767 classes)
    margin     float16  correct-class logit minus the best other logit; null when not stored
    prob       float16  softmax probability of the correct class (only when [train] store has it)
    logits     fixed_size_list<float16>[classes]  every logit (only when [train] store has it)
    loss_sum, learn_epoch, forgets   float16, int16, int16: the run's training dynamics (workers/dynamics.py),
               on the train rows it trained on, null elsewhere (only when [train] store has "dynamics")

Run-level facts are Parquet key-value metadata under the key "longtail" (JSON). Readers map rows to
examples through `split` and `example`, never through row order.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.errors import LongtailError
from workers.storage import arrow_source, atomic_path

FORMAT_VERSION = 1
META_KEY = b"longtail"
FLOAT16_MAX = 65504.0

SPLIT_TYPE = pa.dictionary(pa.int8(), pa.string())


class ShardError(LongtailError, ValueError):
    """A shard that cannot be trusted: unreadable, truncated, foreign or malformed. Says which and why."""


def _pred_type(num_classes: int) -> pa.DataType:
    return pa.int16() if num_classes <= np.iinfo(np.int16).max else pa.int32()


# stored value -> shard column
COLUMNS = {"margin": "margin", "probability": "prob"}
# training dynamics (optional; shards written before they existed have none)
DYNAMIC_COLUMNS = {"loss_sum": pa.float16(), "learn_epoch": pa.int16(), "forgets": pa.int16()}


def _float16(values: np.ndarray) -> pa.Array:
    return pa.array(np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), pa.float16())


@functools.lru_cache(maxsize=8)
def _fixed_columns(n_train: int, n_test: int) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """split and example columns, and the test-row mask: the same for every run of a campaign."""
    split = pa.DictionaryArray.from_arrays(
        pa.array(np.r_[np.zeros(n_train, np.int8), np.ones(n_test, np.int8)]), pa.array(["train", "test"]))
    example = pa.array(np.r_[np.arange(n_train, dtype=np.int32), np.arange(n_test, dtype=np.int32)])
    test_rows = np.r_[np.zeros(n_train, bool), np.ones(n_test, bool)]
    test_rows.flags.writeable = False
    return split, example, test_rows


def build_table(mask: np.ndarray, train_pred: np.ndarray, test_pred: np.ndarray, train_labels: np.ndarray,
                test_labels: np.ndarray, num_classes: int, meta: dict,
                values: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                dynamics: dict[str, np.ndarray] | None = None) -> pa.Table:
    """The shard of one run. `values` maps "margin" / "probability" to their (train, test) arrays;
    `dynamics` maps DYNAMIC_COLUMNS to arrays over the examples trained on, in ascending order."""
    values = values or {}
    n_train, n_test = len(train_pred), len(test_pred)
    split, example, test_rows = _fixed_columns(n_train, n_test)
    in_subset = pa.array(np.r_[mask.astype(bool), np.zeros(n_test, bool)], mask=test_rows)
    correct = np.r_[train_pred == train_labels, test_pred == test_labels]
    pred_type = _pred_type(num_classes)
    pred_np = np.r_[train_pred, test_pred].astype(np.int16 if pred_type == pa.int16() else np.int32)
    fields = [("split", SPLIT_TYPE), ("example", pa.int32()), ("in_subset", pa.bool_()), ("correct", pa.bool_()),
              ("pred", pred_type), ("margin", pa.float16())]
    columns = [split, example, in_subset, pa.array(correct), pa.array(pred_np)]
    margin = values.get("margin")
    columns.append(pa.nulls(n_train + n_test, pa.float16()) if margin is None else _float16(np.r_[margin]))
    if "probability" in values:
        fields.append(("prob", pa.float16()))
        columns.append(_float16(np.r_[values["probability"]]))
    if "logits" in values:  # every logit, only when asked: (examples x classes) float16
        logits = np.concatenate(values["logits"]).astype(np.float16)
        fields.append(("logits", pa.list_(pa.float16(), logits.shape[1])))
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel(), pa.float16()), logits.shape[1]))
    if dynamics is not None:
        rows = np.flatnonzero(mask)
        absent = np.ones(n_train + n_test, bool)
        absent[rows] = False
        for name, dtype in DYNAMIC_COLUMNS.items():
            full = np.zeros(n_train + n_test, np.float32 if dtype == pa.float16() else np.int64)
            full[rows] = dynamics[name]
            arr = (np.clip(full, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16) if dtype == pa.float16()
                   else np.clip(full, -32768, 32767).astype(np.int16))
            fields.append((name, dtype))
            columns.append(pa.array(arr, dtype, mask=absent))
    schema = pa.schema(fields, metadata={META_KEY: json.dumps({"format": FORMAT_VERSION, **meta}).encode()})
    return pa.Table.from_arrays(columns, schema=schema)


def _write(table: pa.Table, sink) -> None:
    encodings = {"example": "DELTA_BINARY_PACKED", "margin": "BYTE_STREAM_SPLIT"}
    if "prob" in table.column_names:
        encodings["prob"] = "BYTE_STREAM_SPLIT"
    dictionary = ["split", "pred"]
    if "loss_sum" in table.column_names:  # dynamics: counts of at most epochs distinct values, bit-packed
        encodings["loss_sum"] = "BYTE_STREAM_SPLIT"
        dictionary += ["learn_epoch", "forgets"]
    pq.write_table(table, sink, compression="zstd", use_dictionary=dictionary, column_encoding=encodings,
                   write_page_checksum=True, write_statistics=False)


def write_shard(path, table: pa.Table) -> None:
    """Write atomically: temporary name, fsync, rename. Page checksums let readers detect corruption."""
    with atomic_path(path) as tmp:
        _write(table, tmp)


def shard_bytes(table: pa.Table) -> bytes:
    """The shard file's bytes, for a worker that cannot see the campaign directory: the driver writes them."""
    sink = pa.BufferOutputStream()
    _write(table, sink)
    return sink.getvalue().to_pybytes()


@dataclass
class ShardData:
    """A verified shard, as arrays indexed by example id."""

    meta: dict
    mask: np.ndarray  # (n_train,) bool
    train_correct: np.ndarray  # (n_train,) bool
    test_correct: np.ndarray  # (n_test,) bool
    train_pred: np.ndarray
    test_pred: np.ndarray
    train_values: dict[str, np.ndarray]  # "margin", "probability" (float32) when the shard has them
    test_values: dict[str, np.ndarray]
    # DYNAMIC_COLUMNS -> (n_train,) float32 (NaN on examples not trained on) when the shard has them
    dynamics: dict[str, np.ndarray] | None = None


def read_meta(path) -> dict:
    source, filesystem = arrow_source(path)
    try:
        md = pq.read_schema(source, filesystem=filesystem).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: unreadable Parquet footer ({e}); the file is truncated or corrupt") from None
    if META_KEY not in md:
        raise ShardError(f"{path}: no longtail metadata; not a longtail shard")
    try:
        return json.loads(md[META_KEY])
    except ValueError:
        raise ShardError(f"{path}: longtail metadata is not valid JSON") from None


def _check_meta(path, meta: dict, *, campaign: str, spec_hash: str, run: int, n_train: int, n_test: int) -> None:
    expect = {"format": FORMAT_VERSION, "campaign": campaign, "spec_hash": spec_hash, "run": run,
              "n_train": n_train, "n_test": n_test}
    for key, value in expect.items():
        if meta.get(key) != value:
            raise ShardError(f"{path}: metadata {key} is {meta.get(key)!r}, expected {value!r}"
                             + (" (a shard of another campaign or spec)" if key in ("campaign", "spec_hash") else ""))


def read_run_meta(path, *, campaign: str, spec_hash: str, run: int, n_train: int, n_test: int) -> dict:
    """The run-level facts of run `run`'s shard, verified to be that run's of this campaign and spec
    (its footer only: for readers of run facts such as test_acc, not of outcomes); raise ShardError."""
    meta = read_meta(path)
    _check_meta(path, meta, campaign=campaign, spec_hash=spec_hash, run=run, n_train=n_train, n_test=n_test)
    return meta


def _split_is_train(split: pa.Array) -> tuple[np.ndarray, bool]:
    """(is this row a train row, does every row say 'train' or 'test'). The writer dictionary-encodes
    the column: deciding on its codes avoids making 60,000 Python strings a shard (20 ms of the
    driver's 5 ms budget per shard at the CIFAR-100 shape)."""
    if pa.types.is_dictionary(split.type) and not split.null_count:
        names = np.asarray(split.dictionary.cast(pa.string()).to_pylist(), dtype=object)
        codes = split.indices.to_numpy(zero_copy_only=False)
        train_code, test_code = names == "train", names == "test"
        return train_code[codes], bool((train_code | test_code)[codes].all())
    values = np.asarray(split.cast(pa.string()).to_numpy(zero_copy_only=False))
    return values == "train", bool(((values == "train") | (values == "test")).all())


def read_shard(path, *, campaign: str, spec_hash: str, run: int, n_train: int, n_test: int,
               mask: np.ndarray | None = None) -> ShardData:
    """Read and verify one shard against what the campaign expects of run `run`; raise ShardError otherwise."""
    source, filesystem = arrow_source(path)
    try:  # one footer parse serves the metadata check and the read
        parquet = pq.ParquetFile(source, filesystem=filesystem, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: unreadable Parquet footer ({e}); the file is truncated or corrupt") from None
    md = parquet.schema_arrow.metadata or {}
    if META_KEY not in md:
        raise ShardError(f"{path}: no longtail metadata; not a longtail shard")
    try:
        meta = json.loads(md[META_KEY])
    except ValueError:
        raise ShardError(f"{path}: longtail metadata is not valid JSON") from None
    _check_meta(path, meta, campaign=campaign, spec_hash=spec_hash, run=run, n_train=n_train, n_test=n_test)
    try:
        table = parquet.read()
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: unreadable ({e}); the file is corrupt") from None
    need = {"split", "example", "in_subset", "correct", "pred", "margin"}
    if not need <= set(table.column_names):
        raise ShardError(f"{path}: columns {sorted(table.column_names)}, expected {sorted(need)}")
    if table.num_rows != n_train + n_test:
        raise ShardError(f"{path}: {table.num_rows} rows, expected {n_train} train + {n_test} test = "
                         f"{n_train + n_test}")
    is_train, valid = _split_is_train(table.column("split").combine_chunks())
    example = table.column("example").to_numpy()
    if not valid:
        raise ShardError(f"{path}: column split holds values other than 'train' and 'test'")
    written = np.r_[np.arange(n_train), np.arange(n_test)]
    if is_train[:n_train].all() and np.array_equal(example, written):
        tr, te = slice(0, n_train), slice(n_train, n_train + n_test)  # the order writers use: views, no copies
    else:  # any other row order is fine too: rows are mapped to examples by (split, example)
        out = {}
        for name, sel, n in (("train", is_train, n_train), ("test", ~is_train, n_test)):
            ex = example[sel]
            if len(ex) != n or not np.array_equal(np.sort(ex), np.arange(n)):
                raise ShardError(f"{path}: {name} rows do not cover examples 0..{n - 1} exactly once")
            out[name] = np.flatnonzero(sel)[np.argsort(ex, kind="stable")]
        tr, te = out["train"], out["test"]
    correct = table.column("correct")
    in_subset = table.column("in_subset")
    train_subset = in_subset.slice(0, n_train) if isinstance(tr, slice) else in_subset.take(pa.array(tr))
    if correct.null_count or train_subset.null_count:
        raise ShardError(f"{path}: missing values in columns correct or in_subset")
    correct = correct.to_numpy(zero_copy_only=False).astype(bool)
    subset = in_subset.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    pred = table.column("pred").to_numpy(zero_copy_only=False)
    train_values, test_values = {}, {}
    for name, column in COLUMNS.items():
        if column not in table.column_names or table.column(column).null_count == table.num_rows:
            continue
        col = table.column(column)
        if col.null_count:
            raise ShardError(f"{path}: column {column} has {col.null_count} missing values")
        v = col.to_numpy(zero_copy_only=False).astype(np.float32)
        train_values[name], test_values[name] = v[tr], v[te]
    if "logits" in table.column_names:
        col = table.column("logits").combine_chunks()
        v = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
        train_values["logits"], test_values["logits"] = v[tr], v[te]
    dynamics = None
    if all(name in table.column_names for name in DYNAMIC_COLUMNS):
        dynamics = {name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float32)[tr]
                    for name in DYNAMIC_COLUMNS}  # nulls become NaN
    shard_mask = subset[tr]
    if mask is not None and not np.array_equal(shard_mask, np.asarray(mask, bool)):
        raise ShardError(f"{path}: in_subset differs from the plan's subset of run {run} in "
                         f"{int((shard_mask != mask).sum())} examples")
    return ShardData(meta=meta, mask=shard_mask, train_correct=correct[tr], test_correct=correct[te],
                     train_pred=pred[tr], test_pred=pred[te], train_values=train_values, test_values=test_values,
                     dynamics=dynamics)
