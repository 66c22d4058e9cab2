"""An export directory as the runtime sees it: manifest, vocabulary, and checked file paths.

Every file name comes from the manifest, which may have been written by someone else: each
is a plain entry name inside the artifact directory (``xmr.paths``) whose sha256 the
manifest records and which is checked before the file is used (``verify=False``: names are
still confined, hashes are not computed). Nothing outside the directory is ever read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmr.config import config_to_dict
from xmr.data.vocab import Vocabulary
from xmr.errors import ArtifactError, ExportError, InputError, VocabError
from xmr.export.graphs import GRAPHS, TensorSpec, graph_specs
from xmr.export.manifest import MANIFEST, read_manifest
from xmr.models.base import RetrievalModel
from xmr.paths import checked_file, inside, require

RERUN = "re-run `xmr export` (`xmr calibrate` for int8)"


def weights_sha256(model: RetrievalModel) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes): what ties a gallery to them."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Artifacts:
    directory: Path | None  # None: an in-memory model (``of_model``)
    manifest: dict[str, Any]
    vocab: Vocabulary | None
    verify: bool = True  # check each file's sha256 against the manifest before it is used
    _verified: set[tuple[str, str]] = field(default_factory=set)

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = True) -> Artifacts:
        if not isinstance(directory, (str, os.PathLike)):
            raise ArtifactError(f"an artifact directory is a path, got {type(directory).__name__}")
        if not isinstance(verify, bool):
            raise InputError(f"verify must be True or False, got {verify!r}")
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory not found: {directory} (create one with `xmr export`)")
        try:
            manifest = read_manifest(directory)
        except (FileNotFoundError, ExportError) as e:
            raise ArtifactError(str(e)) from e
        except (ValueError, AttributeError, TypeError, RecursionError) as e:  # not JSON, not an object, too deep
            raise ArtifactError(f"{directory / MANIFEST} is not an xmr artifact manifest ({e}); re-export it") from e
        artifacts = cls(directory, manifest, None, verify)
        if manifest.get("vocab") is not None:
            path = artifacts.checked(manifest["vocab"], "vocabulary")
            try:
                artifacts.vocab = Vocabulary.load(path)
            except VocabError as e:
                raise ArtifactError(f"{e}; {RERUN}") from e
            if len(artifacts.vocab) > artifacts.config["vocab_size"]:
                raise ArtifactError(f"{path} has {len(artifacts.vocab)} words but the model embeds "
                                    f"{artifacts.config['vocab_size']}; {RERUN}")
        return artifacts

    @classmethod
    def of_model(cls, model: RetrievalModel, regions: int) -> Artifacts:
        """What the runtime needs to know of an in-memory model (no directory, no files): its
        config, vocabulary, graph IO for ``regions`` regions, and an identity from its weights."""
        specs = graph_specs(model, regions)
        manifest = {"model": model.kind, "config": config_to_dict(model.config), "regions": regions,
                    "source_checkpoint": {"sha256": weights_sha256(model)},
                    "graphs": {name: {**spec.io(), "files": {}} for name, spec in specs.items()},
                    "engines": {"built": False, "reason": "an in-memory model"}, "profile": {}}
        return cls(None, manifest, model.vocab, verify=False)

    @property
    def kind(self) -> str:
        return self.manifest["model"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def regions(self) -> int:
        return self.manifest["regions"]

    @property
    def identity(self) -> str:
        """What galleries are tied to: the weights they were encoded with."""
        return self.manifest["source_checkpoint"]["sha256"]

    def outputs(self, graph: str) -> list[TensorSpec]:
        """The outputs of ``graph`` as the manifest records them (names, dtypes, shapes)."""
        return [TensorSpec(t["name"], t["dtype"], list(t["shape"])) for t in self.manifest["graphs"][graph]["outputs"]]

    def checked(self, entry: object, what: str) -> Path:
        """The file a manifest entry ``{"file", "sha256"}`` names inside the directory, after
        checking that it is there and (``verify``) has that sha256."""
        listed = self.directory / MANIFEST
        key = (entry.get("file"), entry.get("sha256")) if isinstance(entry, dict) else None
        if key is not None and all(isinstance(k, str) for k in key) and key in self._verified:
            return self.directory / key[0]
        try:
            if self.verify:
                path = checked_file(self.directory, entry, what, listed)
                self._verified.add(key)  # type: ignore[arg-type]
                return path
            path = inside(self.directory, entry.get("file") if isinstance(entry, dict) else entry, f"{listed}: {what}")
            if not path.is_file():
                raise ArtifactError(f"{what} {path.name} is listed in {listed} but missing or not a regular file")
            return path
        except ArtifactError as e:
            raise ArtifactError(str(e) if "re-create" in str(e) else f"{e}; {RERUN}") from e

    def precisions(self) -> list[str]:
        """Precisions every graph has an ONNX file for."""
        graphs = self.manifest["graphs"]
        return [p for p in ("fp32", "fp16", "bf16", "int8") if all(p in graphs[g]["files"] for g in GRAPHS)]

    def graph(self, graph: str, precision: str) -> Path:
        files = self.manifest["graphs"][graph]["files"]
        if precision not in files:
            hint = "run `xmr calibrate`" if precision == "int8" else f"re-export with --precision {precision}"
            raise ArtifactError(f"no {precision} {graph} in {self.directory} (has {', '.join(self.precisions())}); {hint}")
        return self.checked(files[precision], f"{precision} {graph}")

    def engine(self, graph: str, precision: str) -> Path:
        files = require(self.manifest.get("engines"), "files", dict, f"{self.directory / MANIFEST}: engines")
        entry = require(files, graph, dict, f"{self.directory / MANIFEST}: engines.files").get(precision)
        return self.checked(entry, f"{precision} {graph} engine")

    def checkpoint(self) -> Path:
        entry = self.manifest.get("checkpoint")
        if entry is None:
            raise ArtifactError(f"{self.directory / MANIFEST} lists no checkpoint (exported by an older xmr, before "
                                f"artifact directories carried their checkpoint); re-export it with `xmr export`")
        return self.checked(entry, "checkpoint")
