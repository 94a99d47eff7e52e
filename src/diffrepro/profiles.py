"""Profiles: conf/base.yaml + conf/profile/<name>.yaml, composed into params.yaml.

`dvc exp run -S profile=<name>` does this composition itself (DVC's Hydra support); this module
does the same for `python -m diffrepro params --profile <name>` (write params.yaml without
running anything) and for the test that keeps the committed params.yaml equal to the default.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from diffrepro.atomic import atomic_path
from diffrepro.config import validate
from diffrepro.errors import UserError
from diffrepro.paths import CONF_DIR
from diffrepro.replicates import register



def profile_names(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "profile").glob("*.yaml"))


def compose(profile: str = "default", overrides: tuple[str, ...] = (), conf_dir: Path = CONF_DIR) -> dict:
    """The params of `profile` (plus Hydra-style `key=value` overrides), validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    if profile not in profile_names(conf_dir):
        raise UserError(f"unknown profile {profile!r}; profiles: {', '.join(profile_names(conf_dir))}")
    register()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        cfg = hydra_compose("config", overrides=[f"profile={profile}", *overrides])
    return validate(OmegaConf.to_container(cfg, resolve=True), f"conf/profile/{profile}.yaml")


def write_params(profile: str, path: str | Path = "params.yaml") -> None:
    params = compose(profile)
    with atomic_path(path) as tmp:
        tmp.write_text(f"# Composed from conf/ for profile `{profile}`: edit conf/, then run\n"
                       f"# `python -m diffrepro params --profile {profile}` (or `dvc exp run -S profile={profile}`).\n"
                       + yaml.safe_dump(params, sort_keys=False))
