"""Representations over training, from the probe set a trace recorded (``NetworkTrace(..., probe=(x, y))``).

Every function takes a :class:`~nn_staining.trace.Trace` and returns a tidy DataFrame; nothing here
imports torch. Most analyses need only each layer's probe Gram matrix ``K = R Rᵀ`` (kept whatever
the layer's width): with ``H = I − 11ᵀ/n`` the centred Gram ``Kc = HKH`` gives

- linear CKA (Kornblith et al. 2019): ``CKA(K, L) = ⟨Kc, Lc⟩_F / (‖Kc‖_F ‖Lc‖_F)``, 1 when two
  representations differ only by an orthogonal transform and an isotropic scaling;
- the PCA spectrum: the eigenvalues of ``Kc`` are the squared singular values of the centred
  representation; ``variance = λ / (n − 1)``;
- the linear probe: a ridge classifier in its dual (kernel) form, the same predictions as
  scikit-learn's ``RidgeClassifier`` on the activations;
- embeddings: kernel PCA of ``Kc`` (= PCA of the activations) and t-SNE on the distances
  ``d²(i, j) = K_ii + K_jj − 2K_ij``.

Split units, feature–input correlations and breadcrumbs need the per-sample activations, which the
probe keeps where they fit its byte budget.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import probes, staining
from .staining import resolve_epoch
from .trace import Trace

log = logging.getLogger(__name__)

#: Ridge penalty of the linear probe, relative to the train half's total variance: α = RIDGE · tr(Kc)/n_train.
RIDGE = 1e-2
#: Explained variance a layer's ``components_90`` column reaches.
VARIANCE_LEVEL = 0.9
EMBEDDING_METHODS = ("pca", "tsne")


# -- what the probe holds -------------------------------------------------------------------------
def probe_layers(trace: Trace, epoch: int | None = None) -> list[str]:
    """The layers with a probe record at ``epoch`` (default: the last recorded), in model order."""
    epoch = resolve_epoch(trace, -1 if epoch is None else epoch)
    probes.probe_info(trace.meta)
    path = probes.probe_part(trace.path, epoch)
    blocks = probes.probe_blocks(path) if path.exists() else None
    if blocks is None:
        blocks = [(c["kind"], c["layer"]) for c in probes.probe_contents(trace.path, trace.meta, epoch)]
    kept = {layer for kind, layer in blocks if kind in ("gram", "activations")}
    return [k for k in trace.layers if k in kept]


def _epochs(trace: Trace, epochs: Sequence[int] | None) -> list[int]:
    if epochs is None:
        probes.probe_info(trace.meta)
        return list(trace.epochs)
    return [resolve_epoch(trace, e) for e in epochs]


def _layers(trace: Trace, layers: Sequence[str] | str | None, epoch: int | None = None) -> list[str]:
    if layers is None:
        return probe_layers(trace, epoch)
    if isinstance(layers, str):
        layers = [layers]
    return [trace.layer_info(layer)["key"] for layer in layers]


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """One BLAS thread for the many small (n × n) eigen-decompositions and solves: threads buy nothing at
    this size, and on a busy machine they spin-wait (a 256 × 256 eigvalsh took 0.3 s instead of 10 ms)."""
    try:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _gram(trace: Trace, epoch: int, layer: str) -> np.ndarray:
    return probes.read_probe_gram(trace.path, trace.meta, epoch, layer)


def centre_gram(gram: np.ndarray) -> np.ndarray:
    """``HKH`` with ``H = I − 11ᵀ/n``: the Gram matrix of the mean-centred representation."""
    gram = np.asarray(gram, dtype=np.float64)
    row = gram.mean(0)
    return gram - row[None, :] - gram.mean(1)[:, None] + row.mean()


def cka_from_grams(gram_a: np.ndarray, gram_b: np.ndarray) -> float:
    """Linear CKA of two representations of the same samples from their Gram matrices
    (NaN when one is constant over the samples)."""
    a, b = centre_gram(gram_a), centre_gram(gram_b)
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def _cka_matrix(grams: list[np.ndarray]) -> np.ndarray:
    """Pairwise linear CKA of centred-and-normalised Grams, all pairs in one product."""
    flat = np.stack([centre_gram(g).ravel() for g in grams])
    norms = np.linalg.norm(flat, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = flat / norms[:, None]
    out = unit @ unit.T
    out[norms == 0, :] = np.nan
    out[:, norms == 0] = np.nan
    return out


# -- CKA ------------------------------------------------------------------------------------------
@_one_blas_thread()
def cka(
    trace: Trace,
    *,
    epoch: int | None = None,
    layer: str | None = None,
    layers: Sequence[str] | None = None,
    epochs: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Linear CKA between every pair of layers at ``epoch`` (index ``(epoch, layer_a, layer_b)``, layers as
    categoricals in model order, which ``unstack`` keeps), or between every pair of epochs of ``layer``
    (index ``(layer, epoch_a, epoch_b)``); column ``cka``.

    CKA near 1: the two representations are the same up to rotation and scale.
    """
    if (epoch is None) == (layer is None):
        raise ValueError("cka needs exactly one of epoch= (layer × layer) or layer= (epoch × epoch)")
    if epoch is not None:
        epoch = resolve_epoch(trace, epoch)
        names = _layers(trace, layers, epoch)
        matrix = _cka_matrix([_gram(trace, epoch, k) for k in names])
        ordered = pd.CategoricalIndex(names, categories=names, ordered=True)  # unstack keeps model order
        index = pd.MultiIndex.from_product([[epoch], ordered, ordered], names=["epoch", "layer_a", "layer_b"])
    else:
        key = trace.layer_info(layer)["key"]
        chosen = _epochs(trace, epochs)
        matrix = _cka_matrix([_gram(trace, e, key) for e in chosen])
        index = pd.MultiIndex.from_product([[key], chosen, chosen], names=["layer", "epoch_a", "epoch_b"])
    return pd.DataFrame({"cka": matrix.ravel()}, index=index)


