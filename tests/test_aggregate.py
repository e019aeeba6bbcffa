"""C++ class aggregator == NumPy reference, exactly, on random inputs."""
import numpy as np
import pytest

from xctrt import _core


def ref_priority(p, thr, ids, order):
    out = np.zeros(p.shape[1:], np.uint8)
    for c in order[::-1]:  # lowest priority first; higher priorities overwrite
        out[p[c] >= thr[c]] = ids[c]
    return out


def ref_argmax(p, thr, ids):
    masked = np.where(p >= thr.reshape((-1,) + (1,) * (p.ndim - 1)), p, -np.inf)
    best = np.argmax(masked, axis=0)  # first index on ties
    any_ = np.isfinite(np.max(masked, axis=0))
    return np.where(any_, ids[best], 0).astype(np.uint8)


def random_case(rng):
    k = int(rng.integers(1, 6))
    ndim = int(rng.integers(1, 4))
    shape = tuple(int(s) for s in rng.integers(1, 9, ndim))
    kind = rng.integers(4)
    if kind == 0:
        p = rng.random((k,) + shape, dtype=np.float32)
    elif kind == 1:  # coarse values: many ties and exact-threshold hits
        p = (rng.integers(0, 5, (k,) + shape) / 4).astype(np.float32)
    elif kind == 2:
        p = np.zeros((k,) + shape, np.float32)   # all below threshold -> all air
    else:
        p = np.ones((k,) + shape, np.float32)    # all above -> highest priority everywhere
    thr = (rng.integers(0, 5, k) / 4).astype(np.float32)
    ids = rng.permutation(np.arange(1, 256))[:k].astype(np.uint8)
    order = rng.permutation(k)
    return p, thr, ids, order


@pytest.mark.parametrize("seed", range(250))
def test_priority_and_argmax_match_reference(seed):
    rng = np.random.default_rng(seed)
    p, thr, ids, order = random_case(rng)
    assert np.array_equal(_core.aggregate(p, thr, ids, order, "priority"), ref_priority(p, thr, ids, order))
    assert np.array_equal(_core.aggregate(p, thr, ids, order, "argmax"), ref_argmax(p, thr, ids))


def test_paper_rule_inclusion_beats_pore_beats_material():
    # channels: material, pore, inclusion; every voxel above every threshold in some combination
    p = np.array([[[0.9, 0.9, 0.9, 0.1]],
                  [[0.0, 0.9, 0.9, 0.1]],
                  [[0.0, 0.0, 0.9, 0.1]]], np.float32)
    out = _core.aggregate(p, [0.5, 0.5, 0.5], [1, 2, 3], [2, 1, 0], "priority")
    assert out.tolist() == [[1, 2, 3, 0]]


def test_large_input_uses_parallel_path_and_still_matches():
    rng = np.random.default_rng(7)
    p = rng.random((3, 700, 700), dtype=np.float32)
    thr = np.array([0.3, 0.6, 0.8], np.float32)
    ids = np.array([1, 2, 3], np.uint8)
    assert np.array_equal(_core.aggregate(p, thr, ids, [2, 1, 0]), ref_priority(p, thr, ids, [2, 1, 0]))
    assert np.array_equal(_core.aggregate(p, thr, ids, [2, 1, 0], "argmax"), ref_argmax(p, thr, ids))


@pytest.mark.parametrize("args", [
    dict(thresholds=[0.5], label_ids=[1, 2], priority=[0, 1]),       # threshold count
    dict(thresholds=[0.5, 0.5], label_ids=[1, 2], priority=[0, 0]),  # channel twice
    dict(thresholds=[0.5, 0.5], label_ids=[1, 2], priority=[0, 2]),  # channel out of range
    dict(thresholds=[0.5, 0.5], label_ids=[1, 2], priority=[0, 1], mode="vote"),
])
def test_bad_arguments_raise(args):
    with pytest.raises(ValueError):
        _core.aggregate(np.zeros((2, 3, 3), np.float32), **args)


def test_out_buffer_is_filled_and_returned():
    rng = np.random.default_rng(3)
    p = rng.random((3, 5, 6), dtype=np.float32)
    out = np.full((5, 6), 99, np.uint8)
    got = _core.aggregate(p, [0.5] * 3, [1, 2, 3], [2, 1, 0], "priority", out)
    assert got is out
    assert np.array_equal(out, ref_priority(p, np.full(3, 0.5, np.float32), np.array([1, 2, 3]), [2, 1, 0]))
    with pytest.raises(ValueError):
        _core.aggregate(p, [0.5] * 3, [1, 2, 3], [2, 1, 0], "priority", np.empty((5, 7), np.uint8))
    with pytest.raises(ValueError):
        _core.aggregate(p, [0.5] * 3, [1, 2, 3], [2, 1, 0], "priority", np.empty((5, 6), np.int32))
