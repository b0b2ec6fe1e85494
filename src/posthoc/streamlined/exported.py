"""Moment propagation through a model's torch.export graph, for forwards torch.fx cannot trace (Hugging Face models).

torch.fx traces a forward symbolically and stops at Python it cannot follow (transformers 5's models: "co_varnames
is too small"); torch.export runs the forward on example inputs and records every tensor op as an aten op, with the
parameters and buffers lifted to placeholders (:attr:`torch.export.ExportedProgram.graph_signature` names them).
This module turns that graph into one the traced walk (:func:`posthoc.streamlined.traced.propagate_traced`) takes:

- every op recorded inside a module with a rule in the one registry (its ``nn_module_stack`` metadata; the
  outermost such module, as the fx tracer keeps it a leaf) is folded back into one ``call_module`` node when the
  module's ops read one activation and give one output: Linear, Embedding, LayerNorm, transformers' Conv1D and
  NewGELUActivation, posthoc's blocks... take their module rules exactly as on the fx path, random weights included;
  an nn.MultiheadAttention call (several inputs: query, key, value, masks) is exported with its call signature kept
  and folded from it, so its masks and a key/value other than its query reach its rule as on the fx path;
- the parameters, buffers and lifted constants the remaining ops read become ``get_attr`` nodes, so a random
  parameter read by any other op is refused as on the fx path;
- a split (chunk) whose parts are read by index becomes one slice per part, which the full mode tracks;
- the remaining aten ops take the aten rules (:mod:`posthoc.streamlined.rules.aten`, thin adapters onto the op
  rules), or run on the means when no argument is random (masks, positions).

The forward is exported through a wrapper that returns only the output read (a tensor, a tuple's first element or
a mapping's ``"logits"``, :func:`posthoc.streamlined.traced._output_of`), so auxiliary outputs (a loss, a key/value
cache object) never reach export. Export needs example inputs: the graph is exported at the first prediction with
that batch, its batch axis dynamic (``Dim.AUTO``); where export specialises the batch size (a branch on it), or the
other input dims change (sequence length), the batch is exported again, and the graphs are cached by input shapes.
Cost: one export (about a second for a small transformer) per cached shape; the walk is the traced walk's.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import fx, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import ConstantArgument, InputKind, OutputKind, TensorArgument
from torch.utils import _pytree as pytree

from posthoc.streamlined.moments import Moments
from posthoc.streamlined.rules import Context
from posthoc.streamlined.rules.attention import attach_value_sources
from posthoc.streamlined.rules.base import find_rule
from posthoc.streamlined.rules.multihead import bind_call, fold_batch_transposes
from posthoc.streamlined.rules.ops import UnsupportedOpError
from posthoc.streamlined.traced import TracedInputs, _output_of, propagate_traced

_WRAPPED = "model"  # the model's name inside the export wrapper: parameter paths start with "model."


class GraphRoute(str, Enum):
    """Which graph Streamlined walks for a model without a rule of its own."""

    AUTO = "auto"  # torch.fx; torch.export (with a warning saying why) when fx cannot trace the forward
    FX = "fx"  # torch.fx only (modules kept whole, no example inputs needed)
    EXPORT = "export"  # torch.export only (any forward export can run; one export per input shape)


class _ReadOutput(nn.Module):
    """Calls the model on (args, kwargs) and returns only the output read (tensor, first element or "logits")."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        out = _output_of(self.model(*args, **kwargs))
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the model must return a tensor of outputs, a tuple/list whose first element it is or "
                             f"a mapping with 'logits'; got {type(out).__name__}")
        return out


def _strip(target: str) -> str:
    """A parameter/buffer path of the wrapper -> the model's own path."""
    return target[len(_WRAPPED) + 1:] if target.startswith(_WRAPPED + ".") else target


