"""Out-of-subset prediction counts (dense and bounded-memory) and the triage of memorized examples."""

import numpy as np
import pytest

from estimators import triage as tr


def _dense_reference(preds: np.ndarray, out: np.ndarray, classes: int) -> np.ndarray:
    """Counts per (example, class) by a plain loop over runs."""
    counts = np.zeros((preds.shape[1], classes), np.int64)
    for r in range(len(preds)):
        for i in np.flatnonzero(out[r]):
            counts[i, preds[r, i]] += 1
    return counts


def test_dense_counts_equal_a_plain_reference_and_summary_is_exact_with_few_classes():
    rng = np.random.default_rng(0)
    runs, n, classes = 30, 200, 6
    preds = rng.integers(0, classes, (runs, n))
    out = rng.random((runs, n)) < 0.3
    # the summary holds 20 classes in 6 slots, and only 6 classes occur
    dense, summary = tr.OutOfSubset(n, classes, 1e9), tr.OutOfSubset(n, 20, 0, slots=classes)
    assert dense.dense and not summary.dense
    for r in range(runs):
        for acc in (dense, summary):
            acc.add(out[r], preds[r])
    want = _dense_reference(preds, out, classes)
    np.testing.assert_array_equal(dense.counts, want)
    np.testing.assert_array_equal(dense.total, want.sum(1))
    lab, cnt = summary.table()  # as many slots as classes occur: Misra-Gries never evicts, so it is exact
    got = np.zeros_like(want)
    for i in range(n):
        for c, k in zip(lab[i], cnt[i]):
            if c >= 0:
                got[i, c] += k
    np.testing.assert_array_equal(got, want)
    assert np.all(summary.bound() == 0)


def test_misra_gries_bound_holds_against_exact_counts():
    """Many classes, few slots: every kept count is at most the true one and at least the true one minus
    the stated bound, and every class above N / (slots + 1) is kept; the bound is not vacuous (it is met
    with equality-or-less but the error is really there)."""
    rng = np.random.default_rng(1)
    runs, n, classes, slots = 200, 300, 50, 4
    mode = rng.integers(0, classes, n)
    share = rng.uniform(0.1, 0.7, n)
    preds = np.where(rng.random((runs, n)) < share, mode, rng.integers(0, classes, (runs, n)))
    out = rng.random((runs, n)) < 0.4
    acc = tr.OutOfSubset(n, classes, 0, slots=slots)
    for r in range(runs):
        acc.add(out[r], preds[r])
    want = _dense_reference(preds, out, classes)
    lab, cnt = acc.table()
    bound = acc.bound()
    kept = np.zeros_like(want)
    for i in range(n):
        for c, k in zip(lab[i], cnt[i]):
            if c >= 0:
                kept[i, c] = k
    assert np.all(kept <= want)
    assert np.all(want - kept <= bound[:, None] + 1e-9)
    assert np.all((want > want.sum(1, keepdims=True) / (slots + 1)) <= (kept > 0))
    assert (want - kept).max() > 0  # the summary does lose counts here: the bound is what is tested


def test_bounded_memory_at_imagenet_shape():
    """1.28 M examples x 1,000 classes: the dense uint16 table is 2.56 GB, over a 0.25 GB budget, so the
    summary is used: 4 (class, count) slots per example, 31 MB. 11 runs predict each example's planted
    mode 6 times and 5 other random classes: 6 distinct classes for 4 slots, so counts are evicted, and
    the mode (share 6/11 > 1 / (slots + 1)) must still be found with its share within the stated bound."""
    n, classes, budget, slots = 1_281_167, 1000, 0.25e9, 4
    acc = tr.OutOfSubset(n, classes, budget, slots=slots)
    assert not acc.dense and n * classes * 2 > budget
    assert acc.nbytes() <= 0.04e9
    rng = np.random.default_rng(2)
    mode = rng.integers(0, classes, n).astype(np.int32)
    everyone = np.ones(n, bool)
    for r in range(11):
        pred = mode if r % 2 == 0 else (mode + rng.integers(1, classes, n)) % classes  # never the mode
        acc.add(everyone, pred.astype(np.int32))
    y = (mode + 1) % classes
    d = tr.distribution(*acc.table(), acc.total, y, acc.bound())
    np.testing.assert_array_equal(d.mode, mode)
    truth = 6 / 11
    assert np.all(d.mode_share <= truth + 1e-12) and np.all(d.mode_share >= truth - d.bound - 1e-12)
    assert (d.bound > 0).mean() > 0.5  # evictions did happen


