"""Config-time checks for the learners whose payload is not a delta State (FedKSeed,
FedBPT): what the server pipeline needs to carry them, refused with the numbers."""

from __future__ import annotations

NON_STATE = ("fedkseed", "fedbpt")
STEP = "non_state_payload"
# Server steps that only measure (they change no update, delta or model), so the server's
# model stays what clients rebuild from the history (FedKSeed) or the distribution (FedBPT).
# Every other registered step changes what is aggregated (clip_updates, norm_bound, weak_dp,
# centered_clip, dp_clip, alie, ipm, fedfa), the delta (dp_noise) or the model (waffle,
# client_watermark), or reads what these learners do not send: sim_clock counts the
# payload's tensor bytes (the zero delta non_state_payload adds, not what travelled),
# cluster_report clusters the deltas (zeros here) or needs its own learners,
# dp_sgd_accountant needs the dp_sgd learner's metrics.
MEASURING = ("backdoor_asr",)
# tasks whose loss skips the prompt's virtual-token logits (causal_lm: tasks/causal_lm.continuation_logits;
# lm_classification: tasks/verbalizer.answer_logits)
FEDBPT_TASKS = ("text_classification", "causal_lm", "lm_classification")


def zeroth_order_config_problems(exp) -> list[str]:
    from fedfm.learners.bdpl import bdpl_config_problems

    name = exp.learner.name
    if name not in NON_STATE:
        return bdpl_config_problems(exp)
    problems = []
    steps = [s.get("name") for s in exp.server_steps]
    if not steps or steps[0] != STEP:
        problems.append(
            f"learner {name}: its payload is not a delta State; list {{name: {STEP}}} first in server_steps "
            f"(got {steps})"
        )
    changing = [s for s in steps[1:] if s not in MEASURING]
    if changing:
        problems.append(
            f"server_steps: learner {name} does not support {changing}: its server half computes the model from the "
            f"clients' {'seeds and scalars' if name == 'fedkseed' else 'search distributions'} itself, so a step that "
            "changes the updates, the delta or the model would make the server's model differ from the one clients "
            f"rebuild (and a privacy step would report a guarantee it does not give); allowed after {STEP}: "
            f"{', '.join(MEASURING)}"
        )
    if exp.aggregator.rule != "fedavg":
        own = ("the example-weighted sum of the projected gradients per seed" if name == "fedkseed"
               else "a server-level CMA-ES over the clients' final means")
        problems.append(
            f"aggregator.rule: learner {name} supports only fedavg (got {exp.aggregator.rule}): its server half "
            f"combines the payloads itself ({own}) and would silently ignore any other rule"
        )
    from fedfm.aggregators.server_opt import not_as_is

    got = not_as_is(exp.server_optimizer)
    if got is not None:
        problems.append(
            f"learner {name}: the server half computes the model step itself; server_optimizer must be sgd with "
            f"lr 1.0 (got {got})"
        )
    if exp.codecs.up:
        problems.append(f"learner {name}: its payload is a few scalars per step; codecs.up must be empty (got {exp.codecs.up})")
    if exp.peft.local:
        problems.append(f"learner {name}: peft.local {exp.peft.local} is not supported (the payload has no parameters)")
    if name == "fedbpt" and exp.peft.method != "prompt_tuning":
        problems.append(f"learner fedbpt: tunes a soft prompt; peft.method must be prompt_tuning (got {exp.peft.method})")
    if name == "fedbpt":
        from fedfm.runtime.sampling import clients_per_round

        m = clients_per_round(exp.federation, exp.federation.clients)
        if m < 2:
            problems.append(
                f"federation: learner fedbpt samples {m} client per round; its server CMA-ES takes the sampled clients' "
                "means as its population (population and parents = clients per round), which needs at least 2"
            )
    if name == "fedbpt" and exp.model.task not in FEDBPT_TASKS:
        problems.append(
            f"learner fedbpt: model.task {exp.model.task} is not supported (supported: {', '.join(FEDBPT_TASKS)}): "
            "its loss must skip the logits of the virtual tokens that peft's prompt tuning prepends"
        )
    return problems
