"""``VisionEncoder``: one onnxruntime session over the bundle's vision graph (FP32 or INT8).

The session's signature is checked once, at load: input ``pixel_values`` float32 [N, 3, S, S]
and output ``image_embeds`` float32 [N, rows, hidden] with S, rows and hidden fixed numbers (rows: the
bundle's ``n_queries`` when the caller gives it). A file
that does not load or has another signature raises ``BundleError`` naming the file, so a broken
bundle fails before any prompt is processed.

onnxruntime's telemetry is turned off before it is imported: otherwise importing it writes a device
id and an event database under ``~/.cache/Microsoft/DeveloperTools``. A value the user set is kept.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402 - after the telemetry switch, which onnxruntime reads at import
import onnxruntime as ort  # noqa: E402

from qwenvl_edge.contract import VISION_INPUT as INPUT_NAME  # noqa: E402
from qwenvl_edge.contract import VISION_OUTPUT as OUTPUT_NAME  # noqa: E402
from qwenvl_edge.errors import BundleError


def _session_options(n_threads: int | None, prepack: bool = True) -> ort.SessionOptions:
    """The runtime's session options. onnxruntime repacks the weights for the CPU's kernels at open: 3.7 s
    of a full-size INT8 open, 1.9 s on two threads. ``prepack`` False skips it (open 0.06 s) and packs at
    each product instead (+0.3 to 2 s an encode): less for a session that serves one encode (``run`` frees
    it before the decoder loads), more for one kept across images."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # BiasGelu, DynamicQuantizeMatMul
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the graph is one chain: the parallelism is inside ops
    so.intra_op_num_threads = n_threads or 0  # 0: onnxruntime's default, one thread per physical core
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    so.add_session_config_entry("session.disable_prepacking", "0" if prepack else "1")
    so.add_session_config_entry("session.prepack.enable_parallel", "1")
    return so


def _describe(arg: ort.NodeArg) -> str:
    return f"{arg.name} {arg.type} {list(arg.shape)}"


class VisionEncoder:
    """pixel_values [N, 3, S, S] float32 -> image_embeds [N, rows, hidden] float32 on the CPU.

    ``n_queries``: the rows per image the bundle states (``ModelInfo.n_queries``); a graph with other rows is
    refused. None accepts any fixed number (tools that inspect a graph before any bundle exists). ``prepack``:
    see ``_session_options``.
    """

    def __init__(self, onnx_path: Path | str, n_threads: int | None = None, n_queries: int | None = None,
                 prepack: bool = True):
        self.path = Path(onnx_path)
        self.n_queries = n_queries
        self._stack = contextlib.ExitStack()
        if not self.path.is_file():
            raise BundleError(f"{self.path}: vision model is missing")
        try:
            session = ort.InferenceSession(str(self.path), _session_options(n_threads, prepack),
                                           providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            reason = " ".join(str(e).split())[:300]
            raise BundleError(f"{self.path}: not a loadable ONNX model ({reason})") from None
        self._session: ort.InferenceSession | None = session
        self._stack.callback(self._release)
        self.image_size, self.n_queries, self.hidden_size = self._check_signature(session)

    def _release(self) -> None:
        self._session = None  # onnxruntime frees the session with its last reference

    def _check_signature(self, session: ort.InferenceSession) -> tuple[int, int, int]:
        """(S, rows, hidden) of a graph with the one signature the runtime drives."""
        inputs, outputs = session.get_inputs(), session.get_outputs()
        rows = self.n_queries if self.n_queries is not None else "rows"
        want = (f"want {INPUT_NAME} tensor(float) [N, 3, S, S] -> {OUTPUT_NAME} tensor(float) "
                f"[N, {rows}, hidden]")
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{self.path}: has {len(inputs)} input(s) and {len(outputs)} output(s); {want}")
        x, y = inputs[0], outputs[0]
        got = f"got {_describe(x)} -> {_describe(y)}"
        ok = (x.name == INPUT_NAME and y.name == OUTPUT_NAME
              and x.type == "tensor(float)" and y.type == "tensor(float)"
              and len(x.shape) == 4 and len(y.shape) == 3
              and x.shape[1] == 3 and isinstance(x.shape[2], int) and x.shape[2] == x.shape[3]
              and isinstance(y.shape[1], int) and y.shape[1] == (self.n_queries or y.shape[1])
              and isinstance(y.shape[2], int))
        if not ok:
            raise BundleError(f"{self.path}: wrong vision signature: {got}; {want}")
        return x.shape[2], y.shape[1], y.shape[2]

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise ValueError(f"{self.path}: VisionEncoder is closed")
        return self._session

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] (from ``preprocess_batch``) -> float32 [N, rows, hidden].

        One image per run: a dynamic-INT8 graph scales activations per run, so a batch would make an
        image's rows depend on the other images beside it. Each image is already 1024 tokens, enough
        to keep the matrix kernels busy, so batching would gain next to nothing on a CPU.
        """
        s = self.image_size
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"pixel_values must be [N, 3, {s}, {s}], got {list(pixels.shape)}")
        embeds = np.empty((len(pixels), self.n_queries, self.hidden_size), dtype=np.float32)
        for i, image in enumerate(pixels):
            embeds[i] = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(image[None])})[0][0]
        return embeds  # (N, rows, hidden) float32

    def close(self) -> None:
        """Free the session; safe to call twice."""
        self._stack.close()

    def __enter__(self) -> VisionEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
