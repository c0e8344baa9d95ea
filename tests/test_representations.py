"""Tests for nn_staining.representations: CKA, PCA spectra, linear probes, split units, embeddings,
correlations, saliency and breadcrumbs, each against an independent computation (numpy on the stored
activations, scikit-learn, brute force) on a planted network whose answers are known."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from test_probes import record_with_probe
from torch import nn

from nn_staining import load_trace, probes
from nn_staining import representations as rep
from nn_staining.trace import Trace

N_PROBE = 200


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small numpy linear algebra: one BLAS thread avoids spin-waiting on a busy 2-core machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


CLASSES = 4
FEATURES = 6
HIDDEN = 8
NOISE = 16


class Planted(nn.Module):
    """``inp`` → ``rot`` (a frozen orthogonal rotation of ``inp``'s output) → ReLU → ``out``; ``noise``
    outputs fresh Gaussian noise whatever its input (a layer that knows nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, HIDDEN)
        self.rot = nn.Linear(HIDDEN, HIDDEN, bias=False)
        q, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, dtype=torch.float64))
        self.rot.weight.data = q.float()
        self.rot.weight.requires_grad_(False)
        self.noise = Noise()
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotated = self.rot(self.inp(x))
        self.noise(rotated)
        return self.out(torch.relu(rotated))


class Noise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], NOISE)


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian class blobs: class c centred at 2·e_c in the first CLASSES features."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % CLASSES)[torch.randperm(n, generator=g)]
    x = torch.randn(n, FEATURES, generator=g)
    x[torch.arange(n), y] += 2.0
    return x, y


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Trace:
    store = tmp_path_factory.mktemp("planted") / "trace"
    torch.manual_seed(0)
    model = Planted()
    x, y = blobs(256, seed=1)
    record_with_probe(
        model, x, y, probes.ProbeSet.from_arg(blobs(N_PROBE, seed=2), batch_size=64), store, epochs=3
    )
    return load_trace(store)


