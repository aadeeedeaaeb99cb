"""Example ONNX models in Triton layout (DIR/NAME/VERSION/model.onnx) for tests, the demo and the bench.

Every builder is deterministic for a given seed, so a bench run and a test see the same weights, and
returns the model directory (DIR/NAME). Graphs use opset 17 and IR 8 so that any onnxruntime of
the last few years loads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

# KServe datatype -> ONNX element type, for every type the ORT CPU Identity kernel accepts.
ONNX_TYPES: dict[str, int] = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}

Dims = tuple[int, ...]


def _value_info(name: str, elem_type: int, shape: Dims) -> onnx.ValueInfoProto:
    # -1 becomes a named symbolic dim, which ORT reports back as a string (the runtime maps it to -1).
    dims: list[int | str] = [f"{name}_d{i}" if d < 0 else d for i, d in enumerate(shape)]
    return helper.make_tensor_value_info(name, elem_type, dims)


def _save(
    directory: Path | str,
    name: str,
    version: int,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="meshserve.examples")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    model_dir = Path(directory) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version_dir / "model.onnx"))
    return model_dir


def _mlp_hidden(in_features: int, out_features: int, approx_bytes: int) -> int:
    # FP32 parameters: in*h + h + h*out + out; solve for h so the file lands near approx_bytes.
    return max(1, (approx_bytes // 4 - out_features) // (in_features + 1 + out_features))


def write_mlp(
    directory: Path | str,
    name: str,
    version: int = 1,
    *,
    in_features: int = 16,
    out_features: int = 4,
    approx_bytes: int = 1_000_000,
    seed: int = 0,
) -> Path:
    """INPUT0 FP32 [-1, in] -> Relu(x @ W1 + b1) @ W2 + b2 -> OUTPUT0 FP32 [-1, out]."""
    hidden = _mlp_hidden(in_features, out_features, approx_bytes)
    rng = np.random.default_rng(seed)
    # Scaled so activations stay O(1) whatever the width: answers compare with a relative tolerance.
    w1 = (rng.standard_normal((in_features, hidden)) / np.sqrt(in_features)).astype(np.float32)
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((hidden, out_features)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(out_features) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["INPUT0", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["OUTPUT0"]),
    ]
    initializers = [
        numpy_helper.from_array(array, label) for label, array in (("W1", w1), ("B1", b1), ("W2", w2), ("B2", b2))
    ]
    return _save(
        directory,
        name,
        version,
        nodes,
        [_value_info("INPUT0", TensorProto.FLOAT, (-1, in_features))],
        [_value_info("OUTPUT0", TensorProto.FLOAT, (-1, out_features))],
        initializers,
    )


def mlp_reference(model_dir: Path | str, x: np.ndarray, version: int = 1) -> np.ndarray:
    """The MLP's answer computed with numpy from the weights stored in the model file."""
    graph = onnx.load(str(Path(model_dir) / str(version) / "model.onnx")).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    hidden = np.maximum(x.astype(np.float32) @ weights["W1"] + weights["B1"], 0.0)
    output: np.ndarray = hidden @ weights["W2"] + weights["B2"]
    return output


def write_identity(
    directory: Path | str,
    name: str,
    datatype: str,
    version: int = 1,
    *,
    shape: Dims = (-1, 16),
) -> Path:
    """INPUT0 -> OUTPUT0 unchanged, of any KServe datatype ORT supports (BYTES as string tensors)."""
    try:
        elem_type = ONNX_TYPES[datatype]
    except KeyError:
        raise ValueError(f"no ONNX type for datatype {datatype!r}; known: {sorted(ONNX_TYPES)}") from None
    return _save(
        directory,
        name,
        version,
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        [_value_info("INPUT0", elem_type, shape)],
        [_value_info("OUTPUT0", elem_type, shape)],
    )


