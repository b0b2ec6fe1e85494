"""Moment propagation through a model's torch.fx graph: how :class:`posthoc.streamlined.Streamlined` walks any model.

The model is traced once (in eval mode, so ``self.training`` branches are those of prediction) with every module
that has a rule in :data:`posthoc.streamlined.rules.RULES` kept as a leaf (Linear, Conv2d, norms, activations,
pooling, posthoc's own residual / attention blocks, a user's registered module); everything else is traced into
its ``call_function`` / ``call_method`` nodes, which the op rules of :mod:`posthoc.streamlined.rules.ops` handle
(residual adds, scaling, re-indexing, reductions, functional activations, pooling, dropout) and
:mod:`posthoc.streamlined.rules.attention` (matmul, softmax, scaled_dot_product_attention, split). Ops whose arguments
are all deterministic (index arithmetic, shape queries, a fixed table) run on the means, no rule needed.

Full mode carries the cross-covariances between live activations (:mod:`posthoc.streamlined.joint`), so residual
joins keep the branch/skip covariance. Weight noise enters only through leaf modules: a random parameter read elsewhere (a ``get_attr`` node) or a module
with random weights called twice (its two calls' noise is one draw) is refused. torch.fx first: it keeps the module
boundaries the rules are written for and needs no example inputs. Forwards it cannot trace (Hugging Face models) go
through torch.export, whose aten graph :mod:`posthoc.streamlined.exported` folds back into module calls and walks
with :func:`propagate_traced` (``Streamlined(graph=...)``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections import ChainMap, Counter
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import fx, nn

from posthoc.streamlined.joint import JointCovariances, cat_parts, join, stack_operands
from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules import Context, UnsupportedLayerError
from posthoc.streamlined.rules.attention import joint_operands, linearised_joint
from posthoc.streamlined.rules.base import AttentionRule, find_rule, rule_key
from posthoc.streamlined.rules.multihead import fold_multihead_calls
from posthoc.streamlined.rules.ops import ADDS, SUBS, UnsupportedOpError, _apply, is_random
from posthoc.streamlined.walk import unsupported_module

# Readers that take some arguments as means only: scaled_dot_product_attention computes its weights from the means
# of the query and key (the paper's rule), so their variances are never read. (target -> positions, keywords)
MEAN_ONLY_ARGUMENTS: dict[Any, tuple[tuple[int, ...], tuple[str, ...]]] = {
    torch.nn.functional.scaled_dot_product_attention: ((0, 1), ("query", "key")),
    torch.ops.aten.scaled_dot_product_attention.default: ((0, 1), ("query", "key")),
}


class _RuleLeafTracer(fx.Tracer):
    """Keeps every module with a rule, and torch.nn's own childless layers, as ``call_module`` nodes.

    A torch.nn layer without a rule and without submodules (e.g. Softplus) stays a leaf so that the error names the
    layer. torch.nn's composite modules without a rule (e.g. TransformerEncoderLayer) are traced into like a user's
    own: their parts have rules, and a forward fx cannot trace fails the trace, so ``graph="auto"`` walks the
    torch.export graph instead.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if find_rule(type(m)) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name) and next(m.children(), None) is None


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` (call in eval mode) into a GraphModule sharing its modules and parameters.

    Raises ValueError naming the fix when torch.fx cannot trace the forward (data-dependent control flow).
    Cost: one symbolic pass over the forward, no tensor computation.
    """
    try:
        graph = _RuleLeafTracer().trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError... for untraceable forwards
        raise ValueError(f"torch.fx could not trace {type(model).__name__} ({type(err).__name__}: {err}); register a "
                         "rule for the module whose forward does not trace (posthoc.streamlined.register_rule), so "
                         "it stays one leaf") from err
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if not placeholders:
        raise ValueError(f"{type(model).__name__}.forward takes no input")
    fold_multihead_calls(graph, model)  # nn.MultiheadAttention's node becomes its output (several inputs, a tuple)
    return fx.GraphModule(model, graph, class_name=type(model).__name__)  # the root's name, for error messages


def _load(value: Any, env: Mapping[fx.Node, Any]) -> Any:
    return fx.node.map_arg(value, lambda node: env[node])


def _means(value: Any) -> Any:
    if isinstance(value, Moments):
        return value.mean
    if isinstance(value, (list, tuple)):
        return type(value)(_means(v) for v in value)
    if isinstance(value, dict):
        return {k: _means(v) for k, v in value.items()}
    return value


def _any_random(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_any_random(v) for v in value)
    if isinstance(value, dict):
        return any(_any_random(v) for v in value.values())
    return is_random(value)


def _any_moments(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_any_moments(v) for v in value)
    if isinstance(value, dict):
        return any(_any_moments(v) for v in value.values())
    return isinstance(value, Moments)


def _has_random_weights(module: nn.Module, ctx: Context) -> bool:
    return any(ctx.posterior.get(m) is not None for m in module.modules())


def _check_attribute(graph_module: fx.GraphModule, node: fx.Node, ctx: Context) -> None:
    owner_name, _, attr = str(node.target).rpartition(".")
    owner = graph_module.get_submodule(owner_name)
    post = ctx.posterior.layers.get(owner_name)  # by name: the GraphModule stands in for the model's root
    if post is not None and post.is_random(attr):
        raise UnsupportedLayerError(
            f"the random parameter {node.target} is read by an op outside its module's rule (node {node.name}); "
            f"weight noise enters through modules with rules only: register a rule for {type(owner).__name__} "
            "(posthoc.streamlined.register_rule) so it stays a leaf")


def _unsupported(node: fx.Node) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"no moment-propagation rule for the op {rule_key(node.target)!r} (node {node.name!r}: {node.format_node()}) "
        "on a random activation; register one with posthoc.streamlined.register_rule"
        f"({node.target!r}) as rule(op, args, kwargs, ctx) -> Moments, or register a rule for the module "
        "that contains it")


# The forward's arguments as the traced walk takes them: (positional, keyword), each value Moments or a plain
# (deterministic) tensor, a tuple/list or a dict of them.
TracedInputs = tuple[tuple, dict[str, Any]]


def _output_of(value: Any) -> Any:
    """The output in a forward's return value: itself, a tuple/list's first element, or a mapping's ``"logits"``.

    The same reading as :class:`posthoc.network.inputs.ModelCall`'s.
    """
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    if isinstance(value, Mapping) and "logits" in value:
        return value["logits"]
    return value


def _placeholder_values(graph: fx.Graph, state: Moments | TracedInputs) -> Iterator[tuple[fx.Node, Any]]:
    """Each placeholder of the graph with the value the call gives it: positional, then by name, then the default.

    Raises ValueError for a ``*args``/``**kwargs`` forward or an input the call does not give.
    """
    positional, keywords = ((state,), {}) if isinstance(state, Moments) else state
    index = 0
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target)
        if name.startswith("*"):
            raise ValueError(f"the model's forward takes {name}; Streamlined traces forwards with named inputs only: "
                             "wrap the model in a module whose forward names its inputs")
        if index < len(positional):
            yield node, positional[index]
            index += 1
        elif name in keywords:
            yield node, keywords[name]
        elif node.args:
            yield node, node.args[0]  # the argument's default value
        elif len(positional) == 1 and not keywords and isinstance(state, Moments):
            raise ValueError(f"the model's forward takes a second input {name!r}; give x as a dict of the inputs "
                             "by name (or a tuple the forward takes as one argument)")
        else:
            raise ValueError(f"the model's forward needs the input {name!r}, which x does not give")


def _reachable(returned: Any, inputs_of: Callable[[fx.Node], list[fx.Node]]) -> set[fx.Node]:
    """The nodes reached from the nodes in ``returned`` by following ``inputs_of`` backwards. O(graph)."""
    stack: list[fx.Node] = []
    fx.node.map_arg(returned, stack.append)
    reached: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node not in reached:
            reached.add(node)
            stack.extend(inputs_of(node))
    return reached


def _needed(returned: Any) -> set[fx.Node]:
    """The nodes the read output depends on: the others (an auxiliary loss, a second head) are not propagated."""
    return _reachable(returned, lambda node: node.all_input_nodes)


def _variance_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs whose variances the node's output variance depends on: all but those read as means only."""
    skipped = MEAN_ONLY_ARGUMENTS.get(node.target) if node.op == "call_function" else None
    if skipped is None:
        return node.all_input_nodes
    positions, keywords = skipped
    inputs: list[fx.Node] = []
    for i, arg in enumerate(node.args):
        if i not in positions:
            fx.node.map_arg(arg, inputs.append)
    for name, arg in node.kwargs.items():
        if name not in keywords:
            fx.node.map_arg(arg, inputs.append)
    return inputs


def variance_needed(returned: Any) -> set[fx.Node]:
    """The nodes whose variances reach the read output; the others (e.g. BERT's Q and K projections) are mean-only.

    A node is in the set when the output reads it, or when a node in the set reads its variance (every input of
    a node except those in :data:`MEAN_ONLY_ARGUMENTS`). Diagonal mode runs a node outside the set on the means
    of its inputs with the weights at their means: the mean is the same, and the variance pass nobody reads is
    skipped (for BERT-base two of the six Linear layers per block). Cost: one pass over the graph.
    """
    return _reachable(returned, _variance_inputs)


def _without_variance(value: Any) -> Any:
    """The value with every Moments replaced by its mean as a deterministic activation (Moments without variance)."""
    if isinstance(value, Moments):
        return Moments(value.mean)
    if isinstance(value, (list, tuple)):
        return type(value)(_without_variance(v) for v in value)
    if isinstance(value, dict):
        return {k: _without_variance(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class _GraphPlan:
    """What the walk reads of a graph's structure (:func:`_plan`): the output, the nodes it needs, who reads what."""

    nodes: tuple[fx.Node, ...]
    returned: Any
    needed: set[fx.Node]
    calls: Counter
    last_reader: dict[fx.Node, fx.Node]
    with_variance: set[fx.Node]
    modules: dict[fx.Node, nn.Module]


PLAN_ATTRIBUTE = "_posthoc_walk_plan"


def _plan(graph_module: fx.GraphModule) -> _GraphPlan:
    """The graph's plan, built once per structure (its node sequence), not on every prediction. O(graph) to check.

    Kept on the graph module itself, so it lives and dies with it (the plan's nodes reference their graph and
    so the module: a module-level cache keyed on the module would keep every module walked alive).
    """
    graph = graph_module.graph
    nodes = tuple(graph.nodes)
    cached = getattr(graph_module, PLAN_ATTRIBUTE, None)
    if cached is not None and len(cached.nodes) == len(nodes) and all(a is b for a, b in zip(cached.nodes, nodes,
                                                                                              strict=True)):
        return cached
    output = next(node for node in nodes if node.op == "output")
    returned = _output_of(output.args[0])
    needed = _needed(returned)
    plan = _GraphPlan(
        nodes, returned, needed,
        Counter(node.target for node in nodes if node.op == "call_module" and node in needed),
        {arg: node for node in nodes for arg in node.all_input_nodes},
        variance_needed(returned),
        {node: graph_module.get_submodule(str(node.target)) for node in nodes if node.op == "call_module"})
    setattr(graph_module, PLAN_ATTRIBUTE, plan)
    return plan


def propagate_traced(graph_module: fx.GraphModule, state: Moments | TracedInputs, ctx: Context) -> Moments:
    """Propagate the input state through a traced model (:func:`trace`); returns the output's Moments.

    ``state``: the Moments of the one input tensor, or the forward's (positional, keyword) arguments with
    Moments or plain tensors (deterministic inputs such as token ids and masks) as values. The output read is
    the forward's return value, its first element (tuple/list) or its ``"logits"`` entry (mapping).

    Leaf modules take their module rules (the node that produces the output is the network's last layer);
    ``call_function`` / ``call_method`` nodes take op rules when an argument is random, else run on the means.
    Raises UnsupportedOpError naming the op, the node and register_rule for an op without a rule, and ValueError
    for a module with random weights called more than once. Cost: the rules' (about that of the forward pass
    plus the variance pass in diagonal mode).
    """
    graph = graph_module.graph
    plan = _plan(graph_module)
    returned, needed = plan.returned, plan.needed
    last = returned if isinstance(returned, fx.Node) else None
    env: dict[fx.Node, Any] = {}
    joint = JointCovariances(graph, needed) if ctx.full else None
    # diagonal mode: a value is dropped once its last reader ran, so memory is that of the widest cut of the graph,
    # not of every activation (ViT-B at batch 32: 6 GB); the full mode's joint covariances read earlier values
    last_reader = {} if joint is not None else plan.last_reader
    # diagonal mode: nodes whose variance nobody reads run on the means with the weights at their means
    with_variance = None if joint is not None else plan.with_variance
    mean_ctx = dataclasses.replace(ctx, posterior=ctx.posterior.deterministic())
    for node, value in _placeholder_values(graph, state):
        env[node] = value
        if joint is not None and isinstance(value, Moments):
            env[node] = joint.record(node, value, [], had_random_input=False)
    for node in plan.nodes:
        if node.op == "placeholder" or (node.op != "output" and node not in needed):
            continue
        elif node.op == "get_attr":
            _check_attribute(graph_module, node, ctx)
            env[node] = getattr(graph_module.get_submodule(str(node.target).rpartition(".")[0]),
                                str(node.target).rpartition(".")[2])
        elif node.op in ("call_module", "call_function", "call_method"):
            if with_variance is None or node in with_variance:
                env[node] = _call(plan, node, env, joint, ctx, node is last)
            else:
                means = {arg: _without_variance(env[arg]) for arg in node.all_input_nodes}
                env[node] = _call(plan, node, means, None, mean_ctx, False)
            for arg in node.all_input_nodes:
                if last_reader.get(arg) is node:
                    env.pop(arg, None)
        elif node.op == "output":
            result = _load(returned, env)
            if isinstance(result, torch.Tensor):
                result = Moments(result)  # outputs that no random weight reaches
            if not isinstance(result, Moments):
                raise ValueError(f"the model must return a tensor of outputs, a tuple/list whose first element it is "
                                 f"or a mapping with 'logits'; got {type(result).__name__}")
            return result
    raise RuntimeError("the traced graph has no output node")


def _call(plan: _GraphPlan, node: fx.Node, env: dict[fx.Node, Any], joint: JointCovariances | None, ctx: Context,
          last: bool) -> Any:
    """One call node; in full mode its random inputs carry their cross-covariances with the live activations."""
    local: Mapping[fx.Node, Any] = env
    anchors: list[fx.Node] = []
    randoms: list[fx.Node] = []
    if joint is not None:
        randoms = joint.random_inputs(node, env)
        if randoms:
            anchors = joint.anchors(node)
            local = ChainMap({n: joint.with_crosses(n, anchors, env) for n in randoms}, env)
    args, kwargs = _load(node.args, local), _load(node.kwargs, local)
    result: Any
    if node.op == "call_module":
        result = _call_module(plan, node, args, kwargs, ctx, last)
    elif joint is not None and node.target in (*ADDS, *SUBS) and len(args) == 2 and is_random(args[0]) \
            and is_random(args[1]):
        a_node, b_node = node.args[0], node.args[1]
        assert isinstance(a_node, fx.Node) and isinstance(b_node, fx.Node)
        coefficient = float(kwargs.get("alpha", 1)) * (-1.0 if node.target in SUBS else 1.0)
        result = join(args[0], args[1], joint.between(a_node, b_node, env),
                      args[0].mean + coefficient * args[1].mean, coefficient)
    elif joint is not None and node.target in (torch.cat, torch.concat) and len(randoms) > 1:
        parts, part_nodes = list(args[0]), list(node.args[0])  # type: ignore[arg-type]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        mean = node.target([p.mean if isinstance(p, Moments) else p for p in parts], dim)
        if dim % mean.ndim == 0:
            raise UnsupportedOpError("cat along the batch axis")
        result = cat_parts(parts, part_nodes, dim, joint, env, mean)
    elif joint is not None and ctx.attention is AttentionRule.LINEARIZED and \
            (operands := joint_operands(node.target, node.args, node.kwargs, args, kwargs)) is not None:
        stacked, shapes = stack_operands([v for _, v in operands], [n for n, _ in operands], joint, env)
        result = linearised_joint(node.target, args, kwargs, stacked, shapes, ctx)
    else:
        result = _call_op(node, args, kwargs, ctx)
    if joint is None:
        return result
    result = joint.record(node, result, anchors, bool(randoms))
    joint.release(node)
    return result


@functools.lru_cache(maxsize=None)
def _signature(rule: Callable[..., Any]) -> inspect.Signature:
    """A rule's signature, read once per rule instead of on every call (about 70 µs each in a profile)."""
    return inspect.signature(rule)


def _call_module(plan: _GraphPlan, node: fx.Node, args: tuple, kwargs: dict,
                 ctx: Context, last: bool) -> Moments:
    module, calls = plan.modules[node], plan.calls
    if calls[node.target] > 1 and _has_random_weights(module, ctx):
        raise ValueError(f"the module {node.target!r} ({type(module).__name__}) has random weights and is called "
                         f"{calls[node.target]} times in the forward: one weight draw enters every call, which the "
                         "rules (weights independent of their input) cannot express; register a rule for the module "
                         "that contains the calls (posthoc.streamlined.register_rule)")
    if args and isinstance(args[0], torch.Tensor):
        args = (Moments(args[0]), *args[1:])  # a buffer or a value computed from constants (position ids)
    rule = find_rule(type(module))
    if rule is None:
        raise unsupported_module(module)
    if args and isinstance(args[0], Moments) and not (len(args) > 1 or kwargs):
        return rule(module, args[0], ctx, last)
    try:  # a rule whose signature takes the call's further arguments (nn.MultiheadAttention's) gets them
        _signature(rule).bind(module, *args[:1], ctx, last, *args[1:], **kwargs)
    except TypeError:
        raise UnsupportedOpError(f"module {node.target!r} ({type(module).__name__}) is called with "
                                 f"{len(args)} inputs and keywords {sorted(kwargs)}; its rule takes one activation"
                                 ) from None
    if not args or not isinstance(args[0], Moments):
        raise UnsupportedOpError(f"module {node.target!r} ({type(module).__name__}) takes an activation first")
    return rule(module, args[0], ctx, last, *args[1:], **kwargs)


def _call_op(node: fx.Node, args: tuple, kwargs: dict, ctx: Context) -> Any:
    if not (_any_random(args) or _any_random(kwargs)):
        # deterministic: run on the means; a tensor computed from an activation stays an activation
        value = _apply(node.target, _means(args), _means(kwargs))
        if isinstance(value, torch.Tensor) and (_any_moments(args) or _any_moments(kwargs)):
            return Moments(value)
        return value
    rule = find_rule(node.target)
    if rule is None:
        raise _unsupported(node)
    return rule(node.target, args, kwargs, ctx)
