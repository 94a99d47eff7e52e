"""Tests that edit a composed params dict by hand regenerate its per-seed sections, as composition would."""

from diffrepro.replicates import expand


def recompose(params: dict) -> dict:
    """`train_runs` / `sample_runs` from the (edited) `runs`, in place; returns params."""
    params["train_runs"], params["sample_runs"] = expand(params["runs"])
    return params
