"""Reconstruction: from kept clusters to one network that computes the teacher's function.

1. *Collapse* each cluster to one neuron: the member of the best-loss student that holds one
   (the authors' winner-take-all, not the centroid, which debris and imprecise copies would
   pull away); among that student's members, the one nearest the cluster's median.
2. *Outgoing weights* by least squares over the queries, with the output bias — and, for the
   even+linear classes, the affine path θᵀ[x; 1] that absorbs the covert linear symmetry. The
   students' summed outgoing weights are one feasible point of this problem, so it is never
   worse on the queries, and it aligns the output bias in the same step.
3. *Fine-tune* the small recovered network with Levenberg–Marquardt: it starts inside the
   teacher's basin, so a few quadratically convergent steps supply the last digits.
4. *Prune*: once the network fits exactly, a neuron the teacher does not have is one whose
   removal (and a refit) keeps the fit exact; duplicates coincide with their twins. Clustering
   may then err on the generous side: the fit decides (see ``prune``).
5. Map back from standardised to original units (exact affine change of variables).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import activations
from .network import MLP, from_layers
from .queries import Standardizer
from .students import LMOptions, StudentPack, fit_lm

REFERENCE_TOP = 5  # the authors' collapse looks at the 5 best students only
EXACT_FIT = 1e-16  # relative MSE below which the recovered network reproduces the teacher
EXACT_FLOOR = 1e-20  # fits below this are all exact: their differences are rounding and LM stopping noise
# The first joint fit of a deep network's candidates creeps when they are generous (duplicates share a
# flat direction): digits 64-16-16-10 g from [20, 33] candidates gained < 10× in 10 iterations at 1.5e-12
# and stopped there; allowed 50, it reached 8.2e-20 in 182 s, exact, so pruning could run.
JOINT_STALL = 50
# refit_supported tries this many support levels: MNIST-1D 40-12-12-12-10 g needed the first (clusters
# of 2 of 10 students dropped), the toy of tests/test_reconstruct.py the second
SUPPORT_LEVELS = 3


@dataclass(frozen=True)
class Collapsed:
    """K recovered neurons: vectors (K, D) and, per neuron, the student and row it came from."""

    vectors: np.ndarray
    student: np.ndarray
    row: np.ndarray
    cluster: np.ndarray


def collapse(
    vectors: np.ndarray,
    student_ids: np.ndarray,
    labels: np.ndarray,
    student_loss: dict[int, float],
    top: int | None = None,
) -> Collapsed:
    """One neuron per kept cluster, from the best student that has a member in it.

    ``top``: consider only the ``top`` best students and drop clusters none of them holds (the
    authors' rule with 5); None: all students. Example:

    >>> v = np.array([[1., 0.], [1.1, 0.], [0., 1.]]); sid = np.array([0, 1, 1])
    >>> collapse(v, sid, np.array([0, 0, -1]), {0: 1e-3, 1: 1e-9}).vectors
    array([[1.1, 0. ]])
    """
    ranked = sorted(student_loss, key=lambda s: (student_loss[s], s))
    allowed = set(ranked[:top]) if top else set(ranked)
    rank = {s: i for i, s in enumerate(ranked)}
    out_v, out_s, out_r, out_c = [], [], [], []
    for c in range(int(labels.max()) + 1 if labels.size else 0):
        rows = np.flatnonzero(labels == c)
        holders = [s for s in np.unique(student_ids[rows]).tolist() if s in allowed]
        if not holders:
            continue
        best = min(holders, key=lambda s: rank[s])
        mine = rows[student_ids[rows] == best]
        center = np.median(vectors[rows], axis=0)
        pick = mine[np.argmin(np.linalg.norm(vectors[mine] - center, axis=1))]
        out_v.append(vectors[pick])
        out_s.append(best)
        out_r.append(pick)
        out_c.append(c)
    D = vectors.shape[1]
    return Collapsed(
        np.asarray(out_v, dtype=np.float64).reshape(-1, D),
        np.asarray(out_s, dtype=np.int64),
        np.asarray(out_r, dtype=np.int64),
        np.asarray(out_c, dtype=np.int64),
    )


def output_layer(
    V: np.ndarray, X: np.ndarray, Y: np.ndarray, activation: str, affine: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Least-squares outgoing weights A (d_out, K), bias c (d_out,) and skip S (d_out, d_in) or None.

    V: (K, d_in+1) recovered neurons; X: (n, d_in); Y: (n, d_out).
    """
    act = activations.get(activation)
    Xt = np.hstack([X, np.ones((len(X), 1))])
    H = act.fn(torch.as_tensor(Xt @ V.T)).numpy() if len(V) else np.zeros((len(X), 0))
    cols = [H, np.ones((len(X), 1))] + ([X] if affine else [])
    theta, *_ = np.linalg.lstsq(np.hstack(cols), Y, rcond=None)
    K = V.shape[0]
    A, c = theta[:K].T, theta[K]
    S = theta[K + 1 :].T if affine else None
    return A, c, S


def finetune(
    V: np.ndarray,
    A: np.ndarray,
    c: np.ndarray,
    S: np.ndarray | None,
    X: torch.Tensor,
    Y: torch.Tensor,
    activation: str,
    iters: int,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Levenberg–Marquardt on the recovered one-hidden-layer network.

    Returns its relative MSE and weights V (K, d_in+1), A (d_out, K), c (d_out,), S or None.
    """
    d_in, K, d_out = V.shape[1] - 1, V.shape[0], A.shape[0]
    if K == 0:  # nothing to fine-tune: the least-squares output layer is the whole network
        resid = (Y.cpu().double().numpy() - c - (X.cpu().double().numpy() @ S.T if S is not None else 0))
        return float((resid**2).mean()), V, A, c, S
    parts = [V.ravel(), np.hstack([A, c[:, None]]).ravel()]
    if S is not None:
        parts.append(S.ravel())
    theta = torch.as_tensor(np.concatenate(parts)[None], dtype=X.dtype, device=X.device)
    pack = StudentPack(theta, [d_in, K, d_out], activation, [0], skip=S is not None)
    if iters:
        fit_lm(pack, X, Y, LMOptions(max_iter=iters, tol=0.0, stall_window=10, stall_level=1e-30, restarts=0))
    else:
        pack.rel_loss = pack.mse(X, Y).cpu().numpy()
    blocks = pack.block(0)[0].detach().cpu().double().numpy()
    out = pack.block(1)[0].detach().cpu().double().numpy()
    skip = pack.skip()[0].detach().cpu().double().numpy() if S is not None else None
    return float(pack.rel_loss[0]), blocks, out[:, :-1], out[:, -1], skip


def finetune_network(
    blocks: list[np.ndarray], A: np.ndarray, c: np.ndarray, X: torch.Tensor, Y: torch.Tensor, activation: str, iters: int,
    stall_window: int = 10,
) -> tuple[float, list[np.ndarray], np.ndarray, np.ndarray]:
    """Levenberg–Marquardt on every parameter of a recovered deep network (no affine path).

    blocks: hidden layers as neuron rows [w | b], (K_l, K_{l−1}+1); A (d_out, K_L), c (d_out,).
    The layers were recovered one at a time on fixed layers below; this joint pass lets each
    supply the last digits the others need. It stops after ``iters`` iterations or once
    ``stall_window`` of them gain less than 10× (``JOINT_STALL`` for the first fit of a generous
    candidate set). Returns the relative MSE, blocks, A and c.
    """
    widths = [blocks[0].shape[1] - 1, *(b.shape[0] for b in blocks), A.shape[0]]
    parts = [b.ravel() for b in blocks] + [np.hstack([A, c[:, None]]).ravel()]
    theta = torch.as_tensor(np.concatenate(parts)[None], dtype=X.dtype, device=X.device)
    pack = StudentPack(theta, widths, activation, [0])
    if iters:
        fit_lm(pack, X, Y, LMOptions(max_iter=iters, tol=0.0, stall_window=stall_window, stall_level=1e-30, restarts=0))
    else:
        pack.rel_loss = pack.mse(X, Y).cpu().numpy()
    out = [pack.block(l)[0].detach().cpu().double().numpy() for l in range(len(blocks) + 1)]
    return float(pack.rel_loss[0]), out[:-1], out[-1][:, :-1], out[-1][:, -1]


def prune_network(
    blocks: list[np.ndarray],
    A: np.ndarray,
    c: np.ndarray,
    final: float,
    X: torch.Tensor,
    Y: torch.Tensor,
    activation: str,
    iters: int,
    max_trials: int = 64,
) -> tuple[float, list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]]:
    """Remove the hidden neurons of a deep network that its exact joint fit does not need.

    ``prune`` pruned the last hidden layer on the lower layers as clustered; those come from
    clustering alone and can keep a debris cluster whose neuron the joint fine-tune then silences
    (MNIST-1D 40-12-12-12-10 tanh: a 13th neuron in layer 2 with outgoing weights of 2.6e-5
    beside ~2, the fit stuck at 8e-19), or a cluster split in two, and with a spurious lower
    neuron gone the last layer may need fewer neurons too. Only from an exact fit (``final`` ≤
    ``EXACT_FIT``): layer by layer from the first, each neuron in turn, weakest first (std of its
    activation × ‖outgoing weights‖, at most ``max_trials`` per layer), is removed, the whole
    network fine-tuned, and the removal kept if the error stays exact and within 10× of the
    starting fit's (floor ``EXACT_FLOOR``) — measured against the start, so removals cannot ratchet the
    error up. Passes repeat while one removes a neuron: a lower neuron may become removable only once
    the duplicates above it are gone (digits 64-16-16-10 g: one pass left [19, 16], the teacher's
    [16, 16]). Returns the relative MSE, blocks, A, c and, per hidden layer, the indices kept.
    """
    kept = [np.arange(len(b)) for b in blocks]
    if final > EXACT_FIT:
        return final, blocks, A, c, kept
    bound = min(10 * max(final, EXACT_FLOOR), EXACT_FIT)
    act = activations.get(activation)
    Xn = X.cpu().double().numpy()
    while True:  # passes, until one removes nothing
        removed = False
        for l in range(len(blocks)):
            H = _through(act, Xn, blocks[:l])  # the inputs of layer l
            above = blocks[l + 1][:, :-1] if l + 1 < len(blocks) else A
            order = kept[l][np.argsort(_contributions(act, H, blocks[l], above), kind="stable")]
            for neuron in order[:max_trials]:
                if len(kept[l]) == 1:
                    break
                j = int(np.flatnonzero(kept[l] == neuron)[0])
                trial, A2 = [*blocks], A
                trial[l] = np.delete(blocks[l], j, axis=0)
                if l + 1 < len(blocks):
                    trial[l + 1] = np.delete(blocks[l + 1], j, axis=1)
                else:
                    A2 = np.delete(A, j, axis=1)
                error, trial, A2, c2 = finetune_network(trial, A2, c, X, Y, activation, iters)
                if error <= bound:
                    final, blocks, A, c = error, trial, A2, c2
                    kept[l] = np.delete(kept[l], j)
                    removed = True
        if not removed:
            return final, blocks, A, c, kept


def refit_supported(
    blocks: list[np.ndarray],
    support: list[np.ndarray],
    X: torch.Tensor,
    Y: torch.Tensor,
    activation: str,
    iters: int,
    stall_window: int = JOINT_STALL,
    levels: int = SUPPORT_LEVELS,
) -> tuple[float, list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """The first exact joint fit of a deep network's best-supported candidates, or None.

    A generous candidate set can leave the joint fit creeping short of exact, and ``prune_network``
    needs an exact fit to begin: on MNIST-1D 40-12-12-12-10 g the [17, 17, 24] candidates (every
    teacher neuron among them, the extras from clusters of 2–3 of 10 students) stopped at 1.6e-13 and
    were at 1.1e-15 after 500 more iterations, a layer-2 neuron 2.4e-2 off. Without the clusters of 2
    students, [15, 13, 16] fitted to 1.2e-28 (~50 iterations). So: ``support`` gives each candidate's
    number of students (per hidden layer, aligned with ``blocks``' rows); the least-supported are
    dropped first, one support level at a time (their columns leave the layer above; the output
    layer is refitted by least squares), each set is fitted jointly, and the first exact fit is
    returned — the largest exact set, for ``prune_network`` to trim. Fits that are not exact never
    win (fewer neurons fit worse, so "better" means nothing short of exact). At most ``levels`` sets
    are fitted, each up to ``iters`` iterations: candidates that hold no exact network cost that many
    more joint fits, not one per support level. Returns the relative MSE, blocks, A, c and, per hidden
    layer, the rows of ``blocks`` kept.
    """
    if not support:
        return None
    act = activations.get(activation)
    Xn, Yn = X.cpu().double().numpy(), Y.cpu().double().numpy()
    for level in np.unique(np.concatenate(support))[1 : levels + 1]:
        rows = [np.flatnonzero(s >= level) for s in support]
        if any(len(r) == 0 for r in rows):
            return None
        trial = [b[r] for b, r in zip(blocks, rows)]
        for l in range(1, len(trial)):  # the dropped neurons' columns leave the layer above
            trial[l] = np.hstack([trial[l][:, :-1][:, rows[l - 1]], trial[l][:, -1:]])
        A, c, _ = output_layer(trial[-1], _through(act, Xn, trial[:-1]), Yn, activation, affine=False)
        final, trial, A, c = finetune_network(trial, A, c, X, Y, activation, iters, stall_window)
        if final <= EXACT_FIT:
            return final, trial, A, c, rows
    return None


def prune(
    V: np.ndarray,
    X: torch.Tensor,
    Y: torch.Tensor,
    activation: str,
    iters: int,
    max_trials: int = 64,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Fit the output layer and fine-tune, removing the neurons the fit does not need.

    Only an exact fit (relative MSE ≤ ``EXACT_FIT``) can tell a spurious neuron from a weak real
    one, so without one nothing but duplicates (canonical vectors within 1e-6, merged first) is
    removed. With one, two passes over the neurons ranked by contribution (‖outgoing‖ × std of
    the activation), each removal followed by a refit and fine-tune:

    1. groups — spurious neurons tend to compensate for each other, so none of them goes to
       zero alone: remove the k weakest for k = 1, 2, … and keep the largest k whose error is
       within 10× of the best seen (stop once a removal costs a real neuron: error × 10⁶);
    2. singles — a spurious neuron can outweigh a weak real one: try each remaining neuron
       alone and drop it if the fit stays exact.

    Returns the relative MSE, V, A, c, S and the indices of the input neurons that were kept.
    """
    act = activations.get(activation)
    Xn, Yn = X.cpu().double().numpy(), Y.cpu().double().numpy()

    def fit(rows: np.ndarray):
        A, c, S = output_layer(V[rows], Xn, Yn, act.name, act.symmetry.needs_affine)
        return finetune(V[rows], A, c, S, X, Y, act.name, iters)

    def weakest_first(rows: np.ndarray, result) -> np.ndarray:
        _, Vf, A = result[:3]
        return rows[np.argsort(_contributions(act, Xn, Vf, A), kind="stable")]

    kept = _merge_twins(V, act)
    current = fit(kept)
    if len(kept) == 0:
        return (*current, kept)
    order = weakest_first(kept, current)
    trials = [current]
    for k in range(1, min(len(kept), max_trials + 1)):
        trials.append(fit(np.sort(order[k:])))
        if trials[-1][0] > 1e6 * max(min(t[0] for t in trials), EXACT_FLOOR):
            break
    best = max(min(t[0] for t in trials), EXACT_FLOOR)
    if best > EXACT_FIT:
        return (*current, kept)
    k = max(i for i, t in enumerate(trials) if t[0] <= 10 * best)
    kept, current = np.sort(order[k:]), trials[k]
    for j in weakest_first(kept, current)[:max_trials]:
        if len(kept) == 1:
            break
        rows = kept[kept != j]
        trial = fit(rows)
        if trial[0] <= 10 * max(current[0], EXACT_FLOOR):
            kept, current = rows, trial
    return (*current, kept)


def _activations(act: activations.Activation, inputs: np.ndarray, V: np.ndarray) -> np.ndarray:
    """A layer's activations (n, K) for ``inputs`` (n, d) and neuron rows V = [w | b] (K, d+1)."""
    return act.fn(torch.as_tensor(np.hstack([inputs, np.ones((len(inputs), 1))]) @ V.T)).numpy()


def _through(act: activations.Activation, inputs: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """The activations of the last of ``blocks`` (``inputs`` when there are none): a deep layer's inputs."""
    for V in blocks:
        inputs = _activations(act, inputs, V)
    return inputs


def _contributions(act: activations.Activation, inputs: np.ndarray, V: np.ndarray, outgoing: np.ndarray) -> np.ndarray:
    """Each neuron's share of the output (K,): std of its activation × ‖its outgoing weights‖."""
    return _activations(act, inputs, V).std(axis=0) * np.linalg.norm(outgoing, axis=0)


def _merge_twins(V: np.ndarray, act: activations.Activation) -> np.ndarray:
    """Indices of V without duplicates: canonical vectors within 1e-6 (relative) of a kept one."""
    canon = act.symmetry.canonicalize(V).vectors if len(V) else V
    keep: list[int] = []
    for j in range(len(V)):
        if all(np.linalg.norm(canon[j] - canon[i]) >= 1e-6 * np.linalg.norm(canon[i]) for i in keep):
            keep.append(j)
    return np.asarray(keep, dtype=np.int64)


def to_original(
    V: np.ndarray | list[np.ndarray],
    A: np.ndarray,
    c: np.ndarray,
    S: np.ndarray | None,
    xs: Standardizer,
    ys: Standardizer,
    activation: str,
) -> MLP:
    """The network in the teacher's units, from weights fitted on standardised data.

    V: the hidden layer (K, d_in+1), or every hidden layer's [w | b] rows in order (deep).
    x̂ = (x − μx)/sx and y = sy·ŷ + μy, so w = ŵ/sx, b = b̂ − ŵ·μx/sx in the first layer, the
    output layer (and skip path) are scaled by sy with the means folded into the output bias,
    and the layers between are unchanged.
    """
    blocks = [V] if isinstance(V, np.ndarray) else list(V)
    W = blocks[0][:, :-1] / xs.scale
    b = blocks[0][:, -1] - W @ xs.mean
    inner = blocks[1:]
    A_o = A * ys.scale[:, None]
    c_o = c * ys.scale + ys.mean
    skip = None
    if S is not None:
        skip = S / xs.scale * ys.scale[:, None]
        c_o = c_o - skip @ xs.mean
    weights = [W, *(v[:, :-1] for v in inner), A_o]
    return from_layers(weights, [b, *(v[:, -1] for v in inner), c_o], activation, skip=skip)
