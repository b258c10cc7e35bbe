"""W&B runs -> results rows: the same schema as results.csv, the default cell shared across axes."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from analysis.load import COLUMNS, normalize
from analysis.stats import default_arm
from analysis.wandb_rows import select, wandb_rows

AXIS_KEYS = {"embedding": ["codec.type"], "attention": ["model.attention"]}


def _run(run_id: str, axis: str, seed: int, ap: float, state: str = "finished", **config) -> SimpleNamespace:
    resolved = {"seed": {"value": seed}, "codec": {"type": "pca", "dim": 60}, "model": {"attention": "self+dynamic"}}
    for dotted, value in config.items():
        section, key = dotted.split("__")
        resolved[section] = {**resolved[section], key: value}
    summary = {"segm_AP": ap, "bbox_AP": ap + 5, "steps": 60, "_runtime": 12.5, "img_per_s": 20.0}
    return SimpleNamespace(id=run_id, group=f"{axis}-demo", job_type=axis, state=state, config=resolved,
                           summary=summary)  # fmt: skip


def test_rows_have_the_results_schema_and_arms_from_the_axis_keys() -> None:
    runs = [
        _run("a0", "embedding", 0, 10.0),
        _run("a1", "embedding", 0, 8.0, codec__type="dct"),
        _run("b1", "attention", 0, 7.0, model__attention="self"),
        _run("crash", "attention", 1, 0.0, state="crashed", model__attention="self"),
        _run("other", "not-an-axis", 0, 1.0),
    ]
    df = normalize(pd.DataFrame(wandb_rows(runs, AXIS_KEYS)))
    assert list(df.columns) == COLUMNS
    emb = df[df["axis"] == "embedding"].set_index("arm")
    assert emb.loc["dct", "segm_AP"] == 8.0 and emb.loc["pca", "codec_dim"] == 60
    assert emb.loc["pca", "seed"] == 0 and emb.loc["pca", "wall_s"] == 12.5  # {"value": ...} config unwrapped
    attention = df[df["axis"] == "attention"]
    # the default cell, logged once under embedding, is also the attention axis's default arm
    shared = attention[attention["arm"] == "self+dynamic"]
    assert list(shared["wandb_run_id"]) == ["a0"] and default_arm(df, "attention")[0] == "self+dynamic"
    assert set(attention["status"]) == {"complete", "crashed"}
    assert "not-an-axis" not in set(df["axis"])


def test_own_default_run_is_not_duplicated_by_sharing() -> None:
    runs = [_run("a0", "embedding", 0, 10.0), _run("b0", "attention", 0, 11.0)]
    df = pd.DataFrame(wandb_rows(runs, AXIS_KEYS))
    assert sorted(df.loc[df["axis"] == "attention", "wandb_run_id"]) == ["b0"]
    assert sorted(df.loc[df["axis"] == "embedding", "wandb_run_id"]) == ["a0"]


def test_select_dotted_keys() -> None:
    assert select({"a": {"b": 3}}, "a.b") == 3
    assert select({"a": {"b": 3}}, "a.c") is None and select({"a": 1}, "a.b") is None