# -- PCA spectra ------------------------------------------------------------------------------------
def _spectrum(gram: np.ndarray, width: int) -> np.ndarray:
    """Eigenvalues of the centred Gram, descending, at most min(n − 1, width) of them, clipped at 0."""
    values = np.linalg.eigvalsh(centre_gram(gram))[::-1]
    return np.clip(values[: max(min(len(values) - 1, width), 1)], 0, None)


def _width(trace: Trace, layer: str) -> int:
    return int(trace.layer_info(layer)["neurons"])


@_one_blas_thread()
def pca_spectrum(
    trace: Trace, epochs: Sequence[int] | None = None, layers: Sequence[str] | None = None
) -> pd.DataFrame:
    """Each layer's PCA spectrum over the probe samples at each epoch.

    Index ``(epoch, layer, component)``; columns ``variance`` (λ/(n − 1), as scikit-learn's PCA),
    ``ratio`` (explained variance ratio) and ``cumulative``.
    """
    frames = []
    for e in _epochs(trace, epochs):
        for key in _layers(trace, layers, e):
            values = _spectrum(_gram(trace, e, key), _width(trace, key))
            total = values.sum()
            ratio = values / total if total > 0 else np.full_like(values, np.nan)
            n = len(trace.probe_labels)
            frames.append(
                pd.DataFrame(
                    {
                        "epoch": e,
                        "layer": key,
                        "component": np.arange(len(values)),
                        "variance": values / max(n - 1, 1),
                        "ratio": ratio,
                        "cumulative": np.cumsum(ratio),
                    }
                )
            )
    return pd.concat(frames).set_index(["epoch", "layer", "component"])


