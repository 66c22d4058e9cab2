"""``xmr score-matrix``: tiles, top-K merging, resuming, and Ray runs equal to one process."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import alive, descendants, export_small_imram, invoke

from xmr.errors import InputError, OutputError
from xmr.matrix import MatrixJob, score_matrix
from xmr.matrix.run import RayOptions
from xmr.matrix.tiles import TopK, merge_top_k, plan_tiles, top_k
from xmr.runtime import Scorer

REGIONS, IMG_DIM = 5, 12


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A small IMRAM's artifacts, 14 test images and their 70 captions; tiles of 5 x 16 (3 x 5 tiles)."""
    root = tmp_path_factory.mktemp("matrix")
    export_small_imram(root, n_test=14, seed=5, regions=REGIONS, img_dim=IMG_DIM)
    return MatrixJob(artifacts=str(root / "artifacts"), images=str(root / "images.npy"),
                     captions=str(root / "captions.txt"), backend="onnxruntime", tile_images=5, tile_captions=16)


def _top_k_job(job, k=4):
    return dataclasses.replace(job, top_k=k)


@pytest.fixture(scope="module")
def single(job, tmp_path_factory):
    """The single-process results: full matrix and top-4."""
    root = tmp_path_factory.mktemp("single")
    full = score_matrix(job, root / "full", show_progress=False)
    top = score_matrix(_top_k_job(job), root / "top", show_progress=False)
    assert (full["tiles"], full["scored"], top["scored"]) == (15, 15, 15)
    return root


def _outputs(path):
    return {p.stem: np.load(p) for p in sorted(path.glob("*.npy"))}


def test_tiles_cover_the_matrix_once_row_major():
    tiles = plan_tiles(7, 10, 3, 4)
    assert [(t.images, t.captions) for t in tiles[:4]] == [((0, 3), (0, 4)), ((0, 3), (4, 8)), ((0, 3), (8, 10)),
                                                          ((3, 6), (0, 4))]
    covered = np.zeros((7, 10), int)
    for t in tiles:
        covered[slice(*t.images), slice(*t.captions)] += 1
    assert (covered == 1).all() and [t.index for t in tiles] == list(range(len(tiles)))


def test_merged_top_k_equals_the_top_k_of_whole_rows_ties_to_the_lower_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 23)).astype(np.float32)  # many ties
    parts = [top_k(scores[:, c:c + 5], 3, offset=c) for c in range(0, 23, 5)]
    merged, whole = merge_top_k(parts, 3), top_k(scores, 3)
    np.testing.assert_array_equal(merged.indices, whole.indices)
    np.testing.assert_array_equal(merged.scores, whole.scores)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(whole.indices, expected)
    assert isinstance(merged, TopK) and top_k(scores[:, :2], 3).indices.shape == (6, 2)  # k above the width