def test_distribution_and_triage_on_constructed_counts():
    classes = 4
    # out-of-subset counts per example (dense rows), labels y
    counts = np.array([[0, 9, 1, 0],   # 0: label 0, out models agree on 1 -> mislabeled
                       [5, 4, 1, 0],   # 1: split between the label and 1 -> ambiguous
                       [3, 2, 3, 2],   # 2: no class dominates -> rare
                       [1, 9, 0, 0],   # 3: like 0 but not memorized -> no triage
                       [0, 0, 0, 0],   # 4: no out-of-subset run -> no triage
                       [2, 5, 2, 1]])  # 5: mode 1 at exactly 0.5 (= agree) -> mislabeled
    y = np.array([0, 0, 0, 0, 0, 0])
    mem = np.array([0.8, 0.6, 0.7, 0.1, 0.9, 0.3])
    labels = np.broadcast_to(np.arange(classes), counts.shape)
    d = tr.distribution(labels, counts, counts.sum(1), y)
    assert d.mode.tolist()[:4] == [1, 0, 0, 1] and d.mode[4] == -1
    np.testing.assert_allclose(d.mode_share[:4], [0.9, 0.5, 0.3, 0.9])
    np.testing.assert_allclose(d.other_share[:3], [0.9, 0.4, 0.3])
    assert d.entropy[0] == pytest.approx(-(0.9 * np.log2(0.9) + 0.1 * np.log2(0.1)))
    assert d.entropy[2] == pytest.approx(-(2 * 0.3 * np.log2(0.3) + 2 * 0.2 * np.log2(0.2)))
    assert np.isnan(d.entropy[4])
    cat = tr.triage(d, y, mem, mem_threshold=0.25, agree=0.5, split=0.2)
    assert cat.tolist() == ["mislabeled", "ambiguous", "rare", "", "", "mislabeled"]
    # the thresholds are the rule: with a stricter agreement example 5 is no longer mislabeled, and as
    # its predictions do not split between two classes (0.3 elsewhere), it is rare
    cat = tr.triage(d, y, mem, mem_threshold=0.25, agree=0.6, split=0.2)
    assert cat[5] == "rare" and cat[1] == "ambiguous"
    cat = tr.triage(d, y, mem, mem_threshold=0.25, agree=0.6, split=0.45)  # 0.4 on class 1 is below it
    assert cat[1] == "rare"
    assert tr.triage(d, y, mem, mem_threshold=0.75, agree=0.5, split=0.2).tolist() == ["mislabeled", "", "", "", "",
                                                                                       ""]


def test_pred_probs_rows_and_auroc():
    acc = tr.OutOfSubset(3, 3, 1e9)
    acc.add(np.array([True, True, False]), np.array([1, 2, 0]))
    acc.add(np.array([True, False, False]), np.array([1, 0, 0]))
    p = acc.pred_probs()
    np.testing.assert_allclose(p, [[0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    assert p.dtype == np.float32
    # AUROC: perfect, reversed, chance with ties
    pos = np.array([0, 0, 1, 1], bool)
    assert tr.auroc(np.array([0.1, 0.2, 0.8, 0.9]), pos) == 1.0
    assert tr.auroc(np.array([0.9, 0.8, 0.2, 0.1]), pos) == 0.0
    assert tr.auroc(np.ones(4), pos) == 0.5
    from sklearn.metrics import roc_auc_score

    s = np.random.default_rng(0).random(100)
    lab = np.random.default_rng(1).random(100) < 0.3
    assert tr.auroc(s, lab) == pytest.approx(roc_auc_score(lab, s))
