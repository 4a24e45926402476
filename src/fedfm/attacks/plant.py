"""``python -m fedfm.attacks.plant CONFIG [-o key=value ...] [--out DIR]``: plant the
backdoor of a config's ``attack: {name: compromised_base, ...}`` section into the config's
base model (``attacks/compromised_base.py``, compromised base model, Fed-EBD-inspired),
then ``fedfm run CONFIG`` federates honestly from it. Kept out of the attacks package's
imports so that ``python -m`` runs it cleanly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedfm.attacks.compromised_base import CompromisedBaseParams, plant_backdoor


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, plant, print the manifest."""
    import argparse

    import yaml

    from fedfm.config import apply_overrides, from_dict

    ap = argparse.ArgumentParser(description="Plant the backdoor of a config's attack: {name: compromised_base} section into its base model.")
    ap.add_argument("config", type=Path)
    ap.add_argument("-o", "--override", action="append", default=[], help="dotted override, e.g. attack.epochs=2")
    ap.add_argument("--out", type=Path, default=None, help="where to write the planted model (default: attack.checkpoint)")
    args = ap.parse_args(argv)
    raw = apply_overrides(yaml.safe_load(args.config.read_text()), args.override)
    spec = dict(raw.pop("attack", None) or {})
    if spec.pop("name", None) != "compromised_base":
        raise SystemExit(f"{args.config}: needs an attack: {{name: compromised_base, checkpoint: DIR, ...}} section")
    params = CompromisedBaseParams(**spec)
    exp = from_dict(raw, str(args.config))  # the clean base model: the section is not applied
    if exp.runtime.threads is not None:
        torch.set_num_threads(exp.runtime.threads)
    manifest = plant_backdoor(exp, params, args.out)
    print(json.dumps(manifest, indent=2))
    print(f"planted into {args.out or params.checkpoint}; now: fedfm run {args.config}")




if __name__ == "__main__":
    main()
