"""Continual learning on permuted-pixel Fashion-MNIST: an MLP kept near earlier tasks by its Laplace posterior.

    .venv/bin/python examples/continual_learning.py            # a few minutes (5 tasks, 4,000 images each)
    .venv/bin/python examples/continual_learning.py --quick    # seconds (2 tasks, 500 images, 1 epoch)

Every task is the shipped Fashion-MNIST subset (``posthoc.data.get_suite("fmnist-embedded")``) with its 784
pixels in a fixed random order of its own (task 1 keeps the original order). A 784-200-200-10 MLP learns the
tasks one after the other. After each task, a diagonal Laplace approximation over all weights
(``posthoc.compat.laplace.Laplace``) is fitted on that task with ``fit(..., override=False)``, so its precision
sums the curvature of every task so far plus the prior precision, which the marginal likelihood tunes once, on
the first task (re-tuning it after every task, with ``prior_mean`` at the previous weights, let it grow from 23
to 244 and gave 0.689 mean accuracy after 5 tasks instead of 0.731: it anchors the weights that the curvature
leaves free too). ``prior_mean`` is still set to the previous task's weights, so that
``la.log_marginal_likelihood()`` is the evidence of the sequential posterior. The
next task is trained on its cross-entropy plus the negative log of that posterior,
(1 / 2N) sum_p Lambda_p (theta_p - theta*_p)^2 (the online Laplace, or EWC, objective). The baseline is plain
fine-tuning (cross-entropy only) from the same start. Printed: test accuracy on every task seen so far.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from example_io import parse_args, write_metrics
from torch.utils.data import DataLoader, TensorDataset

from posthoc.compat.laplace import Laplace
from posthoc.data import get_suite
from posthoc.models import MLP
from posthoc.plots import save_figure


def permuted_tasks(n_tasks: int, n_train: int, n_test: int) -> list[tuple[TensorDataset, TensorDataset]]:
    """(train, test) TensorDatasets of flattened (n, 784) images, one pixel order per task (task 0: the original)."""
    suite = get_suite("fmnist-embedded")
    x_train, y_train = (t[:n_train] for t in suite.train.tensors)
    x_test, y_test = (t[:n_test] for t in suite.test.tensors)
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for task in range(n_tasks):
        order = torch.arange(784) if task == 0 else torch.randperm(784, generator=generator)
        tasks.append((TensorDataset(x_train.flatten(1)[:, order], y_train),
                      TensorDataset(x_test.flatten(1)[:, order], y_test)))
    return tasks


def train_task(model: torch.nn.Module, data: TensorDataset, epochs: int, seed: int,
               anchor: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Adam on the mean cross-entropy, plus (1/2N) sum Lambda (theta - theta*)^2 when ``anchor`` = (Lambda, theta*)."""
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if anchor is not None:
                precision, mean = anchor
                theta = torch.nn.utils.parameters_to_vector(model.parameters())
                loss = loss + 0.5 * (precision * (theta - mean) ** 2).sum() / len(data)
            loss.backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: TensorDataset) -> float:
    """Test accuracy of the network's argmax on ``data``."""
    x, y = data.tensors
    return float((model(x).argmax(-1) == y).double().mean())


def main() -> None:
    """Learn the tasks in turn with the Laplace anchor and with plain fine-tuning; report and plot accuracies."""
    args = parse_args(__doc__.splitlines()[0])
    n_tasks, n_train, n_test, epochs = (2, 500, 300, 1) if args.quick else (5, 4000, 2000, 5)
    tasks = permuted_tasks(n_tasks, n_train, n_test)
    torch.manual_seed(0)
    laplace_model = MLP(784, hidden=(200, 200), out_features=10, activation="relu")
    finetune_model = MLP(784, hidden=(200, 200), out_features=10, activation="relu")
    finetune_model.load_state_dict(laplace_model.state_dict())

    la = Laplace(laplace_model, "classification", subset_of_weights="all", hessian_structure="diag")
    anchor = None
    history: dict[str, list[list[float]]] = {"laplace": [], "finetune": []}
    for task, (train, _) in enumerate(tasks):
        train_task(laplace_model, train, epochs, seed=task, anchor=anchor)
        train_task(finetune_model, train, epochs, seed=task, anchor=None)
        if anchor is not None:
            la.prior_mean = anchor[1]               # the previous task's weights centre the prior in the evidence
        la.fit(DataLoader(train, batch_size=256), override=task == 0)
        if task == 0:
            la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=100)
        anchor = (la.posterior_precision.detach().clone(), la.mean.detach().clone())
        seen = [test for _, test in tasks[: task + 1]]
        history["laplace"].append([accuracy(laplace_model, test) for test in seen])
        history["finetune"].append([accuracy(finetune_model, test) for test in seen])
        print(f"after task {task + 1}: Laplace {history['laplace'][-1]}, fine-tuning {history['finetune'][-1]}, "
              f"prior precision {float(la.prior_precision.mean()):.3g}", flush=True)

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = range(1, n_tasks + 1)
    for key, label in (("laplace", "Laplace prior (diag, online)"), ("finetune", "plain fine-tuning")):
        left.plot(steps, [sum(row) / len(row) for row in history[key]], "o-", label=label)
    left.set(xlabel="tasks learned", ylabel="mean test accuracy over tasks so far", title="Permuted Fashion-MNIST",
             xticks=list(steps))
    left.legend(fontsize=8)
    width = 0.4
    right.bar([t - width / 2 for t in steps], history["laplace"][-1], width, label="Laplace prior")
    right.bar([t + width / 2 for t in steps], history["finetune"][-1], width, label="plain fine-tuning")
    right.set(xlabel="task", ylabel="test accuracy", title=f"After all {n_tasks} tasks", ylim=(0, 1))
    right.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, args.out / "continual_learning.png")

    results = {f"laplace_accuracy_task{t + 1}": value for t, value in enumerate(history["laplace"][-1])}
    results |= {f"finetune_accuracy_task{t + 1}": value for t, value in enumerate(history["finetune"][-1])}
    results["laplace_mean_accuracy"] = sum(history["laplace"][-1]) / n_tasks
    results["finetune_mean_accuracy"] = sum(history["finetune"][-1]) / n_tasks
    results["prior_precision"] = float(la.prior_precision.mean())
    write_metrics(args.out, "continual_learning", results)


if __name__ == "__main__":
    main()
