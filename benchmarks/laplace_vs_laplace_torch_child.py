"""One case of one library in its own process: the child side of benchmarks/laplace_vs_laplace_torch.py.

Not a script: laplace_vs_laplace_torch.py runs itself with ``--child SPEC`` (under RLIMIT_AS and a timeout,
through posthoc.bench.processes.run_limited) and that calls ``child_main(spec)`` here. Each side (posthoc,
laplace-torch) fits, saves, loads, summarises its posterior and gives glm predictive covariances.
"""

from __future__ import annotations

import json
import os
import resource
import time
from typing import Any

# Result statuses of a case.
OK, OOM, TIMEOUT, ERROR, SKIPPED = "ok", "out of memory", "timeout", "error", "not run"


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("can't allocate memory", "cannot allocate memory", "not enough memory",
                                   "bad_alloc", "out of memory", "failed to allocate"))


def write_child_json(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    """Write a spec or a (progress) result for the other side atomically: the parent never reads half a file.

    No fsync: this is written after every predictive batch, inside the timing.
    """
    from posthoc.utils.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str), fsync=False)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


class PosthocSide:
    """posthoc.Laplace."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from posthoc import Laplace

        self.spec = spec
        self.Laplace = Laplace

    def make(self, model):
        return self.Laplace(model, "classification", subset_of_weights=self.spec["subset"],
                            hessian_structure=self.spec["structure"], prior_precision=1.0, progress=False)

    def fit(self, model, loader):
        return self.make(model).fit(loader)

    def save(self, la, path: str) -> None:
        import torch

        torch.save(la.state_dict(), path)

    def load(self, model, path: str):
        import torch

        return self.make(model).load_state_dict(torch.load(path, weights_only=True))

    def summary(self, la) -> dict[str, Any]:
        """Cheap read-outs of the posterior to compare: curvature spectra (kron), posterior variance (diag/full)."""
        out: dict[str, Any] = {}
        if self.spec["structure"] == "kron":
            out["kron_eigenvalues"] = [b.eigenvalues.detach().flatten().sort().values for b in la.structure.blocks]
        if self.spec["structure"] in ("diag", "full"):
            out["posterior_variance"] = la.posterior_variance()
        return out

    def covariance(self, la, x):
        return la.predict(x, pred_type="glm").cov


class LaplaceTorchSide:
    """laplace-torch (``from laplace import Laplace``) with its default GGN backend, CurvlinopsGGN."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from laplace import Laplace
        from laplace.curvature import CurvlinopsGGN

        self.spec = spec
        self.Laplace = Laplace
        self.backend = CurvlinopsGGN

    def make(self, model):
        return self.Laplace(model, "classification", subset_of_weights=self.spec["subset"],
                            hessian_structure=self.spec["structure"], prior_precision=1.0, backend=self.backend)

    def fit(self, model, loader):
        la = self.make(model)
        la.fit(loader)
        return la

    def save(self, la, path: str) -> None:
        import torch

        torch.save(la.state_dict(), path)

    def load(self, model, path: str):
        import torch

        la = self.make(model)
        # laplace-torch's state holds its own classes (e.g. Kron); the file is this run's own, written just before
        la.load_state_dict(torch.load(path, weights_only=False))
        return la

    def summary(self, la) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        if self.spec["structure"] == "kron":
            eigs = []
            for factors in la.H_facs.kfacs:  # [G, A] for a weight, [G] for a bias (laplace-torch's order)
                values = [torch.linalg.eigvalsh(f.double()).clamp_min(0) for f in factors]
                e = values[0] if len(values) == 1 else torch.outer(values[0], values[1])
                eigs.append(e.flatten().sort().values.float())
            out["kron_eigenvalues"] = eigs
        if self.spec["structure"] == "diag":
            out["posterior_variance"] = la.posterior_variance
        if self.spec["structure"] == "full":
            out["posterior_variance"] = la.posterior_covariance.diagonal()
        return out

    def covariance(self, la, x):
        # _glm_predictive_distribution returns (f_mu (B, C), f_var (B, C, C)): the functional covariance.
        return la._glm_predictive_distribution(x)[1]


def child_main(spec: dict[str, Any]) -> None:
    """Run one case of one library; write its result (and progress) to spec['result']."""
    result: dict[str, Any] = {"status": "running", "points_done": 0, "seconds": 0.0,
                              "loadavg_start": os.getloadavg()[0]}
    write_child_json(spec["result"], result)
    try:
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        from posthoc.models import FMNISTCNN

        dtype = getattr(torch, spec["dtype"])
        data = {k: (v.to(dtype) if v.is_floating_point() else v)
                for k, v in torch.load(spec["data"], weights_only=True).items()}
        model = FMNISTCNN()
        model.load_state_dict(torch.load(spec["model"], weights_only=True))
        model = model.to(dtype).eval()
        result["baseline_rss_bytes"] = _maxrss_bytes()
        if spec["lib"] == "map":
            x = data["x_test"]
            t0 = time.perf_counter()
            with torch.no_grad():
                for i in range(0, len(x), spec["batch"]):
                    model(x[i:i + spec["batch"]])
            result.update(seconds=time.perf_counter() - t0, points_done=len(x), status=OK)
            return
        side = PosthocSide(spec) if spec["lib"] == "posthoc" else LaplaceTorchSide(spec)
        result["phase"] = "fit"
        if spec["kind"] == "fit":
            loader = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=spec["fit_batch"],
                                shuffle=False)
            t0 = time.perf_counter()
            la = side.fit(model, loader)
            result["seconds"] = time.perf_counter() - t0
            result["points_done"] = len(data["x_train"])
            result["rss_after_fit_bytes"] = _maxrss_bytes()
            side.save(la, spec["state"])
            torch.save(side.summary(la), spec["summary"])
            result["status"] = OK
            return
        # glm predictive
        if spec.get("state_available"):
            result["phase"] = "load"
            la = side.load(model, spec["state"])
        else:  # the fit case did not finish: fit on a small subset (small batches) to time the predictive anyway
            n = spec["fallback_fit_n"]
            loader = DataLoader(TensorDataset(data["x_train"][:n], data["y_train"][:n]),
                                batch_size=spec["fallback_fit_batch"], shuffle=False)
            t0 = time.perf_counter()
            la = side.fit(model, loader)
            result["fallback_fit"] = {"n": n, "seconds": time.perf_counter() - t0}
        result["rss_before_predict_bytes"] = _maxrss_bytes()
        result["phase"] = "predict"
        x = data["x_test"][: spec.get("n_points")]
        keep, saved = spec["n_compare"], []
        t0 = time.perf_counter()
        for i in range(0, len(x), spec["batch"]):
            cov = side.covariance(la, x[i:i + spec["batch"]])
            if i < keep:
                saved.append(cov.detach()[: keep - i].clone())
            result["points_done"] = min(i + spec["batch"], len(x))
            result["seconds"] = time.perf_counter() - t0
            write_child_json(spec["result"], {**result, "peak_rss_bytes": _maxrss_bytes()})
            if result["seconds"] > spec["budget"] and result["points_done"] < len(x):
                result["extrapolated"] = True
                break
        if saved:
            torch.save(torch.cat(saved), spec["cov"])
        result["status"] = OK
    except BaseException as exc:  # noqa: BLE001 - the parent needs to know whatever happened
        result["status"] = OOM if _is_oom(exc) else ERROR
        result["message"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        if result["status"] == ERROR:
            import traceback

            result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        result["peak_rss_bytes"] = _maxrss_bytes()
        result["loadavg_end"] = os.getloadavg()[0]
        write_child_json(spec["result"], result)
