"""Secure aggregation's exchange phases (privacy/secagg/exchange.py, mask.py) driven
in-process as the round loop drives them, without a model: Shamir by hand, masks that
cancel on constructed vectors, dropouts in every phase, a tampered ciphertext and a
malformed share, and too few survivors."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from fedfm.core.types import Update
from fedfm.privacy.secagg import fixed_point, shamir
from fedfm.privacy.secagg.common import mask_vector
from fedfm.privacy.secagg.exchange import secagg_phases
from fedfm.privacy.secagg.mask import mask_update, weight_text
from fedfm.privacy.secagg.params import SecAggParams
from fedfm.runtime.store import ClientStore, round_tag


def test_shamir_three_of_five_by_hand():
    # f(x) = 7 + 3x + 2x^2: f(1) = 12, f(2) = 21, f(3) = 34, f(4) = 51, f(5) = 72.
    shares = [(1, 12), (2, 21), (3, 34), (4, 51), (5, 72)]
    for subset in ([0, 1, 2], [0, 2, 4], [2, 3, 4], [1, 3, 4]):
        assert int.from_bytes(shamir.combine([shares[i] for i in subset]), "big") == 7
    # Two shares fit the line through (1, 12) and (2, 21): 12 - 9 = 3 at 0, not the secret.
    assert int.from_bytes(shamir.combine(shares[:2]), "big") == 3
    # A random split of a 32-byte seed: any 3 of 5 give it back.
    seed = bytes(range(32))
    assert shamir.combine(shamir.split(seed, 3, 5)[1:4]) == seed


def test_the_polynomial_through_three_shares_by_hand():
    # f(x) = 7 + 3x + 2x^2 through (1, 12), (2, 21), (3, 34): f(0) = 7, f(4) = 51, f(5) = 72, f(10) = 237
    f = shamir.evaluator([(1, 12), (2, 21), (3, 34)])
    assert [f(x) for x in (0, 4, 5, 10)] == [7, 51, 72, 237]
    assert shamir.evaluator([(2, 21), (5, 72), (4, 51)])(1) == 12  # any 3 shares, in any order
    with pytest.raises(ValueError, match="distinct and nonzero"):
        shamir.evaluator([(1, 12), (1, 13)])
    # the extra shares checked all at once: on f, (4, 51) and (5, 72) pass; (5, 73) does not
    # (whatever the random weights: the sum is r_5 * 1, nonzero mod p)
    used = [(1, 12), (2, 21), (3, 34)]
    assert shamir.all_on(used, [(4, 51), (5, 72), (10, 237)]) and shamir.all_on(used, [])
    assert not shamir.all_on(used, [(4, 51), (5, 73)]) and not shamir.all_on(used, [(10, 236)])


def test_the_masked_weight_has_one_width_whatever_the_mask():
    # 2^24 - 1 = 16,777,215: 8 digits; a random masked word of any size takes 8 characters,
    # so the payload header, and the bytes counted, do not change from run to run
    assert [weight_text(w, 24) for w in (0, 5, 16_777_215)] == ["00000000", "00000005", "16777215"]
    assert float(weight_text(5, 24)) == 5.0  # the server reads it back as before
    assert len(weight_text(3, 32)) == len("4294967295")


def test_masks_cancel_in_the_sum_of_three_constructed_vectors():
    from fedfm.privacy.secagg import crypto

    # frac_bits 4, modulus 2^8: 0.5 -> 8, -0.25 -> -4 = 252, 0.25 -> 4, -1.0 -> -16 = 240, 0.125 -> 2.
    x = {0: [0.5, -0.25], 1: [0.25, 0.25], 2: [-1.0, 0.125]}
    enc = {u: fixed_point.encode(np.array(v), 1.0, 4, 8) for u, v in x.items()}
    assert [enc[u].tolist() for u in range(3)] == [[8, 252], [4, 4], [240, 2]]
    keys = {u: crypto.keypair() for u in range(3)}
    s_pks = {u: keys[u][1] for u in range(3)}
    seeds = {u: bytes([u + 1]) * 32 for u in range(3)}
    masked = {u: (enc[u] + mask_vector(u, seeds[u], keys[u][0], s_pks, [0, 1, 2], 2, 8)) & np.uint32(255) for u in range(3)}
    total = fixed_point.add(*masked.values(), bits=8)
    for u in range(3):  # the server removes the self masks PRG(b_u) it reconstructs
        total = (total - crypto.prg(seeds[u], 2)) & np.uint32(255)
    # 8 + 4 - 16 = -4 = 252 (mod 256); -4 + 4 + 2 = 2: the pairwise masks cancelled exactly.
    assert total.tolist() == [252, 2]
    assert fixed_point.decode(total, 4, 8).tolist() == [-0.25, 0.125]


class Round:
    """The loop's part, in-process: messages -> client -> receive for every phase, with
    the masking (``mask_update``, the route phase's ``on_train_reply``) as the train step."""

    def __init__(self, tmp_path, params: dict, n: int = 4, rnd: int = 1):
        self.p = SecAggParams(**params)
        self.phases = {ph.step: ph for ph in secagg_phases(self.p)}
        self.store = ClientStore(tmp_path / "clients")
        self.env = types.SimpleNamespace(exp=types.SimpleNamespace(seed=0), store=self.store, middleware=lambda cid: [])
        self.rs = {"instructions": {}, "attempt": 0}
        self.rnd, self.cids = rnd, list(range(n))
        for c in self.cids:
            self.store.stage(c, round_tag(rnd, 0))

    def phase(self, step: str, participants: list[int], tamper=None) -> list[int]:
        ph = self.phases[step]
        replies = {}
        for cid, (meta, tensors) in ph.messages(self.rnd, participants, self.rs).items():
            try:
                replies[cid] = ph.client(self.env, cid, self.rnd, meta, tensors)
            except RuntimeError:  # a simulated dropout: no reply
                continue
        if tamper is not None:
            tamper(replies)
        return ph.receive(self.rnd, replies, self.rs)

    def run(self, updates: dict[int, Update], tamper_share=None, tamper_unmask=None) -> list[Update]:
        going = self.phase("advertise", self.cids)
        going = self.phase("share", going, tamper_share)
        going = self.phase("route", going)
        accepted = []
        for cid in going:
            ctx = types.SimpleNamespace(cid=cid, round=self.rnd, store=self.store)
            try:
                accepted.append(mask_update(updates[cid], ctx))
            except RuntimeError:
                continue
        going = set(self.phase("unmask", [u.cid for u in accepted], tamper_unmask))
        return self.phases["unmask"].transform([u for u in accepted if u.cid in going], self.rs)


def updates_of(values: dict[int, list[float]], weights: dict[int, int]) -> dict[int, Update]:
    return {c: Update(cid=c, payload={"w": torch.tensor(v, dtype=torch.float32)}, num_examples=weights[c]) for c, v in values.items()}


X = {0: [0.5, -0.25, 0.0], 1: [0.25, 0.25, 1.0], 2: [-1.0, 0.125, 0.5], 3: [0.0, 0.5, -0.5]}
N = {0: 1, 1: 2, 2: 1, 3: 4}


def mean_of(cids) -> list[float]:
    w = sum(N[c] for c in cids)
    return [sum(N[c] * X[c][i] for c in cids) / w for i in range(3)]


def test_weighted_mean_is_exact_and_no_single_masked_input_is_the_update(tmp_path):
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16})
    ups = updates_of(X, N)
    ctx = types.SimpleNamespace(cid=0, round=1, store=r.store)
    out = r.run(ups)
    # sum(n x) = [0.5 + 0.5 - 1 + 0, -0.25 + 0.5 + 0.125 + 2, 0 + 2 + 0.5 - 2] = [0, 2.375, 0.5]; sum(n) = 8.
    assert mean_of(range(4)) == [0.0, 2.375 / 8, 0.5 / 8]
    assert [u.cid for u in out] == [0, 1, 2, 3] and all(u.num_examples == 1 for u in out)
    for u in out:
        assert u.payload["w"].tolist() == pytest.approx([0.0, 0.296875, 0.0625], abs=0)
    assert r.rs["secagg"]["weight"] == 8 and r.rs["secagg"]["dropped"] == []
    assert r.store.get(0, "secagg") is None  # the keys are deleted once the shares are sent
    del ctx


