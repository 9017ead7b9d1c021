"""GraphBuilder: an ONNX graph written node by node with onnx.helper -- fresh value names, initializers,
shared constants -- and the few op patterns every layer uses (linear, RMSNorm, SiLU, SwiGLU).

Why onnx.helper and not torch.onnx.export: the graph must hold onnxruntime's MatMulNBits and QMoE contrib ops fed
straight from the checkpoint's packed tensors (the exporter would trace dequantized float weights), a Scan over
the tokens for KDA's recurrence (tracing unrolls a Python loop over a fixed length), and state inputs and outputs
named per layer; written by hand, each node is exactly the op and layout onnxruntime documents.
"""
from __future__ import annotations

import numpy as np
from onnx import GraphProto, TensorProto, helper, numpy_helper

from klconvert.onnx.matmul_nbits import NBitsWeight

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib ops (MatMulNBits, QMoE)
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class GraphBuilder:
    """Nodes and initializers of one graph (the main graph, or a Scan body that reads the outer one's constants)."""

    def __init__(self, graph: GraphProto | None = None, parent: "GraphBuilder | None" = None):
        """`graph`: the GraphProto whose initializers `weight` adds to (a new one if None), as the model's graph
        holds them: protobuf copies a message on every add, extend or CopyFrom and moves none, so initializers
        gathered apart and handed to make_graph, then make_model, stood three times in memory at once (h268's F1)."""
        self.nodes: list = []
        self.initializers = parent.initializers if parent is not None else \
            (GraphProto() if graph is None else graph).initializer
        self._constants: dict = {} if parent is None else parent._constants
        self._count = [0] if parent is None else parent._count  # one count: names stay unique across subgraphs

    def body(self) -> "GraphBuilder":
        """A builder for a subgraph: its own nodes, this graph's initializers and constants (outer-scope values)."""
        return GraphBuilder(parent=self)

    def fresh(self, hint: str) -> str:
        self._count[0] += 1
        return f"{hint}_{self._count[0]}"

    def weight(self, name: str, value: np.ndarray) -> str:
        """An initializer under a checkpoint-derived name."""
        # the graph's copy is the one kept: from_array's goes as this returns. atleast_1d gives a scalar the shape [1]
        # it has always had here, and copies no transposed weight: from_array's bytes are row-major from any layout
        self.initializers.add().CopyFrom(numpy_helper.from_array(np.atleast_1d(value), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (axes, shapes, scalars), one initializer per distinct value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.weight(f"const_{len(self._constants)}", array)
        return self._constants[key]

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        """Add a node; returns its output name (or a list of `outputs` names)."""
        names = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain or None, **attrs))
        return names[0] if outputs == 1 else names

    # ---- patterns ---------------------------------------------------------------------------------
    def matmul_nbits(self, x: str, w: NBitsWeight, name: str) -> str:
        """x [..., k] @ W^T with W held packed (name: the checkpoint module, for the initializers)."""
        inputs = [x, self.weight(f"{name}.qweight", w.codes), self.weight(f"{name}.scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(self.weight(f"{name}.zero_points", w.zero_points))
        return self.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=w.k, N=w.n, bits=w.bits, block_size=w.block_size)

    def matmul_dense(self, x: str, weight: np.ndarray, name: str) -> str:
        """x [..., in] @ W^T for a float weight W [out, in] (stored transposed, as MatMul reads it)."""
        return self.op("MatMul", x, self.weight(f"{name}.weight_t", weight.T.astype(np.float32, copy=False)))

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        """x / sqrt(mean(x^2, last dim) + eps) * weight (an initializer's name)."""
        ms = self.op("ReduceMean", self.op("Mul", x, x), self.const([-1]), keepdims=1)
        inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", ms, self.const(eps, np.float32))))
        return self.op("Mul", self.op("Mul", x, inv), weight)

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def swiglu(self, gate: str, up: str) -> str:
        return self.op("Mul", self.silu(gate), up)
