"""`python -m diffrepro <stage> [...]`: the entry point of every DVC stage, plus `info MODEL`,
`params`, `adm-npz RUN` and `regimes`.

Each stage reads params.yaml itself (only its own section); errors that a user can fix (a full
disk included) are printed as one line and exit with status 2. A stage that succeeds records its
wall time and peak memory in `logs/stages/<profile>/<stage>.json` (benchmarks/ tabulates them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

from diffrepro.errors import OUT_OF_ROOM, DiskFullError, TrainingPaused, UserError
from diffrepro.execution import PAUSED_EXIT_CODE
from diffrepro.paths import STAGE_RECORDS


@contextlib.contextmanager
def stage_record(name: str, records_dir: Path):
    """Write `<records_dir>/<name>.json` (wall seconds, peak RSS) if the block succeeds.

    Peak RSS is the kernel's high-water mark of this process (VmHWM) and of its largest finished
    child (getrusage). Under `accelerate launch` only rank 0 records.
    """
    from diffrepro.atomic import atomic_path

    tic = time.perf_counter()
    yield
    wall = time.perf_counter() - tic
    if int(os.environ.get("RANK", "0")) != 0:
        return
    own = _own_peak_rss()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    record = {"stage": name, "via_dvc": "DVC_STAGE" in os.environ, "wall_seconds": round(wall, 3),
              "peak_rss_bytes": max(own, children), "peak_rss_self_bytes": own,
              "peak_rss_children_bytes": children, "cpus": os.cpu_count()}
    with atomic_path(records_dir / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))


def _own_peak_rss() -> int:
    """This process's resident high-water mark in bytes. /proc's VmHWM, not getrusage: Linux's
    ru_maxrss keeps the high-water mark of the process that forked us (DVC, pytest) across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stage(command: str, module: str, with_run: bool = False):
    def run(args):
        import importlib

        from diffrepro.config import load_params
        from diffrepro.preflight import preflight

        # DVC names the stage it runs (train@dit, figures@speedups, pretrain); by hand: command@run
        target = args.run if with_run else getattr(args, "notebook", None)
        name = os.environ.get("DVC_STAGE") or (f"{command}@{target}" if target else command)
        params = load_params(args.params)
        with stage_record(name, STAGE_RECORDS / params["profile"]):
            preflight(params)
            fn = importlib.import_module(f"diffrepro.stages.{module}").stage
            if target:
                fn(params, target)
            else:
                fn(params)

    return run


STAGES = {  # command: (module of diffrepro.stages whose `stage` it runs, takes a run name, help)
    "download": ("download", False, "fetch or generate the raw data set"),
    "prepare": ("prepare", False, "decode, crop and shard the data set"),
    "autoencoder": ("autoencoder", False, "train the tiny VAE / adopt the SD VAE"),
    "extract-latents": ("extract_latents", False, "encode image + flip moments"),
    "features": ("features", False, "FID network and reference statistics"),
    "train": ("train", True, "train one run"),
    "sample": ("sample", True, "sample one run"),
    "evaluate": ("evaluate", True, "score one run's samples"),
    "speed": ("speed", False, "the speed claims, method and baseline interleaved"),
    "figures": ("figures", False, "execute the notebooks (or one): a PNG each in REPORT_DIR/plots"),
    "report": ("report", False, "write REPORT_DIR/results.md and results.csv"),
}


def _info(args) -> None:
    from diffrepro.models.info import model_info

    kwargs = {"num_classes": args.num_classes, "image_size": args.image_size,
              "num_super_classes": args.num_super_classes}
    print(json.dumps(model_info(args.model, method=args.method,
                                **{k: v for k, v in kwargs.items() if v is not None})))


def _params(args) -> None:
    from diffrepro.profiles import write_params

    write_params(args.profile, args.output)


def _adm_npz(args) -> None:
    from pathlib import Path

    from diffrepro.adm_npz import write_adm_npz
    from diffrepro.paths import adm_samples_npz, samples_dir

    out = Path(args.out) if args.out else adm_samples_npz(args.run)
    print(write_adm_npz(samples_dir(args.run) / "final.npz", out))


def _regimes(args) -> None:
    from diffrepro.config import load_params
    from diffrepro.regimes import main

    main(load_params(args.params))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffrepro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, with_run, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        if with_run:
            p.add_argument("run", help="a run name from params.yaml `runs`")
        if name == "figures":
            p.add_argument("notebook", nargs="?", help="one notebook of notebooks/, no .ipynb (default: every one)")
        p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
        p.set_defaults(func=_stage(name, module, with_run))
    info = sub.add_parser("info", help="params, trainable params and GMACs of a model")
    info.add_argument("model", help="registry name, e.g. DiT-XL/2, DiMR-XL/2R, ddpmpp, sd-v1.4-unet")
    info.add_argument("--method", default=None, help="method whose parameter selection applies")
    info.add_argument("--num-classes", type=int, default=None)
    info.add_argument("--num-super-classes", type=int, default=None)
    info.add_argument("--image-size", type=int, default=None, help="image size in pixels")
    info.set_defaults(func=_info)
    compose = sub.add_parser("params", help="write params.yaml composed from conf/ for a profile")
    compose.add_argument("--profile", default="default", help="a file name in conf/profile/ (no .yaml)")
    compose.add_argument("--output", default="params.yaml")
    compose.set_defaults(func=_params)
    adm = sub.add_parser("adm-npz", help="pack samples/RUN/final.npz as the ADM evaluator's arr_0 .npz")
    adm.add_argument("run", help="a run name whose sample stage has finished")
    adm.add_argument("--out", default=None,
                     help="output .npz (default: checkpoints/RUN_adm_samples.npz, git-ignored)")
    adm.set_defaults(func=_adm_npz)
    regimes = sub.add_parser("regimes", help="where each claim holds: its verdict at every value of a "
                                             "`dvc exp` sweep of its regime variable (REPORT_DIR/regimes.md)")
    regimes.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    regimes.set_defaults(func=_regimes)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        return
    except OSError as err:  # a write outside atomic_path ran out of room: the same one line
        if err.errno not in OUT_OF_ROOM:
            raise
        message = str(DiskFullError(err.filename or "a file", OUT_OF_ROOM[err.errno]))
    except UserError as err:
        message = str(err)
    except TrainingPaused as pause:
        print(f"paused: {pause}", file=sys.stderr)
        sys.exit(PAUSED_EXIT_CODE)
    # Exit only after the except block: the failed stage's frames, and what they hold (accelerator,
    # dvclive, worker threads), are released now, not at interpreter shutdown where they fail noisily.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
