"""No paper-scale code path mixes the accelerator's device with the CPU (the `meta` stand-in)."""

from __future__ import annotations

import pytest
import yaml

from diffrepro import device_standin


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    device_standin.smoke_workspace(root)
    return root


def test_every_method_sampler_and_stage_batch_stays_on_the_device(workspace):
    rows = device_standin.run_harness(workspace)
    failed = [f"{r['check']}: {r['detail']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    names = " ".join(r["check"] for r in rows)
    for item in [*device_standin.METHOD_RUNS, "lsa", "lsa_global", "knn", "micro-batches",
                 *device_standin.GAUSSIAN_SAMPLERS, "heun", "latent extraction", "judge", "inception"]:
        assert item in names


def test_the_stand_in_catches_a_schedule_lookup_through_the_host(workspace, monkeypatch):
    def host_lookup(self, table, t, like):  # the lookup before this harness existed: a host sync per step
        return table[t.cpu()].to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))

    monkeypatch.setattr("diffrepro.diffusion.gaussian.GaussianDiffusion._gather", host_lookup)
    monkeypatch.chdir(workspace)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    with pytest.raises(NotImplementedError, match="meta"):
        device_standin.check_training_step(params, "dit")


def test_the_stand_in_catches_an_ema_left_on_the_host(workspace, monkeypatch):
    from diffrepro.training import RunEma

    monkeypatch.setattr(RunEma, "to", lambda self, device: self)  # the EMA never follows the network
    monkeypatch.chdir(workspace)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    with pytest.raises(RuntimeError, match="device"):
        device_standin.check_training_step(params, "dit")
