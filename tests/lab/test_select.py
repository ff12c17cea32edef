"""Choosing cells to review: the scores on hand-computed rows, the audit share (exact
count, uniform, stable), no duplicates, spreading over classes and patients,
determinism, exclusion and the errors."""

import hashlib

import numpy as np
import pytest

from leukotree.errors import LeukotreeError
from leukotree.lab.select import (
    AUDIT_REASON,
    POLICIES,
    Pool,
    active_score,
    answer_uncertainty,
    audit_count,
    audit_flag,
    margin_uncertainty,
    ood_term,
    read_done,
    select_cells,
    uncertainty_score,
    uniform_keys,
)

LEAVES = ("A", "B", "C")


def pool(rows, **extra):
    return Pool([f"c{i}" for i in range(len(rows))], LEAVES, np.array(rows, float), **extra)


def test_margin_uncertainty_by_hand():
    u = margin_uncertainty(np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0],
                                     [0.1, 0.2, 0.7]]))
    assert u == pytest.approx([0.8, 0.0, 1.0, 0.5])


def test_answer_and_ood_terms_by_hand():
    assert answer_uncertainty(np.array([1, 2, 3]), 3) == pytest.approx([0.0, 0.5, 1.0])
    assert ood_term(np.array([0.5, 1.0, 3.0, np.nan])) == pytest.approx([0.25, 0.5, 1.0, 0.0])


def test_active_score_mixes_uncertainty_answer_size_and_ood():
    p = pool([[0.5, 0.3, 0.2], [0.9, 0.1, 0.0]], ood_score=np.array([1.0, 3.0]))
    assert active_score(p) == pytest.approx([(0.8 + 0.5) / 2, (0.2 + 1.0) / 2])
    q = pool([[0.5, 0.3, 0.2]], answer_sizes=np.array([3]), answer_nodes=["root"])
    assert uncertainty_score(q) == pytest.approx([(0.8 + 1.0) / 2])
    assert active_score(q) == pytest.approx([0.9])  # no ood score: the uncertainty alone


def test_reasons_a_technologist_can_read():
    p = pool([[0.48, 0.41, 0.11], [0.9, 0.05, 0.05], [0.05, 0.05, 0.9],
              [0.05, 0.9, 0.05]], ood_score=np.array([0.2, 1.3, 0.9, 0.1]))
    picks = select_cells(p, 4, policy="active", audit_share=0)
    reasons = {q.id: q.reason for q in picks}
    assert reasons["c0"] == "uncertain: A 0.48 / B 0.41"
    assert reasons["c1"] == "unlike training cells (ood 1.30); predicted A 0.90"
    assert reasons["c2"] == "unusual (ood 0.90); predicted C 0.90"  # O 0.45 > U 0.15
    assert reasons["c3"] == "spread over classes: predicted B 0.90"
    assert select_cells(p, 1, policy="uncertainty", audit_share=0)[0].reason == \
        "uncertain: A 0.48 / B 0.41"


def test_audit_count_is_exact_and_halves_round_up():
    assert [audit_count(n, 0.2) for n in (1, 2, 3, 5, 10, 50)] == [0, 0, 1, 1, 2, 10]
    assert audit_count(5, 0.3) == 2  # 1.5
    rng = np.random.default_rng(0)
    p = pool(rng.dirichlet(np.ones(3), 40))
    picks = select_cells(p, 10, audit_share=0.2, seed=3)
    assert sum(q.audit for q in picks) == 2
    assert all(q.reason == AUDIT_REASON for q in picks if q.audit)
    assert all(q.score is None for q in picks if q.audit)


def test_audit_cells_are_uniform_over_all_candidates_whatever_the_scores():
    """The most uncertain cells are not favoured: over 400 seeds every cell is an audit
    cell about 400 * 5 / 20 = 100 times."""
    rows = [[1 / 3, 1 / 3, 1 / 3]] * 5 + [[1.0, 0.0, 0.0]] * 15
    p = pool(rows)
    counts = np.zeros(20)
    for seed in range(400):
        for q in select_cells(p, 10, policy="uncertainty", audit_share=0.5, seed=seed):
            counts[q.index] += q.audit
    assert counts.sum() == 400 * 5
    assert counts.min() > 60 and counts.max() < 140
    assert counts[:5].mean() == pytest.approx(counts[5:].mean(), abs=25)


