"""Import checkpoints saved by the authors' released CAMP and IMRAM training code.

Their files pickle the training options (``argparse.Namespace`` for IMRAM,
``easydict.EasyDict`` for CAMP). A checkpoint comes from outside, and reading one must
not run anything it carries. :func:`read_authors_checkpoint` closes three ways in, all
before anything is deserialised:

* Pickled callables (``os.system``, ``builtins.exec``, ...). Every global the pickles name
  is listed with :mod:`pickletools` (which builds nothing) and checked against a short
  allow-list: tensor rebuilding, ``OrderedDict``, numpy scalars and the two option classes,
  mapped onto plain stand-ins, so neither their code nor easydict is needed. The file is
  then read by torch's ``weights_only`` unpickler with exactly those globals added.
* TorchScript. ``torch.load`` sends any zip with a ``constants.pkl`` record to
  ``torch.jit.load``, whatever ``pickle_module`` says, and the ``__setstate__`` methods
  compiled from the archive's ``code/`` then run (one can write chosen bytes to a chosen
  path). Only the two layouts ``torch.save`` writes are accepted: the legacy pickle
  stream, or a zip of ``data.pkl``, ``data/<n>`` storages and bookkeeping records, as seen
  by both torch's zip reader and Python's.
* Things that are not files. Directories, FIFOs (opening one blocks) and devices
  (``/dev/zero`` never ends) are refused without being read.

Every refusal, and every truncated or garbled file, is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import pickletools
import re
import stat
import tarfile
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch
from torch._utils import IMPORT_MAPPING, NAME_MAPPING

from xmr.data.vocab import Vocabulary
from xmr.errors import CheckpointError, first_line
from xmr.models.base import RetrievalModel
from xmr.models.checkpoint import is_checkpoint_file, save_checkpoint
from xmr.models.config import CampConfig, ImramConfig, ModelConfig
from xmr.models.registry import build_model
from xmr.outputs import check_output_file
from xmr.paths import file_sha256

IMRAM_MODES = {"full_IMRAM": "full", "text_IMRAM": "text", "image_IMRAM": "image"}


class _PickledNamespace:
    """Stands in for ``argparse.Namespace`` while unpickling."""


class _PickledDtype:
    """Stands in for ``numpy.dtype`` while unpickling: keeps the name and byte order only."""

    def __init__(self, name: object, align: object = False, copy: object = True) -> None:
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            self.byteorder = state[1]


def _numpy_scalar(dtype: object, data: object) -> int | float | complex | bool:
    """Rebuilds a pickled numpy scalar (``best_rsum`` is one in real checkpoints) from raw bytes."""
    if not isinstance(dtype, _PickledDtype) or not isinstance(dtype.name, str) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("malformed numpy scalar")
    real = np.dtype(dtype.name)
    if real.kind not in "biufc":
        raise pickle.UnpicklingError(f"refusing a numpy scalar of dtype {real}")
    return np.frombuffer(data, dtype=real.newbyteorder(dtype.byteorder), count=1)[0].item()


# Every global a checkpoint may name, and what it resolves to; a file naming any other is
# refused unread. (Storage types, torch.FloatStorage and kin, are torch's own markers.)
_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "argparse.Namespace": _PickledNamespace,
    # weights_only fills only exact dicts/OrderedDicts; an OrderedDict also takes the
    # attribute copy of the items that EasyDict pickles as its state
    "easydict.EasyDict": OrderedDict,
    "numpy.dtype": _PickledDtype,
    "_codecs.encode": codecs.encode,  # numpy scalars carry their bytes through it
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
}
_STORAGE_GLOBAL = re.compile(r"torch\.[A-Za-z]*Storage")
_SAFE_GLOBALS = [(value, name) for name, value in _ALLOWED_GLOBALS.items()]
# opcodes that reach a global other than through GLOBAL (weights_only refuses them too)
_INDIRECT_GLOBAL_OPCODES = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}
# safe_globals edits torch's process-wide allow-list; two imports at once must not undo each other's
_LOAD_LOCK = threading.Lock()

_LEGACY_HEADER = (pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
                  + pickle.dumps(torch.serialization.PROTOCOL_VERSION, protocol=2))
_ZIP_MAGIC = b"PK\x03\x04"  # what torch.load itself looks at to call a file a zip
# records (below the archive's one top folder) of a torch.save zip
_PLAIN_RECORD = re.compile(r"data\.pkl|data/\d+|version|byteorder|\.format_version|\.storage_alignment"
                           r"|\.data/(serialization_id|version)")
# records of torch.jit.save archives (torch itself only looks for constants.pkl)
_TORCHSCRIPT_RECORD = re.compile(r"(constants|bytecode|mobile_info)\.(pkl|json)|(code|constants|extra)/.*"
                                 r"|.*\.(py|debug_pkl)|(.*/)?ts_code/.*")


def _open_regular_file(path: Path) -> BinaryIO:
    """``path`` open for reading if it is a regular file (or a link to one), checked before
    opening and again on the open descriptor, so that no FIFO or device is ever read."""
    not_regular = (f"{path}: not a regular file (a directory, FIFO or device); "
                   "an authors' checkpoint is a file saved by torch.save")
    nonblocking = getattr(os, "O_NONBLOCK", 0)  # so that a FIFO swapped in meanwhile cannot block open
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise CheckpointError(not_regular)
        fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from None
    file = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        file.close()
        raise CheckpointError(not_regular)
    if nonblocking:
        os.set_blocking(fd, True)
    return file


def _pickle_globals(stream: BinaryIO) -> set[str]:
    """The globals one pickle names, listed without building or importing anything."""
    found = set()
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name == "GLOBAL":  # named as torch's unpickler will look it up (Python 2 names mapped)
            module, _, name = str(arg).partition(" ")
            module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
            found.add(f"{module}.{name}")
        elif opcode.name in _INDIRECT_GLOBAL_OPCODES:
            found.add(f"(a global named through {opcode.name})")
    return found


def _refuse_torchscript(path: Path, records: list[str]) -> None:
    if any(_TORCHSCRIPT_RECORD.fullmatch(record) for record in records):
        raise CheckpointError(
            f"{path}: is a TorchScript archive (it holds code/constants records), not a torch.save checkpoint; "
            "torch.load would run the code inside it, so it is refused unread")


def _zip_globals(path: Path, file: BinaryIO) -> set[str]:
    """The globals in ``data.pkl`` of a torch.save zip; TorchScript or any other content is refused."""
    with zipfile.ZipFile(file) as archive:
        names = [info.filename for info in archive.infolist()]
    inner = [name.partition("/")[2] for name in names]
    _refuse_torchscript(path, inner)
    prefix = names[0].partition("/")[0] if names else ""
    unexpected = sorted({name for name, record in zip(names, inner)
                         if not name.startswith(prefix + "/") or not _PLAIN_RECORD.fullmatch(record)})
    if unexpected:
        raise CheckpointError(f"{path}: not a plain torch.save zip archive: unexpected entries {unexpected[:5]}")
    if "data.pkl" not in inner:
        raise CheckpointError(f"{path}: not a plain torch.save zip archive: it has no data.pkl")
    file.seek(0)
    reader = torch._C.PyTorchFileReader(file)  # what torch.load reads the archive with
    records = list(reader.get_all_records())
    _refuse_torchscript(path, records)
    if len(set(inner)) != len(inner) or sorted(inner) != sorted(records):
        raise CheckpointError(f"{path}: not a plain torch.save zip archive: duplicate entries, "
                              "or entries that torch and Python's zipfile read differently")
    return _pickle_globals(io.BytesIO(reader.get_record("data.pkl")))


def _plain(value: Any) -> Any:
    """Options as plain dicts/lists, recursively."""
    if isinstance(value, _PickledNamespace):
        value = vars(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _legacy_globals(path: Path, file: BinaryIO) -> set[str]:
    """The globals in the pickles of a legacy torch.save stream: magic number, protocol,
    system info, the object, its storage keys (raw storage bytes follow, unpickled).
    A file ``tarfile`` takes for a tar (torch.load tries that first: the pre-1.0 format) is refused."""
    try:
        tarfile.open(fileobj=file, mode="r:").close()
    except tarfile.TarError:
        file.seek(0)
        return set().union(*(_pickle_globals(file) for _ in range(5)))
    raise CheckpointError(f"{path}: a tar archive (torch's pre-1.0 format), not a torch.save checkpoint")


def _check_format_and_globals(path: Path, file: BinaryIO) -> None:
    """Refuses, unread, anything but a plain torch.save file naming only allowed globals."""
    head = file.read(len(_LEGACY_HEADER))
    file.seek(0)
    if head.startswith(_ZIP_MAGIC):
        names = _zip_globals(path, file)
    elif head == _LEGACY_HEADER:
        names = _legacy_globals(path, file)
    else:
        start = f"it starts {head[:8]!r}" if head else "it is empty"
        raise CheckpointError(f"{path}: neither a torch.save zip archive nor a legacy torch.save file ({start})")
    refused = sorted(n for n in names if n not in _ALLOWED_GLOBALS and not _STORAGE_GLOBAL.fullmatch(n))
    if refused:
        raise CheckpointError(f"{path}: cannot read as an authors' checkpoint: refusing to unpickle "
                              f"{' '.join(', '.join(refused).split())} (only tensors, containers, numpy scalars "
                              "and the training options may be in it)")
    file.seek(0)


def _reason(error: BaseException) -> str:
    """One line saying why reading failed."""
    if isinstance(error, pickle.UnpicklingError) and error.__context__ is not None:
        error = error.__context__  # torch wraps the unpickler's reason in advice to load unsafely
    return first_line(error)


def read_authors_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict with ``opt`` as a plain mapping, read without running anything
    the file carries: TorchScript archives, anything but the two torch.save layouts, and
    any global outside the allow-list are refused before deserialisation (module docstring)."""
    path = Path(path)
    with _open_regular_file(path) as file:
        try:
            _check_format_and_globals(path, file)
            with _LOAD_LOCK, torch.serialization.safe_globals(_SAFE_GLOBALS):
                blob = torch.load(file, map_location="cpu", weights_only=True, mmap=False)
        except CheckpointError:
            raise
        except Exception as e:  # truncated or garbled files fail in many ways
            raise CheckpointError(f"{path}: cannot read as an authors' checkpoint: {_reason(e)}") from e
    if not isinstance(blob, dict) or "model" not in blob or "opt" not in blob:
        keys = sorted(blob, key=repr) if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path}: expected a dict with 'model' and 'opt' (authors' format), got {keys}")
    blob = dict(blob)
    blob["opt"] = _plain(blob["opt"])
    return blob


def check_output_is_not_input(source: Path, out: Path, role: str = "being imported",
                              original: str = "the authors' original") -> None:
    """Refuses an output path that is the checkpoint being read, however it is spelt
    (``./x/../x/file``, a symlink, a hard link): writing there would destroy the original."""
    try:
        same = os.path.samefile(source, out)
    except OSError:  # either does not exist (yet): they cannot be one file
        same = False
    if same:
        raise CheckpointError(f"{out}: is the checkpoint {role} ({source}); writing there would overwrite {original}, "
                              "choose another output path")


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
    for i, (part, rules) in enumerate(zip(parts, (CAMP_IMAGE_KEYS, CAMP_TEXT_KEYS, CAMP_SIM_KEYS))):
        state.update(map_keys(part, rules, f"model[{i}]"))
    return state


# the authors' training code each importable kind comes from -> its state dict in xmr's key names
AUTHORS_STATES: dict[str, Callable[[dict[str, Any]], dict[str, torch.Tensor]]] = {"camp": _camp_state, "imram": _imram_state}


def _load_weights(model: RetrievalModel, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"keys {unexpected} have no place in the model its options describe")
    for key, tensor in expected.items():
        if key not in state:
            raise CheckpointError(f"missing key for {key!r} in the checkpoint")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"shape mismatch for {key!r}: checkpoint has {tuple(state[key].shape)}, "
                                  f"the config implies {tuple(tensor.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def import_authors_checkpoint(path: str | Path, model: str, vocab: Vocabulary) -> RetrievalModel:
    """An xmr model (eval mode) holding the weights of an authors' ``model`` checkpoint."""
    blob = read_authors_checkpoint(path)
    opt = blob["opt"]
    if not isinstance(opt, Mapping):
        raise CheckpointError(f"{path}: 'opt' is not a mapping of training options")
    if model not in AUTHORS_STATES:
        raise ValueError(f"model must be one of {list(AUTHORS_STATES)}, got {model!r}")
    try:
        state = AUTHORS_STATES[model](blob)
        config: ModelConfig = imram_config(opt) if model == "imram" else camp_config(opt, state)
        if config.vocab_size != len(vocab):
            raise CheckpointError(f"the checkpoint was trained with vocab_size={config.vocab_size} but the vocabulary "
                                  f"has {len(vocab)} words; pass the vocabulary it was trained with")
        result = build_model(config, vocab)
        _load_weights(result, state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    result.authors_metadata = {k: blob[k] for k in ("epoch", "best_rsum", "Eiters") if k in blob and isinstance(blob[k], (int, float))}
    return result.eval()


def convert_authors_checkpoint(path: str | Path, model: str, vocab: str | Path, out: str | Path,
                               overwrite: bool = False) -> RetrievalModel:
    """``xmr import-checkpoint``: the authors' ``model`` checkpoint at ``path`` written to ``out``
    as an xmr checkpoint (with the ``vocab`` JSON it was trained with, and where it came from:
    ``imported_from``, ``source_sha256`` and the authors' epoch/rsum); returns the model.
    ``out`` is checked before any work: never ``path`` itself, nor a file xmr did not write
    (unless ``overwrite``)."""
    path, out = Path(path), Path(out)
    check_output_is_not_input(path, out)
    check_output_file(out, is_checkpoint_file, overwrite, "output checkpoint")
    result = import_authors_checkpoint(path, model, Vocabulary.load(vocab))
    save_checkpoint(result, out, {"imported_from": str(path), "source_sha256": file_sha256(path), **result.authors_metadata})
    return result
