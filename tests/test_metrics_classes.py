"""Classification metrics: ARI/NMI against numpy formulas, permutation invariance, confusion by hand."""

import math

import numpy as np
import pytest
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.metrics.classes import classification_metrics


def _contingency(a, b):
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    c = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(c, (ai, bi), 1)
    return c


def _ari_reference(a, b):
    """Hubert & Arabie's adjusted Rand index from pair counts."""
    c = _contingency(a, b)

    def comb(x):
        return x * (x - 1) / 2

    index = comb(c).sum()
    ra, rb, n = comb(c.sum(1)).sum(), comb(c.sum(0)).sum(), comb(c.sum())
    expected = ra * rb / n
    return (index - expected) / (0.5 * (ra + rb) - expected)


def _nmi_reference(a, b):
    """I(A; B) / mean(H(A), H(B)) in nats."""
    p = _contingency(a, b) / len(a)
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum()

    def h(q):
        return -(q[q > 0] * np.log(q[q > 0])).sum()

    return mi / ((h(pa) + h(pb)) / 2)


def test_a_permuted_perfect_labelling_scores_one():
    labels = torch.arange(5).repeat_interleave(40)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = classification_metrics(perm[labels], labels)
    assert out["ari"] == pytest.approx(1.0) and out["nmi"] == pytest.approx(1.0)
    assert out["n_empty_classes"] == 0 and out["class_sizes"] == [40] * 5


def test_random_labels_score_about_zero():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (5000,), generator=g)
    pred = torch.randint(0, 5, (5000,), generator=g)
    out = classification_metrics(pred, labels)
    assert abs(out["ari"]) < 0.01 and out["nmi"] < 0.01


def test_ari_and_nmi_match_the_formulas_on_a_partial_labelling():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 600)
    pred = np.where(rng.random(600) < 0.7, labels, rng.integers(0, 6, 600))  # 70 % right, 6 classes
    out = classification_metrics(torch.from_numpy(pred), torch.from_numpy(labels))
    assert out["ari"] == pytest.approx(_ari_reference(pred, labels), abs=1e-5)
    assert out["nmi"] == pytest.approx(_nmi_reference(pred, labels), abs=1e-5)
    assert 0.3 < out["ari"] < 0.9


def test_confusion_matrix_empty_classes_and_unknown_labels_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, -1])
    pred = torch.tensor([1, 1, 3, 3, 3, 0, 0, 1, 4])
    out = classification_metrics(pred, labels, n_classes=6)
    assert out["confusion"] == [
        [0, 2, 0, 1, 0, 0],
        [0, 0, 0, 2, 0, 0],
        [2, 1, 0, 0, 0, 0],
    ]
    assert out["class_sizes"] == [2, 3, 0, 3, 1, 0]  # the unlabelled image still occupies class 4
    assert out["n_empty_classes"] == 2
    known = labels >= 0
    assert out["ari"] == pytest.approx(_ari_reference(pred[known].numpy(), labels[known].numpy()), abs=1e-6)


def test_probabilities_are_argmaxed_and_set_the_number_of_classes():
    labels = torch.tensor([0, 0, 1, 1])
    probs = torch.tensor(
        [[0.1, 0.8, 0.1, 0.0], [0.2, 0.7, 0.1, 0.0], [0.9, 0.0, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0]]
    )
    out = classification_metrics(probs, labels)
    assert out["class_sizes"] == [2, 2, 0, 0] and out["n_empty_classes"] == 2
    assert out["ari"] == pytest.approx(1.0)


def test_label_values_need_not_be_contiguous_and_one_group_agrees_with_one_group():
    out = classification_metrics(torch.tensor([7, 7, 2, 2]), torch.tensor([0, 0, 5, 5]))
    assert out["ari"] == pytest.approx(1.0) and out["nmi"] == pytest.approx(1.0)
    assert len(out["confusion"]) == 6 and len(out["class_sizes"]) == 8
    single = classification_metrics(torch.zeros(10, dtype=torch.long), torch.full((10,), 3))
    assert single["ari"] == 1.0 and single["nmi"] == 1.0
    collapsed = classification_metrics(torch.zeros(10, dtype=torch.long), torch.arange(10) % 2)
    assert collapsed["ari"] == pytest.approx(0.0) and collapsed["nmi"] == pytest.approx(0.0)
    assert all(isinstance(v, (int, float, list)) for v in out.values())
    assert not math.isnan(collapsed["nmi"])


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(InputError):
        classification_metrics(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(InputError):
        classification_metrics(torch.tensor([0, 5]), torch.tensor([0, 1]), n_classes=3)
    with pytest.raises(InputError):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([-1, -1]))
