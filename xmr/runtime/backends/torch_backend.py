"""The PyTorch model itself (the reference): fp32 on CPU or GPU, fp16 on GPU, bf16 on GPUs
and CPUs (oneDNN runs bf16 matrix products on AMX-BF16 / AVX-512 BF16; elsewhere emulated).

Encoder outputs are float32 whatever the precision, as the exported graphs' are, so a
gallery is the same whichever backend encoded it; fp16 and bf16 compute in that type inside
(weights and inputs cast, as autocast breaks on the models' mixed-type ``lerp``), except the
text encoder, whose recurrence stays float32 as in the exported fp16 and bf16 graphs."""

from __future__ import annotations

import torch

from xmr.errors import BackendUnavailableError
from xmr.export.graphs import IMAGE_GLOBAL, TEXT_GLOBAL, PreparedIO
from xmr.models.base import RetrievalModel
from xmr.models.checkpoint import load_checkpoint
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends.base import Backend, Prepared, bf16_emulated

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_problem(precision: str, device: torch.device) -> str | None:
    """Why the torch backend cannot run ``precision`` on ``device`` here, or None if it can."""
    if precision not in DTYPES:
        return f"torch runs fp32, fp16 and bf16, not {precision}; {precision} runs on onnxruntime or tensorrt"
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return (f"torch bf16 needs a GPU with bf16 support (compute capability 8.0+), "
                    f"not {torch.cuda.get_device_name(device)}")
        return None
    if precision == "fp16":
        return ("torch fp16 needs a CUDA GPU (CPU float16 kernels are slow or missing); use fp32, or onnxruntime "
                "for fp16 graphs")
    return None


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, artifacts: Artifacts, precision: str, device: str | torch.device | None = None,
                 model: RetrievalModel | None = None) -> None:
        """The artifacts' checkpoint, or ``model`` itself (``from_model``: no copy, scored where it is)."""
        super().__init__(artifacts, precision)
        if model is not None:
            self.device, self.dtype, self.model = next(model.parameters()).device, torch.float32, model
            return
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch on cuda: no CUDA GPU is available to PyTorch here")
        if (problem := torch_problem(precision, self.device)) is not None:
            raise BackendUnavailableError(problem)
        self.emulated = bf16_emulated(precision, self.device)
        model = load_checkpoint(artifacts.checkpoint()).eval()
        self.dtype = DTYPES[precision]
        self.model = model.to(self.device, self.dtype)
        self.model.txt_enc.float()  # the recurrence stays float32, as in the exported fp16 and bf16 graphs

    @classmethod
    def from_model(cls, model: RetrievalModel, regions: int) -> TorchBackend:
        """A backend over an in-memory model (fp32, on its device) for ``regions`` regions per
        image: how ``xmr eval`` and training score through the runtime without exporting."""
        return cls(Artifacts.of_model(model, regions), "fp32", model=model.eval())

    @property
    def io(self) -> PreparedIO:
        """The model's prepared tensors under the graphs' names (``image_*``, ``text_*``; ``lengths`` apart)."""
        return PreparedIO(self.model.prepared_spec())

    @torch.no_grad()
    def encode_images(self, features: torch.Tensor) -> Prepared:
        regions = self.model.encode_images(features.to(self.dtype))
        outputs = self.io.to_graph_images(self.model.prepare_images(regions))
        if self.model.prefilter is not None:
            outputs[IMAGE_GLOBAL] = self.model.global_images(regions)
        return {name: t.float() for name, t in outputs.items()}

    @torch.no_grad()
    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor) -> Prepared:
        words = self.model.encode_texts(ids, lengths).to(self.dtype)
        outputs = self.io.to_graph_texts(self.model.prepare_texts(words, lengths))
        if self.model.prefilter is not None:
            outputs[TEXT_GLOBAL] = self.model.global_texts(words, lengths)
        return {name: t.float() for name, t in outputs.items()}

    @torch.no_grad()
    def score(self, images: Prepared, texts: Prepared, lengths: torch.Tensor) -> torch.Tensor:
        images = {name: t.to(self.dtype) for name, t in images.items()}
        texts = {name: t.to(self.dtype) for name, t in texts.items()}
        return self.model.score_prepared(*self.io.from_graph(images, texts, lengths)).float()
