"""Per-conformation and per-image FSC protocols on oracle decoders (perfect, swapped, sign-flipped)."""

import json

import pytest
import torch

from cryobench_lab.errors import InputError
from cryobench_lab.metrics.fsc import fsc, fsc_auc
from cryobench_lab.metrics.masks import volume_mask
from cryobench_lab.metrics.protocols import METRIC_KEYS, per_conformation_fsc, per_image_fsc

D, APIX, S, PER_STATE = 24, 3.0, 3, 20
MAX_AUC = (D / 2 - 1) / D  # identical volumes: FSC = 1 on every shell


def _volumes():
    g = torch.Generator().manual_seed(0)
    a = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(a, a, a, indexing="ij")
    vols = []
    for _ in range(S):
        v = torch.zeros(D, D, D)
        for c in (torch.rand(5, 3, generator=g) - 0.5) * 12:
            v += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 1.5**2))
        vols.append(v + 0.01 * torch.randn(D, D, D, generator=g))  # broadband, so every shell has signal
    return torch.stack(vols)


GT = _volumes()
LABELS = torch.arange(S).repeat_interleave(PER_STATE)  # (60,)
CENTRES = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])  # each state's latent centre


def _latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return CENTRES[LABELS] + 0.5 * torch.randn(len(LABELS), 2, generator=g)  # (N, 2)


class Oracle:
    """decode_fn that maps a latent to its nearest state's centre (or a class to a state) and returns that
    state's ground truth, optionally permuted (``swap``) or negated; records its batch sizes."""

    def __init__(self, swap=(0, 1, 2), sign=1.0, by_class=False):
        self.swap, self.sign, self.by_class, self.calls = torch.tensor(swap), sign, by_class, []

    def __call__(self, latent, classes):
        self.calls.append(len(classes))
        if self.by_class or latent is None:
            states = classes
        else:
            states = torch.cdist(latent, CENTRES).argmin(1)
        return self.sign * GT[self.swap[states]]


