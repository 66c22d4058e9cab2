"""Encoded images and captions, kept where the backend wants them and saved to disk once.

A gallery holds the encoders' outputs (the pair scorer's inputs, ``image_*`` / ``text_*``),
item index first; caption tensors are padded to the longest caption, with ``lengths``. It
records the weights and precision that encoded it, so it is never scored by another model.
On disk: a directory with ``gallery.json`` and one ``.npy`` per tensor, loaded memory-mapped.
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
                          self.lengths, dict(self.meta))

    def select(self, index: np.ndarray | list[int]) -> Gallery:
        """The items at ``index`` (in that order), as a gallery of the same kind."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        items = {n: t.index_select(0, index.to(t.device)) for n, t in self.items.items()}
        lengths = None if self.lengths is None else self.lengths[index]
        return type(self)(items, self.identity, self.precision, lengths, dict(self.meta))

    def save(self, path: str | Path) -> Path:
        """Write the gallery to directory ``path`` (replaced atomically if it exists)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        try:
            tensors = dict(self.items)
            if self.lengths is not None:
                tensors["lengths"] = self.lengths
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
        meta = {k: v for k, v in header.items() if k not in ("format", "xmr", "kind", "count", "identity",
                                                             "precision", "tensors")}
        return GALLERY_KINDS[header["kind"]](tensors, header["identity"], header["precision"], lengths, meta)


class ImageGallery(Gallery):
    """Encoded images: ``image_*`` tensors ``[N, R, ...]``."""

    kind = "images"


class TextGallery(Gallery):
    """Encoded captions: ``text_*`` tensors padded to the longest caption on every length axis
    (``meta["length_axes"]``: ``[N, L, D]`` -> [1], CAMP's word x word ``[N, L, L]`` -> [1, 2]),
    and ``lengths`` ``[N]``."""

    kind = "texts"

    @property
    def length_axes(self) -> dict[str, list[int]]:
        return self.meta["length_axes"]

    def block(self, index: torch.Tensor, length: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors of captions ``index``, cut to ``length`` tokens, on ``device``."""
        index = index.to(self.device)
        return {name: cut_length(t, self.length_axes[name], length).index_select(0, index).to(device, non_blocking=True)
                for name, t in self.items.items()}


def cut_length(tensor: torch.Tensor, axes: list[int], length: int) -> torch.Tensor:
    """A view of ``tensor`` with every axis in ``axes`` cut to ``length``."""
    for axis in axes:
        tensor = tensor.narrow(axis, 0, length)
    return tensor


def pad_length(tensor: torch.Tensor, axes: list[int], length: int) -> torch.Tensor:
    """``tensor`` zero-padded to ``length`` on every axis in ``axes``."""
    widths = [0] * (2 * tensor.dim())
    for axis in axes:
        widths[2 * (tensor.dim() - 1 - axis) + 1] = length - tensor.size(axis)
    return torch.nn.functional.pad(tensor, widths) if any(widths) else tensor


GALLERY_KINDS: dict[str, type[Gallery]] = {"images": ImageGallery, "texts": TextGallery}
