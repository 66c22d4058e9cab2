"""Encoded images and captions, kept where the backend wants them and saved to disk once.

A gallery holds the encoders' outputs (the pair scorer's inputs, ``image_*`` / ``text_*``),
float32 whatever the precision. Image tensors are ``[N, R, ...]``. Caption tensors are
packed: only each caption's real tokens are stored, end to end, with per-caption
``offsets``; a launch gets its captions padded to its own length (``TextGallery.block``), so
memory follows the real tokens, not N x the longest caption. A gallery records the weights
and precision that encoded it, so it is never scored by another model.

A gallery with prefilter vectors may also carry an approximate index over them
(``with_index``; ``shortlist.PrefilterIndex``), saved as its centroids, each item's list and
its probes.

On disk: a directory with ``gallery.json`` and one ``.npy`` per tensor, loaded
memory-mapped. A saved gallery may come from someone else, so the header records each
file's sha256 and a digest of everything else it says (kind, count, identity, precision,
tensors, meta); ``Gallery.load`` checks both and the structure (dtypes, sizes, lengths and
offsets) before anything is scored: every problem is one ``InputError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xmr
from xmr.errors import InputError, OutputError, first_line
from xmr.outputs import check_output_dir, keep_foreign, staged_directory
from xmr.paths import checked_file, file_sha256, inside, require
from xmr.runtime.shortlist import PrefilterIndex

GALLERY = "gallery.json"
FORMAT = "xmr-gallery"
FORMAT_VERSION = 2  # 2: sha256 per tensor file and a header digest
DIGESTED = ("format", "format_version", "kind", "count", "identity", "precision", "tensors", "meta", "index")
PREFIX = {"images": "image_", "texts": "text_"}
VECTORS = "vectors"  # the prefilter head's vectors, saved as vectors.npy
CENTROIDS = "centroids"  # the prefilter index's centroids, saved as centroids.npy
ASSIGNMENT = "assignment"  # the prefilter index's list of each item, saved as assignment.npy
INDEX_KIND = "ivf-flat"
MAX_HEADER_BYTES = 16 << 20  # a header lists a few tensors; anything larger is not one
FINITE_CHUNK = 1 << 22  # elements checked at a time for NaN/Inf (no gallery-sized temporaries)


@dataclass
class Gallery:
    items: dict[str, torch.Tensor]
    identity: str  # sha256 of the weights that encoded it
    precision: str
    lengths: torch.Tensor | None = None  # captions only: tokens per caption (CPU, int64)
    meta: dict = field(default_factory=dict)
    offsets: dict[int, torch.Tensor] = field(default_factory=dict)  # captions only: see TextGallery
    vectors: torch.Tensor | None = None  # the prefilter head's unit vectors [N, G] in item order (None: no head)
    index: PrefilterIndex | None = None  # an approximate index over the vectors (None: exact search)

    kind = "gallery"

    def __len__(self) -> int:
        return next(iter(self.items.values())).size(0)

    @property
    def device(self) -> torch.device:
        return next(iter(self.items.values())).device

    def to(self, device: torch.device) -> Gallery:
        if self.device == device:
            return self
        return type(self)({n: t.to(device) for n, t in self.items.items()}, self.identity, self.precision,
                          self.lengths, dict(self.meta), self.offsets,
                          None if self.vectors is None else self.vectors.to(device),
                          None if self.index is None else self.index.copy())

    def with_index(self, lists: int | None = None, probes: int | None = None) -> Gallery:
        """This gallery with an approximate prefilter index (``PrefilterIndex.train``: ``lists``
        k-means centroids of its vectors, ``probes`` searched per query), so ``search(...,
        shortlist=K)`` ranks a large gallery in a fraction of exact search's time, at the
        prefilter recall it costs (measure it: docs/retrieval.md). Needs the ``faiss`` extra."""
        if self.vectors is None:
            raise InputError(f"a prefilter index is built over a gallery's prefilter vectors, and this {self.kind} "
                             f"gallery has none (encoded by artifacts without a prefilter head)")
        return type(self)(self.items, self.identity, self.precision, self.lengths, dict(self.meta), self.offsets,
                          self.vectors, PrefilterIndex.train(self.vectors, lists, probes))

    def select(self, index: np.ndarray | list[int]) -> Gallery:
        """The items at ``index`` (in that order), as a gallery of the same kind (without a
        prefilter index: one belongs to the items it was trained on; ``with_index`` again)."""
        index = _index(index, len(self))
        items = {n: _take(t, index) for n, t in self.items.items()}
        return type(self)(items, self.identity, self.precision, None, dict(self.meta), {}, _select_vectors(self, index))

    def check(self, where: str) -> None:
        """The structure every gallery has (``InputError`` naming ``where`` and the problem):
        ``image_*`` float32 tensors with one row per image; see ``TextGallery.check``."""
        if not self.items or not isinstance(self.items, dict):
            raise InputError(f"{where} holds no tensors")
        if not isinstance(self.identity, str) or not isinstance(self.precision, str):
            raise InputError(f"{where}: identity and precision must be strings, got {self.identity!r}, "
                             f"{self.precision!r}"[:300])
        prefix = PREFIX.get(self.kind, "")
        for name, tensor in self.items.items():
            if not isinstance(name, str) or not name.startswith(prefix):
                raise InputError(f"{where}: tensor {name!r} is not an {self.kind} tensor (names start with {prefix!r})")
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.dim() < 1:
                raise InputError(f"{where}: tensor {name} must be a float32 tensor with one row per item, got "
                                 f"{getattr(tensor, 'dtype', type(tensor).__name__)} {list(getattr(tensor, 'shape', []))}")
        sizes = {t.size(0) for t in self.items.values()}
        if self.kind == "images" and len(sizes) != 1:
            raise InputError(f"{where}: its tensors hold different numbers of images {sorted(sizes)}")
        if self.kind == "images" and 0 in sizes:
            raise InputError(f"{where} holds no images")
        if self.kind == "images" and (self.lengths is not None or self.offsets):
            raise InputError(f"{where} holds caption lengths or offsets; an image gallery has image_* tensors only")
        vectors = self.vectors
        if vectors is not None and (not isinstance(vectors, torch.Tensor) or vectors.dtype != torch.float32
                                    or vectors.dim() != 2 or vectors.size(0) != len(self) or vectors.size(1) < 1):
            raise InputError(f"{where}: its prefilter vectors must be float32 [{len(self)}, G] (one per item), got "
                             f"{getattr(vectors, 'dtype', type(vectors).__name__)} {list(getattr(vectors, 'shape', []))}")
        if self.index is not None:
            if vectors is None:
                raise InputError(f"{where} has a prefilter index but no prefilter vectors to index")
            if not isinstance(self.index, PrefilterIndex):
                raise InputError(f"{where}: its index must be a PrefilterIndex, got {type(self.index).__name__}")
            self.index.check(vectors, where)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the gallery to directory ``path``: built beside it and swapped in atomically.

        An existing directory is replaced only if it is a saved gallery or empty (or
        ``overwrite``); a file there, the working directory or one of its parents is refused
        (``OutputError``)."""
        path = _output_path(path)
        self.check(f"this {self.kind} gallery")
        check_output_dir(path, is_gallery, overwrite, "gallery")
        with staged_directory(path) as work:
            entries = {}
            extra = {} if self.lengths is None else {"lengths": self.lengths}
            extra.update({f"offsets_{a}": offsets for a, offsets in self.offsets.items()})
            if self.vectors is not None:
                extra[VECTORS] = self.vectors
            if self.index is not None:
                extra[CENTROIDS] = self.index.centroids
                extra[ASSIGNMENT] = self.index.assignment
            for name, tensor in {**self.items, **extra}.items():
                file = work / f"{name}.npy"
                np.save(file, tensor.detach().cpu().numpy())
                entries[name] = {"file": file.name, "sha256": file_sha256(file)}
            header = {"format": FORMAT, "format_version": FORMAT_VERSION, "xmr": xmr.__version__, "kind": self.kind,
                      "count": len(self), "identity": self.identity, "precision": self.precision,
                      "tensors": entries, "meta": self.meta}
            if self.index is not None:
                header["index"] = {"kind": INDEX_KIND, "probes": self.index.probes}
            header["digest"] = _digest(header)
            (work / GALLERY).write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
            keep_foreign(path, work, gallery_files(path))
        return path

    @staticmethod
    def load(path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> Gallery:
        """A saved gallery as CPU tensors over memory-mapped files (copy-on-write), checked.

        The header must be an xmr gallery header whose digest matches (an edited identity,
        precision or kind is refused); every tensor file a plain ``NAME.npy`` inside ``path``
        whose sha256 matches (``verify=False`` skips only the hashing) and whose dtype and size
        are what the header implies; caption lengths and offsets exactly consistent with the
        packed tensors; no NaN or Inf. Each problem: one ``InputError``. Hashing and the NaN
        check read every file once (about 1-2 s per GB)."""
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"a gallery is loaded from a directory path, got {type(path).__name__}")
        path = Path(path)
        header_path = path / GALLERY
        if not header_path.is_file():
            raise InputError(f"{path} is not a saved gallery (no {GALLERY}); save one with gallery.save(path)")
        inside(path, GALLERY, f"gallery {path}", InputError)  # not a symbolic link
        header = _read_header(header_path)
        tensors = {}
        for name, entry in header["tensors"].items():
            inside(path, name, f"{header_path}: tensor name", InputError)
            if not isinstance(entry, dict) or entry.get("file") != f"{name}.npy":
                raise InputError(f"{header_path}: tensor {name} must be stored as {name}.npy, got {entry!r}"[:300])
            file = (checked_file(path, entry, f"tensor {name}", header_path, InputError) if verify
                    else inside(path, entry["file"], f"{header_path}: tensor {name}", InputError))
            if not file.is_file():  # a FIFO or device would block or never end
                raise InputError(f"tensor {name} {file.name} is listed in {header_path} but missing or not a regular file")
            integer = name in ("lengths", ASSIGNMENT) or name.startswith("offsets_")
            tensors[name] = _read_npy(file, np.dtype(np.int64 if integer else np.float32), mmap)
        lengths = tensors.pop("lengths", None)
        vectors = tensors.pop(VECTORS, None)
        index = _read_index(header, tensors.pop(CENTROIDS, None), tensors.pop(ASSIGNMENT, None), header_path)
        offsets = {}
        for name in [n for n in tensors if n.startswith("offsets_")]:
            axes = name.removeprefix("offsets_")
            if axes not in ("1", "2"):
                raise InputError(f"{header_path}: unknown tensor {name} (offsets are offsets_1 and offsets_2)")
            offsets[int(axes)] = tensors.pop(name)
        gallery = GALLERY_KINDS[header["kind"]](tensors, header["identity"], header["precision"], lengths,
                                                header["meta"], offsets, vectors, index)
        gallery.check(f"gallery {path}")
        if len(gallery) != header["count"]:
            raise InputError(f"gallery {path} holds {len(gallery)} items, its header says {header['count']}")
        for name, tensor in {**gallery.items, **({} if vectors is None else {VECTORS: vectors})}.items():  # centroids: check()
            if not all(torch.isfinite(chunk).all() for chunk in tensor.reshape(-1).split(FINITE_CHUNK)):
                raise InputError(f"gallery {path}: {name} holds NaN or Inf values (an encoder never makes them)")
        return gallery