def test_perfect_decoder_scores_the_maximum_and_swapped_volumes_clearly_less():
    perfect = per_conformation_fsc(Oracle(), LABELS, _latents(), None, GT, APIX)
    assert perfect["fsc_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)
    assert perfect["fsc_auc_std"] == pytest.approx(0.0, abs=1e-9)
    assert perfect["fsc_res_0.5"] == pytest.approx(2 * APIX)  # never below: Nyquist
    swapped = per_conformation_fsc(Oracle(swap=(1, 2, 0)), LABELS, _latents(), None, GT, APIX)
    assert swapped["fsc_auc_mean"] < 0.75 * MAX_AUC
    assert swapped["fsc_res_0.5"] > 3 * APIX
    # each state's number is the FSC of the swapped pair, computed directly
    for p in swapped["per_state"]:
        assert p["auc"] == pytest.approx(fsc_auc(*fsc(GT[(p["state"] + 1) % S], GT[p["state"]])))


def test_representative_is_the_image_nearest_the_state_mean_and_volumes_reach_the_hook():
    z = _latents()
    seen = {}
    out = per_conformation_fsc(
        Oracle(), LABELS, z, None, GT, APIX, on_volume=lambda s, v: seen.update({s: v})
    )
    for p in out["per_state"]:
        members = torch.nonzero(LABELS == p["state"]).squeeze(1)
        mean = z[members].mean(0)
        assert p["image"] == int(members[((z[members] - mean) ** 2).sum(1).argmin()])
    assert sorted(seen) == [0, 1, 2]
    torch.testing.assert_close(seen[2], GT[2])
    assert [p["state"] for p in out["per_state"]] == [0, 1, 2]
    assert len(out["per_state"][0]["curve"]) == D // 2 and out["per_state"][0]["freq"][1] == 1 / D


def test_batches_of_decodes_and_per_class_latents_and_class_only_models():
    oracle = Oracle(by_class=True)
    perm = torch.tensor([2, 0, 1])  # state s is assigned class perm[s]: the classes are renamed states
    probs = torch.nn.functional.one_hot(perm[LABELS], 3).float() * 0.9 + 0.03  # (N, 3)
    oracle.swap = torch.argsort(perm)  # class c decodes to the state whose class it is
    z = torch.randn(len(LABELS), 3, 2)  # per-class latents (N, K, d), ignored by this oracle
    out = per_conformation_fsc(oracle, LABELS, z, probs, GT, APIX, batch_size=2)
    assert oracle.calls == [2, 1]
    assert out["fsc_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)
    assert [p["class"] for p in out["per_state"]] == perm.tolist()
    no_latent = per_conformation_fsc(oracle, LABELS, None, probs, GT, APIX)  # 3D classification
    assert no_latent["fsc_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)


def test_masks_per_state_or_shared_and_unknown_labels_are_skipped():
    labels = LABELS.clone()
    labels[::7] = -1
    masks = torch.stack([volume_mask(v) for v in GT])  # (S, D, D, D)
    per_state = per_conformation_fsc(Oracle(), labels, _latents(), None, GT, APIX, mask=masks)
    shared = per_conformation_fsc(Oracle(), labels, _latents(), None, GT, APIX, mask=masks[0])
    assert per_state["fsc_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)
    assert shared["fsc_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)
    swapped = per_conformation_fsc(Oracle(swap=(1, 2, 0)), labels, _latents(), None, GT, APIX, mask=masks)
    unmasked = per_conformation_fsc(Oracle(swap=(1, 2, 0)), labels, _latents(), None, GT, APIX)
    assert swapped["fsc_auc_mean"] != pytest.approx(unmasked["fsc_auc_mean"], abs=1e-3)  # the mask is used
    assert all(labels[p["image"]] >= 0 for p in per_state["per_state"])


def test_per_image_samples_every_sth_image_and_scores_absolute_fsc():
    oracle = Oracle()
    out = per_image_fsc(oracle, LABELS, _latents(), None, GT, APIX, n=10, batch_size=4)
    assert [p["image"] for p in out["per_image"]] == list(range(0, 60, 6))
    assert oracle.calls == [4, 4, 2]
    assert out["fsc_image_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)
    assert out["fsc_image_auc_median"] == pytest.approx(MAX_AUC, abs=1e-9)
    swapped = per_image_fsc(Oracle(swap=(1, 2, 0)), LABELS, _latents(), None, GT, APIX, n=10)
    assert swapped["fsc_image_auc_mean"] < 0.75 * MAX_AUC
    # A negated volume has FSC −1 on every shell beyond the origin: |FSC| scores it as perfect, which is
    # what CryoBench's per-image AUC does (and the signed per-conformation AUC does not).
    flipped = per_image_fsc(Oracle(sign=-1.0), LABELS, _latents(), None, GT, APIX, n=10)
    assert flipped["fsc_image_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)
    signed = per_conformation_fsc(Oracle(sign=-1.0), LABELS, _latents(), None, GT, APIX)
    assert signed["fsc_auc_mean"] < 0


def test_per_image_without_latents_decodes_each_class_once():
    oracle = Oracle(by_class=True)
    probs = torch.nn.functional.one_hot(LABELS, 3).float()
    out = per_image_fsc(oracle, LABELS, None, probs, GT, APIX, n=30)
    assert sum(oracle.calls) == 3 and len(out["per_image"]) == 30
    assert out["fsc_image_auc_mean"] == pytest.approx(MAX_AUC, abs=1e-9)
    few = per_image_fsc(Oracle(), LABELS, _latents(), None, GT, APIX, n=1000)  # n > N: every image once
    assert len(few["per_image"]) == len(LABELS)


def test_results_are_json_and_use_only_documented_keys():
    conf = per_conformation_fsc(Oracle(), LABELS, _latents(), None, GT, APIX)
    img = per_image_fsc(Oracle(), LABELS, _latents(), None, GT, APIX, n=5)
    json.dumps(conf), json.dumps(img)
    scalars = {k for d in (conf, img) for k, v in d.items() if not isinstance(v, list)}
    assert scalars == {
        "fsc_auc_mean",
        "fsc_auc_std",
        "fsc_auc_median",
        "fsc_res_0.5",
        "fsc_res_0.143",
        "fsc_image_auc_mean",
        "fsc_image_auc_std",
        "fsc_image_auc_median",
    }
    assert scalars <= set(METRIC_KEYS)
    from cryobench_lab.metrics import protocols

    for key in METRIC_KEYS:  # the module's table documents every key
        assert f"``{key}``" in protocols.__doc__


def test_inconsistent_inputs_raise_one_line_errors():
    with pytest.raises(InputError, match="ground-truth volume"):
        per_conformation_fsc(Oracle(), LABELS, _latents(), None, GT[:2], APIX)
    with pytest.raises(InputError, match="rows"):
        per_image_fsc(Oracle(), LABELS, _latents()[:10], None, GT, APIX)
    with pytest.raises(InputError):
        per_conformation_fsc(Oracle(), torch.full((5,), -1), None, None, GT, APIX)
