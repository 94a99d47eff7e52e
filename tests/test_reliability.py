"""Reliability: a full disk costs only the write that failed, the stage chain is deterministic,
and every stage records its wall time and peak memory.

Stages run through the real CLI (`diffrepro.cli.main`), several per process to pay the imports
once: a fresh process runs the smoke chain from scratch, so two of them are two independent runs.
A full disk is simulated by the kernel: a file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ)
makes the write that crosses it fail part-way with EFBIG, as a full disk fails with ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffrepro import atomic
from diffrepro.errors import DiskFullError

ROOT = Path(__file__).resolve().parents[1]
CHAIN = ("download", "prepare", "autoencoder", "extract-latents", "features",
         "train dit", "sample dit", "evaluate dit")
WALL_CLOCK = (("train", "step_seconds"), ("train", "train_seconds"))  # the only timings in metrics
MIB = 1 << 20

# argv: "LIMIT:command args" ...; runs each under a file-size soft limit of LIMIT bytes (0: none),
# then lists every file in the working folder (the state a later stage starts from)
RUNNER = """
import json, resource, sys, time
from pathlib import Path
from diffrepro.cli import main
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
for spec in sys.argv[1:]:
    limit, command = spec.split(":", 1)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit) or hard, hard))
    print(f"=== {command}", file=sys.stderr, flush=True)
    tic, code = time.perf_counter(), 0
    try:
        main(command.split())
    except SystemExit as exit:
        code = exit.code
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    print(f"=== rc={code} seconds={time.perf_counter() - tic}", file=sys.stderr, flush=True)
    files = sorted(str(p) for p in Path().rglob("*") if p.is_file())
    print(f"=== files {json.dumps(files)}", file=sys.stderr, flush=True)
"""


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _start(workdir: Path, *specs: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, *specs], cwd=workdir, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(proc: subprocess.Popen) -> list[dict]:
    """One {rc, seconds, stderr, files} per stage run by RUNNER."""
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    results = []
    for part in err.split("=== ")[1:]:
        if part.startswith("rc="):
            rc, seconds = (field.split("=")[1] for field in part.split()[:2])
            results[-1].update(rc=int(rc), seconds=float(seconds))
        elif part.startswith("files "):
            results[-1]["files"] = json.loads(part.split(" ", 1)[1])
        else:
            results.append({"stderr": part.split("\n", 1)[1] if "\n" in part else ""})
    return results


def _smoke_dir(path: Path) -> Path:
    from diffrepro.profiles import compose

    path.mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(compose("smoke", conf_dir=ROOT / "conf")))
    return path


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> list[Path]:
    """The smoke chain run twice from scratch, by two fresh processes side by side."""
    dirs = [_smoke_dir(tmp_path_factory.mktemp("replicas") / name) for name in ("a", "b")]
    procs = [_start(d, *(f"0:{stage}" for stage in CHAIN)) for d in dirs]
    for proc in procs:
        assert all(r["rc"] == 0 for r in _results(proc))
    return dirs


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_runs_of_the_chain_from_scratch_give_identical_metrics(replicas):
    metrics = [json.loads((d / "metrics" / "smoke" / "dit.json").read_text()) for d in replicas]
    for m in metrics:
        for section, key in WALL_CLOCK:
            assert m[section].pop(key) >= 0
    assert metrics[0] == metrics[1]
    with np.load(replicas[0] / "samples/dit/final.npz") as a, np.load(replicas[1] / "samples/dit/final.npz") as b:
        assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])


def _copy_without(done: Path, dst: Path, *outputs: str) -> Path:
    shutil.copytree(done, dst, ignore=shutil.ignore_patterns("stages", "checkpoints"))
    for output in outputs:
        shutil.rmtree(dst / output)
    return dst


def _left_behind(files: list[str], output: str, stage: str) -> list[str]:
    """Files under the output's final name, temporaries, or a stage record of the failed stage."""
    return [f for f in files if f.startswith(output + "/") or ".tmp-" in f or f == f"logs/stages/smoke/{stage}.json"]