def test_each_file_at_most_once_same_id_or_same_bytes():
    p = Pool(["a", "a", "b", "c"], LEAVES, np.array([[0.4, 0.4, 0.2]] * 4),
             digests=["h1", "h1", "h1", "h2"])
    picks = select_cells(p, 2, audit_share=0)
    assert sorted(q.id for q in picks) == ["a", "c"]
    with pytest.raises(LeukotreeError, match="more than the 2 cell"):
        select_cells(p, 3)


def test_active_spreads_over_predicted_classes_uncertainty_does_not():
    rows = [[0.5, 0.45, 0.05]] * 6 + [[0.1, 0.2, 0.7]] * 6  # A: U 0.95, C: U 0.5
    p = pool(rows)
    by_uncertainty = select_cells(p, 4, policy="uncertainty", audit_share=0)
    assert [q.predicted for q in by_uncertainty] == ["A"] * 4
    active = select_cells(p, 4, policy="active", audit_share=0)
    assert sorted(q.predicted for q in active) == ["A", "A", "C", "C"]
    assert [q.predicted for q in active][:2] == ["A", "C"]  # the best stratum first


def test_active_spreads_over_patients_within_a_class():
    rows = [[0.5, 0.45, 0.05]] * 4 + [[0.6, 0.3, 0.1]] * 4
    p = pool(rows, patients=["p1"] * 4 + ["p2"] * 4)
    picks = select_cells(p, 4, policy="active", audit_share=0)
    assert sorted(q.patient for q in picks) == ["p1", "p1", "p2", "p2"]


def test_flagged_cells_are_one_stratum_and_cannot_take_the_queue():
    rows = [[0.9, 0.05, 0.05]] * 10
    ood = np.array([3.0] * 8 + [0.1, 0.1])
    picks = select_cells(pool(rows, ood_score=ood), 4, policy="active", audit_share=0)
    assert sum(q.ood > 1 for q in picks) == 2
    by_ood = select_cells(pool(rows, ood_score=ood), 4, policy="ood", audit_share=0)
    assert all(q.ood > 1 for q in by_ood)


def test_near_duplicate_vectors_are_skipped_unless_nothing_else_is_left():
    vectors = np.array([[1.0, 0.0], [1.0, 0.0005], [0.0, 1.0]])
    rows = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.9, 0.1, 0.0]]
    p = pool(rows, vectors=vectors)
    picks = select_cells(p, 2, policy="uncertainty", audit_share=0)
    first = picks[0].id
    assert first in {"c0", "c1"} and picks[1].id == "c2"  # the tie broken by the seed
    three = select_cells(p, 3, policy="uncertainty", audit_share=0)
    twin = ({"c0", "c1"} - {first}).pop()
    assert three[-1].id == twin and f"near-duplicate of {first}" in three[-1].reason


def test_the_same_seed_gives_the_same_queue_and_removal_does_not_reshuffle():
    rng = np.random.default_rng(1)
    p = pool(rng.dirichlet(np.ones(3), 30), patients=[f"p{i % 4}" for i in range(30)])
    first = select_cells(p, 10, seed=7)
    assert first == select_cells(p, 10, seed=7)
    assert [q.id for q in first if q.audit] != [q.id for q in select_cells(p, 10, seed=8)
                                                 if q.audit]
    # leaving out a cell that was not chosen keeps the audit picks
    other = next(i for i in p.ids if i not in {q.id for q in first})
    again = select_cells(p, 10, seed=7, exclude=[other])
    assert [q.id for q in again if q.audit] == [q.id for q in first if q.audit]


def test_excluded_cells_are_never_chosen():
    p = pool([[0.5, 0.5, 0.0]] * 3 + [[1.0, 0.0, 0.0]] * 3)
    picks = select_cells(p, 3, policy="uncertainty", audit_share=0, exclude=["c0", "c1"])
    assert {"c0", "c1"}.isdisjoint(q.id for q in picks)
    assert picks[0].id == "c2"


def test_random_policy_is_uniform_and_deterministic():
    p = pool([[1.0, 0.0, 0.0]] * 10)
    picks = select_cells(p, 5, policy="random", audit_share=0, seed=2)
    assert [q.reason for q in picks] == ["random"] * 5
    keys = uniform_keys(p.ids, 2, "order")
    assert [q.index for q in picks] == list(np.argsort(-keys)[:5])


