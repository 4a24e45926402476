"""The accounting plan of a run, read from its config: population, clients per round,
sampling, rounds. Server steps get the config through ``RoundContext.workbench.exp``."""

from __future__ import annotations

from fedfm.privacy.accounting import Plan


def plan_of(exp, accountant: str = "rdp") -> Plan:
    from fedfm.runtime.sampling import clients_per_round

    n = exp.federation.clients
    return Plan(population=n, sample_size=clients_per_round(exp.federation, n), sampling="fixed", accountant=accountant)


def exp_of(ctx, who: str):
    exp = getattr(getattr(ctx, "workbench", None), "exp", None)
    if exp is None:
        raise RuntimeError(f"{who}: the round context carries no workbench with the experiment config, needed for accounting")
    return exp
