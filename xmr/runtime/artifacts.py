"""An export directory as the runtime sees it: manifest, vocabulary, and checked file paths.

Every file name comes from the manifest, which may have been written by someone else: each
is a plain entry name inside the artifact directory (``xmr.paths``) whose sha256 the
manifest records and which is checked before the file is used (``verify=False``: names are
still confined, hashes are not computed). Nothing outside the directory is ever read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmr.data.vocab import Vocabulary
from xmr.errors import ArtifactError, ExportError, InputError, VocabError
from xmr.export.artifacts import MANIFEST, read_manifest
from xmr.export.graphs import GRAPHS, N_IMAGES, TensorSpec
from xmr.paths import checked_file, inside, require

RERUN = "re-run `xmr export` (`xmr calibrate` for int8)"


@dataclass
class Artifacts:
    directory: Path
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
        check_manifest(manifest, directory / MANIFEST)
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
        return [p for p in ("fp32", "fp16", "int8") if all(p in graphs[g]["files"] for g in GRAPHS)]

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


def check_manifest(manifest: object, path: Path) -> None:
    """What the runtime reads from a manifest, with its type: one ``ArtifactError`` naming the
    first problem (the export's ``read_manifest`` checks the rest)."""
    where = str(path)
    for key, kind in (("model", str), ("config", dict), ("regions", int), ("source_checkpoint", dict),
                      ("graphs", dict)):
        require(manifest, key, kind, where)
    assert isinstance(manifest, dict)
    for key in ("img_dim", "vocab_size", "embed_size"):
        if require(manifest["config"], key, int, f"{where}: config") < 1:
            raise ArtifactError(f"{where}: config {key!r} must be >= 1, got {manifest['config'][key]}")
    if manifest["regions"] < 1:
        raise ArtifactError(f"{where}: 'regions' must be >= 1, got {manifest['regions']}")
    require(manifest["source_checkpoint"], "sha256", str, f"{where}: source_checkpoint")
    names: dict[str, set[str]] = {}
    for graph in GRAPHS:
        entry = require(manifest["graphs"], graph, dict, f"{where}: graphs")
        require(entry, "files", dict, f"{where}: graphs.{graph}")
        for side in ("inputs", "outputs"):
            for tensor in require(entry, side, list, f"{where}: graphs.{graph}"):
                context = f"{where}: graphs.{graph}.{side}"
                require(tensor, "name", str, context)
                require(tensor, "dtype", str, context)
                shape = require(tensor, "shape", list, context)
                if not shape or any(isinstance(d, bool) or not isinstance(d, (int, str)) for d in shape):
                    raise ArtifactError(f"{context}: {tensor['name']} has shape {shape!r}; dims are sizes or axis names"[:300])
            names[f"{graph}.{side}"] = {t["name"] for t in entry[side]}
    features = [t["shape"] for t in manifest["graphs"]["image_encoder"]["inputs"] if t["name"] == "features"]
    if features != [[N_IMAGES, manifest["regions"], manifest["config"]["img_dim"]]]:
        raise ArtifactError(f"{where}: image_encoder takes features {features}, not [n_images, regions "
                            f"{manifest['regions']}, img_dim {manifest['config']['img_dim']}] as the manifest says; re-export")
    encoded = names["image_encoder.outputs"] | names["text_encoder.outputs"] | {"lengths"}
    if names["pair_scorer.inputs"] != encoded:
        raise ArtifactError(f"{where}: pair_scorer inputs {sorted(names['pair_scorer.inputs'])} are not the encoders' "
                            f"outputs {sorted(encoded)}; re-export")
    engines = manifest.get("engines", {})
    if not isinstance(engines, dict) or ("files" in engines and not isinstance(engines["files"], dict)):
        raise ArtifactError(f"{where}: 'engines' must be an object with a 'files' object; re-export")