@pytest.mark.parametrize("phase,cids,survivors", [
    ("advertise", [3], [0, 1, 2]),  # never keyed: simply not in the sum
    ("share", [3], [0, 1, 2]),
    ("route", [3], [0, 1, 2]),  # in U2 but never trains: its pairwise masks never enter
    ("train", [3], [0, 1, 2]),  # in U2, no masked input: its mask key s_sk is reconstructed
    ("unmask", [3], [0, 1, 2, 3]),  # masked input sent: its b_u is reconstructed, it stays in the sum
])
def test_one_dropout_in_any_phase_is_recovered(tmp_path, phase, cids, survivors):
    # t = 4 - floor(4/3) = 3: one of four may drop anywhere.
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16, "drop": [{"phase": phase, "cids": cids}]})
    out = r.run(updates_of(X, N))
    assert r.rs["secagg"]["t"] == 3
    assert [u.cid for u in out] == survivors
    # e.g. unmask: the mean of all four; train: (0.5 + 0.5 - 1, -0.25 + 0.5 + 0.125, 0 + 2 + 0.5) / 4
    assert out[0].payload["w"].tolist() == pytest.approx(mean_of(survivors), abs=0)


def test_two_of_four_dropped_after_masking_fails_with_the_reason(tmp_path, caplog):
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16, "drop": [{"phase": "train", "cids": [1, 2]}]})
    assert r.run(updates_of(X, N)) == []
    assert r.rs["secagg"]["failed"] == "2 masked inputs arrived, fewer than the threshold t = 3"
    assert "fewer than the threshold t = 3" in caplog.text