def test_a_full_disk_while_writing_npy_shards_fails_with_one_line_and_a_rerun_works(replicas, tmp_path):
    done = replicas[0]
    work = _copy_without(done, tmp_path / "work", "data/prepared")
    # np.save → ndarray.tofile, which loses the errno; half the largest shard fails part-way
    limit = max(p.stat().st_size for p in (done / "data/prepared").rglob("*.npy")) // 2
    failed, rerun = _results(_start(work, f"{limit}:prepare", "0:prepare"))
    assert failed["rc"] == 2
    line = _one_error_line(failed["stderr"])
    assert line.startswith("error: data/prepared could not be written: a file reached the file-size limit")
    assert line.endswith("Free disk space (or raise the limit) and run the stage again")
    assert _left_behind(failed["files"], "data/prepared", "prepare") == []
    assert rerun["rc"] == 0
    assert _files(work / "data/prepared") == _files(done / "data/prepared")
    assert "logs/stages/smoke/prepare.json" in rerun["files"]


def test_a_full_disk_while_saving_a_checkpoint_fails_with_one_line_and_a_rerun_works(replicas, tmp_path):
    done = replicas[0]
    work = _copy_without(done, tmp_path / "work", "models/dit")
    # torch.save of checkpoints/dit/last.pt (model, EMA, two Adam moments ≈ 4× the weights) fails;
    # the eval_at snapshot written just before it (1× the weights) fits
    limit = 2 * (done / "models/dit/ema.safetensors").stat().st_size
    failed, rerun = _results(_start(work, f"{limit}:train dit", "0:train dit"))
    assert failed["rc"] == 2
    line = _one_error_line(failed["stderr"])
    assert line.startswith("error: checkpoints/dit/last.pt could not be written: a file reached the file-size limit")
    assert _left_behind(failed["files"], "models/dit", "train@dit") == []
    assert "checkpoints/dit/last.pt" not in failed["files"]
    assert rerun["rc"] == 0
    weights = lambda d: {k: v for k, v in _files(d / "models/dit").items() if k.endswith(".safetensors")}  # noqa: E731
    assert weights(work) == weights(done)
    record = json.loads((work / "logs/stages/smoke/train@dit.json").read_text())
    assert record["stage"] == "train@dit" and record["via_dvc"] is False
    assert 0 < record["wall_seconds"] <= rerun["seconds"]


def test_enospc_inside_nested_outputs_names_the_outer_output(tmp_path):
    final = tmp_path / "prepared"
    with pytest.raises(DiskFullError) as caught:
        with atomic.atomic_path(final, is_dir=True) as tmp:
            with atomic.atomic_path(tmp / "train" / "shard.npy") as inner:
                inner.write_bytes(b"partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(inner))
    assert caught.value.path == str(final) and caught.value.reason == "no space left on device"
    assert list(tmp_path.iterdir()) == []


def test_cli_turns_a_disk_full_oserror_outside_outputs_into_one_line(monkeypatch, capsys, tmp_path):
    from diffrepro import cli, profiles

    def full(profile, output):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), output)

    monkeypatch.setattr(profiles, "write_params", full)
    with pytest.raises(SystemExit) as exit:
        cli.main(["params", "--output", str(tmp_path / "params.yaml")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'params.yaml'} could not be written: no space left on device; nothing "
                   "was kept under that name. Free disk space (or raise the limit) and run the stage again\n")


PROBE = """
import json, os, sys, time
from pathlib import Path
import torch
from diffrepro.cli import stage_record
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * page
before = rss()
tic = time.perf_counter()
with stage_record("probe@run", Path(sys.argv[1])):
    held = torch.ones(int(sys.argv[2]) // 4)  # float32, every page written
    time.sleep(0.2)
print(json.dumps({"rss_before": before, "seconds": time.perf_counter() - tic}))
"""


def test_stage_record_peak_memory_covers_a_tensor_allocated_in_the_stage(tmp_path):
    size = 256 * MIB
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(size)], env=_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outside = json.loads(proc.stdout)
    record = json.loads((tmp_path / "probe@run.json").read_text())
    # /proc's resident size before the tensor, plus the tensor: an independent lower bound
    assert record["peak_rss_bytes"] >= outside["rss_before"] + size
    assert record["peak_rss_bytes"] < outside["rss_before"] + size + 256 * MIB
    assert 0.2 <= record["wall_seconds"] <= outside["seconds"]
    assert [p.name for p in tmp_path.iterdir()] == ["probe@run.json"]
