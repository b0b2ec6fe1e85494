"""benchmarks/scalla_authors.py: stopping at a checkpoint, resuming across invocations, and the table."""

import json
import math

import pytest
import torch
from benchmark_scripts import benchmark_module
from torch.utils.data import DataLoader, TensorDataset

from posthoc.models import MLP


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("scalla_authors") as module:
        yield module


def _setup():
    torch.manual_seed(0)
    model = MLP(4, (8,), 3, "tanh", flatten=False).eval()
    g = torch.Generator().manual_seed(1)
    train = DataLoader(TensorDataset(torch.randn(40, 4, generator=g), torch.randint(3, (40,), generator=g)),
                       batch_size=16)
    context = DataLoader(TensorDataset(torch.randn(30, 4, generator=g) + 2.0), batch_size=16)
    return model, train, context


@pytest.mark.parametrize("biased", [False, True])
def test_runs_cut_by_the_time_budget_resume_to_the_uninterrupted_result(bench, tmp_path, biased):
    model, train, context = _setup()
    whole, step, done = bench.train_variant(model, train, context, biased, tmp_path / "whole.pt", math.inf,
                                            steps=30, checkpoint_every=10)
    assert (step, done) == (30, True) and whole.posterior is not None
    reached = []
    for _ in range(3):  # a zero budget stops at the next checkpoint: one invocation per 10 steps
        cut, step, done = bench.train_variant(model, train, context, biased, tmp_path / "cut.pt", 0.0,
                                              steps=30, checkpoint_every=10)
        reached.append((step, done))
        if not done:
            assert cut.posterior is None
            assert bench.posterior_fitted(cut, train).posterior is not None
    assert reached == [(10, False), (20, False), (30, True)]
    for (name, a), b in zip(whole.surrogate.state_dict().items(), cut.surrogate.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = next(iter(train))[0]
    assert torch.equal(whole.predict(x).cov, cut.predict(x).cov)
    # the authors' settings: delta = 1, fresh trunk, their per-step batch
    assert float(cut.prior_precision) == 1.0 and cut.surrogate_init.value == "fresh"
    assert (cut.settings.batch_size, cut.settings.n_probes, cut.settings.objective) == (5, 1, "probes")


def test_table_puts_steps_reached_and_the_papers_figures_beside_ours(bench, tmp_path):
    row = {"accuracy": 0.9, "nll": 0.3, "ece": 0.01, "brier": 0.14, "auroc_variance": 0.7, "auroc_entropy": 0.75,
           "prior_precision": 1.0}
    (tmp_path / "eval-unbiased.json").write_text(json.dumps({**row, "steps_reached": 12_000}))
    rows = bench.table_rows(tmp_path)
    labels = [r["label"] for r in rows]
    assert labels == ["MAP (ours)", "MAP (paper)", "ScaLLA, authors' settings (ours)", "ScaLLA (paper)",
                      "ScaLLA-biased, authors' settings (ours)", "ScaLLA-biased (paper)"]
    meta = {"map": {}, "seed": 0, "steps_total": 1_000_000, "machine": {}, "versions": {}, "date": "d", "git_commit": "c"}
    text = bench.markdown(rows, meta)
    assert "| row | steps reached / 1,000,000 |" in text
    assert "| ScaLLA, authors' settings (ours) | 12,000 | 0.9000 |" in text
    assert "| ScaLLA-biased (paper) | 1,000,000 | 0.9099 | 0.2530 | 0.0084 | 0.1311 | 0.983 |" in text
    assert "| ScaLLA-biased, authors' settings (ours) | — | — |" in text  # not evaluated yet: no numbers made up


def test_cached_evaluation_counts_only_at_its_step(bench, tmp_path):
    path = tmp_path / "eval-biased.json"
    path.write_text(json.dumps({"nll": 0.3, "steps_reached": 4000}))
    assert bench.cached_row(path, 4000)["nll"] == 0.3
    assert bench.cached_row(path, 6000) is None
    assert bench.cached_row(tmp_path / "missing.json") is None


def test_a_fresh_machine_keeps_the_results_rows_and_resumes_from_the_kept_checkpoints(bench, tmp_path):
    results, run_dir, resume = tmp_path / "scalla_authors.json", tmp_path / "run", tmp_path / "resume"
    ours = {"label": "ScaLLA, authors' settings (ours)", "method": "scalla_unbiased_authors", "nll": 0.25,
            "steps_reached": 1_000_000, "finished": True}
    paper = {"label": "ScaLLA (paper)", "nll": 0.2528}
    results.write_text(json.dumps({"meta": {}, "rows": [ours, paper]}))
    assert bench.import_results(results, run_dir) == ["eval-unbiased"]
    assert bench.cached_row(run_dir / "eval-unbiased.json") == {k: v for k, v in ours.items() if k != "label"}
    assert bench.import_results(results, run_dir) == []  # a cached evaluation is never overwritten
    # an unfinished variant's checkpoint and the MAP go to the kept folder, and come back on a fresh machine
    map_path = run_dir / "map.pt"
    map_path.write_bytes(b"map")
    (run_dir / "scalla-biased.pt").write_bytes(b"step 2000")
    bench.keep_resumable(resume, run_dir, map_path, [], ["biased"])
    assert sorted(p.name for p in resume.iterdir()) == ["map.pt", "scalla-biased.pt"]
    fresh = tmp_path / "fresh"
    assert bench.copy_missing(resume, fresh, "*.pt") == ["map.pt", "scalla-biased.pt"]
    assert (fresh / "scalla-biased.pt").read_bytes() == b"step 2000"
    assert bench.copy_missing(resume, fresh, "*.pt") == []  # never over a newer local checkpoint
    # once the variant finishes, its checkpoint and then the MAP leave the kept folder
    bench.keep_resumable(resume, run_dir, map_path, ["biased"], [])
    assert list(resume.iterdir()) == []


def test_our_rows_are_also_scored_by_the_authors_metric_code(bench, tmp_path):
    from types import SimpleNamespace

    model, train, context = _setup()
    s, _, _ = bench.train_variant(model, train, context, False, tmp_path / "s.pt", 0.0, steps=20, checkpoint_every=10)
    g = torch.Generator().manual_seed(2)
    test = TensorDataset(torch.randn(30, 4, generator=g), torch.randint(3, (30,), generator=g))
    row = bench.authors_code_row(s, SimpleNamespace(suite=SimpleNamespace(test=test), train_loader=train))
    assert set(row) == {"accuracy", "nll", "ece", "brier"} and all(math.isfinite(v) for v in row.values())
    assert s.posterior is not None  # a checkpoint's surrogate gets its posterior before it is scored
    cached = {"accuracy": 0.9, "nll": 0.3, "ece": 0.01, "brier": 0.14, "prior_precision": 1.0, "steps_reached": 20,
              "authors_code": row}
    (tmp_path / "eval-unbiased.json").write_text(json.dumps(cached))
    rows = bench.table_rows(tmp_path)
    theirs = next(r for r in rows if r["label"] == "ScaLLA, authors' settings (ours), through the authors' metric code")
    assert theirs["nll"] == row["nll"] and theirs["steps_reached"] == 20
