"""Import checkpoints saved by the authors' released CAMP and IMRAM training code.

Their files pickle the training options (``argparse.Namespace`` for IMRAM,
``easydict.EasyDict`` for CAMP). We read them with an unpickler that resolves only an
allow-list of globals (tensor rebuilding, ``OrderedDict``, numpy scalars, and those two
option classes mapped onto plain stand-ins), so neither their code nor easydict is
needed and nothing else in the file can run.
"""

from __future__ import annotations

import codecs
import pickle
import re
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from xmr.data.vocab import Vocabulary
from xmr.errors import CheckpointError
from xmr.models.base import RetrievalModel
from xmr.models.config import CampConfig, ImramConfig, ModelConfig
from xmr.models.registry import build_model

IMRAM_MODES = {"full_IMRAM": "full", "text_IMRAM": "text", "image_IMRAM": "image"}


class _PickledNamespace:
    """Stands in for ``argparse.Namespace`` while unpickling."""


class _PickledEasyDict(dict):
    """Stands in for ``easydict.EasyDict`` (a dict that mirrors its items as attributes)."""


def _numpy_scalar(dtype: np.dtype, data: bytes) -> Any:
    """Rebuilds a pickled numpy scalar (``best_rsum`` is one in real checkpoints) from raw bytes."""
    return np.frombuffer(data, dtype=dtype)[0].item()


# Every global the unpickler may resolve; anything else in the file is refused unrun.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("argparse", "Namespace"): _PickledNamespace,
    ("easydict", "EasyDict"): _PickledEasyDict,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # numpy scalars carry their bytes through it
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}") from None


# what torch.load needs of a pickle module: Unpickler (and load, for the legacy format)
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="xmr_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
)


