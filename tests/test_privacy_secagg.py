"""Secure aggregation's primitives: fixed point, Shamir, key agreement and the PRG. The
phases themselves, with dropouts, a tampered ciphertext and a wrong share, are tested in
test_secagg_units.py, test_secagg_rounds.py and test_secagg_plus.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedfm.privacy.secagg import crypto, fixed_point, shamir


def test_fixed_point_by_hand():
    # 2^16 = 65536: 0.5 -> 32768; -0.25 -> -16384 = 2^32 - 16384 = 4294950912; 3.0 clipped to 1.0 -> 65536
    enc = fixed_point.encode(np.array([0.5, -0.25, 3.0]), bound=1.0, frac_bits=16)
    assert enc.tolist() == [32768, 4294950912, 65536]
    # sum mod 2^32 of the encodings of 0.5 and -0.75 decodes to -0.25
    s = fixed_point.add(fixed_point.encode(np.array([0.5]), 1.0, 16), fixed_point.encode(np.array([-0.75]), 1.0, 16))
    assert fixed_point.decode(s, 16).tolist() == [-0.25]
    assert fixed_point.capacity_problem(100, 1.0, 16) is None  # 100 * 65536 < 2^31
    assert "wrap" in fixed_point.capacity_problem(40_000, 1.0, 16)  # 40000 * 65536 = 2.6e9 >= 2^31


def test_shamir_any_t_recover_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, 5)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset)) == secret
    with pytest.raises(ValueError):  # two points of a degree-2 polynomial interpolate to a random field element
        assert shamir.combine(shares[:2]) != secret
    assert shamir.share_from_bytes(shamir.share_bytes(shares[4])) == shares[4]


def test_key_agreement_and_prg():
    a_sk, a_pk = crypto.keypair()
    b_sk, b_pk = crypto.keypair()
    k = crypto.agree(a_sk, b_pk, b"mask")
    assert k == crypto.agree(b_sk, a_pk, b"mask") and k != crypto.agree(a_sk, b_pk, b"enc")
    assert np.array_equal(crypto.prg(k, 100), crypto.prg(k, 100)) and crypto.prg(k, 100).dtype == np.uint32
    assert crypto.public_of(a_sk) == a_pk
    ct = crypto.encrypt(k, b"share", b"ad")
    assert crypto.decrypt(k, ct, b"ad") == b"share"
    with pytest.raises(crypto.InvalidTag):
        crypto.decrypt(k, ct[:-1] + bytes([ct[-1] ^ 1]), b"ad")
