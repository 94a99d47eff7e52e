"""`python -m diffrepro.launch <stage> [run]`: run a computing stage on every device of the machine.

dvc.yaml starts `train`, `sample`, `extract-latents` and `features` through this launcher. The
process count is never a tracked param (a stage's DVC hash is the same on 1 or 64 GPUs); it is,
in this order:
1. `DIFFREPRO_NUM_PROCESSES`, if set;
2. accelerate's own config file (`accelerate config`, or `ACCELERATE_CONFIG_FILE`), which also
   carries a multi-node setup (num_machines, machine_rank, main_process_ip/port): then
   `accelerate launch` reads everything from it;
3. every visible CUDA GPU; one process on a CPU-only machine.
One process runs the stage in this interpreter (no second start-up); more go through
`accelerate launch`. A training process that spent its `DIFFREPRO_TRAIN_SECONDS` budget exits
with status 75 through the launcher too (see `diffrepro.execution`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from diffrepro.errors import UserError
from diffrepro.execution import PAUSED_EXIT_CODE, num_processes
from diffrepro.paths import pause_marker


def accelerate_config_file() -> Path | None:
    """The config `accelerate launch` would read by default, if the user wrote one."""
    explicit = os.environ.get("ACCELERATE_CONFIG_FILE")
    if explicit:
        return Path(explicit)
    from accelerate.commands.config.config_args import default_config_file

    path = Path(default_config_file)
    return path if path.exists() else None


def process_count() -> int | None:
    """Processes to start on this machine; None when accelerate's config file decides."""
    requested = num_processes()
    if requested is not None:
        return requested
    if accelerate_config_file() is not None:
        return None
    import torch

    return max(1, torch.cuda.device_count())


def launch_command(args: list[str], processes: int | None) -> list[str]:
    """`accelerate launch -m diffrepro ARGS` for `processes` local processes (None: from the config)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes is not None:
        command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--multi_gpu"]  # on a CPU with ACCELERATE_USE_CPU=1: gloo
    return command + ["-m", "diffrepro", *args]


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        processes = process_count()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if processes == 1:
        from diffrepro.cli import main as run_stage

        run_stage(args)
        return
    import torch

    marker = pause_marker(args[1]) if args[:1] == ["train"] and len(args) > 1 else None
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    code = subprocess.run(launch_command(args, processes), env=env).returncode
    if code and marker is not None and marker.exists():  # the workers paused; torchrun reports a failure
        marker.unlink()
        code = PAUSED_EXIT_CODE
    sys.exit(code)


if __name__ == "__main__":
    main()
