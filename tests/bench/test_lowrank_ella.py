"""benchmarks/lowrank_ella.py: the span posterior of a cached basis, its evidence prior and the goal check."""

import pytest
import torch
from benchmark_scripts import benchmark_module

DTYPE = torch.float64


def _state(n=6, k=3, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    root = torch.randn(k, k, generator=g, dtype=DTYPE)
    return {"curvature": root @ root.T + torch.diag(torch.tensor([5.0, 0.5, 0.0], dtype=DTYPE)),
            "theta_sq": 7.0, **{s: torch.randn(n, k, c, generator=g, dtype=DTYPE) for s in ("val", "test", "ood")}}


def test_span_posterior_is_the_dense_subspace_predictive_and_cuts_rank():
    with benchmark_module("lowrank_ella") as bench:
        state = _state()
        logits = {s: torch.zeros(6, 4, dtype=DTYPE) for s in ("val", "test", "ood")}
        for rank in (2, 3):
            post = bench.SpanPosterior(state, rank, logits, 50)
            features = state["test"][:, :rank]  # J V (N, r, C) on the first r directions
            precision = state["curvature"][:rank, :rank] + 0.3 * torch.eye(rank, dtype=DTYPE)
            expected = features.transpose(1, 2) @ torch.linalg.inv(precision) @ features
            torch.testing.assert_close(post.predictive("test", 0.3).cov, expected, rtol=1e-10, atol=1e-12)


def test_marglik_priors_maximise_the_omitted_and_the_full_evidence():
    with benchmark_module("lowrank_ella") as bench:
        n_params = 50
        post = bench.SpanPosterior(_state(), 3, {s: torch.zeros(6, 4, dtype=DTYPE) for s in ("val", "test", "ood")},
                                   n_params)

        def omitted(d):  # the structure's evidence since issue 17: the complement held at theta*
            return -d / 2 * 7.0 + n_params / 2 * torch.log(d) - 0.5 * torch.log(post.values + d).sum()

        def full(d):
            return -d / 2 * 7.0 - 0.5 * torch.log1p(post.values / d).sum()

        for evidence, delta in ((omitted, post.marglik_prior()), (full, post.marglik_prior(full=True))):
            delta = torch.tensor(delta, dtype=DTYPE)
            for other in (delta * 0.95, delta * 1.05):  # the grid step is 1.2%
                assert evidence(delta) >= evidence(other)
        assert post.marglik_prior() > 5 * post.marglik_prior(full=True)


def test_goal_check_against_the_paper_and_against_laplace_torchs_ella_on_the_same_link():
    with benchmark_module("lowrank_ella") as bench:
        rows = {"map": {"nll": 0.5, "ece": 0.02},
                "lowrank[a,k=20,val,probit]": {"nll": 0.498, "ece": 0.013},
                "lowrank[a,k=20,val,probit_centred]": {"nll": 0.498, "ece": 0.013},
                "lowrank[b,k=20,val,probit]": {"nll": 0.4990, "ece": 0.01},
                "lowrank[c,k=20,val,probit]": {"nll": 0.49, "ece": 0.015},
                "ella_laplace_torch[probit]": {"nll": 0.4985, "ece": 0.014}}
        check = bench.goal_check(rows)
        assert check["gain_needed"] == pytest.approx(0.0009)  # the paper's ELLA gain
        paper = [name for name, c in check["rows"].items() if c["passes"]]
        assert paper == ["lowrank[a,k=20,val,probit]", "lowrank[a,k=20,val,probit_centred]",
                         "lowrank[b,k=20,val,probit]"]  # gain >= 0.0009 and ECE <= 0.67 x 0.02
        versus = {name: c["vs_torch_ella"] for name, c in check["rows"].items()}
        assert versus == {"lowrank[a,k=20,val,probit]": True,  # gain 0.002 >= ELLA's 0.0015, ECE below its 0.014
                          "lowrank[a,k=20,val,probit_centred]": None,  # no ELLA row under that link
                          "lowrank[b,k=20,val,probit]": False,  # gain 0.001 < 0.0015
                          "lowrank[c,k=20,val,probit]": False,  # ECE 0.015 > 0.014
                          "ella_laplace_torch[probit]": None}