def effective_rank(spectrum: pd.DataFrame | Trace, level: float = VARIANCE_LEVEL) -> pd.DataFrame:
    """Per (epoch, layer): ``effective_rank`` = exp(entropy of the explained variance ratios)
    (Roy & Vetterli 2007), ``participation_ratio`` = (Σλ)²/Σλ², ``components_90`` (components
    reaching ``level`` of the variance) and ``total_variance``."""
    if isinstance(spectrum, Trace):
        spectrum = pca_spectrum(spectrum)
    rows = []
    for (e, key), group in spectrum.groupby(level=["epoch", "layer"], sort=False):
        p = group["ratio"].to_numpy()
        lam = group["variance"].to_numpy()
        nz = p[p > 0]
        rows.append(
            {
                "epoch": e,
                "layer": key,
                "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())) if len(nz) else np.nan,
                "participation_ratio": float(lam.sum() ** 2 / (lam**2).sum()) if (lam > 0).any() else np.nan,
                "components_90": int(np.searchsorted(group["cumulative"].to_numpy(), level - 1e-12) + 1),
                "total_variance": float(lam.sum()),
            }
        )
    return pd.DataFrame(rows).set_index(["epoch", "layer"])


# -- linear probe -----------------------------------------------------------------------------------
def probe_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stratified half split of the probe samples: within each class, alternate samples (in probe
    order) go to the train half and the test half."""
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        train.append(idx[0::2])
        test.append(idx[1::2])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def ridge_from_gram(
    gram: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, ridge: float = RIDGE
) -> tuple[np.ndarray, float]:
    """Predictions on ``test`` of a ridge classifier (±1 targets, intercept) fitted on ``train``,
    from the Gram matrix alone; returns (predictions, α) with α = ridge · tr(Kc_train)/n_train."""
    k_tr = gram[np.ix_(train, train)]
    k_te = gram[np.ix_(test, train)]
    col = k_tr.mean(0)
    kc_tr = k_tr - col[None, :] - k_tr.mean(1)[:, None] + col.mean()
    kc_te = k_te - k_te.mean(1)[:, None] - col[None, :] + col.mean()
    classes = np.unique(labels[train])
    scale = np.trace(kc_tr) / len(train)
    alpha = float(ridge * scale) if scale > 0 else float(ridge)
    if len(classes) == 1:
        return np.full(len(test), classes[0]), alpha
    targets = np.where(labels[train][:, None] == classes[None, :], 1.0, -1.0)
    if len(classes) == 2:
        targets = targets[:, 1:]
    mean = targets.mean(0)
    dual = np.linalg.solve(kc_tr + alpha * np.eye(len(train)), targets - mean)
    decision = kc_te @ dual + mean
    chosen = (decision[:, 0] > 0).astype(int) if len(classes) == 2 else decision.argmax(1)
    return classes[chosen], alpha


@_one_blas_thread()
def linear_probe(
    trace: Trace,
    epochs: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    ridge: float = RIDGE,
    inputs: bool = False,
) -> pd.DataFrame:
    """How linearly decodable the labels are at each layer and epoch: a closed-form ridge classifier
    trained on half the probe set (:func:`probe_split`), scored on the other half.

    Index ``(epoch, layer)``; columns ``accuracy``, ``chance`` (predicting the train half's most
    frequent class), ``alpha``, ``train`` and ``test`` (sample counts). ``inputs=True`` adds the
    probe inputs themselves as layer ``"x"`` (the baseline every layer starts from).
    """
    labels = trace.probe_labels
    train, test = probe_split(labels)
    values, counts = np.unique(labels[train], return_counts=True)
    chance = float((labels[test] == values[counts.argmax()]).mean())
    rows = []
    for e in _epochs(trace, epochs):
        grams = {key: (lambda e=e, key=key: _gram(trace, e, key)) for key in _layers(trace, layers, e)}
        if inputs:
            x = probes.read_probe_input(trace.path, trace.meta, e).astype(np.float64)
            grams = {probes.INPUT_LAYER: lambda x=x: x @ x.T} | grams
        for key, gram in grams.items():
            predicted, alpha = ridge_from_gram(gram(), labels, train, test, ridge)
            rows.append(
                {
                    "epoch": e,
                    "layer": key,
                    "accuracy": float((predicted == labels[test]).mean()),
                    "chance": chance,
                    "alpha": alpha,
                    "train": len(train),
                    "test": len(test),
                }
            )
    return pd.DataFrame(rows).set_index(["epoch", "layer"])


# -- split units ------------------------------------------------------------------------------------
def _activations(trace: Trace, epoch: int, layer: str) -> tuple[np.ndarray, np.ndarray]:
    values = probes.read_probe(trace.path, trace.meta, epoch, layer).astype(np.float64)
    return values, probes.read_probe_neurons(trace.path, trace.meta, epoch, layer)


def split_units(
    trace: Trace, epochs: Sequence[int] | None = None, layers: Sequence[str] | None = None
) -> pd.DataFrame:
    """BUTTER's split units per (epoch, layer): units > 0 for some probe samples and not for others.

    Columns ``units`` (kept; fewer than ``width`` when the probe subsampled the layer), ``width``,
    ``split``, ``dead`` (never > 0), ``always_on`` (always > 0) and ``split_frac``. On a
    pre-activation layer "> 0" is whether a ReLU after it would pass the sample. Layers whose
    activations the probe budget dropped are left out.
    """
    rows = []
    for e in _epochs(trace, epochs):
        for key in _layers(trace, layers, e):
            try:
                values, _ = _activations(trace, e, key)
            except KeyError:
                log.info("split_units: no activations of %s kept at epoch %d", key, e)
                continue
            on = (values > 0).sum(0)
            n = values.shape[0]
            split = int(((on > 0) & (on < n)).sum())
            rows.append(
                {
                    "epoch": e,
                    "layer": key,
                    "units": values.shape[1],
                    "width": _width(trace, key),
                    "split": split,
                    "dead": int((on == 0).sum()),
                    "always_on": int((on == n).sum()),
                    "split_frac": split / values.shape[1] if values.shape[1] else np.nan,
                }
            )
    return pd.DataFrame(rows).set_index(["epoch", "layer"])


# -- embeddings -------------------------------------------------------------------------------------
def _flip(coords: np.ndarray) -> np.ndarray:
    """Deterministic signs: each column's largest-magnitude entry positive."""
    idx = np.abs(coords).argmax(0)
    signs = np.sign(coords[idx, np.arange(coords.shape[1])])
    return coords * np.where(signs == 0, 1, signs)


