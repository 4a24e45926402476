"""The accounting plan of a run: population, clients per round, sampling. Read from the
config at config time (``plan_of``), and from the round's context by the server steps
(``round_plan``: ``RoundContext.num_clients`` and ``sample_size``), so a step needs no
experiment object."""

from __future__ import annotations

from fedfm.privacy.accounting import Plan


def plan_of(exp, accountant: str = "rdp") -> Plan:
    from fedfm.runtime.sampling import clients_per_round

    n = exp.federation.clients
    return Plan(population=n, sample_size=clients_per_round(exp.federation, n), sampling="fixed", accountant=accountant)


def round_plan(ctx, who: str, accountant: str = "rdp") -> Plan:
    """The plan of the run this round belongs to (``RoundContext`` carries it)."""
    if ctx.sample_size <= 0 or ctx.rounds <= 0:
        raise RuntimeError(f"{who}: the round context carries no run plan (rounds, clients per round), needed for accounting")
    return Plan(population=ctx.num_clients, sample_size=ctx.sample_size, sampling="fixed", accountant=accountant)
