"""An export directory as the runtime sees it: manifest, vocabulary, and checked file paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmr.data.vocab import Vocabulary
from xmr.errors import ArtifactError, ExportError
from xmr.export.artifacts import read_manifest
from xmr.export.graphs import GRAPHS
from xmr.models.checkpoint import file_sha256


@dataclass
class Artifacts:
    directory: Path
    manifest: dict[str, Any]
    vocab: Vocabulary | None
    verify: bool = True  # check each file's sha256 against the manifest before it is used
    _verified: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, directory: str | Path, verify: bool = True) -> Artifacts:
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory not found: {directory} (create one with `xmr export`)")
        try:
            manifest = read_manifest(directory)
        except (FileNotFoundError, ExportError) as e:
            raise ArtifactError(str(e)) from e
        except ValueError as e:
            raise ArtifactError(f"{directory / 'manifest.json'} is not valid JSON ({e}); re-export it") from e
        artifacts = cls(directory, manifest, None, verify)
        if manifest.get("vocab"):
            artifacts.vocab = Vocabulary.load(artifacts.checked(manifest["vocab"], "vocabulary"))
        return artifacts

    @property
    def kind(self) -> str:
        return self.manifest["model"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    @property
    def regions(self) -> int:
        return int(self.manifest["regions"])

    @property
    def identity(self) -> str:
        """What galleries are tied to: the weights they were encoded with."""
        return self.manifest["source_checkpoint"]["sha256"]

    def checked(self, entry: dict[str, Any], what: str) -> Path:
        """The file a manifest entry (``file``, ``sha256``) names, after checking it is there and intact."""
        path = self.directory / entry["file"]
        if not path.is_file():
            raise ArtifactError(f"{what} {path.name} is listed in {self.directory / 'manifest.json'} but missing; "
                                f"re-run `xmr export` (or `xmr calibrate` for int8)")
        if self.verify and entry.get("sha256") and path.name not in self._verified:
            if file_sha256(path) != entry["sha256"]:
                raise ArtifactError(f"{path} does not match the sha256 in its manifest (changed after export); "
                                    f"re-export, or load with verify=False to skip the check")
            self._verified.add(path.name)
        return path

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

    def checkpoint(self) -> Path:
        entry = self.manifest.get("checkpoint")
        if entry is None:  # exported before artifacts carried their checkpoint
            source = self.manifest["source_checkpoint"]
            entry = {"file": str(Path(source["path"]).resolve()), "sha256": source["sha256"]}
        return self.checked(entry, "checkpoint")
