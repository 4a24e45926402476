"""The README's own-CSV example, end to end, on a generated CSV sorted by label.

The YAML is read from the README itself, so the example cannot drift from what runs: the
test only points it at the generated file and swaps the pretrained model for a tiny
random one (1 round, few rows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from conftest import TINY_BERT, invoke

README = Path(__file__).parent.parent / "README.md"


def readme_example() -> dict:
    text = README.read_text()
    section = text[text.index("### Your own CSV"):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)


def reviews_csv(path: Path, shops: int = 8, per_shop: int = 24) -> None:
    """Columns review, sentiment, shop; sorted by sentiment, as many exports are."""
    rng = np.random.default_rng(0)
    good = ["great", "fast", "works", "lovely", "perfect"]
    bad = ["broken", "late", "awful", "useless", "refund"]
    rows = []
    for s in range(shops):
        for i in range(per_shop):
            y = i % 2
            words = " ".join(rng.choice(good if y else bad, size=4))
            rows.append({"review": f"the order was {words}", "sentiment": "good" if y else "bad", "shop": f"shop-{s:02d}"})
    pd.DataFrame(rows).sort_values("sentiment", kind="stable").to_csv(path, index=False)


def test_own_csv_example_describe_run_report(tmp_path, monkeypatch):
    raw = readme_example()
    assert raw["data"]["source"] == "file" and "num_labels" not in raw["model"]
    reviews_csv(tmp_path / "reviews.csv")
    raw["data"]["path"] = str(tmp_path / "reviews.csv")
    cfg = tmp_path / "my_reviews.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    small = [
        "-o", "rounds=1", "-o", "federation.examples_per_client=16", "-o", "federation.test_examples=40",
        "-o", "train.steps=1", "-o", "train.epochs=1", "-o", "runtime.progress=false",
        "-o", "model.init=random", "-o", f"model.config_overrides={json.dumps(TINY_BERT)}",
    ]
    result, text = invoke(monkeypatch, "data", "describe", str(cfg), *small)
    assert result.exit_code == 0, text
    assert "bad -> 0, good -> 1" in text and "model.num_labels 2" in text
    assert "one class only" not in text  # subsample: random on a file sorted by label

    out = tmp_path / "runs" / "reviews"
    result, text = invoke(monkeypatch, "run", str(cfg), *small, "--out", str(out))
    assert result.exit_code == 0, text
    assert "done my-reviews" in text
    assert json.loads((out / "labels.json").read_text())["labels"] == {"bad": 0, "good": 1}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and len(rows[1]["clients"]) == raw["federation"]["clients"]

    result, text = invoke(monkeypatch, "report", str(out))
    assert result.exit_code == 0, text
    assert (out / "report" / "report.html").is_file()
