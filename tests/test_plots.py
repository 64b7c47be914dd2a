"""Figures: every one is a readable PNG with labelled axes, a title and a legend or colour bar."""

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from cryobench_lab import plots
from cryobench_lab.metrics.fsc import fsc_summary


@pytest.fixture
def figures(monkeypatch):
    """Capture each Figure as it is saved, to inspect what the PNG shows."""
    captured = []
    save = plots.save_figure

    def spy(fig, path, dpi=None):
        captured.append(fig)
        return save(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", spy)
    return captured


def _check_readable(fig, path, min_px=300):
    img = imread(path)
    assert img.shape[0] >= min_px and img.shape[1] >= min_px and img[..., :3].std() > 0.05
    data_axes = [
        ax
        for ax in fig.axes
        if ax.get_label() != "<colorbar>" and ax.images + ax.lines + ax.collections + ax.patches
    ]
    assert data_axes
    for ax in data_axes:
        assert ax.get_xlabel() and ax.get_ylabel()
    assert any(ax.get_title() for ax in fig.axes) or (fig._suptitle is not None and fig._suptitle.get_text())
    has_colorbar = any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    has_legend = any(ax.get_legend() is not None for ax in fig.axes)
    assert has_colorbar or has_legend


def _volumes(n=3, D=32):
    a = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(a, a, a, indexing="ij")
    return torch.stack([torch.exp(-((x - 3 * s) ** 2 + y**2 + (z + s) ** 2) / 18) for s in range(n)])


def test_fsc_curves_few_and_many_states(tmp_path, figures):
    vols = _volumes()
    curves = [
        {"state": s, **fsc_summary(vols[s] + 0.01 * s * torch.randn_like(vols[s]), vols[s], 3.0)}
        for s in range(3)
    ]
    p = plots.plot_fsc_curves(tmp_path / "a" / "fsc.png", curves, apix=3.0)
    _check_readable(figures[-1], p)
    ax = figures[-1].axes[0]
    assert "1/Å" in ax.get_xlabel() and ax.get_xlim()[1] == pytest.approx(0.5 / 3.0)
    assert {line.get_label() for line in ax.lines} >= {"FSC = 0.5", "FSC = 0.143"}
    many = [dict(curves[s % 3], state=s) for s in range(30)]
    _check_readable(figures[-1], plots.plot_fsc_curves(tmp_path / "fsc30.png", many, apix=3.0))
    assert any(ax.get_label() == "<colorbar>" for ax in figures[-1].axes)


def test_latent_scatter_discrete_continuous_and_one_dimensional(tmp_path, figures):
    labels = torch.arange(4).repeat_interleave(50)
    emb = torch.randn(200, 2) + labels[:, None]
    p = plots.plot_latent(tmp_path / "l.png", emb, labels)
    _check_readable(figures[-1], p)
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == [
        f"state {s}" for s in range(4)
    ]
    p = plots.plot_latent(tmp_path / "l50.png", torch.randn(500, 2), torch.arange(500) % 50)
    _check_readable(figures[-1], p)
    p = plots.plot_latent(tmp_path / "l1.png", torch.randn(200, 1), labels, axis_labels=["z"])
    _check_readable(figures[-1], p)
    p = plots.plot_latent(tmp_path / "big.png", np.random.randn(30000, 2), None, max_points=1000)
    _check_readable(figures[-1], p)
    assert "1000 of 30000" in figures[-1].axes[0].get_title()


def test_confusion_and_class_sizes(tmp_path, figures):
    cm = np.array([[10, 0, 2], [0, 7, 0]])
    p = plots.plot_confusion(tmp_path / "cm.png", cm)
    _check_readable(figures[-1], p)
    texts = [t.get_text() for t in figures[-1].axes[0].texts]
    assert texts == ["10", "0", "2", "0", "7", "0"]  # every cell annotated with its count
    p = plots.plot_class_sizes(tmp_path / "sizes.png", [10, 7, 2, 0], confusion=np.c_[cm, [0, 0]])
    _check_readable(figures[-1], p)
    assert "empty" in [t.get_text() for t in figures[-1].axes[0].texts]
    _check_readable(figures[-1], plots.plot_class_sizes(tmp_path / "s2.png", np.arange(40)))


def test_volume_montage_rows_and_columns(tmp_path, figures):
    p = plots.plot_volume_montage(tmp_path / "m.png", _volumes(), titles=["a", "b", "c"], apix=2.0)
    _check_readable(figures[-1], p)
    image_axes = [ax for ax in figures[-1].axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 3 * 4
    assert all("(Å)" in ax.get_xlabel() for ax in image_axes)
    np.testing.assert_allclose(image_axes[3].images[0].get_array(), _volumes()[0].sum(0).numpy(), rtol=1e-5)
    one = plots.plot_volume_montage(tmp_path / "one.png", _volumes(1)[0])
    _check_readable(figures[-1], one)
    assert "(px)" in figures[-1].axes[0].get_xlabel()


def test_auc_against_base_rmsd(tmp_path, figures):
    rows = [{"state": s, "auc": 0.45 - 0.015 * s, "base_rmsd": 0.7 * s + 0.5} for s in (3, 0, 2, 1)]
    p = plots.plot_auc_vs_rmsd(tmp_path / "fsc_vs_base_rmsd.png", rows)
    _check_readable(figures[-1], p)
    ax = figures[-1].axes[0]
    assert "RMSD" in ax.get_xlabel() and "Å" in ax.get_xlabel()
    x, y = ax.lines[0].get_data()
    np.testing.assert_allclose(x, [0.5, 1.2, 1.9, 2.6])  # sorted by RMSD, each state's own AUC
    np.testing.assert_allclose(y, [0.45, 0.435, 0.42, 0.405])
