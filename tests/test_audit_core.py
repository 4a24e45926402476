"""New-user audit of the federated core (FedAvg, FedProx, FedDyn, SCAFFOLD, the server
optimizers) and the PEFT tuners: odd and out-of-range input fails before training with
the config field named, and the papers' update rules hold on hand-checked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_config
from fedfm.config import ConfigError, from_dict


# -- non-finite hyperparameters -------------------------------------------------------

@pytest.mark.parametrize(
    "section,spec,field",
    [
        ("server_optimizer", {"name": "sgd", "lr": math.inf}, "server_optimizer.lr"),
        ("server_optimizer", {"name": "fedavgm", "lr": math.inf}, "server_optimizer.lr"),
        ("server_optimizer", {"name": "fedadam", "lr": math.inf}, "server_optimizer.lr"),
        ("server_optimizer", {"name": "fedyogi", "tau": math.inf}, "server_optimizer.tau"),
        ("server_optimizer", {"name": "fedadagrad", "lr": math.nan}, "server_optimizer.lr"),
        ("learner", {"name": "fedprox", "mu": math.inf}, "learner.mu"),
        ("learner", {"name": "feddyn", "alpha": math.inf}, "learner.alpha"),
        ("peft", {"method": "lora", "alpha": math.inf}, "peft.alpha"),
        ("peft", {"method": "ffa_lora", "alpha": math.inf}, "peft.alpha"),
        ("peft", {"method": "adapter", "init_std": math.inf}, "peft.init_std"),
    ],
)
def test_infinite_hyperparameters_are_refused_naming_the_field(tmp_path, section, spec, field):
    # inf passed `gt=0`: a server lr of inf made the global model NaN after round 1 and
    # every later update was rejected; mu or alpha inf made every client's update NaN.
    raw = tiny_config(tmp_path)
    raw[section] = spec
    with pytest.raises(ConfigError, match=rf"{field}: Input should be a finite number"):
        from_dict(raw)