def test_the_single_process_matrix_is_the_scorers_and_its_top_k_the_matrixs(job, single):
    split_scores = _outputs(single / "full")["scores"]
    scorer = Scorer.load(job.artifacts, backend="onnxruntime", device="cpu")
    expected = scorer.score(np.load(job.images), open(job.captions).read().splitlines())
    np.testing.assert_allclose(split_scores, expected, atol=1e-5)  # other block shapes: float rounding only
    top = _outputs(single / "top")
    np.testing.assert_array_equal(top["i2t_indices"], np.argsort(-split_scores, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(top["t2i_indices"], np.argsort(-split_scores.T, axis=1, kind="stable")[:, :4])
    np.testing.assert_array_equal(top["i2t_scores"], np.take_along_axis(split_scores, top["i2t_indices"], 1))
    assert json.loads((single / "full" / "job.json").read_text())["complete"] is True


@pytest.mark.parametrize("on_ray", [False, True], ids=["one-process", "ray"])
def test_an_interrupted_run_resumes_skipping_the_tiles_it_recorded(job, single, tmp_path, on_ray):
    if on_ray:
        pytest.importorskip("ray")
    options = RayOptions(workers=2) if on_ray else None
    seen = []

    def stop_after_four(tile):
        seen.append(tile.index)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_matrix(_top_k_job(job), tmp_path / "run", ray=options, show_progress=False, after_tile=stop_after_four)
    assert json.loads((tmp_path / "run" / "job.json").read_text())["complete"] is False
    resumed = score_matrix(_top_k_job(job), tmp_path / "run", ray=options, show_progress=False)
    assert (resumed["skipped"], resumed["scored"]) == (4, 11)
    for name, array in _outputs(single / "top").items():
        np.testing.assert_array_equal(_outputs(tmp_path / "run")[name], array, err_msg=name)
    again = score_matrix(_top_k_job(job), tmp_path / "run", show_progress=False)
    assert (again["skipped"], again["scored"]) == (15, 0)
    with pytest.raises(OutputError, match="another score-matrix job"):
        score_matrix(_top_k_job(job, k=3), tmp_path / "run", show_progress=False)
    assert score_matrix(_top_k_job(job, k=3), tmp_path / "run", show_progress=False, overwrite=True)["scored"] == 15


def test_score_matrix_refuses_bad_input_in_one_line(job, tmp_path):
    for args, message in ((["--tile-images", 0], "tile-images must be a positive integer"),
                          (["--top-k", -1], "top-k must be a positive integer"),
                          (["--workers", 2], "--workers needs --ray"),
                          (["--images", tmp_path / "none.npy"], "not a .npy file")):
        base = {"--artifacts": job.artifacts, "--images": job.images, "--captions": job.captions,
                "--out": tmp_path / "out"}
        extra = dict(zip(args[::2], args[1::2]))
        flat = [str(x) for pair in {**base, **extra}.items() for x in pair]
        result = invoke("score-matrix", *flat)
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.output
    zero = invoke("score-matrix", "--artifacts", job.artifacts, "--images", job.images, "--captions", job.captions,
                  "--out", tmp_path / "out", "--ray", "--workers", 0)
    assert zero.exit_code == 2 and "workers must be a positive integer" in zero.stderr, zero.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError):
        dataclasses.replace(job, captions=job.images).validate()


def test_ray_is_imported_only_by_a_ray_run():
    import subprocess
    import sys

    code = "import sys, xmr.matrix, xmr.matrix.run, xmr.cli; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


ray = pytest.importorskip("ray")


def test_ray_with_two_workers_equals_the_single_process_exactly(job, single, tmp_path):
    result = invoke("score-matrix", "--artifacts", job.artifacts, "--images", job.images, "--captions", job.captions,
                    "--out", tmp_path / "full", "--backend", "onnxruntime", "--tile-images", 5, "--tile-captions", 16,
                    "--ray", "--workers", 2)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(_outputs(tmp_path / "full")["scores"], _outputs(single / "full")["scores"])
    top = score_matrix(_top_k_job(job), tmp_path / "top", ray=RayOptions(workers=2), show_progress=False)
    assert top["scored"] == 15
    for name, array in _outputs(single / "top").items():
        np.testing.assert_array_equal(_outputs(tmp_path / "top")[name], array, err_msg=name)
    assert not ray.is_initialized()


def test_a_ray_actor_killed_mid_run_has_its_tiles_rescored_elsewhere(job, single, tmp_path):
    killed = []

    def kill_a_worker(tile):
        if not killed:
            actor = ray.get_actor("xmr-tile-worker-0")
            ray.kill(actor)
            killed.append(tile.index)

    result = score_matrix(job, tmp_path / "full", ray=RayOptions(workers=2), show_progress=False, after_tile=kill_a_worker)
    assert killed and result["scored"] == 15
    np.testing.assert_array_equal(_outputs(tmp_path / "full")["scores"], _outputs(single / "full")["scores"])
    assert not ray.is_initialized()


def test_eval_on_ray_gives_the_recall_of_eval_in_one_process(job, tmp_path):
    from pathlib import Path

    root = Path(job.artifacts).parent
    args = ("eval", root / "model.pt", "--data", root / "data")
    here = invoke(*args, "--json", tmp_path / "here.json")
    assert here.exit_code == 0, here.output
    on_ray = invoke(*args, "--json", tmp_path / "ray.json", "--ray", "--workers", 2)
    assert on_ray.exit_code == 0, on_ray.output
    metrics = [json.loads((tmp_path / f"{name}.json").read_text())["metrics"] for name in ("here", "ray")]
    assert metrics[0] == metrics[1]
    shortlists = []
    for name, extra in (("short-here", ()), ("short-ray", ("--ray", "--workers", 2))):
        result = invoke(*args, "--shortlist", 4, "--json", tmp_path / f"{name}.json", *extra)
        assert result.exit_code == 0, result.output
        shortlists.append(json.loads((tmp_path / f"{name}.json").read_text())["shortlist"])
    for key in ("metrics", "prefilter", "prefilter_recall_at_k", "pairs_scored", "exhaustive_pairs"):
        assert shortlists[0][key] == shortlists[1][key], key
    assert not ray.is_initialized()


def test_fold5_eval_on_ray_scores_the_folds_of_eval_in_one_process(job, tmp_path):
    """COCO's 5-fold protocol: each fold's images against its own captions, from Ray tiles."""
    from pathlib import Path

    from xmr.data import SynthConfig, write_synthetic

    root = Path(job.artifacts).parent
    write_synthetic(tmp_path / "data", SynthConfig(n_train=8, n_dev=4, n_test=10, regions=REGIONS, img_dim=IMG_DIM,
                                                   seed=5))  # 10 test images: 5 folds of 2
    args = ("eval", root / "model.pt", "--data", tmp_path / "data", "--fold5")
    for name, extra in (("here", ()), ("ray", ("--ray", "--workers", 2))):
        result = invoke(*args, "--json", tmp_path / f"{name}.json", *extra)
        assert result.exit_code == 0, result.output
    here, on_ray = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("here", "ray"))
    assert len(here["folds"]) == 5 and here["folds"] == on_ray["folds"] and here["metrics"] == on_ray["metrics"]
    assert not ray.is_initialized()


def test_sigterm_stops_a_ray_run_and_leaves_no_ray_process(job, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "xmr.cli", "score-matrix", "--artifacts", job.artifacts, "--images", job.images,
               "--captions", job.captions, "--out", str(tmp_path / "out"), "--backend", "onnxruntime",
               "--tile-images", "1", "--tile-captions", "4", "--ray", "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "out" / "tiles").glob("*.done")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list((tmp_path / "out" / "tiles").glob("*.done")), "no tile was recorded within 120 s"
        below = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in below if alive(pid)]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