def test_two_silent_in_unmask_fails(tmp_path):
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16, "drop": [{"phase": "unmask", "cids": [0, 3]}]})
    assert r.run(updates_of(X, N)) == []
    assert r.rs["secagg"]["failed"] == "2 clients sent unmasking shares, fewer than the threshold t = 3"


def test_tampered_ciphertext_and_malformed_share_are_noted_not_used(tmp_path):
    def flip_ciphertext(replies):  # client 0's share box for client 2 (the second box): one bit flipped
        boxes = replies[0][1]["boxes"]
        boxes[1, 50] ^= 1

    def bad_share(replies):  # client 1 sends a wrong value for its share of client 3's b (rows sorted by client)
        shares = replies[1][1]["shares"]
        shares[3, -1] ^= 1

    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16})
    out = r.run(updates_of(X, N), tamper_share=flip_ciphertext, tamper_unmask=bad_share)
    assert out[0].payload["w"].tolist() == pytest.approx(mean_of(range(4)), abs=0)
    notes = r.rs["secagg"]["notes"]
    assert "client 2: the share from client 0 failed authentication; not used" in notes
    # client 0's b: 3 shares left (0, 1, 3) = t; client 3's b: 4 shares, client 1's (x = 2) off the polynomial
    assert "share 2 of client 3's self-mask seed is malformed; not used" in notes, notes


def test_quantization_error_is_bounded_by_n_half_steps_over_the_weight(tmp_path):
    # frac_bits 4: each w * x is rounded to a multiple of 1/16, error <= 1/32 per client;
    # the mean's error is at most 4 * (1/32) / 8 = 1/64.
    rng = np.random.default_rng(0)
    xs = {c: rng.uniform(-0.4, 0.4, 50).tolist() for c in range(4)}
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16})
    out = r.run(updates_of(xs, N))
    exact = np.array([sum(N[c] * xs[c][i] for c in range(4)) / 8 for i in range(50)])
    err = np.abs(out[0].payload["w"].numpy().astype(np.float64) - exact)
    assert err.max() <= 4 * (1 / 32) / 8 + 1e-7 and err.max() > 0


def test_a_masked_input_is_uniform_words_not_the_update(tmp_path):
    r = Round(tmp_path, {"bound": 1.0, "frac_bits": 16, "bits": 24}, n=3)
    zeros = {c: Update(cid=c, payload={"w": torch.zeros(2000)}, num_examples=1) for c in range(3)}
    going = r.phase("route", r.phase("share", r.phase("advertise", r.cids)))
    masked = mask_update(zeros[0], types.SimpleNamespace(cid=0, round=1, store=r.store))
    words = masked.payload["w"].numpy()
    assert going == [0, 1, 2] and masked.num_examples == 1
    assert np.all(words == np.rint(words)) and words.min() >= 0 and words.max() < 2**24
    # an all-zero update masked: words uniform on [0, 2^24): mean 2^23 within 4 std errors (2^24/sqrt(12 * 2000))
    assert abs(words.mean() - 2**23) < 4 * 2**24 / np.sqrt(12 * 2000)


def test_too_few_keyed_clients_fail_before_anyone_trains(tmp_path):
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16, "drop": [{"phase": "advertise", "cids": [0, 2]}]})
    assert r.phase("advertise", r.cids) == []
    assert r.rs["secagg"]["failed"] == "2 clients advertised keys, fewer than the threshold t = 3"
    # the later phases send nothing and let no one through
    assert r.phases["share"].messages(1, [], r.rs) == {} and r.phase("route", []) == []