def is_gallery(path: Path) -> bool:
    """Whether directory ``path`` holds a gallery xmr saved (a ``gallery.json`` of this format)."""
    try:
        header = json.loads((path / GALLERY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("format") == FORMAT


def gallery_files(path: Path) -> set[str]:
    """The entries a saved gallery at ``path`` consists of (none if it is not one)."""
    if not is_gallery(path):
        return set()
    tensors = json.loads((path / GALLERY).read_text(encoding="utf-8")).get("tensors")
    names = {e.get("file") for e in tensors.values() if isinstance(e, dict)} if isinstance(tensors, dict) else set()
    return {GALLERY} | {n for n in names if isinstance(n, str)}


def _output_path(path: object) -> Path:
    """``path`` unless it is the working directory or one of its parents (never replaced)."""
    if not isinstance(path, (str, os.PathLike)):
        raise OutputError(f"a gallery is saved to a directory path, got {type(path).__name__}")
    path = Path(path)
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"refusing to save a gallery to {path}: it is the working directory or one of its parents "
                          f"({resolved}), which saving would replace; choose a new directory")
    return path


def _digest(header: dict[str, Any]) -> str:
    """sha256 of what ``header`` says (the keys in ``DIGESTED`` it has: ``index`` only when
    the gallery has one, so a header without one digests as before it existed)."""
    body = json.dumps({k: header[k] for k in DIGESTED if k in header}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _read_header(path: Path) -> dict[str, Any]:
    """The header at ``path`` if it is an xmr gallery header of this version, unedited."""
    if path.stat().st_size > MAX_HEADER_BYTES:
        raise InputError(f"{path} is {path.stat().st_size} bytes, not a gallery header (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path} is not valid JSON ({str(e)[:200] or type(e).__name__}); re-save the gallery") from e
    where = str(path)
    if not isinstance(header, dict):
        raise InputError(f"{path} must be a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise InputError(f"{path} is not an xmr gallery header (format {header.get('format')!r})"[:300])
    if header.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} is gallery format version {header.get('format_version')!r}, this xmr reads "
                         f"{FORMAT_VERSION} (older galleries carry no sha256s); encode and save it again"[:300])
    kind = require(header, "kind", str, where, InputError)
    if kind not in GALLERY_KINDS:
        raise InputError(f"{path}: unknown gallery kind {kind!r} (expected {' or '.join(GALLERY_KINDS)})"[:300])
    if require(header, "count", int, where, InputError) < 1:
        raise InputError(f"{path}: count must be >= 1, got {header['count']}")
    for key, kind_ in (("identity", str), ("precision", str), ("tensors", dict), ("meta", dict), ("digest", str)):
        require(header, key, kind_, where, InputError)
    if header["digest"] != _digest(header):
        raise InputError(f"{path} was changed after it was saved (its digest does not match what it says); "
                         f"encode and save the gallery again")
    return header


def _read_index(header: dict[str, Any], centroids: torch.Tensor | None, assignment: torch.Tensor | None,
                where: Path) -> PrefilterIndex | None:
    """The prefilter index a header and its tensors describe (None if none of them says one)."""
    entry = header.get("index")
    if entry is None and centroids is None and assignment is None:
        return None
    if not isinstance(entry, dict) or entry.get("kind") != INDEX_KIND or centroids is None or assignment is None:
        raise InputError(f"{where}: a prefilter index is an \"index\" entry {{\"kind\": \"{INDEX_KIND}\", "
                         f"\"probes\": P}} with {CENTROIDS} and {ASSIGNMENT} tensors, got {entry!r}, "
                         f"{'a' if centroids is not None else 'no'} {CENTROIDS} and "
                         f"{'an' if assignment is not None else 'no'} {ASSIGNMENT} tensor"[:300])
    return PrefilterIndex(centroids, assignment, entry.get("probes"))  # type: ignore[arg-type]  # check() checks it


def _read_npy(file: Path, dtype: np.dtype, mmap: bool) -> torch.Tensor:
    """The array in ``file`` (memory-mapped if ``mmap``) after checking from its header alone
    that it is a ``.npy`` of ``dtype`` whose data fills the file exactly."""
    try:
        with file.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, stored = read[version](f)
            offset = f.tell()
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{file} is not a readable .npy file ({first_line(e)[:160]})") from e
    if stored != dtype:
        raise InputError(f"{file} holds {stored}, a gallery stores {dtype} there")
    expected = offset + math.prod(shape) * dtype.itemsize
    if file.stat().st_size != expected:
        raise InputError(f"{file} is truncated or damaged: shape {list(shape)} of {dtype} needs {expected} bytes, "
                         f"the file has {file.stat().st_size}")
    try:
        array = np.load(file, mmap_mode="c" if mmap and math.prod(shape) else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"{file} cannot be read ({first_line(e)[:160]})") from e
    return torch.from_numpy(array)


def _index(index: object, n: int) -> torch.Tensor:
    """A non-empty 1-D integer index into ``n`` items, checked."""
    try:
        array = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
    except ValueError as e:
        raise InputError("a gallery index must be a 1-D list of integers, got ragged rows") from e
    if array.size == 0:
        raise InputError("a gallery index must name at least one item, got an empty one")
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise InputError(f"a gallery index must be a 1-D list of integers, got {array.dtype} {list(array.shape)}")
    bad = (array < 0) | (array >= n)
    if bad.any():
        raise InputError(f"gallery index {array[bad][:5].tolist()} out of range: the gallery holds {n} items")
    return torch.from_numpy(array.astype(np.int64))


class ImageGallery(Gallery):
    """Encoded images: ``image_*`` tensors ``[N, R, ...]``."""

    kind = "images"


class TextGallery(Gallery):
    """Encoded captions, packed: ``items[name]`` holds every caption's real entries end to end
    (``[Σ L, ...]`` for a ``[N, L, ...]`` tensor, ``[Σ L², ...]`` for CAMP's word x word
    ``[N, L, L, ...]``); ``offsets[a]`` is where each caption starts in the tensors with ``a``
    length axes; ``lengths`` its tokens; ``meta["length_axes"]`` the length axes of each tensor
    in its padded form (``[1]`` or ``[1, 2]``)."""

    kind = "texts"

    @classmethod
    def from_padded(cls, padded: dict[str, torch.Tensor], lengths: torch.Tensor, identity: str, precision: str,
                    length_axes: dict[str, list[int]]) -> TextGallery:
        """Pack padded encoder outputs ``[N, L(, L), ...]`` of captions with ``lengths``."""
        items = {name: tensor[_valid(lengths, tensor.size(1), len(length_axes[name])).to(tensor.device)]
                 for name, tensor in padded.items()}
        return cls(items, identity, precision, lengths.cpu(), {"length_axes": length_axes}, _offsets(lengths, length_axes))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def length_axes(self) -> dict[str, list[int]]:
        return self.meta["length_axes"]

    def check(self, where: str) -> None:
        """Also: int64 ``lengths`` in [1, what the packed tensors can hold], packed sizes equal
        to Σ L (Σ L² for two length axes), and offsets exactly the cumulative sums the lengths
        imply in storage order (captions are stored in encoding order, sorted by length): each
        caption reads exactly its own entries."""
        super().check(where)
        lengths = self.lengths
        if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int64 or lengths.dim() != 1 or not len(lengths):
            raise InputError(f"{where}: lengths must be a non-empty int64 vector (tokens per caption), got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} {list(getattr(lengths, 'shape', []))}")
        axes = self.meta.get("length_axes") if isinstance(self.meta, dict) else None
        if not isinstance(axes, dict) or set(axes) != set(self.items) or any(a not in ([1], [1, 2]) for a in axes.values()):
            raise InputError(f"{where}: meta length_axes must give [1] or [1, 2] for each of its tensors "
                             f"{sorted(self.items)}, got {axes!r}"[:300])
        needed = {len(a) for a in axes.values()}
        if set(self.offsets) != needed:
            raise InputError(f"{where}: it has offsets for {sorted(self.offsets)} length axes, its tensors need {sorted(needed)}")
        lengths = lengths.cpu()
        for a in sorted(needed):
            sizes = {t.size(0) for n, t in self.items.items() if len(axes[n]) == a}
            if len(sizes) != 1:
                raise InputError(f"{where}: its tensors with {a} length axes hold different numbers of entries {sorted(sizes)}")
            size = sizes.pop()
            longest = size if a == 1 else math.isqrt(size)
            if int(lengths.min()) < 1 or int(lengths.max()) > longest:
                raise InputError(f"{where}: caption lengths must be in [1, {longest}] (what its packed tensors hold), "
                                 f"got range [{int(lengths.min())}, {int(lengths.max())}]")
            per = lengths ** a
            ends = torch.cumsum(per, 0)
            what = "Σ lengths" if a == 1 else "Σ lengths²"
            if int(ends[-1]) != size:
                raise InputError(f"{where}: its lengths imply {int(ends[-1])} packed entries ({what}), its tensors "
                                 f"with {a} length axes hold {size}")
            offsets = self.offsets[a]
            if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.shape != lengths.shape:
                raise InputError(f"{where}: offsets_{a} must be int64 [{len(lengths)}], got "
                                 f"{getattr(offsets, 'dtype', type(offsets).__name__)} {list(getattr(offsets, 'shape', []))}")
            order = torch.argsort(offsets.cpu(), stable=True)  # captions in storage order (encoding sorts by length)
            expected = torch.cumsum(per[order], 0) - per[order]
            wrong = torch.nonzero(offsets.cpu()[order] != expected).flatten()
            if len(wrong):
                first = int(order[wrong[0]])
                raise InputError(f"{where}: offsets_{a} are not the cumulative sums its lengths imply ({what} in "
                                 f"storage order): caption {first} starts at {int(offsets[first])}, expected "
                                 f"{int(expected[wrong[0]])}")

    def block(self, index: torch.Tensor, length: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors of captions ``index`` padded (with zeros) to ``length`` tokens, on ``device``."""
        lengths = self.lengths[index]
        out = {}
        for name, flat in self.items.items():
            axes = len(self.length_axes[name])
            valid = _valid(lengths, length, axes)
            span = torch.arange(length)
            offsets = self.offsets[axes][index]
            if axes == 1:
                entries = offsets[:, None] + span[None, :]
            else:
                entries = offsets[:, None, None] + span[None, :, None] * lengths[:, None, None] + span[None, None, :]
            entries = torch.where(valid, entries, 0).to(flat.device)
            padded = flat[entries] * valid.view(*valid.shape, *[1] * (flat.dim() - 1)).to(flat.device, flat.dtype)
            out[name] = padded.to(device, non_blocking=True)
        return out

    def select(self, index: np.ndarray | list[int]) -> TextGallery:
        index = _index(index, len(self))
        padded = self.block(index, int(self.lengths[index].max()), self.device)
        selected = TextGallery.from_padded(padded, self.lengths[index], self.identity, self.precision, self.length_axes)
        selected.vectors = _select_vectors(self, index)
        return selected


def concat(galleries: list[Gallery]) -> Any:
    """One gallery of several of one kind, in order (same model and precision), without a
    prefilter index (``with_index`` builds one for the whole)."""
    first = galleries[0]
    if len(galleries) == 1:
        return first
    items = {name: torch.cat([g.items[name] for g in galleries]) for name in first.items}
    with_vectors = all(g.vectors is not None for g in galleries)
    vectors = torch.cat([g.vectors for g in galleries]) if with_vectors else None  # type: ignore[misc]
    if not isinstance(first, TextGallery):
        return type(first)(items, first.identity, first.precision, vectors=vectors)
    offsets = {}
    for axes in first.offsets:
        shift = torch.cumsum(torch.tensor([0] + [int((g.lengths ** axes).sum()) for g in galleries[:-1]]), 0)
        offsets[axes] = torch.cat([g.offsets[axes] + s for g, s in zip(galleries, shift.tolist())])
    return TextGallery(items, first.identity, first.precision, torch.cat([g.lengths for g in galleries]),
                       dict(first.meta), offsets, vectors)


def _select_vectors(gallery: Gallery, index: torch.Tensor) -> torch.Tensor | None:
    return None if gallery.vectors is None else _take(gallery.vectors, index)


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``tensor``. On a CPU through numpy, on one thread: torch's parallel
    gather of a few hundred rows waits about 8 ms for threads an inference session keeps busy
    (measured beside ONNX Runtime on 2 cores), a copy on one thread takes microseconds."""
    if tensor.device.type != "cpu":
        return tensor.index_select(0, index.to(tensor.device))
    return torch.from_numpy(np.take(tensor.numpy(), index.numpy(), axis=0))


def _valid(lengths: torch.Tensor, length: int, axes: int) -> torch.Tensor:
    """Bool ``[n, length]`` (``[n, length, length]`` for two length axes): real entries."""
    real = torch.arange(length)[None, :] < lengths.cpu()[:, None]
    return real if axes == 1 else real[:, :, None] & real[:, None, :]


def _offsets(lengths: torch.Tensor, length_axes: dict[str, list[int]]) -> dict[int, torch.Tensor]:
    """Where each caption starts in the packed tensors with 1 and 2 length axes."""
    for name, axes in length_axes.items():
        if axes not in ([1], [1, 2]):
            raise ValueError(f"cannot pack {name}: its length axes are {axes}, expected [1] or [1, 2]")
    lengths = lengths.cpu().long()
    return {a: torch.cumsum(lengths ** a, 0) - lengths ** a for a in sorted({len(v) for v in length_axes.values()})}


GALLERY_KINDS: dict[str, type[Gallery]] = {"images": ImageGallery, "texts": TextGallery}
