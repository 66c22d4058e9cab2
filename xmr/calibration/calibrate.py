"""``xmr calibrate``: INT8 graphs for an exported artifact directory, and their accuracy report.

1. the calibration set (train or dev split; matching and non-matching pairs) is fed through
   the fp32 graphs; its activation ranges are cached in ``calibration/`` with the set's sha256;
2. every matmul is quantized; if the evaluation split (dev) misses ``accuracy_target``, the
   most sensitive nodes fall back to float32 until it is met (``fallback.py``);
3. the report compares fp32, fp16 and INT8 (and INT8 without fallback, when there was one) on
   the report split (test);
4. the INT8 graphs, the range cache, the report and the updated manifest are moved into the
   artifact directory only when everything succeeded (built in a temporary directory first).
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx

from xmr.calibration.accuracy import mean_rank_agreement, meets_target
from xmr.calibration.config import CalibrationConfig
from xmr.calibration.dataset import build_calibration_set, check_split
from xmr.calibration.fallback import Evaluation, Quantizer, choose_fallback
from xmr.calibration.quantize import quantized_nodes
from xmr.calibration.report import bf16_variant, graph_variant, precision_rows, write_report
from xmr.data import Vocabulary, load_split
from xmr.errors import CalibrationError
from xmr.eval.evaluate import split_scores
from xmr.export.artifacts import ARTIFACT_EXTRAS, TIMING_CACHE, build_engines, copy_timing_cache, install
from xmr.export.manifest import manifest_specs, read_manifest
from xmr.export.graphs import GRAPHS
from xmr.export.precision import graph_path
from xmr.export.tensorrt import BuildOptions, ProfileShapes
from xmr.outputs import check_output_dir, staged_directory
from xmr.paths import file_sha256
from xmr.progress import console
from xmr.runtime import OnnxRuntimeBackend, Scorer
from xmr.runtime.artifacts import Artifacts

RANGES_DIR = "calibration"
CALIBRATION_SET = "calibration_set.json"
DEFAULT_TARGET = 0.99


def _reuse_ranges(artifacts: Path, work: Path, sha256: str, method: str) -> bool:
    """Copy cached ranges into ``work`` when they were computed from this very calibration set."""
    cached = artifacts / RANGES_DIR
    record = cached / CALIBRATION_SET
    if not record.is_file() or json.loads(record.read_text()).get("sha256") != sha256:
        return False
    hits = list(cached.glob(f"*.{method}.json"))
    for path in hits:
        shutil.copy2(path, work / path.name)
    return bool(hits)


def _load(data: Path, split: str, vocab: Vocabulary, purpose: str):
    if split in ("test", "testall") and purpose != "report":
        raise CalibrationError(f"the {purpose} split must be train or dev, not {split!r}")
    try:
        return load_split(data, split, vocab)
    except FileNotFoundError as e:
        raise CalibrationError(f"cannot read the {purpose} split: {e}") from e


def calibrate_artifacts(artifacts: Path, data: Path, config: CalibrationConfig | None = None,
                        accuracy_target: float = DEFAULT_TARGET, eval_split: str = "dev", eval_images: int = 100,
                        report_split: str | None = "test", measure_sensitivity: bool = False,
                        engine: bool | None = None, show_progress: bool = True,
                        expected_model: str | None = None) -> dict[str, Any]:
    """Add INT8 graphs to the artifact directory ``artifacts`` (an ``xmr export`` output);
    returns the updated manifest. ``report_split=None`` skips the report (and never reads it).
    The directory is replaced as a whole when everything succeeded (a kill leaves the old one)."""
    config = config or CalibrationConfig()
    config.validate()
    if not 0 < accuracy_target <= 1:
        raise CalibrationError(f"--accuracy-target must be in (0, 1] (a fraction of fp32), got {accuracy_target}")
    if eval_images < 1:
        raise CalibrationError(f"--eval-images must be at least 1, got {eval_images}")
    opened = Artifacts.open(artifacts)  # every file it lists is confined and checked against its sha256
    manifest = opened.manifest
    if expected_model is not None and opened.kind != expected_model:
        raise CalibrationError(f"{artifacts} holds {opened.kind} artifacts, not {expected_model}; "
                               f"pass --model {opened.kind}")
    check_output_dir(artifacts, lambda _: True, False, "artifact directory")
    if opened.vocab is None:
        raise CalibrationError(f"{artifacts} has no vocabulary (the checkpoint had none): re-export from a checkpoint with one")
    vocab = opened.vocab
    fp32 = {g: opened.graph(g, "fp32") for g in GRAPHS}
    shape = manifest["config"]["img_dim"], manifest["regions"]
    split = check_split(_load(data, config.split, vocab, "calibration"), config.split, *shape)
    evaluation_split = check_split(_load(data, eval_split, vocab, "evaluation"), eval_split, *shape)
    report_data = None if report_split is None else _load(data, report_split, vocab, "report")  # fail before the work
    variants = {p: {g: opened.graph(g, p) for g in GRAPHS} for p in ("fp32", "fp16") if p in opened.precisions()}
    encoders = OnnxRuntimeBackend(opened, "fp32", "cpu")  # the reference: the fp32 graphs on CPU
    with console.status(f"calibration set: {config.images} {config.split} images"):
        calibration = build_calibration_set(split, encoders, config)
    with staged_directory(artifacts) as work:
        scratch = work / ".int8-work"
        ranges = scratch / RANGES_DIR
        ranges.mkdir(parents=True)
        reused = _reuse_ranges(artifacts, ranges, calibration.sha256, config.method)
        reference = split_scores(Scorer(encoders), evaluation_split, eval_images)
        evaluate = Evaluation(opened, evaluation_split, eval_images, reference)
        quantizer = Quantizer(fp32, calibration, config, ranges)
        with console.status(f"quantizing ({config.method}) and checking accuracy on {eval_split}"):
            result = choose_fallback(quantizer, evaluate, accuracy_target, scratch / "candidates", measure_sensitivity)
        final = quantizer.build(scratch / "final", result.exclude)
        for graph, path in final.items():  # a graph without matmuls: its int8 file is the fp32 graph
            if path == fp32[graph]:
                final[graph] = Path(shutil.copy2(path, graph_path(scratch / "final", graph, "int8")))
        (ranges / CALIBRATION_SET).write_text(json.dumps({"sha256": calibration.sha256, "config": asdict(config),
                                                          **calibration.summary()}, indent=2) + "\n")
        int8 = _int8_section(config, calibration, result, final, accuracy_target, eval_split, eval_images, reused)
        report = None if report_split is None else _report(opened, variants, final, result, quantizer, scratch, int8,
                                                           report_data, report_split, accuracy_target, show_progress)
        _install(artifacts, manifest, work, scratch, final, int8, report, engine)
    return read_manifest(artifacts)


def _int8_section(config, calibration, result, final, target, eval_split, eval_images, reused) -> dict:
    nodes = {}
    sensitivity = {(r["graph"], r["node"]): r for r in result.sensitivity}
    for graph in GRAPHS:
        fallback = [{"node": n, "reason": f"kept in float32 to meet accuracy target {target} on {eval_split}",
                     **{k: v for k, v in sensitivity.get((g, n), {}).items() if k not in ("graph", "node")}}
                    for g, n in sorted(result.exclude) if g == graph]
        nodes[graph] = {"quantized": quantized_nodes(onnx.load(str(final[graph]))), "fallback": fallback}
    return {
        "calibration": {"split": config.split, "method": config.method, "seed": config.seed,
                        **({"percentile": config.percentile} if config.method == "percentile" else {}),
                        **calibration.summary(), "ranges": RANGES_DIR, "ranges_reused": reused},
        "accuracy_target": target, "evaluation": {"split": eval_split, "images": eval_images,
                                                  "all_nodes_int8": result.full, "chosen": result.chosen},
        "fallback_steps": result.steps, "sensitivity": result.sensitivity, "nodes": nodes,
    }


def _report(artifacts, variants, final, result, quantizer, work, int8, split, split_name, target,
            show_progress) -> dict:
    variants = {name: graph_variant(artifacts, paths, name) for name, paths in variants.items()}
    if (bf16 := bf16_variant(artifacts)) is not None:
        variants["bf16"] = bf16
    variants["int8"] = graph_variant(artifacts, final, "int8")
    if result.exclude:
        variants["int8 (no fallback)"] = graph_variant(artifacts, quantizer.build(work / "candidates" / "full"), "int8")
    rows = precision_rows(variants, split, show_progress)
    chosen = rows["int8"]
    verdict = (f"INT8 {'meets' if meets_target(chosen, target) else 'MISSES'} the target on {split_name}: rsum "
               f"{chosen['rsum']:.1f} vs fp32 {rows['fp32']['rsum']:.1f} ({100 * chosen['delta_rsum'] / rows['fp32']['rsum']:+.2f}%), "
               f"mean per-query rank correlation {mean_rank_agreement(chosen):.4f} (target {target}); "
               f"{sum(len(n['fallback']) for n in int8['nodes'].values())} node(s) kept in float32.")
    c = int8["calibration"]
    return {"model": artifacts.kind, "split": split_name, "pairs": split.n_images * split.n_captions,
            "calibration": f"{c['method']} on {c['images']} {c['split']} images, {c['captions']} captions, "
                           f"{c['matching_pairs']} matching + {c['non_matching_pairs']} non-matching pairs "
                           f"(set sha256 {c['sha256'][:12]})",
            "accuracy_target": target, "rows": rows, "verdict": verdict,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _int8_engines(staged: Path, manifest: dict[str, Any], engine: bool | None) -> dict[str, Any]:
    """TensorRT engines of the INT8 graphs (same rules as ``xmr export --engine``), merged
    with the engines the export built."""
    previous = manifest["engines"]
    if engine is False:
        return previous
    options = BuildOptions(workspace_bytes=previous.get("workspace_bytes", BuildOptions.workspace_bytes),
                           optimization_level=previous.get("builder_optimization_level", BuildOptions.optimization_level),
                           timing_cache=staged / TIMING_CACHE)
    profile = ProfileShapes({axis: tuple(sizes) for axis, sizes in manifest["profile"].items()})
    built = build_engines(staged, manifest_specs(manifest), ("int8",), profile, options, required=bool(engine))
    if not built["built"]:
        return previous if previous.get("built") else built
    files = previous.get("files", {}) if previous.get("built") else {}
    for graph, by_precision in built["files"].items():
        files.setdefault(graph, {}).update(by_precision)
    return {**built, "files": files}


def _install(artifacts: Path, manifest: dict[str, Any], work: Path, scratch: Path, final: dict[str, Path],
             int8: dict[str, Any], report: dict[str, Any] | None, engine: bool | None) -> None:
    """Complete the new artifact directory ``work``: the INT8 graphs (and engines), the range
    cache, the report and every other entry of ``artifacts`` as it is; manifest last."""
    for graph, path in final.items():
        name = graph_path(artifacts, graph, "int8").name
        manifest["graphs"][graph]["files"]["int8"] = {
            "file": name, "sha256": file_sha256(path), "precision": "int8",
            "quantized_nodes": len(int8["nodes"][graph]["quantized"]),
            "fallback_nodes": len(int8["nodes"][graph]["fallback"])}
        shutil.move(str(path), str(work / name))
    copy_timing_cache(artifacts, work)
    previous_engines = manifest["engines"]
    manifest["int8"] = int8
    manifest["engines"] = _int8_engines(work, manifest, engine)
    if report is not None:
        write_report(report, work)
    shutil.move(str(scratch / RANGES_DIR), str(work / RANGES_DIR))
    shutil.rmtree(scratch)
    int8_engines = {f["int8"]["file"] for f in previous_engines.get("files", {}).values() if "int8" in f}
    replaced = {p.name for p in work.iterdir()} | set(ARTIFACT_EXTRAS) | int8_engines
    install(artifacts, work, manifest, replaced)
