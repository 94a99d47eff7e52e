"""`download` stage: fetch a real data set (and verify it), or describe the generated default.

The embedded default (`data.dataset: synthetic`) has nothing to download: the stage records the
generator's settings, and `prepare` renders the images. Real data sets go through
`data/download.py` (fetch + verify).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffrepro.atomic import atomic_path


def stage(params: dict) -> None:
    data = params["data"]
    raw_dir = Path(data["raw_dir"])
    if data["dataset"] == "synthetic":
        with atomic_path(raw_dir, is_dir=True) as tmp:
            manifest = {"dataset": "synthetic", "source": "generated locally by "
                        "src/diffrepro/data/synthetic.py; nothing is downloaded",
                        "seed": params["seed"], **data["synthetic"]}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return
    from diffrepro.data import download

    download.download_dataset(data["dataset"], raw_dir)
