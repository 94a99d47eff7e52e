"""Immiscible Diffusion's noise assignment: optimal, a permutation, global across processes; KNN."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from diffrepro.errors import UserError
from diffrepro.methods.immiscible import (ASSIGNERS, knn_select, lsa_permutation, make_assigner,
                                          mean_pair_distance, norm_bias, pair_cost)

EVERYTHING = slice(None)  # one process holds the whole batch


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assigned(mode, x0, seed, **options):
    """One process's noise for x0 by `mode`, drawn as the training loop draws it (one generator)."""
    assigner = make_assigner(mode, **options)
    gen = torch.Generator().manual_seed(seed)
    return assigner.assign(x0, assigner.draw(x0.shape, EVERYTHING, gen, gen), EVERYTHING)


def brute_force_min(cost: np.ndarray) -> float:
    n = len(cost)
    perms = np.array(list(itertools.permutations(range(n))))
    return cost[np.arange(n), perms].sum(1).min()


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5, 7])
def test_assignment_reaches_the_brute_force_optimum(n, squared):
    x0, noise = randn(n, 3, 2, 2, seed=n), randn(n, 3, 2, 2, seed=100 + n)
    perm = lsa_permutation(pair_cost(x0, noise, quantize_fp16=False, squared=squared))
    # independent cost: pairwise differences in float64, not the matmul form
    dist = torch.cdist(x0.flatten(1).double(), noise.flatten(1).double())
    cost = (dist.square() if squared else dist).numpy()
    assert cost[np.arange(n), perm.numpy()].sum() == pytest.approx(brute_force_min(cost), rel=1e-6)


@pytest.mark.parametrize("quantize", [True, False])
def test_reduced_solve_reaches_scipys_optimum_on_the_raw_cost_at_batch_1024(quantize):
    # lsa_permutation subtracts row and column minima first; the optimum must not move, also with
    # the many ties of fp16-quantised costs. Reference: scipy on the unreduced float64 matrix.
    from scipy.optimize import linear_sum_assignment

    cost = pair_cost(randn(1024, 4, 8, 8, seed=20), randn(1024, 4, 8, 8, seed=21), quantize_fp16=quantize)
    raw = cost.double().numpy()
    rows, cols = linear_sum_assignment(raw)
    perm = lsa_permutation(cost).numpy()
    assert sorted(perm) == list(range(1024))
    assert raw[np.arange(1024), perm].sum() == pytest.approx(raw[rows, cols].sum(), rel=1e-12, abs=0)


def test_assigned_noise_is_a_permutation_of_the_drawn_noise_and_images_are_untouched():
    x0 = randn(16, 4, 4, 4, seed=0)
    x0_before = x0.clone()
    drawn = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    paired = assigned("lsa", x0, seed=7)
    equal = (paired.flatten(1)[:, None] == drawn.flatten(1)[None]).all(-1)  # (16, 16)
    assert (equal.sum(0) == 1).all() and (equal.sum(1) == 1).all()
    assert not torch.equal(paired, drawn)  # the pairing did change
    assert torch.equal(x0, x0_before)
    assert norm_bias(paired) == pytest.approx(norm_bias(drawn), abs=1e-12)


def test_lsa_cuts_the_mean_distance_by_about_two_percent_at_sd_latent_size():
    # docs/papers/immiscible.md §3 (measured): B=128, D=4096 Gaussian stand-ins → the summed distance drops ~2.0 %
    x0 = randn(128, 4, 32, 32, seed=1)
    noise = randn(128, 4, 32, 32, seed=2)
    paired = make_assigner("lsa", quantize_fp16=False).assign(x0, noise, EVERYTHING)
    cut = 1 - mean_pair_distance(x0, paired) / mean_pair_distance(x0, noise)
    assert 0.015 < cut < 0.025


def test_quantised_cost_is_the_fp16_distance_of_the_0_1_scaled_inputs():
    x0, noise = randn(6, 4, 16, 16, seed=16), randn(9, 4, 16, 16, seed=17)
    cost = pair_cost(x0, noise)
    scaled = [(0.1 * t.flatten(1)).half().double() for t in (x0, noise)]
    independent = torch.cdist(*scaled)
    assert torch.equal(cost.half().float(), cost)  # values are fp16 numbers
    assert torch.allclose(cost.double(), independent, rtol=2 ** -10, atol=0)  # within one fp16 step


def test_fp16_quantisation_changes_nothing_on_well_separated_inputs():
    noise = randn(32, 4, 8, 8, seed=3)
    target = torch.randperm(32, generator=torch.Generator().manual_seed(4))
    x0 = noise[target] + 0.05 * randn(32, 4, 8, 8, seed=5)  # image i sits next to noise target[i]
    for quantize in (True, False):
        assert torch.equal(lsa_permutation(pair_cost(x0, noise, quantize_fp16=quantize)), target)
    # at SD latent scale (D = 4096, |x| up to ~5) the fp16 path neither overflows nor collapses
    big = 5 * randn(8, 4, 32, 32, seed=6)
    assert torch.isfinite(pair_cost(big, big)).all()
    assert torch.equal(lsa_permutation(pair_cost(big, big)), torch.arange(8))