def test_pre_decided_audit_flags_drawn_from_flagged_cells_only():
    rows = [[0.5, 0.5, 0.0]] * 4 + [[0.9, 0.1, 0.0]] * 6
    flags = np.array([True, False, False, False, True, True, False, False, False, False])
    p = pool(rows, audit=flags)
    picks = select_cells(p, 5, policy="uncertainty", audit_share=0.4)
    audit = [q.index for q in picks if q.audit]
    assert len(audit) == 2 and set(audit) <= {0, 4, 5}
    assert all(not flags[q.index] for q in picks if not q.audit)
    # too few cells that are not audit cells: filled with the spare audit cells (fill)
    few = select_cells(p, 10, policy="uncertainty", audit_share=0.2, fill=True)
    assert len(few) == 10 and sum(q.audit for q in few) == 3


def test_fill_returns_what_is_left_instead_of_refusing():
    p = pool([[0.5, 0.5, 0.0]] * 3)
    assert len(select_cells(p, 10, fill=True)) == 3
    with pytest.raises(LeukotreeError, match="give --n 3 or fewer"):
        select_cells(p, 10)


def test_audit_flag_is_stable_and_near_its_share():
    keys = [f"case{i // 50}:{i % 50}" for i in range(2000)]
    flags = [audit_flag(k, 0.2) for k in keys]
    assert flags == [audit_flag(k, 0.2) for k in keys]
    assert 0.17 < np.mean(flags) < 0.23
    assert not any(audit_flag(k, 0.0) for k in keys[:100])
    assert all(audit_flag(k, 1.0) for k in keys[:100])


def test_audit_flag_is_the_whole_digest_over_2_to_the_256():
    # by hand: the cell is audit when int(sha256("case:index")) / 2^256 < share
    value = int(hashlib.sha256(b"abc:3").hexdigest(), 16) / 2 ** 256
    assert audit_flag("abc:3", value + 1e-9) and not audit_flag("abc:3", value)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n": 0}, "must be an integer >= 1; got 0"),
    ({"n": 2.5}, "must be an integer"),
    ({"audit_share": 1.0}, r"must be in \[0, 1\)"),
    ({"audit_share": -0.1}, r"must be in \[0, 1\)"),
    ({"policy": "activ"}, "Did you mean 'active'"),
])
def test_bad_requests_name_the_parameter(kwargs, match):
    args = {"n": 1, "audit_share": 0.2, "policy": "active"} | kwargs
    n = args.pop("n")
    with pytest.raises(LeukotreeError, match=match):
        select_cells(pool([[1.0, 0.0, 0.0]]), n, **args)


def test_ood_policy_needs_an_ood_score():
    with pytest.raises(LeukotreeError, match="--policy active or uncertainty"):
        select_cells(pool([[1.0, 0.0, 0.0]] * 2), 1, policy="ood", audit_share=0)


def test_every_policy_returns_n_distinct_cells():
    rng = np.random.default_rng(5)
    p = pool(rng.dirichlet(np.ones(3), 25), ood_score=rng.uniform(0, 2, 25),
             patients=[f"p{i % 3}" for i in range(25)])
    for name in POLICIES:
        picks = select_cells(p, 12, policy=name)
        assert len({q.id for q in picks}) == 12 and sum(q.audit for q in picks) == 2


def test_read_done_resolves_paths_from_the_csv_folder(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    done = tmp_path / "done.csv"
    done.write_text(f"path,label\na.png,A\n{tmp_path / 'b.png'},B\n")
    assert read_done(done) == {str((tmp_path / "a.png").resolve()),
                               str((tmp_path / "b.png").resolve())}
    (tmp_path / "bad.csv").write_text("file\na.png\n")
    with pytest.raises(LeukotreeError, match="no 'path' column"):
        read_done(tmp_path / "bad.csv")
    with pytest.raises(LeukotreeError, match="does not exist"):
        read_done(tmp_path / "none.csv")


def test_an_empty_pool_has_nothing_to_choose():
    empty = Pool([], LEAVES, np.zeros((0, 3)))
    assert len(empty) == 0 and select_cells(empty, 3, fill=True) == []
    with pytest.raises(LeukotreeError, match="No cell can be chosen"):
        select_cells(empty, 3)