def write_add_sub(directory: Path | str, name: str, version: int = 1, *, width: int = 16) -> Path:
    """Triton's "simple": INPUT0, INPUT1 FP32 [-1, width] -> OUTPUT0 = sum, OUTPUT1 = difference."""
    inputs = [_value_info(n, TensorProto.FLOAT, (-1, width)) for n in ("INPUT0", "INPUT1")]
    outputs = [_value_info(n, TensorProto.FLOAT, (-1, width)) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return _save(directory, name, version, nodes, inputs, outputs)


def write_matmul_chain(
    directory: Path | str, name: str, version: int = 1, *, width: int = 256, depth: int = 16, seed: int = 0
) -> Path:
    """A deliberately slow model: INPUT0 FP32 [-1, width] -> OUTPUT0 FP32 [-1, width].

    The input's Gram matrix (width x width, whatever the batch) is pushed through `depth` square
    MatMuls, so even batch 1 costs depth * 2 * width**3 FLOPs; the graph depends on the input
    throughout, so ORT cannot constant-fold the work away. width=256, depth=16 is ~5 ms on one core here.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Transpose", ["INPUT0"], ["xt"]),
        helper.make_node("MatMul", ["xt", "INPUT0"], ["g0"]),
    ]
    initializers = []
    for i in range(depth):
        # 1/sqrt(width) keeps each product near its input's scale, so values stay finite at any depth.
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        initializers.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [f"g{i}", f"W{i}"], [f"g{i + 1}"]))
    nodes.append(helper.make_node("MatMul", ["INPUT0", f"g{depth}"], ["OUTPUT0"]))
    return _save(
        directory,
        name,
        version,
        nodes,
        [_value_info("INPUT0", TensorProto.FLOAT, (-1, width))],
        [_value_info("OUTPUT0", TensorProto.FLOAT, (-1, width))],
        initializers,
    )


def write_accumulator(directory: Path | str, name: str = "simple_sequence", version: int = 1, *,
                      idle_us: int = 5_000_000) -> Path:
    """Triton's simple_sequence for ONNX Runtime, with implicit state: INPUT INT32 [-1, 1] -> OUTPUT INT32 [-1, 1],
    the running sum of the sequence's inputs. OUTPUT = STATE_IN * (1 - START) + INPUT, and STATE_OUT = OUTPUT is
    the next request's STATE_IN (config.pbtxt: sequence batching, START and CORRID controls, zero initial state,
    idle sequences released after `idle_us`)."""
    int32 = TensorProto.INT32
    nodes = [
        helper.make_node("Sub", ["ONE", "START"], ["keep"]),
        helper.make_node("Mul", ["STATE_IN", "keep"], ["kept"]),
        helper.make_node("Add", ["kept", "INPUT"], ["OUTPUT"]),
        helper.make_node("Identity", ["OUTPUT"], ["STATE_OUT"]),
    ]
    inputs = [_value_info(n, int32, (-1, 1)) for n in ("INPUT", "STATE_IN", "START")]
    inputs.append(_value_info("CORRID", TensorProto.UINT64, (-1, 1)))
    outputs = [_value_info(n, int32, (-1, 1)) for n in ("OUTPUT", "STATE_OUT")]
    model_dir = _save(directory, name, version, nodes, inputs, outputs,
                      [numpy_helper.from_array(np.ones((1, 1), np.int32), "ONE")])
    (model_dir / "config.pbtxt").write_text(
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 1\n'
        f"sequence_batching {{ max_sequence_idle_microseconds: {idle_us}\n"
        '  control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },\n'
        '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] } ]\n'
        '  state [ { input_name: "STATE_IN" output_name: "STATE_OUT" data_type: TYPE_INT32 dims: [ 1 ]\n'
        '    initial_state { data_type: TYPE_INT32 dims: [ 1 ] zero_data: true name: "zero" } } ] }\n'
        'input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
    )
    return model_dir


def write_repository(directory: Path | str, names_and_kinds: Iterable[tuple[str, str]]) -> Path:
    """Write several models; kind is "mlp", "add_sub", "matmul_chain" or "identity:<DATATYPE>".

    Returns the repository root (DIR), since there is more than one model directory.
    """
    root = Path(directory)
    for name, kind in names_and_kinds:
        if kind == "mlp":
            write_mlp(root, name)
        elif kind == "add_sub":
            write_add_sub(root, name)
        elif kind == "matmul_chain":
            write_matmul_chain(root, name)
        elif kind.startswith("identity:"):
            write_identity(root, name, kind.removeprefix("identity:"))
        else:
            raise ValueError(f"unknown example kind {kind!r} for model {name!r}")
    root.mkdir(parents=True, exist_ok=True)
    return root


# Triton's example models (docs/examples/model_repository), as its example clients call them. Each comes with
# the config.pbtxt Triton's has, so a Triton serves it the same way (see _example_config's callers).
EXAMPLE_WIDTH = 16
EXAMPLE_MAX_BATCH = 8


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _example_config(name: str, inputs: Sequence[tuple[str, str, int]], outputs: Sequence[tuple[str, str, int]],
                    extra: str = "") -> str:
    """config.pbtxt of a batching ONNX Runtime model; tensors as (name, datatype, width) with dims [width]."""
    def tensors(specs: Sequence[tuple[str, str, int]]) -> str:
        return ", ".join(f'{{ name: "{n}" data_type: {_config_type(d)} dims: [ {w} ] }}' for n, d, w in specs)

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {EXAMPLE_MAX_BATCH}\n{extra}'
            f"input [ {tensors(inputs)} ]\noutput [ {tensors(outputs)} ]\n")


def _write_add_sub_example(directory: Path | str, name: str, version: int, datatype: str,
                           nodes: list[onnx.NodeProto]) -> Path:
    """A graph from INPUT0, INPUT1 to OUTPUT0 (sum), OUTPUT1 (difference), all `datatype` [-1, 16]."""
    shape = (-1, EXAMPLE_WIDTH)
    elem_type = ONNX_TYPES[datatype]
    model_dir = _save(directory, name, version, nodes, [_value_info(n, elem_type, shape) for n in ("INPUT0", "INPUT1")],
                      [_value_info(n, elem_type, shape) for n in ("OUTPUT0", "OUTPUT1")])
    specs = [(n, datatype, EXAMPLE_WIDTH) for n in ("INPUT0", "INPUT1")]
    (model_dir / "config.pbtxt").write_text(
        _example_config(name, specs, [(n, datatype, EXAMPLE_WIDTH) for n in ("OUTPUT0", "OUTPUT1")]))
    return model_dir


def write_simple(directory: Path | str, name: str = "simple", datatype: str = "INT32", version: int = 1) -> Path:
    """Triton's "simple" (INT32) or "simple_int8" (INT8): INPUT0, INPUT1 [16] in batches of up to 8 ->
    OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1."""
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    return _write_add_sub_example(directory, name, version, datatype, nodes)


def write_simple_string(directory: Path | str, name: str = "simple_string", version: int = 1) -> Path:
    """Triton's "simple_string": INPUT0, INPUT1 BYTES [16] holding decimal integers -> OUTPUT0, OUTPUT1 BYTES,
    their sum and difference in decimal (ONNX Runtime casts strings to and from INT32)."""
    nodes = [helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
             helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
             helper.make_node("Add", ["a", "b"], ["sum"]),
             helper.make_node("Sub", ["a", "b"], ["difference"]),
             helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
             helper.make_node("Cast", ["difference"], ["OUTPUT1"], to=TensorProto.STRING)]
    return _write_add_sub_example(directory, name, version, "BYTES", nodes)


def write_simple_sequence(directory: Path | str, name: str = "simple_sequence", version: int = 1, *,
                          idle_us: int = 5_000_000) -> Path:
    """Triton's "simple_sequence" as its example clients see it: INPUT INT32 [1] -> OUTPUT = READY * (INPUT + START)
    (so a sequence's first answer is its input plus one, later ones their input), with START and READY controls
    and no CORRID, so sequence ids may be integers or strings."""
    int32 = TensorProto.INT32
    nodes = [helper.make_node("Add", ["INPUT", "START"], ["started"]),
             helper.make_node("Mul", ["started", "READY"], ["OUTPUT"])]
    model_dir = _save(directory, name, version, nodes,
                      [_value_info(n, int32, (-1, 1)) for n in ("INPUT", "START", "READY")],
                      [_value_info("OUTPUT", int32, (-1, 1))])
    controls = ", ".join(f'{{ name: "{n}" control [ {{ kind: CONTROL_SEQUENCE_{n} int32_false_true: [ 0, 1 ] }} ] }}'
                         for n in ("START", "READY"))
    batching = f"sequence_batching {{ max_sequence_idle_microseconds: {idle_us}\n  control_input [ {controls} ] }}\n"
    (model_dir / "config.pbtxt").write_text(
        _example_config(name, [("INPUT", "INT32", 1)], [("OUTPUT", "INT32", 1)], batching))
    return model_dir