def kernel_pca(gram: np.ndarray, components: int = 2) -> np.ndarray:
    """The PCA scores ``(n, components)`` of the representation behind ``gram`` (signs fixed)."""
    values, vectors = np.linalg.eigh(centre_gram(gram))
    values, vectors = values[::-1][:components], vectors[:, ::-1][:, :components]
    coords = vectors * np.sqrt(np.clip(values, 0, None))[None, :]
    if coords.shape[1] < components:
        coords = np.pad(coords, ((0, 0), (0, components - coords.shape[1])))
    return _flip(coords)


@_one_blas_thread()
def embedding(
    trace: Trace,
    epoch: int,
    layer: str,
    method: str = "pca",
    *,
    perplexity: float = 30.0,
    seed: int = 0,
) -> pd.DataFrame:
    """A 2-D embedding of the probe samples at ``layer`` and ``epoch``: ``pca`` (the top two principal
    components) or ``tsne`` (scikit-learn's t-SNE on the representation's Euclidean distances,
    started from the PCA embedding). Index ``sample``; columns ``x``, ``y``, ``label``."""
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(EMBEDDING_METHODS)}")
    epoch = resolve_epoch(trace, epoch)
    key = trace.layer_info(layer)["key"]
    gram = _gram(trace, epoch, key)
    coords = kernel_pca(gram)
    if method == "tsne":
        from sklearn.manifold import TSNE

        diag = np.diag(gram)
        distances = np.sqrt(np.clip(diag[:, None] + diag[None, :] - 2 * gram, 0, None))
        np.fill_diagonal(distances, 0)
        n = len(gram)
        init = coords / (coords[:, 0].std() or 1.0) * 1e-4
        coords = TSNE(
            2,
            perplexity=min(perplexity, max((n - 1) / 3, 1.0)),
            metric="precomputed",
            init=init,
            random_state=seed,
        ).fit_transform(distances)
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "label": trace.probe_labels})
    frame.index.name = "sample"
    return frame


