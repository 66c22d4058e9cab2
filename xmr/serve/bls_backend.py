"""The exported graphs as models of the same Triton server, called by BLS (business logic scripting).

In a repository from ``graph_repository``, a front model's ``Scorer`` plans the blocks as
everywhere else; each encoder call and each pair-scorer block becomes one
``pb_utils.InferenceRequest`` to ``xmr_image_encoder``, ``xmr_text_encoder`` or
``xmr_pair_scorer`` (TensorRT engines or ONNX Runtime, wherever Triton placed them).
Tensors go through host memory. Only Triton's Python-backend stub imports this module.
"""

from __future__ import annotations

import numpy as np
import torch
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

from xmr.export.graphs import GRAPHS
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.base import GraphBackend
from xmr.runtime.backends.tensorrt_backend import profile_limits
from xmr.serve.graph_repository import GRAPH_MODELS, PLAN


class BlsError(RuntimeError):
    """A graph model answered a BLS request with an error."""


class TritonGraphBackend(GraphBackend):
    name = "triton"

    def __init__(self, artifacts: Artifacts, precision: str, platform: str) -> None:
        """Graphs served as ``platform`` models (``tensorrt_plan``: blocks stay inside the engines' profile)."""
        super().__init__(artifacts, precision)
        self.device = torch.device("cpu")  # where the tensors this backend returns live
        self.platform = platform
        self.limits = profile_limits(artifacts) if platform == PLAN else self.limits
        graphs = artifacts.manifest["graphs"]
        self.inputs = {g: [t["name"] for t in graphs[g]["inputs"]] for g in GRAPHS}
        self.outputs = {g: [t.name for t in artifacts.outputs(g)] for g in GRAPHS}

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        request = pb_utils.InferenceRequest(
            model_name=GRAPH_MODELS[graph], requested_output_names=self.outputs[graph],
            inputs=[pb_utils.Tensor(name, feeds[name].contiguous().numpy()) for name in self.inputs[graph]])
        response = request.exec()
        if response.has_error():
            raise BlsError(f"{GRAPH_MODELS[graph]}: {response.error().message()}")
        return {name: torch.from_numpy(np.array(pb_utils.get_output_tensor_by_name(response, name).as_numpy()))
                for name in self.outputs[graph]}  # copied: the response's buffers go with it

    def describe(self) -> str:
        return f"{self.name} {self.precision} ({self.platform} models over BLS)"