def test_uniform_weighting_gives_the_plain_mean(tmp_path):
    r = Round(tmp_path, {"bound": 4.0, "frac_bits": 4, "bits": 16, "weighting": "uniform"})
    out = r.run(updates_of(X, N))
    # (0.5 + 0.25 - 1 + 0) / 4 = -0.0625; (-0.25 + 0.25 + 0.125 + 0.5) / 4 = 0.15625; (0 + 1 + 0.5 - 0.5) / 4 = 0.25
    assert out[0].payload["w"].tolist() == [-0.0625, 0.15625, 0.25] and r.rs["secagg"]["weight"] == 4


def test_a_weight_that_could_wrap_the_summed_weight_is_refused(tmp_path):
    # bits 24: the weight word holds sums below 2^23 = 8,388,608. Five clients of 2^22 + 5
    # examples would sum to 20,971,545 = 4,194,329 (mod 2^24), a positive, wrong weight. Each
    # client may send at most (2^23 - 1) // 5 = 1,677,721, so client 0 refuses before masking.
    assert fixed_point.weight_cap(5, 24) == 1_677_721
    assert 5 * (2**22 + 5) % 2**24 == 4_194_329
    assert fixed_point.weight_problem(5, 1_677_721, 24) is None
    assert "5 clients x weight up to 1677722 = 8,388,610 >= 2^23" in fixed_point.weight_problem(5, 1_677_722, 24)
    r = Round(tmp_path, {"bound": 1.0, "frac_bits": 4, "bits": 24}, n=5)
    big = {c: Update(cid=c, payload={"w": torch.zeros(3)}, num_examples=2**22 + 5) for c in range(5)}
    with pytest.raises(ValueError, match=r"client 0 round 1: weight 4194309 outside 1..1,677,721: with 5 keyed clients "
                                         r"the summed weight could reach 5 x 4,194,309 = 20,971,545 >= 2\^23"):
        r.run(big)
    # at the cap the summed weight decodes exactly: 5 x 1,677,721 = 8,388,605 < 2^23
    r = Round(tmp_path / "cap", {"bound": 1.0, "frac_bits": 4, "bits": 24}, n=5)
    out = r.run({c: Update(cid=c, payload={"w": torch.zeros(3)}, num_examples=1_677_721) for c in range(5)})
    assert r.rs["secagg"]["weight"] == 8_388_605 and out[0].payload["w"].tolist() == [0.0, 0.0, 0.0]


def test_recovery_tries_a_bounded_number_of_subsets_and_names_the_clients(monkeypatch):
    from fedfm.privacy.secagg import common

    # f(x) = 7 + 3x + 2x^2 (the shares of the first test) with share 1 altered to (1, 13):
    # the subsets by prefix are {1,2,3} (bad), then {1,2,4}, {1,3,4} (bad), {2,3,4}: 7.
    assert list(common.subsets_by_prefix(5, 3))[:4] == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    seven = (7).to_bytes(32, "big")
    shares = [(1, 13), (2, 21), (3, 34), (4, 51), (5, 72)]
    tried = []
    real = shamir.evaluator
    monkeypatch.setattr(shamir, "evaluator", lambda sub: tried.append(len(sub)) or real(sub))
    notes: list[str] = []
    assert common.recover("the test secret", shares, 3, lambda s: s == seven, notes) == seven
    assert notes == ["share 1 of the test secret is malformed; not used"]
    assert len(tried) == 4  # four subsets interpolated; shares 1 and 5 then checked on the last one's polynomial
    # 40 shares, t = 3, only the last three good: 9,880 subsets exist, 512 are tried, then the
    # holders are named (share index x -> client id).
    secret = bytes(range(32))
    good = shamir.split(secret, 3, 40)
    bad = [(x, y + 1) for x, y in good[:37]] + good[37:]
    tried.clear()
    with pytest.raises(common.SecAggError, match=r"no 3 of the 40 shares of client 9's self-mask seed reconstruct it "
                                                 r"\(512 subsets tried, at most 512\): the shares from client 100, "
                                                 r"client 101, .*, client 139 are inconsistent"):
        common.recover("client 9's self-mask seed", bad, 3, lambda s: s == secret, [], {x: 99 + x for x in range(1, 41)})
    assert len(tried) == 512
    # 10 shares, only the last three good: all C(10, 3) = 120 subsets fit under the bound, the last one is good
    ten = shamir.split(secret, 3, 10)
    notes = []
    assert common.recover("ten", [(x, y + 1) for x, y in ten[:7]] + ten[7:], 3, lambda s: s == secret, notes) == secret
    assert len(notes) == 7
