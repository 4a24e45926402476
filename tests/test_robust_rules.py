"""Robust aggregation rules on hand-built updates, each number checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedfm.aggregators import aggregators
from fedfm.aggregators.bulyan import bulyan
from fedfm.aggregators.clipped_clustering import ClippedClusteringParams, clipped_clustering
from fedfm.aggregators.geomed import GeoMedParams, geometric_median, weiszfeld
from fedfm.aggregators.krum import KrumParams, MultiKrumParams, krum, krum_scores, multi_krum
from fedfm.aggregators.lora_space import lora_pairs, product_rows
from fedfm.aggregators.median import coordinate_median
from fedfm.aggregators.trimmed_mean import TrimmedMeanParams, trimmed_mean


def rows(*vals):
    return [{"w": torch.tensor(v, dtype=torch.float32)} for v in vals]


STATE2 = {"w": torch.zeros(2)}


def test_median_and_trimmed_mean_by_hand():
    deltas = rows([1.0, -50.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0])
    # median per coordinate: [3, 1]
    assert torch.equal(coordinate_median(STATE2, deltas, [1] * 5)["w"], torch.tensor([3.0, 1.0]))
    # beta 0.2, n 5: k = floor(1.0) = 1 dropped at each end -> mean(2,3,4) = 3, mean(0,1,2) = 1
    out = trimmed_mean(STATE2, deltas, [1] * 5, TrimmedMeanParams(beta=0.2))
    assert torch.allclose(out["w"], torch.tensor([3.0, 1.0]))
    # beta 0: the plain mean, (1+2+3+4+100)/5 = 22, (-50+0+1+2+3)/5 = -8.8
    out = trimmed_mean(STATE2, deltas, [1] * 5, TrimmedMeanParams(beta=0.0))
    assert torch.allclose(out["w"], torch.tensor([22.0, -8.8]))
    with pytest.raises(ValueError, match="needs 2k < n"):
        trimmed_mean(STATE2, deltas[:4], [1] * 4, TrimmedMeanParams(beta=0.5))


KRUM_SET = rows([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.4, 0.4], [10.0, 10.0])


def test_krum_scores_and_choice_by_hand():
    # f = 1, n = 5: each score sums the n - f - 2 = 2 smallest squared distances.
    # x0: {1, 1, 0.32, 200} -> 1.32;  x1: {1, 2, 0.52, 181} -> 1.52;  x2: 1.52
    # x3 (0.4, 0.4): {0.32, 0.52, 0.52, 184.32} -> 0.84;  x4: {200, 181, 181, 184.32} -> 362
    x = torch.stack([d["w"].double() for d in KRUM_SET])
    assert torch.allclose(krum_scores(x, 1), torch.tensor([1.32, 1.52, 1.52, 0.84, 362.0], dtype=torch.float64))
    assert torch.equal(krum(STATE2, KRUM_SET, [1] * 5, KrumParams(f=1))["w"], torch.tensor([0.4, 0.4]))
    # Multi-Krum m = 3: x3, x0, then x1 (tied with x2, lower position) -> mean = (1.4/3, 0.4/3)
    out = multi_krum(STATE2, KRUM_SET, [1] * 5, MultiKrumParams(f=1, m=3))
    assert torch.allclose(out["w"], torch.tensor([1.4 / 3, 0.4 / 3]))
    with pytest.raises(ValueError, match="needs n >= f \\+ 3"):
        krum(STATE2, KRUM_SET[:3], [1] * 3, KrumParams(f=1))


def test_bulyan_by_hand():
    # 1-D values 0..5 and 100, f = 1 (n = 7 >= 4f + 3). Iterated Krum picks theta = 5:
    # 2 (score 10, tie with 3 -> lower position), then 3, then 1 (tie with 4), then 4, then 0;
    # beta = theta - 2f = 3 values nearest the median 2 of {0..4}: {2, 1, 3} -> mean 2.
    deltas = rows([0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0])
    out = bulyan({"w": torch.zeros(1)}, deltas, [1] * 7, KrumParams(f=1))
    assert torch.allclose(out["w"], torch.tensor([2.0]))
    with pytest.raises(ValueError, match="n >= 4f \\+ 3 = 7"):
        bulyan({"w": torch.zeros(1)}, deltas[:6], [1] * 6, KrumParams(f=1))


def test_geometric_median_fixed_points():
    # 1-D, equal weights: the geometric median of {0, 1, 10} is the median 1.
    out = geometric_median({"w": torch.zeros(1)}, rows([0.0], [1.0], [10.0]), [1, 1, 1], GeoMedParams(max_iter=200, tol=0, weighted=False))
    assert abs(float(out["w"]) - 1.0) < 1e-4
    # weights 1, 1, 10 (total 12): the point 10 holds more than half -> the median is 10.
    out = geometric_median({"w": torch.zeros(1)}, rows([0.0], [1.0], [10.0]), [1, 1, 10], GeoMedParams(max_iter=200, tol=0))
    assert abs(float(out["w"]) - 10.0) < 1e-4
    # Equilateral triangle: the Fermat point is the centroid (1, sqrt(3)/3), a fixed point
    # of the Weiszfeld map, so the first iteration (started at the mean) does not move it.
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3)]], dtype=torch.float64)
    v, _ = weiszfeld(x, torch.full((3,), 1 / 3, dtype=torch.float64), 1e-6, 1, 0.0)
    assert torch.allclose(v, torch.tensor([1.0, math.sqrt(3) / 3], dtype=torch.float64))
    # Fixed-point condition on an arbitrary set: sum_i a_i (x_i - v) / ||x_i - v|| = 0.
    x = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0], [5.0, 5.0]], dtype=torch.float64)
    a = torch.full((4,), 0.25, dtype=torch.float64)
    v, _ = weiszfeld(x, a, 1e-9, 500, 0.0)
    grad = (a[:, None] * (x - v) / (x - v).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm() < 1e-6


def test_clipped_clustering_by_hand():
    # norms 1, sqrt(1.01), 0.9, sqrt(1.22), sqrt(18) -> tau = median = sqrt(1.01) = 1.004988
    # (1.1, 0.1) is scaled by 1.004988 / 1.104536 = 0.909876 -> (1.000864, 0.0909876);
    # the attacker (-3, -3) is clipped and alone in its cosine cluster.
    # mean of the honest four: x = (1 + 1 + 0.9 + 1.000864) / 4 = 0.975216
    #                          y = (0 + 0.1 + 0 + 0.0909876) / 4 = 0.0477469
    deltas = rows([1.0, 0.0], [1.0, 0.1], [0.9, 0.0], [1.1, 0.1], [-3.0, -3.0])
    out = clipped_clustering(STATE2, deltas, [1] * 5, ClippedClusteringParams())
    assert torch.allclose(out["w"], torch.tensor([0.975216, 0.0477469]), atol=1e-5)


def lora_state():
    # one LoRA module: A (r=1, in=2), B (out=2, r=1); global A = [[1, 0]], B = [[1], [0]]
    return {
        "m.lora_A.default.weight": torch.tensor([[1.0, 0.0]]),
        "m.lora_B.default.weight": torch.tensor([[1.0], [0.0]]),
        "head.bias": torch.zeros(1),
    }


def lora_delta(da, db, head=0.0):
    return {
        "m.lora_A.default.weight": torch.tensor([da]),
        "m.lora_B.default.weight": torch.tensor([[db[0]], [db[1]]]),
        "head.bias": torch.tensor([head]),
    }


def test_lora_product_rows_by_hand():
    state = lora_state()
    assert lora_pairs(list(state)) == [("m.lora_A.default.weight", "m.lora_B.default.weight")]
    # dA = [[1, 0]], dB = 0:  (B)(A + dA) - BA = [[1],[0]] @ [[1, 0]] = [[1, 0], [0, 0]]
    # dA = 0, dB = [[1],[0]]: (B + dB) A - BA = [[1],[0]] @ [[1, 0]] -> the same weight change
    # dA = [[0, 5]], dB = [[0],[1]]: [[1],[1]] @ [[1, 5]] - [[1, 0],[0, 0]] = [[0, 5], [1, 5]]
    x = product_rows(state, [lora_delta([1.0, 0.0], [0.0, 0.0]), lora_delta([0.0, 0.0], [1.0, 0.0], 2.0), lora_delta([0.0, 5.0], [0.0, 1.0])])
    assert torch.allclose(x[0], torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(x[1], torch.tensor([1.0, 0, 0, 0, 2.0], dtype=torch.float64))
    assert torch.allclose(x[2], torch.tensor([0.0, 5, 1, 5, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match="no LoRA A/B pairs"):
        product_rows(STATE2, rows([1.0, 0.0]))


def test_krum_product_space_differs_from_coordinates():
    # Two kinds with the SAME weight change (W[0,0] += 1) but different coordinates:
    # a: dA = [[1, 0]], dB = 0;  b: dA = 0, dB = [[1],[0]]; and "mid": dA = [[0.5, 0]],
    # dB = [[0.5],[0]], midway in coordinates but W[0,0] += 1.5 * 1.5 - 1 = 1.25.
    state = lora_state()
    a, b, mid = lora_delta([1.0, 0.0], [0.0, 0.0]), lora_delta([0.0, 0.0], [1.0, 0.0]), lora_delta([0.5, 0.0], [0.5, 0.0])
    # {a, b, b, mid, mid}, f = 1, sum of the 2 smallest squared distances:
    # coordinates: a {2, 2, .5, .5} -> 1.0; b {2, 0, .5, .5} -> 0.5; mid {.5, .5, .5, 0} -> 0.5;
    #   tie b / mid -> b (lower position).
    # product (W[0,0] only differs): a, b, b at 1 score 0; mid at 1.25 {.0625 x3, 0} -> .0625;
    #   -> a (position 0): the product space sees a and b as the same update.
    deltas = [a, b, b, mid, mid]
    coords = krum(state, deltas, [1] * 5, KrumParams(f=1))
    product = krum(state, deltas, [1] * 5, KrumParams(f=1, space="lora_product"))
    assert torch.equal(coords["m.lora_B.default.weight"], b["m.lora_B.default.weight"])
    assert torch.equal(product["m.lora_A.default.weight"], a["m.lora_A.default.weight"])


def test_clipped_clustering_product_space_isolates_the_opposite_update():
    # Four clients change W[0,0] by about +1 through A or through B; client 4 sends
    # dA = [[-1, 0]], dB = 0: W[0,0] += (1)(1 - 1) - 1 = -1, the opposite direction.
    # In the product space its cosine distance to the others is 2, theirs to each other 0
    # (or nearly): the larger cluster is the four, and their clipped mean is returned.
    state = lora_state()
    deltas = [lora_delta([1.0, 0.0], [0.0, 0.0]), lora_delta([0.0, 0.0], [1.0, 0.0]), lora_delta([1.0, 0.0], [0.0, 0.0]),
              lora_delta([0.0, 0.0], [1.0, 0.0]), lora_delta([-1.0, 0.0], [0.0, 0.0])]
    out = clipped_clustering(state, deltas, [1] * 5, ClippedClusteringParams(space="lora_product"))
    # every norm is 1 (tau = 1, nothing clipped): mean of the four = dA [[0.5, 0]], dB [[0.5],[0]]
    assert torch.allclose(out["m.lora_A.default.weight"], torch.tensor([[0.5, 0.0]]))
    assert torch.allclose(out["m.lora_B.default.weight"], torch.tensor([[0.5], [0.0]]))


def test_rules_registered_with_params():
    for name in ("trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median", "clipped_clustering", "median"):
        assert name in aggregators.names()