def export_model(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> ExportedProgram:
    """torch.export of ``model(*args, **kwargs)`` read to its output tensor, batch axis dynamic (``Dim.AUTO``).

    The call signature of every nn.MultiheadAttention is kept (``preserve_module_call_signature``): which graph
    values are its query, key, value and masks, so that :func:`to_graph_module` folds the call back whole. Call with
    the model in eval mode. Raises ValueError naming the export error when the forward cannot be exported. Cost:
    one export (a traced run of the forward on fake tensors).
    """
    inputs = (tuple(args), dict(kwargs))
    dynamic = pytree.tree_map(lambda leaf: {0: torch.export.Dim.AUTO} if isinstance(leaf, torch.Tensor)
                              and leaf.ndim > 0 else None, inputs)
    attention = tuple(f"{_WRAPPED}.{path}" for path, module in model.named_modules()
                      if type(module) is nn.MultiheadAttention)
    try:
        return torch.export.export(_ReadOutput(model), inputs, dynamic_shapes=dynamic,
                                   preserve_module_call_signature=attention)
    except Exception as err:  # export raises UserError, RuntimeError, TypeError... for forwards it cannot run
        raise ValueError(f"torch.export could not export {type(model).__name__} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); register a rule for the module whose "
                         "forward does not export (posthoc.streamlined.register_rule)") from err


def _leaf_module(node: fx.Node, model: nn.Module) -> tuple[str, str] | None:
    """(call key, module path) of the outermost module with a rule that recorded ``node``, or None."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        path = _strip(str(path))
        if not path or path == _WRAPPED:
            continue  # the wrapper or the model itself: a model with a rule never reaches the graph walk
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if find_rule(type(module)) is not None:
            return str(key), path
    return None


def _is_tensor_value(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _fold_modules(graph: fx.Graph, model: nn.Module, lifted: set[fx.Node], calls: dict[str, _Call]) -> None:
    """Fold each call of a module with a rule (one activation in, one tensor out) into a ``call_module`` node.

    An nn.MultiheadAttention call is folded from its kept call signature (``calls``, :func:`_multihead_call`),
    masks and key/value included. Any other call whose ops read several activations or give several outputs is
    left as aten ops (their rules, and the refusal of a random parameter read outside a module rule, apply).
    """
    groups: dict[str, tuple[str, list[fx.Node]]] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            leaf = _leaf_module(node, model)
            if leaf is not None:
                groups.setdefault(leaf[0], (leaf[1], []))[1].append(node)
    attention = [(path, members) for path, members in groups.values()
                 if type(model.get_submodule(path)) is nn.MultiheadAttention]
    # every attention call node is made before any group is erased, so that a call reading another's output is
    # rewired by that one's replace_all_uses_with
    folds = [(_multihead_call(graph, path, members, calls), members) for path, members in attention]
    for (call, output), members in folds:
        output.replace_all_uses_with(call)
        for member in reversed(members):
            graph.erase_node(member)
    for path, members in groups.values():
        if type(model.get_submodule(path)) is nn.MultiheadAttention:
            continue
        inside = set(members)
        inputs = {n for m in members for n in m.all_input_nodes if n not in inside and n not in lifted
                  and _is_tensor_value(n)}
        outputs = [m for m in members if any(user not in inside for user in m.users)]
        if len(inputs) != 1 or len(outputs) != 1 or not _is_tensor_value(outputs[0]):
            continue
        with graph.inserting_before(outputs[0]):
            call = graph.call_module(path, (next(iter(inputs)),))
        call.meta = dict(outputs[0].meta)
        outputs[0].replace_all_uses_with(call)
        for member in reversed(members):
            graph.erase_node(member)


@dataclass
class _Call:
    """A module call's kept signature: its (args, kwargs) and outputs as graph nodes (by name) or constants."""

    args: tuple
    kwargs: dict[str, Any]
    outputs: list[Any]


def _call_signatures(program: ExportedProgram, nodes: dict[str, fx.Node]) -> dict[str, _Call]:
    """Module path -> its call's arguments and outputs, for the modules exported with a kept call signature.

    ``nodes``: the copied graph's node of each exported node name. Raises UnsupportedOpError for a signature with
    an argument that is neither a tensor nor a constant (a symbolic size, an opaque object).
    """
    out = {}
    for entry in program.module_call_graph:
        signature = entry.signature
        if signature is None or not entry.fqn.startswith(_WRAPPED + "."):
            continue

        def value(argument: Any, path: str = entry.fqn) -> Any:
            if isinstance(argument, TensorArgument):
                return nodes[argument.name]
            if isinstance(argument, ConstantArgument):
                return argument.value
            raise UnsupportedOpError(f"the module {_strip(path)!r} is called with an argument torch.export records "
                                     f"as {type(argument).__name__}; Streamlined takes tensors and constants")

        args, kwargs = pytree.tree_unflatten([value(a) for a in signature.inputs], signature.in_spec)
        out[_strip(entry.fqn)] = _Call(tuple(args), dict(kwargs), [value(a) for a in signature.outputs])
    return out


def _multihead_call(graph: fx.Graph, path: str, members: list[fx.Node], calls: dict[str, _Call]
                    ) -> tuple[fx.Node, fx.Node]:
    """One nn.MultiheadAttention call as a ``call_module`` node, and the attention output node it stands for.

    Built from the call's kept signature: query, key and value positional, the masks and flags by name. Raises UnsupportedOpError when the attention weights or any other value computed inside the call is read
    outside it (Streamlined propagates the attention output only).
    """
    call = calls.get(path)
    if call is None or not call.outputs or not isinstance(call.outputs[0], fx.Node):
        raise UnsupportedOpError(f"nn.MultiheadAttention {path!r} was exported without its call signature; "
                                 "use graph='fx'")
    output = call.outputs[0]
    inside = set(members)
    read_outside = [m for m in members if m is not output and any(user not in inside for user in m.users)]
    if read_outside:
        raise UnsupportedOpError(f"the attention weights of nn.MultiheadAttention {path!r} (or another value "
                                 f"computed inside the call: {read_outside[0].format_node()}) are read after it; "
                                 "Streamlined propagates its attention output (read [0]) only")
    args, kwargs = bind_call(call.args, call.kwargs)
    with graph.inserting_before(output):
        node = graph.call_module(path, args, kwargs)
    node.meta = dict(output.meta)
    return node, output


def _split_as_slices(graph: fx.Graph) -> None:
    """Rewrite ``split`` / ``split_with_sizes`` / ``chunk`` whose parts are read by index into one slice per part.

    The same values; the full mode tracks the cross-covariance of slices of one activation (a fused QKV projection's
    Q, K and V), which it cannot for the parts of a split (:func:`posthoc.streamlined.rules.attention.split_rule`).
    """
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.split.Tensor, aten.split_with_sizes.default,
                                                               aten.chunk.default):
            continue
        source, value = node.args[0], node.meta.get("val")
        if not isinstance(source, fx.Node) or not isinstance(source.meta.get("val"), torch.Tensor) \
                or not isinstance(value, (tuple, list)) \
                or not all(user.target is operator.getitem for user in node.users):
            continue
        dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0))
        sizes = [part.shape[dim] for part in value]
        if dim % source.meta["val"].ndim == 0 or not all(isinstance(size, int) for size in sizes):
            continue  # along the batch axis, or of a symbolic size: left to the split rule
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for user in list(node.users):
            index = int(user.args[1])
            with graph.inserting_before(user):
                part = graph.call_function(aten.slice.Tensor, (source, dim, starts[index], starts[index] + sizes[index]))
            part.meta = dict(user.meta)
            user.replace_all_uses_with(part)
            graph.erase_node(user)
        graph.erase_node(node)


