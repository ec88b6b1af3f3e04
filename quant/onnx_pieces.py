"""Cut a large ONNX graph into pieces of bounded weight size, and join pieces back into one graph.

onnxruntime's quantizer loads a whole model into protobuf and keeps copies (23 GB for the 7.7 GB
full-size vision graph). Quantizing piece by piece keeps onnxruntime's quantizer but bounds its
memory: each piece is a few ViT blocks with their own weights, read from the FP32 file's external
data one tensor at a time. The quantized pieces are then appended into one graph whose large
weights stream into ``<out>.data``.

Pieces are cut only between node groups (a ViT block, the patch embedding, the adapter), so every
tensor that crosses a cut is a plain float activation and no quantizer-made name (``X_quantized``)
is made twice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qwenvl_edge.onnx_files import ExternalDataWriter

GROUP = re.compile(r"^(/visual/blocks\.\d+/|/visual/[^/]+/)")
DEFAULT_PIECE_BYTES = 600 * 2**20  # a few full-size ViT blocks (133 MB of FP32 weights each)


def node_group(node: onnx.NodeProto) -> str:
    """The group a node belongs to (its block, or its top-level part); pieces are cut between groups."""
    m = GROUP.match(node.name)
    return m.group(1) if m else node.name


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of an initializer, inline or external, without loading it."""
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(t.raw_data) or numpy_helper.to_array(t).nbytes


@dataclass
class Piece:
    """A contiguous run of nodes with the tensors it reads from before and hands on after it."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    weight_names: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    live_after: list[str] = field(default_factory=list)  # activations read by later pieces or the graph output
    nbytes: int = 0

    @property
    def label(self) -> str:
        first, last = node_group(self.nodes[0]).strip("/"), node_group(self.nodes[-1]).strip("/")
        return first if first == last else f"{first} .. {last}"


def plan_pieces(graph: onnx.GraphProto, max_bytes: int = DEFAULT_PIECE_BYTES) -> list[Piece]:
    """Split ``graph`` (topologically ordered, as built) into pieces of at most ``max_bytes`` of weights
    (a single group over the bound is a piece of its own)."""
    sizes = {t.name: tensor_nbytes(t) for t in graph.initializer}
    groups: list[list[onnx.NodeProto]] = []
    for node in graph.node:
        if groups and node_group(groups[-1][-1]) == node_group(node):
            groups[-1].append(node)
        else:
            groups.append([node])
    pieces: list[Piece] = []
    for nodes in groups:
        nbytes = sum(sizes.get(i, 0) for n in nodes for i in set(n.input))
        if not pieces or pieces[-1].nbytes + nbytes > max_bytes:
            pieces.append(Piece())
        pieces[-1].nodes.extend(nodes)
        pieces[-1].nbytes += nbytes
    _wire(pieces, graph, set(sizes))
    return pieces


def _wire(pieces: list[Piece], graph: onnx.GraphProto, weights: set[str]) -> None:
    """Fill each piece's inputs (activations from before), outputs (read later) and weights."""
    graph_outputs = [o.name for o in graph.output]
    later_reads: set[str] = set(graph_outputs)
    for piece in reversed(pieces):
        made = {o for n in piece.nodes for o in n.output}
        read = [i for n in piece.nodes for i in n.input if i]
        piece.outputs = sorted(made & later_reads)
        piece.inputs = sorted({i for i in read if i not in made and i not in weights})
        piece.weight_names = sorted({i for i in read if i in weights})
        piece.live_after = sorted(later_reads)
        later_reads |= set(piece.inputs)


