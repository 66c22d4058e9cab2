"""User-facing errors. The CLI prints these as one line and exits non-zero.

Anything that is *not* an ``XmrError`` is an internal bug and keeps its traceback.
"""


class XmrError(Exception):
    """Base class of every error caused by user input (files, arguments, data)."""


class DataError(XmrError):
    """A dataset file is missing, malformed, or inconsistent with its siblings."""


class VocabError(XmrError):
    """A vocabulary file is malformed or does not fit the model."""


class CheckpointError(XmrError):
    """A checkpoint cannot be read or mapped onto an xmr model."""


class ConfigError(XmrError):
    """A configuration is invalid or of an unsupported version."""


class ShapeError(XmrError, ValueError):
    """A tensor given to a public API has the wrong shape or dtype."""


class ExportError(XmrError):
    """An exported graph failed a check (ONNX checker, forbidden ops, parity with PyTorch)."""


class CalibrationError(XmrError):
    """INT8 calibration cannot proceed: unsuitable data, options or accuracy target."""


class ArtifactError(XmrError):
    """An artifact directory is incomplete, altered, or from another xmr version."""


class InputError(XmrError, ValueError):
    """Input given to the runtime (features, captions, pairs, galleries) cannot be scored."""


class BackendUnavailableError(XmrError):
    """The backend or precision asked for cannot run here (no GPU, package missing, engine for another GPU)."""


class OutputError(XmrError):
    """An output location cannot be written, or holds something xmr must not replace."""


class MissingFileError(XmrError, FileNotFoundError):
    """A file or directory the user named does not exist (also a ``FileNotFoundError``)."""


class TrainingError(XmrError):
    """Training cannot go on: the data does not fit the run, or the loss diverged."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, white space collapsed (its type name when it has none):
    how a library's multi-line error is quoted inside an xmr one-line message."""
    text = str(error).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(error).__name__
