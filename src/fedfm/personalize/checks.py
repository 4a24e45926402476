"""Config-time refusals of the personalization components (``components.combination_problems``)."""

from __future__ import annotations


def personalize_problems(exp) -> list[str]:
    from fedfm.personalize.feddat import feddat_config_problem
    from fedfm.personalize.ifca import ifca_config_problem
    from fedfm.personalize.fedapt import fedapt_config_problem
    from fedfm.personalize.diprompt import diprompt_config_problem
    from fedfm.personalize.fedbfpt import fedbfpt_config_problem

    found = [feddat_config_problem(exp), ifca_config_problem(exp), fedapt_config_problem(exp), diprompt_config_problem(exp), fedbfpt_config_problem(exp)]
    return [p for p in found if p is not None]
