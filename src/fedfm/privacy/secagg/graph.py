"""SecAgg+'s communication graph: Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (CCS 2020).

In Bonawitz et al.'s protocol every client shares its secrets with, and masks its input
against, every other client: O(n) keys, shares and masks per client, O(n^2) in all. In
SecAgg+ a client does so only with its neighbours in a sparse graph of degree k, so each
client's work and traffic grow with k, not n. The graph here is a Harary graph H(k, n)
over a random order of the clients: the clients on a ring, each linked to the k/2 nearest
on either side (``neighbours: k``, even), so every client has exactly k neighbours and
the graph stays connected after any k - 1 dropouts. The order is drawn from public bytes
(``graph_seed``: the round, the attempt and the ids of the clients keyed; ids sorted by
SHA-256(SHA-256(seed) || id)), so every client computes the same graph from the ids it
is sent, the graph changes every round, and the server has nothing to choose but whom to
key. The server then sends each client the keys of its neighbours only (and the ids, 4
bytes each). With k >= n - 1 every client is every other's neighbour: Bonawitz et al.'s
protocol.

What the server learns: the masks of two neighbours cancel only in a sum that holds
both, so from the masked inputs U3 the server can unmask the sum over each connected
part of the graph restricted to U3. When U3's graph falls apart (dropped clients cut
the ring), unmasking would hand it partial sums; the server then fails the round and an
honest client refuses to send its unmasking shares (``connected``). Bell et al. bound
the chance of this (and of a neighbourhood left with fewer than t) by choosing
k = O(log n) for the expected dropout; here k is the user's choice and a round that
would leak fails instead (``outlook.py`` estimates how often, and the smallest k that
keeps it rare).

Written by hand: a ring and a breadth-first search, no graph library needed.
"""

from __future__ import annotations

import hashlib
from collections import deque


def graph_seed(rnd: int, attempt: int, ids: list[int]) -> bytes:
    """The public bytes the ring's order is drawn from."""
    return b"".join(u.to_bytes(4, "big") for u in [rnd, attempt, *sorted(ids)])


def ring_order(ids: list[int], seed: bytes) -> list[int]:
    """The clients in the ring's order: sorted by SHA-256(SHA-256(seed) || id)."""
    digest = hashlib.sha256(seed).digest()
    return sorted(ids, key=lambda u: hashlib.sha256(digest + u.to_bytes(4, "big")).digest())


def neighbours(ids: list[int], seed: bytes, k: int | None) -> dict[int, set[int]]:
    """Each client's neighbours in H(k, n) over ``ring_order``; every other client when k
    is None or k >= n - 1."""
    n = len(ids)
    if k is None or k >= n - 1:
        return {u: set(ids) - {u} for u in ids}
    ring = ring_order(ids, seed)
    out: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for step in range(1, k // 2 + 1):
            v = ring[(i + step) % n]
            out[u].add(v)
            out[v].add(u)
    return out


def connected(graph: dict[int, set[int]], members: list[int]) -> bool:
    """Whether ``members`` are one connected part of ``graph`` restricted to them."""
    inside = set(members)
    if not inside:
        return True
    start = min(inside)
    seen, todo = {start}, deque([start])
    while todo:
        for v in graph.get(todo.popleft(), ()):
            if v in inside and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == inside


def holders(n: int, k: int | None) -> int:
    """How many clients hold shares of one client's secrets: itself and its neighbours."""
    return n if k is None else min(n, k + 1)
