"""One process of the 2-process `lsa_global` test: assign its half of a batch, save the result.

Usage (launched by tests/test_immiscible.py): torchrun --nproc_per_node 2 this.py INPUT.pt OUT_DIR
INPUT.pt holds the whole batch {"x0", "noise"}; process r keeps rows [r·B, (r+1)·B).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from diffrepro.methods.immiscible import NoiseAssigner


def main(input_path: str, out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    batch = torch.load(input_path, weights_only=True)
    b = batch["x0"].shape[0] // accelerator.num_processes
    rows = slice(accelerator.process_index * b, (accelerator.process_index + 1) * b)
    noise = NoiseAssigner("lsa_global").assign(batch["x0"][rows], batch["noise"][rows], accelerator)
    torch.save({"noise": noise, "num_processes": accelerator.num_processes},
               Path(out_dir) / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroy the gloo group: exiting with it alive can abort (SIGABRT)


if __name__ == "__main__":
    main(*sys.argv[1:])
