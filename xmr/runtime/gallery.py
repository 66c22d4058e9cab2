"""Encoded images and captions, kept where the backend wants them and saved to disk once.

A gallery holds the encoders' outputs (the pair scorer's inputs, ``image_*`` / ``text_*``).
Image tensors are ``[N, R, ...]``. Caption tensors are packed: only each caption's real
tokens are stored, end to end, with per-caption ``offsets``; a launch gets its captions
padded to its own length (``TextGallery.block``), so memory follows the real tokens, not
N x the longest caption. A gallery records the weights and precision that encoded it, so it
is never scored by another model. On disk: a directory with ``gallery.json`` and one
``.npy`` per tensor, loaded memory-mapped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import xmr
from xmr.errors import InputError

GALLERY = "gallery.json"
FORMAT = "xmr-gallery"


@dataclass
class Gallery:
    items: dict[str, torch.Tensor]
    identity: str  # sha256 of the weights that encoded it
    precision: str
    lengths: torch.Tensor | None = None  # captions only: tokens per caption (CPU, int64)
    meta: dict = field(default_factory=dict)
    offsets: dict[int, torch.Tensor] = field(default_factory=dict)  # captions only: see TextGallery

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
                          self.lengths, dict(self.meta), self.offsets)

    def select(self, index: np.ndarray | list[int]) -> Gallery:
        """The items at ``index`` (in that order), as a gallery of the same kind."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        items = {n: t.index_select(0, index.to(t.device)) for n, t in self.items.items()}
        return type(self)(items, self.identity, self.precision, None, dict(self.meta))

    def save(self, path: str | Path) -> Path:
        """Write the gallery to directory ``path`` (replaced atomically if it exists)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            tensors = dict(self.items)
            if self.lengths is not None:
                tensors["lengths"] = self.lengths
            tensors.update({f"offsets_{a}": offsets for a, offsets in self.offsets.items()})
            for name, tensor in tensors.items():
                np.save(work / f"{name}.npy", tensor.detach().cpu().numpy())
            (work / GALLERY).write_text(json.dumps({
                "format": FORMAT, "xmr": xmr.__version__, "kind": self.kind, "count": len(self),
                "identity": self.identity, "precision": self.precision, "tensors": sorted(tensors), **self.meta}, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.replace(work, path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return path

    @staticmethod
    def load(path: str | Path, mmap: bool = True) -> Gallery:
        """A saved gallery as CPU tensors over memory-mapped files (copy-on-write)."""
        path = Path(path)
        header_path = path / GALLERY
        if not header_path.is_file():
            raise InputError(f"{path} is not a saved gallery (no {GALLERY}); save one with gallery.save(path)")
        header = json.loads(header_path.read_text())
        if header.get("format") != FORMAT or header.get("kind") not in GALLERY_KINDS:
            raise InputError(f"{header_path} is not an xmr gallery header")
        tensors = {}
        for name in header["tensors"]:
            file = path / f"{name}.npy"
            if not file.is_file():
                raise InputError(f"gallery {path} lists {name} but {file.name} is missing")
            tensors[name] = torch.from_numpy(np.load(file, mmap_mode="c" if mmap else None))
        lengths = tensors.pop("lengths", None)
        offsets = {int(n.removeprefix("offsets_")): tensors.pop(n) for n in list(tensors) if n.startswith("offsets_")}
        meta = {k: v for k, v in header.items() if k not in ("format", "xmr", "kind", "count", "identity",
                                                             "precision", "tensors")}
        return GALLERY_KINDS[header["kind"]](tensors, header["identity"], header["precision"], lengths, meta, offsets)


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
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        padded = self.block(index, int(self.lengths[index].max()), self.device)
        return TextGallery.from_padded(padded, self.lengths[index], self.identity, self.precision, self.length_axes)


def concat_texts(galleries: list[TextGallery]) -> TextGallery:
    """One caption gallery of several, in order (same model and precision)."""
    first = galleries[0]
    items = {name: torch.cat([g.items[name] for g in galleries]) for name in first.items}
    offsets = {}
    for axes in first.offsets:
        shift = torch.cumsum(torch.tensor([0] + [int((g.lengths ** axes).sum()) for g in galleries[:-1]]), 0)
        offsets[axes] = torch.cat([g.offsets[axes] + s for g, s in zip(galleries, shift.tolist())])
    return TextGallery(items, first.identity, first.precision, torch.cat([g.lengths for g in galleries]),
                       dict(first.meta), offsets)


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