def numpy_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA in feature space (Kornblith et al. 2019, eq. for linear kernels): ‖BᵀA‖²_F / (‖AᵀA‖_F ‖BᵀB‖_F)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    return float(np.linalg.norm(b.T @ a) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


def acts(t: Trace, epoch: int, layer: str) -> np.ndarray:
    return t.probe(epoch, layer).astype(np.float64)


# -- CKA -------------------------------------------------------------------------------------------
def test_cka_matches_numpy_on_stored_activations(planted):
    t = planted
    frame = rep.cka(t, epoch=2)
    layers = ["L_inp", "L_rot", "L_noise", "L_out"]
    assert list(frame.index.get_level_values("layer_a").unique()) == layers
    unstacked = frame["cka"].unstack("layer_b")  # model order survives unstack (ordered categoricals)
    assert list(unstacked.index.get_level_values("layer_a")) == layers and list(unstacked.columns) == layers
    matrix = frame["cka"].unstack("layer_b").droplevel("epoch").loc[layers, layers].to_numpy()
    expected = np.array([[numpy_cka(acts(t, 2, a), acts(t, 2, b)) for b in layers] for a in layers])
    np.testing.assert_allclose(matrix, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-12)  # self-CKA
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    over_epochs = rep.cka(t, layer="L_out")["cka"].unstack("epoch_b").droplevel("layer")
    expected = [[numpy_cka(acts(t, a, "L_out"), acts(t, b, "L_out")) for b in t.epochs] for a in t.epochs]
    np.testing.assert_allclose(over_epochs.to_numpy(), expected, rtol=1e-9, atol=1e-12)


def test_planted_rotation_has_cka_one_and_noise_none(planted):
    frame = rep.cka(planted, epoch=-1)["cka"]
    assert abs(frame.loc[(2, "L_inp", "L_rot")] - 1.0) < 1e-6
    assert frame.loc[(2, "L_inp", "L_noise")] < 0.2
    assert frame.loc[(2, "L_inp", "L_out")] < 1 - 1e-3  # a ReLU and a projection are not a rotation


def test_cka_invariances_and_gram_equals_activations():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    gram = a @ a.T
    assert rep.cka_from_grams(gram, (a @ q) @ (a @ q).T) == pytest.approx(1.0, abs=1e-12)
    assert rep.cka_from_grams(gram, (3.7 * a) @ (3.7 * a).T) == pytest.approx(1.0, abs=1e-12)
    assert rep.cka_from_grams(gram, (a + 5.0) @ (a + 5.0).T) == pytest.approx(1.0, abs=1e-12)  # centring
    b = rng.normal(size=(40, 7))
    assert rep.cka_from_grams(gram, b @ b.T) == pytest.approx(numpy_cka(a, b), rel=1e-12)
    assert np.isnan(rep.cka_from_grams(gram, np.ones((40, 40))))  # a constant representation


def test_cka_from_gram_equals_from_activations_on_the_trace(planted):
    t = planted
    for layer in ("L_inp", "L_noise"):
        a = acts(t, 1, layer)
        assert rep.cka_from_grams(t.probe_gram(1, layer), a @ a.T) == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(t.probe_gram(1, layer), a @ a.T, rtol=1e-12, atol=1e-9)


def test_cka_argument_errors(planted):
    with pytest.raises(ValueError, match="exactly one of epoch= .* or layer="):
        rep.cka(planted)
    with pytest.raises(ValueError, match="exactly one"):
        rep.cka(planted, epoch=0, layer="L_inp")
    with pytest.raises(KeyError, match="recorded epochs"):
        rep.cka(planted, epoch=9)
    with pytest.raises(KeyError, match="layers: L_inp, L_rot"):
        rep.cka(planted, layer="L_nope")


# -- PCA ---------------------------------------------------------------------------------------------
def test_pca_spectrum_matches_numpy_svd(planted):
    t = planted
    spectrum = rep.pca_spectrum(t, epochs=[0, 2])
    for epoch, layer in itertools.product([0, 2], ["L_inp", "L_noise", "L_out"]):
        a = acts(t, epoch, layer)
        s = np.linalg.svd(a - a.mean(0), compute_uv=False)
        got = spectrum.xs((epoch, layer), level=["epoch", "layer"])
        np.testing.assert_allclose(got["variance"], s**2 / (len(a) - 1), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(got["ratio"], s**2 / (s**2).sum(), rtol=1e-8, atol=1e-12)
        assert got["cumulative"].iloc[-1] == pytest.approx(1.0)
    summary = rep.effective_rank(spectrum)
    a = acts(t, 2, "L_noise")
    lam = np.linalg.svd(a - a.mean(0), compute_uv=False) ** 2
    p = lam / lam.sum()
    row = summary.loc[(2, "L_noise")]
    assert row["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert row["participation_ratio"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum())
    assert row["components_90"] == int(np.argmax(np.cumsum(p) >= 0.9)) + 1
    assert row["effective_rank"] > 14  # white noise fills its 16 dimensions
    assert summary.loc[(2, "L_out"), "effective_rank"] <= CLASSES


# -- linear probe -------------------------------------------------------------------------------------
def test_linear_probe_matches_sklearn_ridge_classifier(planted):
    from sklearn.linear_model import RidgeClassifier

    t = planted
    labels = t.probe_labels
    train, test = rep.probe_split(labels)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == N_PROBE
    for c in range(CLASSES):  # stratified
        assert abs((labels[train] == c).sum() - (labels[test] == c).sum()) <= 1
    frame = rep.linear_probe(t)
    assert list(frame.index) == [(e, k) for e in t.epochs for k in ("L_inp", "L_rot", "L_noise", "L_out")]
    for (epoch, layer), row in frame.iterrows():
        a = acts(t, epoch, layer)
        clf = RidgeClassifier(alpha=row["alpha"]).fit(a[train], labels[train])
        assert row["accuracy"] == pytest.approx(clf.score(a[test], labels[test]), abs=1e-12), (epoch, layer)
        predicted, _ = rep.ridge_from_gram(a @ a.T, labels, train, test)
        np.testing.assert_array_equal(predicted, clf.predict(a[test]))
    # two classes: the single-column decision, as scikit-learn does it
    binary = labels % 2
    a = acts(t, 2, "L_inp")
    predicted, alpha = rep.ridge_from_gram(a @ a.T, binary, train, test)
    np.testing.assert_array_equal(
        predicted, RidgeClassifier(alpha=alpha).fit(a[train], binary[train]).predict(a[test])
    )


def test_noise_probes_at_chance_and_informative_layers_well_above(planted):
    frame = rep.linear_probe(planted).xs(2, level="epoch")
    chance = frame["chance"].iloc[0]
    assert chance == pytest.approx(0.25, abs=0.01)
    se = np.sqrt(chance * (1 - chance) / frame["test"].iloc[0])
    assert abs(frame.loc["L_noise", "accuracy"] - chance) < 3 * se
    assert frame.loc["L_inp", "accuracy"] > 0.7
    assert frame.loc["L_rot", "accuracy"] == frame.loc["L_inp", "accuracy"]  # a rotation decodes the same


# -- split units ---------------------------------------------------------------------------------------
def test_split_units_match_numpy(planted):
    t = planted
    frame = rep.split_units(t)
    for (epoch, layer), row in frame.iterrows():
        on = (t.probe(epoch, layer) > 0).sum(0)
        n = N_PROBE
        assert row["split"] == ((on > 0) & (on < n)).sum()
        assert row["dead"] == (on == 0).sum() and row["always_on"] == (on == n).sum()
        assert row["split"] + row["dead"] + row["always_on"] == row["units"] == row["width"]
    assert frame.loc[(0, "L_noise"), "split"] == NOISE


# -- embeddings ----------------------------------------------------------------------------------------
def test_pca_embedding_matches_sklearn_pca_up_to_sign(planted):
    from sklearn.decomposition import PCA

    t = planted
    frame = rep.embedding(t, 2, "L_inp")
    assert list(frame.columns) == ["x", "y", "label"] and frame.index.name == "sample"
    np.testing.assert_array_equal(frame["label"], t.probe_labels)
    expected = PCA(2).fit_transform(acts(t, 2, "L_inp"))
    for col, i in (("x", 0), ("y", 1)):
        got = frame[col].to_numpy()
        sign = np.sign(got @ expected[:, i])
        np.testing.assert_allclose(got, sign * expected[:, i], rtol=1e-7, atol=1e-8)
    with pytest.raises(ValueError, match="'umap' is not one of pca, tsne"):
        rep.embedding(t, 2, "L_inp", method="umap")


def test_tsne_embedding_matches_sklearn_on_the_activations(planted):
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    t = planted
    frame = rep.embedding(t, 2, "L_inp", method="tsne")
    a = acts(t, 2, "L_inp")
    init = rep.kernel_pca(a @ a.T)
    init = init / init[:, 0].std() * 1e-4
    expected = TSNE(2, perplexity=30, init=init, random_state=0).fit_transform(a)
    np.testing.assert_allclose(frame[["x", "y"]].to_numpy(), expected, atol=1e-6 * np.abs(expected).max())
    noise = rep.embedding(t, 2, "L_noise")  # no embedding separates classes a layer knows nothing of
    assert silhouette_score(frame[["x", "y"]], frame["label"]) > 0.1 + silhouette_score(
        noise[["x", "y"]], noise["label"]
    )


# -- correlations -------------------------------------------------------------------------------------
def test_feature_and_prediction_correlations_match_numpy(planted):
    t = planted
    frame = rep.feature_correlations(t, epoch=1, layers=["L_inp"])
    x = probes.read_probe_input(t.path, t.meta, 1).astype(np.float64)
    a = acts(t, 1, "L_inp")
    expected = np.corrcoef(a.T, x.T)[:HIDDEN, HIDDEN:]
    got = frame["corr"].unstack("feature").droplevel(["epoch", "layer"]).to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    # the last layer's neurons are the logits: each correlates perfectly with its own output
    pred = rep.prediction_correlations(t, epoch=1, layers=["L_out"])["corr"].unstack("output")
    np.testing.assert_allclose(np.diag(pred.to_numpy()), 1.0, atol=1e-6)


def test_saliency_table(planted):
    t = planted
    frame = rep.saliency(t, samples=[0, 5])
    assert frame.index.names == ["epoch", "sample", "feature"]
    assert len(frame) == len(t.epochs) * 2 * FEATURES
    sal = probes.read_saliency(t.path, t.meta, 2)
    np.testing.assert_array_equal(frame.loc[(2, 5), "saliency"], sal[5])
    assert (frame.loc[(2, 5), "label"] == t.probe_labels[5]).all()
    with pytest.raises(KeyError, match="samples 0..199"):
        rep.saliency(t, samples=[200])


# -- breadcrumbs --------------------------------------------------------------------------------------
def test_breadcrumbs_contributions_and_top_paths_by_brute_force(planted):
    t = planted
    sample, epoch = 7, 2
    crumbs = rep.breadcrumbs(t, sample, epoch, top_k=4)
    target = int(t.probe_labels[sample])
    assert crumbs.target_class == target and crumbs.sample == sample
    chain = ["L_inp", "L_rot", "L_out"]
    shares = []
    for key in chain:
        w = t.weights(epoch, key).astype(np.float64)
        x = probes.read_probe_inputs(t.path, t.meta, epoch, key)[sample].astype(np.float64)
        bias = t.query(f"E_{epoch}/{key}", columns=["bias"])["bias"].fillna(0).to_numpy()
        # contributions W[j,k]·x_k and the bias sum to the sample's recorded pre-activation
        np.testing.assert_allclose(w @ x + bias, t.probe(epoch, key)[sample], rtol=1e-5, atol=1e-5)
        c = w * x[None, :]
        shares.append(c / np.abs(c).sum(1, keepdims=True))
    brute = sorted(
        (
            (shares[0][j, k] * shares[1][i, j] * shares[2][target, i], (k, j, i))
            for k, j, i in itertools.product(range(FEATURES), range(HIDDEN), range(HIDDEN))
        ),
        reverse=True,
    )[:4]
    np.testing.assert_allclose(crumbs.paths["score"], [s for s, _ in brute], rtol=1e-9)
    expected = [(f"x/n_{k}", f"L_inp/n_{j}", f"L_rot/n_{i}", f"L_out/n_{target}") for _, (k, j, i) in brute]
    assert list(crumbs.paths["path"]) == expected
    assert crumbs.paths["shared"].dtype == bool  # compared with the class's stained pathways
    active = crumbs.active.loc["L_noise"]
    row = t.probe(epoch, "L_noise")[sample]
    np.testing.assert_array_equal(active["neuron"], np.argsort(-row, kind="stable")[:4])
    np.testing.assert_allclose(active["activation"], np.sort(row)[::-1][:4])


def test_trace_without_probe_says_how_to_record_one(mlp_run):
    t = load_trace(mlp_run.store)
    with pytest.raises(KeyError, match=r"NetworkTrace\(..., probe=\(x, y\)\)"):
        rep.linear_probe(t)
    with pytest.raises(KeyError, match="no probe set"):
        t.probe_labels  # noqa: B018


def test_results_are_tidy_frames(planted):
    expected = {
        "cka": (rep.cka(planted, epoch=0), ["epoch", "layer_a", "layer_b"], 16),
        "pca": (rep.pca_spectrum(planted, epochs=[0]), ["epoch", "layer", "component"], None),
        "probe": (rep.linear_probe(planted, epochs=[0]), ["epoch", "layer"], 4),
        "split": (rep.split_units(planted, epochs=[0]), ["epoch", "layer"], 4),
        "rank": (rep.effective_rank(planted), ["epoch", "layer"], 12),
    }
    for name, (frame, index, rows) in expected.items():
        assert isinstance(frame, pd.DataFrame) and frame.index.is_unique, name
        assert list(frame.index.names) == index, name
        assert rows is None or len(frame) == rows, name


# -- figures ------------------------------------------------------------------------------------------
def _by_gid(fig, gid: str):
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, (gid, len(found))
    return found[0]


def test_plot_cka_draws_the_cka_matrices(planted):
    from nn_staining import plots

    t = planted
    fig = plots.plot_cka(t, epoch=1)
    frame = rep.cka(t, epoch=1)["cka"].unstack("layer_b").droplevel("epoch")
    layers = ["L_inp", "L_rot", "L_noise", "L_out"]
    np.testing.assert_allclose(_by_gid(fig, "cka").get_array(), frame.loc[layers, layers].to_numpy())
    assert [tick.get_text() for tick in fig.axes[0].get_yticklabels()] == ["inp", "rot", "noise", "out"]
    fig = plots.plot_cka_epochs(t, layers=["L_inp", "L_out"])
    for layer in ("L_inp", "L_out"):
        expected = rep.cka(t, layer=layer)["cka"].unstack("epoch_b").droplevel("layer").to_numpy()
        np.testing.assert_allclose(_by_gid(fig, f"cka:{layer}").get_array(), expected)


def test_plot_probe_accuracy_draws_accuracy_baseline_chance_and_rank(planted):
    from nn_staining import plots

    t = planted
    fig = plots.plot_probe_accuracy(t)
    probe = rep.linear_probe(t, inputs=True)
    ranks = rep.effective_rank(t)
    for layer in ("L_inp", "L_noise", "L_out", "x"):
        line = _by_gid(fig, f"probe:{layer}")
        np.testing.assert_array_equal(line.get_xdata(), t.epochs)
        np.testing.assert_allclose(line.get_ydata(), probe.xs(layer, level="layer")["accuracy"])
    np.testing.assert_allclose(
        _by_gid(fig, "rank:L_noise").get_ydata(), ranks.xs("L_noise", level="layer")["effective_rank"]
    )
    assert _by_gid(fig, "chance").get_ydata()[0] == pytest.approx(probe["chance"].iloc[0])
    assert _by_gid(fig, "probe:L_inp").get_color() != _by_gid(fig, "probe:L_noise").get_color()


def test_plot_embeddings_draws_each_embedding_in_class_colours(planted):
    from matplotlib.colors import to_rgba

    from nn_staining import plots

    t = planted
    fig = plots.plot_embeddings(t, layers=["L_inp", "L_noise"], epochs=[0, 2])
    palette = plots.class_palette(CLASSES)
    for layer, epoch in itertools.product(["L_inp", "L_noise"], [0, 2]):
        points = _by_gid(fig, f"embedding:{layer}:{epoch}")
        frame = rep.embedding(t, epoch, layer)
        np.testing.assert_allclose(points.get_offsets(), frame[["x", "y"]].to_numpy())
        expected = np.array([to_rgba(palette[k], 0.85) for k in frame["label"]])
        np.testing.assert_allclose(points.get_facecolors(), expected)
    texts = [text.get_text() for text in fig.axes[0].texts]
    assert f"probe acc {rep.linear_probe(t, epochs=[0], layers=['L_inp'])['accuracy'].iloc[0]:.2f}" in texts


def test_plot_breadcrumbs_draws_the_sample_paths_through_the_graph_nodes(planted):
    from nn_staining import plots

    t = planted
    crumbs = rep.breadcrumbs(t, 3, -1, top_k=2)
    fig = plots.plot_breadcrumbs(t, 3, -1, top_k=2)
    keep: dict[str, set[int]] = {}
    for path in crumbs.paths["path"]:
        for node in path:
            layer, neuron = node.split("/n_")
            keep.setdefault(layer, set()).add(int(neuron))
    for row in crumbs.active.reset_index().itertuples():
        if row.activation > 0:
            keep.setdefault(row.layer, set()).add(row.neuron)
    layout = plots.graph_layout(t, -1, keep=keep, aspect=plots._aspect(len(t.layers) + 1))
    for rank, path in enumerate(crumbs.paths["path"]):
        line = _by_gid(fig, f"breadcrumb:{rank}")
        nodes = [tuple(node.split("/n_")) for node in path]
        expected = np.array(
            [layout.nodes.loc[(layer, int(n)), ["x", "y"]].to_numpy(float) for layer, n in nodes]
        )
        np.testing.assert_allclose(line.get_xdata(), expected[:, 0])
        np.testing.assert_allclose(line.get_ydata(), expected[:, 1])
        assert line.get_color() == plots.BREADCRUMB_COLOUR
    assert f"label class {t.probe_labels[3]}" in fig._suptitle.get_text()
    assert _by_gid(fig, "rings").get_offsets().shape[0] == int((crumbs.active["activation"] > 0).sum())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Trace:
    """A small CNN on 4×4 one-channel images, recorded with a probe of 8 images."""
    store = tmp_path_factory.mktemp("images") / "trace"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 4, 4, generator=g), torch.arange(32) % 2
    x[y == 1, 0, :2] += 1.5  # class 1 is bright in the top rows
    record_with_probe(model, x, y, (x[:8], y[:8]), store, epochs=2, batch_size=8)
    return load_trace(store)


def test_plot_saliency_draws_images_per_sample_and_epoch(images):
    from nn_staining import plots

    t = images
    fig = plots.plot_saliency(t)
    samples = [0, 1]  # the first probe sample of each class
    sal = {e: probes.read_saliency(t.path, t.meta, e).reshape(-1, 4, 4) for e in t.epochs}
    x = probes.read_probe_input(t.path, t.meta, 0).reshape(-1, 4, 4)
    for s in samples:
        limit = np.percentile(np.abs(np.stack([sal[e][s] for e in t.epochs])), plots.SALIENCY_PERCENTILE)
        for e in t.epochs:
            np.testing.assert_allclose(
                _by_gid(fig, f"saliency:{s}:{e}").get_array(), sal[e][s] / limit, rtol=1e-6
            )
        np.testing.assert_allclose(_by_gid(fig, f"input:{s}").get_array(), x[s])
    assert _by_gid(fig, "saliency:0:1").get_cmap().name == "RdBu_r"


def test_saliency_strips_for_tabular_inputs(planted):
    from nn_staining import plots

    fig = plots.plot_saliency(planted, samples=[4], epochs=[0, 2])
    assert _by_gid(fig, "saliency:4:2").get_array().shape == (1, FEATURES)


def test_figure_names_list_the_probe_figures_the_run_can_draw(images, planted):
    from nn_staining import figures

    probe_figures = ["cka", "cka_epochs", "probe_accuracy", "embeddings", "breadcrumbs", "saliency"]
    names = figures.figure_names(images)
    assert [n for n in names if n in probe_figures] == probe_figures
    assert set(probe_figures) <= set(figures.figure_names(planted))