def to_graph_module(program: ExportedProgram, model: nn.Module) -> fx.GraphModule:
    """The exported graph as the traced walk takes it: modules with rules folded, lifted inputs as get_attr nodes.

    The GraphModule shares the model's modules, parameters and buffers (the posterior is found by module identity
    and path, as on the fx path); its placeholders are the user inputs in pytree-flattened order. Raises
    ValueError for a forward that mutates a buffer or takes opaque objects. Cost: one pass over the graph.
    """
    signature = program.graph_signature
    if any(spec.kind is not OutputKind.USER_OUTPUT for spec in signature.output_specs):
        raise ValueError(f"{type(model).__name__}'s forward mutates a buffer or an input in eval mode; "
                         "Streamlined propagates pure forwards only")
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(program.graph, copies))  # a copy (graph_copy leaves the output node out)
    nodes = {old.name: new for old, new in copies.items()}
    placeholders = {str(node.target): node for node in graph.nodes if node.op == "placeholder"}
    owned: dict[str, Any] = {}
    lifted: set[fx.Node] = set()
    for spec in signature.input_specs:
        node = placeholders[spec.arg.name]
        if spec.kind is InputKind.USER_INPUT:
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target is not None:
            path = _strip(spec.target)
            owned[path] = model.get_parameter(path) if spec.kind is InputKind.PARAMETER else model.get_buffer(path)
        elif spec.kind is InputKind.CONSTANT_TENSOR and spec.target is not None:
            path = f"_export_constant_{len(owned)}"
            owned[path] = program.constants[spec.target]
        else:
            raise ValueError(f"{type(model).__name__}'s exported forward takes a {spec.kind.name} input "
                             f"({spec.arg.name}); Streamlined propagates tensors, parameters and buffers only")
        with graph.inserting_before(node):
            attr = graph.get_attr(path)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
        nodes[spec.arg.name] = attr
        lifted.add(attr)
    _fold_modules(graph, model, lifted, _call_signatures(program, nodes))
    fold_batch_transposes(graph, model)  # nn.MultiheadAttention(batch_first=False): its (L, N, E) transposes
    _split_as_slices(graph)
    for node in list(graph.nodes):
        if node.op == "call_module":
            owned[str(node.target)] = model.get_submodule(str(node.target))
        elif node.op == "get_attr" and not node.users:
            graph.erase_node(node)
            owned.pop(str(node.target), None)
    return fx.GraphModule(owned, graph, class_name=type(model).__name__)


