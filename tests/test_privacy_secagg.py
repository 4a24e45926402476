"""Secure aggregation: the primitives, and the four phases driven in-process with
dropouts, a tampered ciphertext and a wrong share."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedfm.privacy.secagg import SecAggClient, SecAggConfig, SecAggError, SecAggServer, default_threshold
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


def run(xs, t, drop_before_share=(), drop_after_masking=(), tamper_ct=None, bad_share_from=None, rnd=0):
    """Drive the four phases in-process; returns (sum, server, clients)."""
    d = len(next(iter(xs.values())))
    cfg = SecAggConfig(length=d, threshold=t, bound=1.0, frac_bits=16, round=rnd)
    clients = {u: SecAggClient(u, cfg) for u in xs}
    server = SecAggServer(cfg)
    rosters = server.roster({u: c.advertise() for u, c in clients.items()})
    shared = {u: clients[u].share(rosters[u]) for u in rosters if u not in drop_before_share}
    inboxes = server.route(shared)
    if tamper_ct is not None:  # flip one byte of the ciphertext from u to v on its way
        u, v = tamper_ct
        from fedfm.privacy.secagg.protocol import pack_items, unpack_items

        items = unpack_items(inboxes[v])
        items[u] = items[u][:20] + bytes([items[u][20] ^ 0xFF]) + items[u][21:]
        inboxes[v] = pack_items(items)
    masked = {u: clients[u].masked(inboxes[u], server.u2, xs[u]) for u in inboxes if u not in drop_after_masking}
    survivors, dropped = server.collect(masked)
    replies = {v: clients[v].unmask(survivors, dropped) for v in survivors}
    if bad_share_from is not None:  # a client alters the first share value it returns
        rec = bytearray(replies[bad_share_from])
        rec[-1] ^= 0x01
        replies[bad_share_from] = bytes(rec)
    return server.unmask(replies), server, clients


def plain_sum(xs, ids):
    return fixed_point.add(*[fixed_point.encode(xs[u], 1.0, 16) for u in ids])


@pytest.fixture
def xs():
    rng = np.random.default_rng(0)
    return {u: rng.uniform(-1, 1, 500) for u in range(9)}


def test_masked_sum_equals_plain_fixed_point_sum(xs):
    total, server, _ = run(xs, default_threshold(9))
    assert np.array_equal(total, plain_sum(xs, range(9)))
    assert np.abs(fixed_point.decode(total, 16) - sum(xs.values())).max() <= 9 * 2**-17
    assert server.notes == []
    # bytes per phase: 9 adverts of 64; the roster (9 x 68 bytes) to each of 9; 9 x 2000 bytes masked
    assert server.bytes_up["advertise"] == 9 * 64 and server.bytes_down["advertise"] == 9 * 9 * 68
    assert server.bytes_up["masked"] == 9 * 500 * 4
    # share messages: a 32-byte commitment + 8 ciphertexts of 8 + 176 bytes
    assert server.bytes_up["share"] == 9 * (32 + 8 * (8 + 176))


def test_a_third_drop_after_masking(xs):
    # t = 9 - 3 = 6: clients 2, 5, 8 share their keys, then drop; the other 6 are summed exactly
    total, server, _ = run(xs, default_threshold(9), drop_after_masking=(2, 5, 8))
    assert np.array_equal(total, plain_sum(xs, [0, 1, 3, 4, 6, 7]))
    assert server.dropped == [2, 5, 8]


def test_a_client_dropping_before_sharing_is_recorded(xs):
    total, server, _ = run(xs, default_threshold(9), drop_before_share=(4,), drop_after_masking=(1,))
    assert np.array_equal(total, plain_sum(xs, [0, 2, 3, 5, 6, 7, 8]))
    assert server.notes == ["client 4 dropped before sharing its keys; left out of the sum"]


def test_malformed_shares_are_recorded_not_used(xs):
    # a ciphertext from 0 to 3 altered in transit: client 3 cannot authenticate it
    total, server, clients = run(xs, default_threshold(9), drop_after_masking=(0,), tamper_ct=(0, 3))
    assert np.array_equal(total, plain_sum(xs, range(1, 9)))
    assert clients[3].notes == ["share from client 0 failed authentication; not used"]
    # client 1 returns an altered share: the server finds it off the polynomial
    total, server, _ = run(xs, default_threshold(9), drop_after_masking=(2,), bad_share_from=1)
    assert np.array_equal(total, plain_sum(xs, [0, 1, 3, 4, 5, 6, 7, 8]))
    assert any("share 2 of client" in n and "malformed" in n for n in server.notes), server.notes


def test_too_many_dropouts_is_a_clear_error(xs):
    with pytest.raises(SecAggError, match="fewer than the threshold 6"):
        run(xs, default_threshold(9), drop_after_masking=(0, 1, 2, 3))


def test_a_masked_vector_is_uncorrelated_with_its_update():
    # One client's fixed update, masked with fresh keys in 100 runs of a 3-client round:
    # the Pearson correlation between x and the decoded masked vector stays within noise
    # (|r| ~ 1/sqrt(2000) = 0.022 per run), while x with itself (no mask) gives 1.
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, 2000)
    rs = []
    for trial in range(100):
        cfg = SecAggConfig(length=2000, threshold=2)
        cs = {u: SecAggClient(u, cfg) for u in range(3)}
        srv = SecAggServer(cfg)
        rosters = srv.roster({u: c.advertise() for u, c in cs.items()})
        inboxes = srv.route({u: cs[u].share(rosters[u]) for u in cs})
        y = np.frombuffer(cs[0].masked(inboxes[0], srv.u2, x), dtype="<u4")
        rs.append(np.corrcoef(x, fixed_point.decode(y, 16))[0, 1])
    rs = np.array(rs)
    assert abs(rs.mean()) < 3 * 0.022 / np.sqrt(100) + 1e-3  # mean of 100 runs: std ~0.0022
    assert np.abs(rs).max() < 0.1
    assert np.corrcoef(x, fixed_point.decode(fixed_point.encode(x, 1.0, 16), 16))[0, 1] > 0.999