class WeightSource:
    """Reads initializers of a model loaded without its external data, one tensor at a time."""

    def __init__(self, model_path: Path, graph: onnx.GraphProto):
        self.folder = Path(model_path).parent
        self.tensors = {t.name: t for t in graph.initializer}

    def array(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(self.folder / info["location"], "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise ValueError(f"{info['location']}: tensor {name} runs past the end of the file")
        return np.frombuffer(data, dtype=dtype).reshape(tuple(t.dims))


SMALL_TENSOR_BYTES = 64 * 2**10  # shapes and scalars: onnxruntime reads them inline only (shape inference)


def piece_model(model: onnx.ModelProto, piece: Piece, weights: WeightSource, inline: bool = True
                ) -> onnx.ModelProto:
    """A standalone model of one piece: its weights inline (a piece stays far below protobuf's 2 GB), or
    with ``inline`` False the large ones as the whole model has them (still pointing into its ``.data``)."""
    g = model.graph
    kept_info = {n for node in piece.nodes for n in node.output}
    protos = {t.name: t for t in g.initializer}

    def initializer(name: str) -> TensorProto:
        if inline or tensor_nbytes(protos[name]) < SMALL_TENSOR_BYTES:
            return numpy_helper.from_array(weights.array(name), name)
        return protos[name]

    graph = helper.make_graph(
        list(piece.nodes), f"{g.name}_piece",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in piece.inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in piece.outputs],
        [initializer(n) for n in piece.weight_names],
        value_info=[v for v in g.value_info if v.name in kept_info])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    sub.ir_version = model.ir_version
    return sub


def _merge_opsets(target: onnx.ModelProto, source: onnx.ModelProto) -> None:
    have = {o.domain: o for o in target.opset_import}
    for o in source.opset_import:
        if o.domain not in have:
            target.opset_import.append(o)
            have[o.domain] = target.opset_import[-1]
        elif have[o.domain].version < o.version:
            have[o.domain].version = o.version


class GraphAssembler:
    """Appends quantized pieces into one model; initializers go to ``writer`` (external) or stay inline."""

    def __init__(self, template: onnx.ModelProto, writer: ExternalDataWriter | None, external_min_bytes: int = 1024):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(template)
        del self.model.graph.node[:], self.model.graph.initializer[:], self.model.graph.value_info[:]
        self.writer = writer
        self.external_min_bytes = external_min_bytes
        self._names: dict[str, bytes] = {}

    def add(self, piece: onnx.ModelProto, weights: WeightSource | None = None) -> None:
        """Append a piece; ``weights`` reads its external initializers (onnx.load refuses hard-linked data)."""
        g = self.model.graph
        _merge_opsets(self.model, piece)
        g.node.extend(piece.graph.node)
        known_info = {v.name for v in g.value_info}
        g.value_info.extend(v for v in piece.graph.value_info if v.name not in known_info)
        for t in piece.graph.initializer:
            self._add_initializer(t, weights.array(t.name) if weights else numpy_helper.to_array(t))

    def _add_initializer(self, t: TensorProto, array: np.ndarray) -> None:
        if t.name in self._names:  # shared constants (shapes, scalars) come with every piece that reads them
            if self._names[t.name] != array.tobytes():
                raise ValueError(f"initializer {t.name} differs between pieces")
            return
        self._names[t.name] = array.tobytes() if array.nbytes < self.external_min_bytes else b""
        if self.writer is not None and array.nbytes >= self.external_min_bytes:
            out = TensorProto(name=t.name, dims=t.dims, data_type=t.data_type)
            self.writer.store(out, array)
            self.model.graph.initializer.append(out)
        elif t.data_location == TensorProto.EXTERNAL:  # a reference into a piece's data: bring the bytes in
            self.model.graph.initializer.append(numpy_helper.from_array(array, t.name))
        else:
            self.model.graph.initializer.append(t)


def data_files(model: onnx.ModelProto) -> set[str]:
    """The external data files a model's initializers point into (names relative to the model's folder)."""
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def link_data_files(model_path: Path, model: onnx.ModelProto, folder: Path) -> bool:
    """Hard-link the external data files of ``model`` (loaded from ``model_path`` without its weights) into
    ``folder``, so that piece graphs saved there read the weights in place: no 600 MB copy per piece into the
    piece file and out again (onnxruntime refuses a symbolic link that leaves the model's folder, but a hard
    link is the file itself). False, with nothing left behind, where a link cannot be made (another file
    system) or the model has no external data."""
    names = data_files(model)
    made: list[Path] = []
    try:
        for name in sorted(names):
            os.link(Path(model_path).parent / name, folder / name)
            made.append(folder / name)
    except OSError:
        for path in made:
            path.unlink()
        return False
    return bool(names)


def iter_piece_models(model_path: Path, max_bytes: int = DEFAULT_PIECE_BYTES, inline: bool = True
                      ) -> Iterator[tuple[int, int, Piece, onnx.ModelProto]]:
    """(index, count, piece, standalone FP32 model) for each piece of the model at ``model_path``; with
    ``inline`` False the large external weights stay references (``link_data_files``)."""
    header = onnx.load(str(model_path), load_external_data=False)
    pieces = plan_pieces(header.graph, max_bytes)
    weights = WeightSource(model_path, header.graph)
    for i, piece in enumerate(pieces):
        yield i, len(pieces), piece, piece_model(header, piece, weights, inline)
