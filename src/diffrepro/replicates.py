"""Declared runs → the per-seed entries DVC iterates.

A run is declared once in `runs.<run>` (a recipe from conf/run/, the profile's overrides and a
list of `seeds`). The composition expands it into one entry per seed, split by what depends on
it: `train_runs.<key>` holds what training reads, `sample_runs.<key>` the sampling params, so a
change of, say, `guidance_scale` resamples and rescores without retraining. The first seed keeps
the run's name, every other seed `s` is `<run>_seed<s>`.

conf/base.yaml calls the expansion through two OmegaConf resolvers; `register()` installs them
(hydra_plugins/ does it for `dvc exp run`, profiles.py for `python -m diffrepro params`).
"""

from __future__ import annotations

SAMPLING_KEYS = ("sampler", "sample_steps", "guidance_scale", "guidance_schedule", "guidance_power",
                 "guided_channels")


def replicate_name(run: str, seeds: list[int], seed: int) -> str:
    return run if seed == seeds[0] else f"{run}_seed{seed}"


def expand(runs: dict) -> tuple[dict, dict]:
    """(train_runs, sample_runs) of the declared `runs`; keys in declaration order, seeds in list order."""
    train_runs: dict[str, dict] = {}
    sample_runs: dict[str, dict] = {}
    for run, cfg in runs.items():
        seeds = cfg.get("seeds") or [0]
        for seed in seeds:
            key = replicate_name(run, seeds, seed)
            train_runs[key] = {k: v for k, v in cfg.items() if k not in SAMPLING_KEYS and k != "seeds"}
            train_runs[key]["seed"] = seed
            sample_runs[key] = {k: cfg[k] for k in SAMPLING_KEYS if k in cfg}
    return train_runs, sample_runs


def register() -> None:
    """Install `${diffrepro.train_runs:${runs}}` and `${diffrepro.sample_runs:${runs}}`."""
    from omegaconf import OmegaConf

    def part(index: int):
        def resolve(runs):  # a config node in, a config node out (DVC resolves params.yaml in place)
            return OmegaConf.create(expand(OmegaConf.to_container(runs, resolve=True))[index])
        return resolve

    OmegaConf.register_new_resolver("diffrepro.train_runs", part(0), replace=True)
    OmegaConf.register_new_resolver("diffrepro.sample_runs", part(1), replace=True)