def _plain(value: Any) -> Any:
    """Options as plain dicts/lists, recursively."""
    if isinstance(value, _PickledNamespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_authors_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict with ``opt`` as a plain mapping. Only tensors, containers, numpy
    scalars and the two option classes are unpickled; any other global is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as e:  # unpickling errors come in many types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read as an authors' checkpoint: {first_line}") from e
    if not isinstance(blob, dict) or "model" not in blob or "opt" not in blob:
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: expected a dict with 'model' and 'opt' (authors' format), got {keys}")
    blob = dict(blob)
    blob["opt"] = _plain(blob["opt"])
    return blob


def _opt(opt: Mapping[str, Any], name: str) -> Any:
    if name not in opt:
        raise CheckpointError(f"training options lack {name!r}")
    return opt[name]


def _require(opt: Mapping[str, Any], name: str, allowed: tuple[Any, ...]) -> Any:
    value = _opt(opt, name)
    if value not in allowed:
        raise CheckpointError(f"unsupported option {name}={value!r}; xmr implements {name} in {list(allowed)}")
    return value


def _encoder_fields(opt: Mapping[str, Any]) -> dict[str, Any]:
    _require(opt, "bi_gru", (True,))
    _require(opt, "num_layers", (1,))
    return {
        "vocab_size": int(_opt(opt, "vocab_size")),
        "word_dim": int(_opt(opt, "word_dim")),
        "embed_size": int(_opt(opt, "embed_size")),
        "img_dim": int(_opt(opt, "img_dim")),
        "img_norm": not bool(_opt(opt, "no_imgnorm")),
        "txt_norm": not bool(_opt(opt, "no_txtnorm")),
    }


def imram_config(opt: Mapping[str, Any]) -> ImramConfig:
    _require(opt, "raw_feature_norm", ("clipped_l2norm",))
    if "precomp_enc_type" in opt:
        _require(opt, "precomp_enc_type", ("basic",))
    mode = _require(opt, "model_mode", tuple(IMRAM_MODES))
    return ImramConfig(
        **_encoder_fields(opt),
        mode=IMRAM_MODES[mode],
        steps=int(_opt(opt, "iteration_step")),
        lambda_softmax=float(_opt(opt, "lambda_softmax")),
        memory_norm=not bool(_opt(opt, "no_IMRAM_norm")),
        margin=float(opt.get("margin", 0.2)),
    )


def camp_config(opt: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> CampConfig:
    _require(opt, "measure", ("gate_fusion_new",))
    _require(opt, "fusion_func", ("concat",))
    if opt.get("self_attention"):
        raise CheckpointError("unsupported option self_attention=True; xmr implements the released self_attention=False")
    heads = state.get("reduce_1.heads.weight")
    if heads is None:
        raise CheckpointError("missing key final_reduce_1.linear.2.weight (summary-attention heads)")
    return CampConfig(**_encoder_fields(opt), num_heads=int(heads.shape[0]))


# authors' key (module. prefix removed) -> xmr key
IMRAM_KEYS: list[tuple[str, str]] = [
    (r"img_enc\.fc_local\.(weight|bias)", r"img_enc.fc.\1"),
    (r"txt_enc\.(embed\.weight|rnn\.\w+)", r"txt_enc.\1"),
    (r"(linear|gate)_(t2i|i2t)\.(weight|bias)", r"memory_\2.\1.\3"),
]
CAMP_IMAGE_KEYS = [(r"fc\.(weight|bias)", r"img_enc.fc.\1")]
CAMP_TEXT_KEYS = [(r"(embed\.weight|rnn\.\w+)", r"txt_enc.\1")]
CAMP_SIM_KEYS = [
    (r"((?:weighted_)?(?:img|txt)_(?:key|query)_fc\.weight)", r"\1"),
    (r"fc_([12])\.0\.weight", r"fc_\1.weight"),
    (r"fc_out\.0\.(weight|bias)", r"out_hidden.\1"),
    (r"fc_out\.3\.(weight|bias)", r"out_logit.\1"),
    (r"final_reduce_([12])\.linear\.0\.(weight|bias)", r"reduce_\1.hidden.\2"),
    (r"final_reduce_([12])\.linear\.2\.(weight|bias)", r"reduce_\1.heads.\2"),
]


def map_keys(state: Mapping[str, Any], rules: list[tuple[str, str]], where: str) -> dict[str, torch.Tensor]:
    """Rename every key by the first rule that matches it in full; unmapped keys are refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        bare = key[len("module."):] if key.startswith("module.") else key
        for pattern, replacement in rules:
            if re.fullmatch(pattern, bare):
                out[re.sub(pattern, replacement, bare)] = value
                break
        else:
            raise CheckpointError(f"{where}: cannot map key {key!r} onto an xmr model")
    return out


def _imram_state(blob: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(blob["model"], Mapping):
        raise CheckpointError("IMRAM checkpoint 'model' must be a state dict")
    return map_keys(blob["model"], IMRAM_KEYS, "model")


def _camp_state(blob: dict[str, Any]) -> dict[str, torch.Tensor]:
    parts = blob["model"]
    if not isinstance(parts, (list, tuple)) or len(parts) != 3:
        raise CheckpointError("CAMP checkpoint 'model' must be [image encoder, text encoder, similarity] state dicts")
    state: dict[str, torch.Tensor] = {}
    for part, rules, where in zip(parts, (CAMP_IMAGE_KEYS, CAMP_TEXT_KEYS, CAMP_SIM_KEYS), ("model[0]", "model[1]", "model[2]")):
        state.update(map_keys(part, rules, where))
    return state


def _load_weights(model: RetrievalModel, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"keys {unexpected} have no place in the model its options describe")
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"missing key for {key!r} in the checkpoint")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"shape mismatch for {key!r}: checkpoint has {tuple(state[key].shape)}, "
                f"the config implies {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def import_authors_checkpoint(path: str | Path, model: str, vocab: Vocabulary) -> RetrievalModel:
    """An xmr model (eval mode) holding the weights of an authors' ``model`` checkpoint."""
    blob = read_authors_checkpoint(path)
    opt = blob["opt"]
    if not isinstance(opt, Mapping):
        raise CheckpointError(f"{path}: 'opt' is not a mapping of training options")
    builders: dict[str, Callable[[dict[str, Any]], dict[str, torch.Tensor]]] = {"imram": _imram_state, "camp": _camp_state}
    if model not in builders:
        raise ValueError(f"model must be one of {list(builders)}, got {model!r}")
    try:
        state = builders[model](blob)
        config: ModelConfig = imram_config(opt) if model == "imram" else camp_config(opt, state)
        if config.vocab_size != len(vocab):
            raise CheckpointError(
                f"the checkpoint was trained with vocab_size={config.vocab_size} but the vocabulary has "
                f"{len(vocab)} words; pass the vocabulary it was trained with"
            )
        result = build_model(config, vocab)
        _load_weights(result, state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    result.authors_metadata = {k: blob[k] for k in ("epoch", "best_rsum", "Eiters") if k in blob and isinstance(blob[k], (int, float))}
    return result.eval()