@dataclass
class _Exported:
    """One cached export: the walkable graph and the batch sizes it holds for (its batch symbol's range)."""

    graph_module: fx.GraphModule
    batch_low: int
    batch_high: float


def _batch_range(program: ExportedProgram, batch: int) -> tuple[int, float]:
    """The batch sizes the graph holds for: the range of the first user input's dim-0 symbol, or ``batch`` only."""
    user = [spec.arg.name for spec in program.graph_signature.input_specs if spec.kind is InputKind.USER_INPUT]
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user and _is_tensor_value(node) and node.meta["val"].ndim:
            size = node.meta["val"].shape[0]
            if isinstance(size, int):
                return size, size
            bounds = program.range_constraints.get(size.node.expr)
            if bounds is not None:
                return min(int(bounds.lower), batch), max(float(bounds.upper), batch)
    return batch, batch  # no range known: the exported batch size only


class ExportedGraphs:
    """The torch.export graphs of one model, exported at first use and cached by input shapes (batch dynamic).

    Args:
        model: the network (in eval mode when :meth:`propagate` runs).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._cache: dict[tuple, list[_Exported]] = {}
        self.exports = 0  # how many times the model was exported (new shapes)

    def graph_for(self, args: tuple, kwargs: dict[str, Any]) -> tuple[fx.GraphModule, bool]:
        """The walkable graph for inputs like these, and whether it was exported by this call.

        The cache key is every tensor leaf's dtype and shape without the batch axis; a cached graph serves a
        batch inside its batch range. Cost: one export on a miss, a dict lookup otherwise.
        """
        leaves = pytree.tree_leaves((args, kwargs))
        key = tuple((leaf.dtype, tuple(leaf.shape[1:])) if isinstance(leaf, torch.Tensor) else repr(leaf)
                    for leaf in leaves)
        batch = next((int(leaf.shape[0]) for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.ndim), None)
        if batch is None:
            raise ValueError("the model's inputs hold no batched tensor; Streamlined needs inputs (B, ...)")
        for entry in self._cache.get(key, []):
            if entry.batch_low <= batch <= entry.batch_high:
                return entry.graph_module, False
        program = export_model(self.model, args, kwargs)
        low, high = _batch_range(program, batch)
        entry = _Exported(to_graph_module(program, self.model), low, high)
        self._cache.setdefault(key, []).append(entry)
        self.exports += 1
        return entry.graph_module, True

    def propagate(self, state: Moments | TracedInputs, ctx: Context) -> tuple[Moments, bool]:
        """Propagate through the exported graph; returns the output's Moments and whether a new export ran.

        ``state``: the one input's Moments, or the forward's (positional, keyword) arguments (plain tensors), as
        for :func:`posthoc.streamlined.traced.propagate_traced`, which walks the graph.
        """
        args: tuple
        kwargs: dict[str, Any]
        values: list[Any]
        if isinstance(state, Moments):
            args, kwargs, values = (state.mean,), {}, [state]
        else:
            args, kwargs = state
            values = pytree.tree_leaves((tuple(args), dict(kwargs)))
        graph_module, exported = self.graph_for(tuple(args), dict(kwargs))
        attach_value_sources(graph_module, ctx)  # attention="shared_value": each attention's value projection
        n_inputs = sum(node.op == "placeholder" for node in graph_module.graph.nodes)
        if n_inputs != len(values):
            raise ValueError(f"the exported graph takes {n_inputs} inputs, the call gives {len(values)} leaves; "
                             "give x as tensors (non-tensor arguments are fixed by export)")
        return propagate_traced(graph_module, (tuple(values), {}), ctx), exported
