"""Imports every room so that their registries are filled, and validates the component
references of an Experiment against them (before any data or model loads)."""

from __future__ import annotations

from pydantic import BaseModel

from fedfm import aggregators, attacks, codecs, data, learners, peft, tasks  # noqa: F401
from fedfm import privacy  # noqa: F401  (registers dp_clip, dp_noise, dp_client_noise, dp_sgd)
from fedfm import ip  # noqa: F401  (registers the waffle server step)
from fedfm import personalize  # noqa: F401  (personalization learners and server parts)
from fedfm.aggregators.pipeline import parse_step
from fedfm.codecs.base import parse_stage
from fedfm.core.exchanges import exchanges, parse_exchange
from fedfm.learners.middleware import middlewares, parse_middleware
from fedfm.config import ConfigError
from fedfm.core.profile_keys import named_profile_keys, profile_key_problems
from fedfm.core.registry import Registry, RegistryError


def registries() -> dict[str, Registry]:
    """Every extension point, by the YAML key that names its components."""
    return {
        "model.task": tasks.tasks,
        "model.objective": tasks.objectives,
        "data.source": data.sources,
        "federation.partitioner": data.partitioners,
        "peft.method": peft.tuners,
        "learner.name": learners.learners,
        "aggregator.rule": aggregators.aggregators,
        "server_optimizer.name": aggregators.server_optimizers,
        "codecs": codecs.codecs,
        "server_steps": aggregators.server_steps,
        "exchanges": exchanges,
        "federation.roles[].middleware": middlewares,
    }


def validate_components(exp, source: str = "<config>") -> None:
    errors, parsed = parse_components(exp)
    if not errors:  # the keys the config names are known once every component parses
        errors += [f"  {p}" for p in profile_key_problems(exp.federation.roles, named_profile_keys(parsed))]
    for problem in combination_problems(exp):
        errors.append(f"  {problem}")
    if errors:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(errors))


def config_profile_keys(exp) -> dict[str, str]:
    """profile key -> the config field naming it (``ifca``'s ``profile_key``,
    ``cluster_report``'s ``truth_profile``), over a config that validated."""
    return named_profile_keys(parse_components(exp)[1])


def parse_components(exp) -> tuple[list[str], list[tuple[str, BaseModel]]]:
    """(errors, [(where, validated parameters)]) of every component the config names."""
    errors: list[str] = []
    parsed: list[tuple[str, BaseModel]] = []  # (where, validated parameters): the profile keys they name

    def check(fn, *args):
        try:
            out = fn(*args)
        except RegistryError as exc:
            errors.append(f"  {exc}")
            return
        params = out[1] if isinstance(out, tuple) else out
        if isinstance(params, BaseModel):
            parsed.append((args[-1], params))

    check(tasks.tasks.parse, exp.model.task, exp.model.task_options, "model.task_options")
    if exp.model.objective is not None:
        check(tasks.objectives.parse, exp.model.objective.name, exp.model.objective.params(), "model.objective")
    check(data.sources.parse, exp.data.source, exp.data.options, "data.options")
    fp = exp.federation.partitioner
    check(data.partitioners.parse, fp.name, fp.params(), "federation.partitioner")
    check(peft.tuners.parse, exp.peft.method, exp.peft.params(), "peft")
    check(learners.learners.parse, exp.learner.name, exp.learner.params(), "learner")
    check(aggregators.aggregators.parse, exp.aggregator.rule, exp.aggregator.params(), "aggregator")
    so = exp.server_optimizer
    check(aggregators.server_optimizers.parse, so.name, so.params(), "server_optimizer")
    for direction in ("up", "down"):
        specs = getattr(exp.codecs, direction)
        for i, spec in enumerate(specs):
            check(parse_stage, spec, f"codecs.{direction}[{i}]")
        check(check_stage_order, specs, f"codecs.{direction}")
    for i, spec in enumerate(exp.server_steps):
        check(parse_step, spec, f"server_steps[{i}]")
    for i, spec in enumerate(exp.exchanges):
        check(parse_exchange, spec, f"exchanges[{i}]")
    for i, role in enumerate(exp.federation.roles):
        for j, spec in enumerate(role.middleware):
            check(parse_middleware, spec, f"federation.roles[{i}].middleware[{j}]")
    return errors, parsed


def check_stage_order(specs: list, where: str) -> None:
    """The codec chain's stage order (``codecs.chain.order_problem``), once every stage parses."""
    from fedfm.codecs.chain import order_problem

    try:
        names = [parse_stage(spec, f"{where}[{i}]")[0] for i, spec in enumerate(specs)]
    except RegistryError:
        return  # the stage's own check reports it
    problem = order_problem(names, where)
    if problem is not None:
        raise RegistryError(problem)


def combination_problems(exp) -> list[str]:
    """Settings that are each valid but cannot work together, with the reason."""
    from fedfm.learners.checks import scaffold_config_problem
    from fedfm.runtime.roles import check_roles
    from fedfm.tasks.objectives import objective_problems

    problems = []
    from fedfm.learners.speed import speed_problem
    from fedfm.runtime.concurrent import transport_problem

    for problem in (speed_problem(exp), transport_problem(exp)):
        if problem is not None:
            problems.append(problem)
    reason = check_roles(exp.federation.roles, exp.federation.clients)
    if reason is not None:
        problems.append(f"federation.roles: {reason}")
    scaffold = scaffold_config_problem(exp)
    if scaffold is not None:
        problems.append(scaffold)
    if exp.learner.name == "scaffold" and exp.peft.local:
        problems.append("peft.local: SCAFFOLD's control variates cover the shared State only; use another learner with local parameters")
    from fedfm.aggregators.robust_checks import robust_problems

    problems.extend(robust_problems(exp))
    from fedfm.privacy.checks import privacy_problems

    problems += privacy_problems(exp)
    from fedfm.runtime.flower.node_keys import config_problems as node_key_problems

    problems += node_key_problems(exp)
    problems += objective_problems(exp)
    from fedfm.tasks.verbalizer import verbalizer_problems

    problems += verbalizer_problems(exp)
    from fedfm.ip.waffle import waffle_config_problems

    problems += waffle_config_problems(exp)
    from fedfm.personalize.checks import personalize_problems
    problems += personalize_problems(exp)
    from fedfm.learners.zo_checks import zeroth_order_config_problems
    problems += zeroth_order_config_problems(exp)
    from fedfm.learners.hetero_checks import hetero_config_problems

    problems += hetero_config_problems(exp)
    from fedfm.learners.masked import pruning_config_problems

    problems += pruning_config_problems(exp)
    from fedfm.runtime.batched import batched_problem
    from fedfm.peft.feature_attention import feature_attention_problem
    from fedfm.peft.svd_init import svd_init_problem
    from fedfm.peft.checks import unpad_problem
    problems += [p for p in [batched_problem(exp), svd_init_problem(exp), feature_attention_problem(exp), unpad_problem(exp)]
                 if p is not None]
    return problems
