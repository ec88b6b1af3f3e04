"""A few ``make_*`` helpers over ``onnx.helper`` so graph code reads like the model, not like protobuf.

Conventions (as onnxruntime-genai's builder does them): node names are paths such as
``/visual/blocks.3/attn/MatMul``; a node's output is ``{name}/output_0``; making a node whose
name already exists is a no-op, so shared subgraphs can be "made" twice; constants are named
by dtype and value and stored once. Initializers keep the checkpoint's tensor names.

Large weights can go to an external data file as they are made (``ExternalDataWriter``), so a
model over protobuf's 2 GB limit is built while holding one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwenvl_edge.onnx_files import ExternalDataWriter

EXTERNAL_MIN_BYTES = 1024  # smaller tensors (shapes, scalars) stay inline in the graph


class GraphBuilder:
    """Collects the nodes, initializers and value infos of one graph."""

    def __init__(self, external: ExternalDataWriter | None = None,
                 external_min_bytes: int = EXTERNAL_MIN_BYTES):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.value_infos: list[onnx.ValueInfoProto] = []
        self.external = external
        self.external_min_bytes = external_min_bytes
        self._node_names: set[str] = set()
        self._tensor_names: set[str] = set()

    def make_node(self, op_type: str, inputs: Sequence[str], name: str, output: str | None = None,
                  domain: str = "", **attrs) -> str:
        """Add one single-output node (unless ``name`` exists); return its output name."""
        return self.make_multi_output_node(op_type, inputs, name, [output or f"{name}/output_0"],
                                           domain, **attrs)[0]

    def make_multi_output_node(self, op_type: str, inputs: Sequence[str], name: str, outputs: Sequence[str],
                               domain: str = "", **attrs) -> list[str]:
        if name not in self._node_names:
            self._node_names.add(name)
            self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=name,
                                               domain=domain or None, **attrs))
        return list(outputs)

    def make_value_info(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        """Declare a tensor's type and shape where ONNX shape inference cannot (contrib-domain ops)."""
        self.value_infos.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def make_initializer(self, array: np.ndarray, name: str) -> str:
        """Store a weight under ``name`` (external when large and an external writer is set)."""
        if name in self._tensor_names:
            raise ValueError(f"initializer {name} made twice")
        self._tensor_names.add(name)
        array = np.asarray(array)
        if self.external is not None and array.nbytes >= self.external_min_bytes:
            tensor = TensorProto(name=name, dims=array.shape,
                                 data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
            self.external.store(tensor, array)
        else:
            tensor = numpy_helper.from_array(array, name)
        self.initializers.append(tensor)
        return name

    def make_constant(self, values: Sequence[int] | Sequence[float] | float | int,
                      dtype: type = np.int64) -> str:
        """A small constant named by dtype and value, e.g. ``/constants/INT64/[0, -1]``; stored once."""
        array = np.asarray(values, dtype=dtype)
        tag = helper.tensor_dtype_to_string(helper.np_dtype_to_tensor_dtype(array.dtype)).split(".")[-1]
        name = f"/constants/{tag}/{array.tolist()}"
        if name not in self._tensor_names:
            self._tensor_names.add(name)
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def make_model(self, graph_name: str, inputs: list[onnx.ValueInfoProto],
                   outputs: list[onnx.ValueInfoProto], opsets: dict[str, int], doc: str = "",
                   metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.initializers, doc_string=doc,
                                  value_info=self.value_infos)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                                  producer_name="qwenvl-edge")
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=value)
        return model
