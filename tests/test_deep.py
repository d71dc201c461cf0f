"""Deep, layer-by-layer recovery: insertion of a recovered layer, and end to end on 2-hidden-layer teachers.

The insertion must keep every student's function when the recovered layer is the student's own
(sign flips folded into the outgoing sums, a sigmoid's flip into the next bias); end to end, the
layer-2 clustering must read the fine-tuned students, and Ray must reproduce the in-process run
bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ecdist import activations
from ecdist.packs import inserted
from ecdist.students import StudentPack


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "g"])
def test_inserting_a_students_own_layer_keeps_its_function(activation):
    """Two students; the recovered layer is student 0's canonical first layer with one neuron
    duplicated in student 1 (the duplicates' outgoing weights must add up)."""
    act = activations.get(activation)
    X = torch.as_tensor(np.random.default_rng(0).standard_normal((50, 4)))
    pack = StudentPack.init([4, 5, 3, 2], activation, [0, 1], seed=3)
    with torch.no_grad():
        pack.block(0)[1] = pack.block(0)[0]  # student 1 has student 0's first layer…
        twin = pack.block(0)[0, 3] if act.symmetry.name == "none" else -pack.block(0)[0, 3]
        pack.block(0)[1, 4] = twin  # …with neuron 4 a copy of neuron 3 (sign-flipped where that is a symmetry)
    before = pack.forward(X)
    vec = pack.block(0)[0].numpy()
    V = act.symmetry.canonicalize(vec).vectors  # the recovered layer: student 0's neurons, canonical
    assign = np.concatenate([np.arange(5), [0, 1, 2, 3, 3]])
    up = inserted(pack, assign, 5)
    assert up.widths == [5, 3, 2] and up.k == 2
    H = act.fn(torch.cat([X, torch.ones(50, 1, dtype=X.dtype)], 1) @ torch.as_tensor(V).T)
    after = up.forward(H)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-12)
    # student 1's neuron 4 is no unit of its own any more: recovered neuron 3 carries its weight
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=1e-12)


def test_unassigned_neurons_are_dropped():
    pack = StudentPack.init([3, 4, 2, 1], "tanh", [0, 1], seed=0)
    up = inserted(pack, np.array([0, -1, 1, -1, 1, 0, -1, -1]), 2)
    W = up.weight(0).numpy()  # (k, 2, 2): into the next layer from the 2 recovered neurons
    out = pack.weight(1).numpy()
    vec = pack.block(0).reshape(8, -1).numpy()
    can = activations.get("tanh").symmetry.canonicalize(vec, out.transpose(0, 2, 1).reshape(8, -1))
    np.testing.assert_allclose(W[0, :, 0], can.outgoing[0])
    np.testing.assert_allclose(W[0, :, 1], can.outgoing[2])
    np.testing.assert_allclose(W[1, :, 0], can.outgoing[5])
    np.testing.assert_allclose(W[1, :, 1], can.outgoing[4])
    np.testing.assert_array_equal(up.weight(1).numpy(), pack.weight(2).numpy())  # upper layers unchanged