def test_global_assignment_pairs_across_what_per_process_assignment_cannot():
    b = 6
    noise = randn(2 * b, 3, 4, 4, seed=8)
    # process 0's images lie near process 1's noises and vice versa: per-process matching cannot
    # pair them, the global one (what every process solves on the global batch) must
    x0 = torch.cat([noise[b:], noise[:b]]) + 0.3 * randn(2 * b, 3, 4, 4, seed=9)
    processes = (slice(0, b), slice(b, 2 * b))
    global_lsa, local_lsa = make_assigner("lsa_global"), make_assigner("lsa")
    paired = torch.cat([global_lsa.assign(x0, noise, part) for part in processes])
    assert torch.equal(paired, torch.cat([noise[b:], noise[:b]]))
    per_process = torch.cat([local_lsa.assign(x0, noise, part) for part in processes])
    assert not torch.equal(paired, per_process)


@pytest.mark.parametrize("mode", ["none", "knn"])
def test_knn_with_one_candidate_is_plain_sampling(mode):
    x0 = randn(5, 4, 8, 8, seed=10)
    plain = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    drawn = assigned(mode, x0, seed=11, **({"k": 1} if mode == "knn" else {}))
    assert torch.equal(drawn, plain)


def test_knn_keeps_the_nearest_of_k_candidates():
    x0, k = randn(6, 2, 4, 4, seed=12), 9
    candidates = torch.randn((6, k, 2, 4, 4), generator=torch.Generator().manual_seed(13))
    kept = assigned("knn", x0, seed=13, k=k, quantize_fp16=False)
    dist = (candidates.flatten(2).double() - x0.flatten(1).double()[:, None]).norm(dim=-1)
    assert torch.equal(kept, candidates[torch.arange(6), dist.argmin(1)])
    assert torch.equal(knn_select(x0, candidates, quantize_fp16=False), kept)


def test_knn_biases_the_noise_norm_low_and_lsa_does_not():
    # ‖x − ε‖² = ‖x‖² + ‖ε‖² − 2x·ε: with x, ε ~ N(0, I_d) the selected Z = ‖ε‖² − 2x·ε (variance
    # 6d) is the minimum of k; ‖ε‖² − d has correlation 1/√3 with Z, so, to Gaussian order, the kept
    # ‖ε‖²/d − 1 ≈ −√(2/(3d)) · E[max of k standard normals] (= 2.3437 for k = 64).
    d, k = 1024, 64
    x0 = randn(256, 4, 16, 16, seed=14)
    expected = -math.sqrt(2 / (3 * d)) * 2.3437
    knn = assigned("knn", x0, seed=15, k=k)
    plain = assigned("none", x0, seed=15)
    lsa = assigned("lsa", x0, seed=15)
    assert norm_bias(knn) < -0.03  # the standard error of the mean is ~0.003
    assert norm_bias(knn) == pytest.approx(expected, abs=0.015)
    assert abs(norm_bias(plain)) < 0.012
    assert norm_bias(lsa) == pytest.approx(norm_bias(plain), abs=1e-12)


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="lsa_global"):
        make_assigner("hungarian")
    with pytest.raises(UserError, match="k >= 1"):
        make_assigner("knn", k=0)


def test_every_configurable_mode_splits_over_two_processes_as_its_definition_says():
    from diffrepro.schema import CHOICES

    assert set(CHOICES["assignment"]) == set(ASSIGNERS)
    b, k = 6, 5
    x0 = randn(2 * b, 3, 4, 4, seed=30)
    processes = (slice(0, b), slice(b, 2 * b))
    batch = torch.randn(x0.shape, generator=torch.Generator().manual_seed(31))  # the step's global noise
    for mode in CHOICES["assignment"]:
        assigner = make_assigner(mode, **({"k": k} if mode == "knn" else {}))
        own = [torch.Generator().manual_seed(40 + rank) for rank in range(2)]
        drawn = [assigner.draw(x0.shape, part, torch.Generator().manual_seed(31), gen)
                 for part, gen in zip(processes, own)]
        noise = [assigner.assign(x0, d, part) for d, part in zip(drawn, processes)]
        assert all(n.shape == (b, 3, 4, 4) for n in noise), mode
        if mode == "knn":  # each process keeps, per image, one of its own k candidates
            for d, n in zip(drawn, noise):
                assert d.shape == (b, k, 3, 4, 4)
                assert ((d == n[:, None]).flatten(2).all(-1).sum(1) >= 1).all()
            continue
        assert all(torch.equal(d, batch) for d in drawn), mode  # every process draws the global batch
        whole = torch.cat(noise)
        if mode == "none":
            assert torch.equal(whole, batch)
        elif mode == "lsa":
            assert all(torch.equal(n, make_assigner("lsa").pair(x0[part], batch[part]))
                       for n, part in zip(noise, processes))
        else:  # lsa_global: the slices of the one global pairing
            assert torch.equal(whole, make_assigner("lsa").pair(x0, batch))
