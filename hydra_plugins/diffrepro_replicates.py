"""Installs the resolvers conf/base.yaml uses (one entry per run and seed) into DVC's Hydra.

`dvc exp run -S ...` composes params.yaml from conf/ in DVC's own process, which imports every
module of the `hydra_plugins` package found at the repository root (the `hydra.plugins_path`
default); the expansion itself lives in src/diffrepro/replicates.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffrepro.replicates import register  # noqa: E402

register()