# -- correlations -------------------------------------------------------------------------------------
def _standardise(values: np.ndarray) -> np.ndarray:
    centred = values - values.mean(0)
    std = centred.std(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(std > 0, centred / std, np.nan)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every column of ``a`` with every column of ``b`` over the rows (NaN for a
    constant column)."""
    return _standardise(np.asarray(a, np.float64)).T @ _standardise(np.asarray(b, np.float64)) / len(a)


def _tidy_correlations(epoch: int, layer: str, neurons: np.ndarray, matrix: np.ndarray, other: str):
    return pd.DataFrame(
        {
            "epoch": epoch,
            "layer": layer,
            "neuron": np.repeat(neurons, matrix.shape[1]),
            other: np.tile(np.arange(matrix.shape[1]), len(neurons)),
            "corr": matrix.ravel(),
        }
    )


def feature_correlations(trace: Trace, epoch: int = -1, layers: Sequence[str] | None = None) -> pd.DataFrame:
    """Each neuron's Pearson correlation with each input feature over the probe samples (LANL's
    feature–input correlations). Index ``(epoch, layer, neuron, feature)``; column ``corr``."""
    epoch = resolve_epoch(trace, epoch)
    inputs = probes.read_probe_input(trace.path, trace.meta, epoch).astype(np.float64)
    frames = []
    for key in _layers(trace, layers, epoch):
        try:
            values, neurons = _activations(trace, epoch, key)
        except KeyError:
            continue
        frames.append(_tidy_correlations(epoch, key, neurons, correlation_matrix(values, inputs), "feature"))
    return pd.concat(frames).set_index(["epoch", "layer", "neuron", "feature"])


def prediction_correlations(
    trace: Trace, epoch: int = -1, layers: Sequence[str] | None = None
) -> pd.DataFrame:
    """Each neuron's Pearson correlation with each of the model's outputs (logits) over the probe
    samples (LANL's feature–prediction correlations). Index ``(epoch, layer, neuron, output)``."""
    epoch = resolve_epoch(trace, epoch)
    outputs = probes.read_probe_output(trace.path, trace.meta, epoch).astype(np.float64)
    frames = []
    for key in _layers(trace, layers, epoch):
        try:
            values, neurons = _activations(trace, epoch, key)
        except KeyError:
            continue
        frames.append(_tidy_correlations(epoch, key, neurons, correlation_matrix(values, outputs), "output"))
    return pd.concat(frames).set_index(["epoch", "layer", "neuron", "output"])


# -- saliency ---------------------------------------------------------------------------------------
def saliency(
    trace: Trace, epochs: Sequence[int] | None = None, samples: Sequence[int] | None = None
) -> pd.DataFrame:
    """Saliency over training: input gradient × input of the true class's output (zero baseline) per
    probe sample. Index ``(epoch, sample, feature)``; columns ``saliency``, ``input``, ``label``
    (reshape a sample's features with ``trace.meta["probe"]["input_shape"]``)."""
    labels = trace.probe_labels
    chosen = np.arange(len(labels)) if samples is None else _samples(labels, samples)
    frames = []
    for e in _epochs(trace, epochs):
        sal = probes.read_saliency(trace.path, trace.meta, e)[chosen]
        inputs = probes.read_probe_input(trace.path, trace.meta, e)[chosen]
        features = sal.shape[1]
        frames.append(
            pd.DataFrame(
                {
                    "epoch": e,
                    "sample": np.repeat(chosen, features),
                    "feature": np.tile(np.arange(features), len(chosen)),
                    "saliency": sal.ravel(),
                    "input": inputs.ravel(),
                    "label": np.repeat(labels[chosen], features),
                }
            )
        )
    return pd.concat(frames).set_index(["epoch", "sample", "feature"])


def _samples(labels: np.ndarray, samples: Sequence[int] | int) -> np.ndarray:
    chosen = np.atleast_1d(np.asarray(samples))
    if chosen.dtype.kind not in "iu" or ((chosen < 0) | (chosen >= len(labels))).any():
        raise KeyError(f"probe samples {samples!r} out of range; the probe has samples 0..{len(labels) - 1}")
    return chosen.astype(np.int64)


# -- breadcrumbs ------------------------------------------------------------------------------------
@dataclass
class Breadcrumbs:
    """One probe sample's trail at one epoch: ``active`` (its most active neurons per layer, index
    ``(layer, rank)``) and ``paths`` (its largest-contribution paths through the Linear chain, in the
    format of :func:`nn_staining.staining.pathways`)."""

    sample: int
    epoch: int
    target_class: int
    active: pd.DataFrame
    paths: pd.DataFrame


def breadcrumbs(
    trace: Trace,
    sample: int,
    epoch: int = -1,
    top_k: int = 5,
    target_class: int | None = None,
    end_layer: str | None = None,
) -> Breadcrumbs:
    """Follow one probe sample through the network at ``epoch``.

    ``active``: per layer, its ``top_k`` most active neurons (``neuron``, ``activation`` and ``z``, the
    activation in standard deviations of that neuron over the probe). ``paths``: the ``top_k`` paths
    from input features to output neuron ``target_class`` (default: the sample's label) scored by
    the product of edge shares ``W[j,k]·x_k / Σ_k' |W[j,k']·x_k'|`` with ``x`` this sample's input to
    each Linear layer, the per-sample version of the class pathways; ``shared`` marks paths that
    are also among the class's stained pathways (needs per-class statistics).
    """
    labels = trace.probe_labels
    (sample,) = _samples(labels, [sample])
    epoch = resolve_epoch(trace, epoch)
    target = int(labels[sample]) if target_class is None else int(target_class)
    rows = []
    for key in probe_layers(trace, epoch):
        try:
            values, neurons = _activations(trace, epoch, key)
        except KeyError:
            continue
        row = values[sample]
        std = values.std(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = np.where(std > 0, (row - values.mean(0)) / std, 0.0)
        order = np.argsort(-row, kind="stable")[:top_k]
        for rank, i in enumerate(order):
            rows.append(
                {"layer": key, "rank": rank, "neuron": int(neurons[i]), "activation": row[i], "z": z[i]}
            )
    active = pd.DataFrame(rows, columns=["layer", "rank", "neuron", "activation", "z"]).set_index(
        ["layer", "rank"]
    )
    chain = staining.linear_chain(trace, end_layer)
    shares = []
    for key in chain:
        x = probes.read_probe_inputs(trace.path, trace.meta, epoch, key)[sample].astype(np.float64)
        weights = trace.weights(epoch, trace.layer_info(key).get("first_call") or key)  # stored once a module
        shares.append(staining.edge_shares(weights.astype(np.float64) * x[None, :]))
    if not 0 <= target < shares[-1].shape[0]:
        raise KeyError(f"target_class {target} not among {chain[-1]}'s neurons 0..{shares[-1].shape[0] - 1}")
    scores, nodes = staining.top_paths(shares, target, top_k)
    names = ["x"] + chain
    paths = [tuple(f"{names[i]}/n_{n}" for i, n in enumerate(p)) for p in nodes]
    frame = pd.DataFrame(
        {"score": scores, "path": paths, "epoch": epoch, "target_class": target, "sample": int(sample)},
        index=pd.RangeIndex(len(scores), name="rank"),
    )
    if trace.num_classes and target < trace.num_classes:
        stained = set(staining.pathways(trace, target, epoch, top_k=top_k, end_layer=end_layer)["path"])
        frame["shared"] = [p in stained for p in paths]
    return Breadcrumbs(int(sample), epoch, target, active, frame)
