"""Every command, fed bad input of every class: exit status 2, exactly one line on stderr that
names the bad value or file, no traceback, nothing lost (docs/security.md counts the cases)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_xmr as xmr

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Good inputs (tiny data, a trained IMRAM, its artifacts) and broken copies of them."""
    root = tmp_path_factory.mktemp("cli_errors")
    w = {"root": root}
    w["data"] = root / "data"
    assert xmr("data", "synth", "-o", w["data"], "--n-train", 20, "--n-dev", 4, "--n-test", 4, "--img-dim", 8,
               "--regions", 4)[0] == 0
    status, _, err = xmr("train", "--model", "imram", "--data", w["data"], "-o", root / "run", "--embed-size", 8,
                         "--word-dim", 8, "--epochs", 1, "--warmup-epochs", 1, "--batch-size", 16)
    assert status == 0, err
    w["ckpt"] = root / "run" / "checkpoint.pt"
    w["art"] = root / "art"
    assert xmr("export", "--model", "imram", "--checkpoint", w["ckpt"], "-o", w["art"], "--no-engine",
               "--precision", "fp32")[0] == 0
    w["file"] = root / "a_file.txt"
    w["file"].write_text("not a directory")
    w["userdir"] = root / "userdata"
    w["userdir"].mkdir()
    (w["userdir"] / "thesis.tex").write_text("years of work")
    w["nonutf8"] = root / "latin1_vocab.json"
    w["nonutf8"].write_bytes('{"word2idx": {"caf\xe9": 4}}'.encode("latin-1"))
    w["listjson"] = root / "list_vocab.json"
    w["listjson"].write_text("[1, 2, 3]")
    w["garbage"] = root / "garbage.pt"
    w["garbage"].write_bytes(b"\x00\x01 not a checkpoint" * 10)
    w["foreign_json"] = root / "results.json"
    w["foreign_json"].write_text('{"mine": true}')
    # data with NaN features, an empty .npy, an empty captions file
    for name in ("nan_data", "empty_npy", "empty_caps"):
        shutil.copytree(w["data"], root / name)
        w[name] = root / name
    features = np.load(w["nan_data"] / "test_ims.npy")
    features[2, 1, 3] = np.nan
    np.save(w["nan_data"] / "test_ims.npy", features)
    train = np.load(w["nan_data"] / "train_ims.npy")
    train[5, 0, 0] = np.inf
    np.save(w["nan_data"] / "train_ims.npy", train)
    (w["empty_npy"] / "test_ims.npy").write_bytes(b"")
    (w["empty_caps"] / "test_caps.txt").write_text("")
    # a checkpoint with NaN weights
    import torch

    blob = torch.load(w["ckpt"], weights_only=True)
    next(iter(blob["state_dict"].values())).view(-1)[0] = float("nan")
    w["nan_ckpt"] = root / "nan.pt"
    torch.save(blob, w["nan_ckpt"])
    # artifacts: manifest without graphs, manifest not an object, truncated and bit-flipped graphs
    for name in ("art_nokeys", "art_list", "art_truncated", "art_flipped"):
        shutil.copytree(w["art"], root / name)
        w[name] = root / name
    manifest = json.loads((w["art"] / "manifest.json").read_text())
    (w["art_nokeys"] / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "graphs"}))
    (w["art_list"] / "manifest.json").write_text("[1, 2]")
    scorer = w["art_truncated"] / "pair_scorer.onnx"
    scorer.write_bytes(scorer.read_bytes()[:100])
    flipped = bytearray((w["art_flipped"] / "image_encoder.onnx").read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    (w["art_flipped"] / "image_encoder.onnx").write_bytes(bytes(flipped))
    # a TorchScript archive where an authors' checkpoint is expected
    w["torchscript"] = root / "model.pth.tar"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, and still what torch.load routes
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(w["torchscript"]))
    assert zipfile.is_zipfile(w["torchscript"])
    w["vocab"] = w["data"] / "vocab.json"
    w["authors"] = ROOT / "tests" / "fixtures" / "authors" / "imram" / "checkpoint_full.pth.tar"
    return w


@pytest.fixture(scope="module")
def full_disk(world):
    """A file system with 8 KiB left and a read-only one, where mounting works (as root)."""
    mounts = {}
    for name, options in (("full", "size=256k"), ("readonly", "size=256k")):
        path = world["root"] / name
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
            break
        mounts[name] = path
    try:
        if "readonly" in mounts:
            subprocess.run(["mount", "-o", "remount,ro", str(mounts["readonly"])], check=True)
        if "full" in mounts:  # leave a few KiB: the first real write fails
            free = shutil.disk_usage(mounts["full"]).free
            (mounts["full"] / "filler").write_bytes(b"\0" * max(0, free - 8192))
        yield mounts
    finally:
        for path in mounts.values():
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


S, T, E, I, C, X, B = "data synth", "train", "eval", "import-checkpoint", "export", "calibrate", "serve-bench"
D = "distill"
TINY_TRAIN = ["--embed-size", 8, "--word-dim", 8, "--epochs", 1, "--batch-size", 16]

# (class, command, arguments with {placeholders} from ``world``, text the one error line must contain)
CASES = [
    # output paths
    ("output", S, ["-o", "{file}"], "a_file.txt is a file"),
    ("output", S, ["-o", "{file}/sub"], "a_file.txt is a file"),
    ("output", S, ["-o", "{userdir}"], "userdata is a non-empty directory that xmr did not write"),
    ("output", S, ["-o", "{readonly}/synth"], "Read-only file system"),
    ("output", S, ["-o", "{full}/synth"], "No space left"),
    ("output", T, ["-m", "imram", "--data", "{data}", "-o", "{file}", *TINY_TRAIN], "a_file.txt is a file"),
    ("output", T, ["-m", "imram", "--data", "{data}", "-o", "{file}/run", *TINY_TRAIN], "a_file.txt is a file"),
    ("output", T, ["-m", "imram", "--data", "{data}", "-o", "{userdir}", *TINY_TRAIN], "userdata is a non-empty"),
    ("output", T, ["-m", "imram", "--data", "{data}", "-o", "{readonly}/run", *TINY_TRAIN], "Read-only file system"),
    ("output", E, ["{ckpt}", "--data", "{data}", "--json", "{userdir}"], "userdata is a directory"),
    ("output", E, ["{ckpt}", "--data", "{data}", "--json", "{file}/m.json"], "a_file.txt is a file"),
    ("output", E, ["{ckpt}", "--data", "{data}", "--json", "{foreign_json}"], "results.json exists and is not"),
    ("output", E, ["{ckpt}", "--data", "{data}", "--json", "{readonly}/m.json"], "Read-only file system"),
    ("output", I, ["{authors}", "-m", "imram", "--vocab", "{f30k}", "-o", "{authors}"], "overwrite the authors"),
    ("output", I, ["{authors}", "-m", "imram", "--vocab", "{f30k}", "-o", "{userdir}"], "userdata is a directory"),
    ("output", I, ["{authors}", "-m", "imram", "--vocab", "{f30k}", "-o", "{foreign_json}"], "results.json exists"),
    ("output", I, ["{authors}", "-m", "imram", "--vocab", "{f30k}", "-o", "{full}/x.pt"], "No space left"),
    ("output", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{file}"], "a_file.txt is a file"),
    ("output", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{userdir}"], "userdata is a non-empty"),
    ("output", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{file}/art"], "a_file.txt is a file"),
    ("output", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{readonly}/art"], "Read-only file system"),
    ("output", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{full}/art", "--no-engine"], "No space left"),
    ("output", B, ["--out", "{file}", "--quick"], "a_file.txt is a file"),
    ("output", B, ["--out", "{userdir}", "--quick"], "userdata is a non-empty directory"),
    ("output", B, ["--out", "{readonly}/sb", "--quick"], "Read-only file system"),
    # non-finite numbers
    ("non-finite", E, ["{ckpt}", "--data", "{nan_data}"], "test_ims.npy"),
    ("non-finite", T, ["-m", "imram", "--data", "{nan_data}", "-o", "{root}/nanrun", *TINY_TRAIN], "train_ims.npy"),
    ("non-finite", E, ["{nan_ckpt}", "--data", "{data}"], "nan.pt"),
    ("non-finite", C, ["-m", "imram", "--checkpoint", "{nan_ckpt}", "-o", "{root}/nanart"], "nan.pt"),
    ("non-finite", S, ["-o", "{root}/s1", "--noise", "nan"], "noise"),
    ("non-finite", S, ["-o", "{root}/s2", "--scale", "inf"], "scale"),
    ("non-finite", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r1", "--lr", "nan"], "nan"),
    ("non-finite", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a1", "--workspace-gib", "nan"], "nan"),
    # nonsensical options
    ("option", S, ["-o", "{root}/s3", "--regions", 0], "regions"),
    ("option", S, ["-o", "{root}/s4", "--img-dim", 0], "img_dim"),
    ("option", S, ["-o", "{root}/s5", "--n-train", -2], "n_train"),
    ("option", S, ["-o", "{root}/s6", "--objects", 0], "objects"),
    ("option", S, ["-o", "{root}/s7", "--n-train", 10**12], "memory"),
    ("option", S, ["-o", "{root}/s8", "--regions", 100000], "memory"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r2", "--epochs", 0], "epochs"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r3", "--batch-size", 1], "batch_size"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r4", "--lr", 0], "learning_rate"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r5", "--grad-clip", -1], "grad_clip"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r6", "--device", "cuda"], "no CUDA GPU is available"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r7", "--device", "gpu"], "'gpu'"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r8", "--embed-size", 0], "embed_size"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r9", "--steps", 0], "steps"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r10", "--max-steps", -1], "max_steps"),
    ("option", T, ["-m", "imram", "--data", "{data}", "-o", "{root}/r11", "--embed-size", 10**6], "memory"),
    ("option", T, ["-m", "camp", "--data", "{data}", "-o", "{root}/r12", "--batch-size", 500], "batch"),
    ("option", E, ["{ckpt}", "--data", "{data}", "--device", "cuda"], "no CUDA GPU is available"),
    ("option", E, ["{ckpt}", "--data", "{data}", "--split", "bogus"], "bogus"),
    ("option", E, ["{ckpt}", "--data", "{data}", "--shortlist", 0], "--shortlist"),
    ("option", E, ["{ckpt}", "--data", "{data}", "--compare"], "give --shortlist K too"),
    ("option", E, ["{ckpt}", "--data", "{data}", "--shortlist", 4, "--fold5"], "--fold5"),
    ("option", D, ["{ckpt}", "--data", "{data}", "-o", "{root}/d1.pt", "--epochs", 0], "epochs"),
    ("option", D, ["{ckpt}", "--data", "{data}", "-o", "{root}/d2.pt", "--prefilter-dim", -1], "global_dim"),
    ("output", D, ["{ckpt}", "--data", "{data}", "-o", "{ckpt}"], "being distilled"),
    ("output", D, ["{ckpt}", "--data", "{data}", "-o", "{foreign_json}"], "results.json exists"),
    ("file", D, ["{garbage}", "--data", "{data}", "-o", "{root}/d3.pt"], "garbage.pt"),
    ("option", E, ["{ckpt}", "--data", "{data}", "--fold5"], "divisible by 5"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a2", "--regions", 0], "--regions 0"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a3", "--regions", 100000], "--regions 100000"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a4", "--max-length", 0], "--max-length 0"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a5", "--max-images", 0], "--max-images 0"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a6", "--opset", 5], "--opset 5"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a7", "--opset", 99], "--opset 99"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a8", "--optimization-level", 9],
     "--optimization-level 9"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a9", "--workspace-gib", 0], "--workspace-gib 0"),
    ("option", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a10", "--precision", "fp32,bf8"], "bf8"),
    ("option", C, ["-m", "camp", "--checkpoint", "{ckpt}", "-o", "{root}/a11"], "holds a imram model, not camp"),
    ("option", X, ["-m", "camp", "--artifacts", "{art}", "--data", "{data}"], "imram artifacts, not camp"),
    ("option", X, ["-m", "imram", "--artifacts", "{art}", "--data", "{data}", "--calibration-images", 0],
     "--calibration-images 0"),
    ("option", X, ["-m", "imram", "--artifacts", "{art}", "--data", "{data}", "--eval-images", 0], "--eval-images"),
    ("option", X, ["-m", "imram", "--artifacts", "{art}", "--data", "{data}", "--accuracy-target", 2],
     "--accuracy-target"),
    ("option", X, ["-m", "imram", "--artifacts", "{art}", "--data", "{data}", "--split", "test"], "'test'"),
    ("option", X, ["-m", "imram", "--artifacts", "{art}", "--data", "{data}", "--method", "percentile",
                   "--percentile", 0], "percentile"),
    ("option", B, ["--out", "{root}/sb1", "--images", 0], "images"),
    ("option", B, ["--out", "{root}/sb2", "--seconds", -1], "seconds"),
    ("option", B, ["--out", "{root}/sb3", "--gallery", 0], "gallery"),
    ("option", B, ["--out", "{root}/sb4", "--online-seconds", 0], "seconds"),
    ("option", B, ["--out", "{root}/sb5", "--backend", "foo"], "foo"),
    ("option", B, ["--out", "{root}/sb6", "--precision", "bf8"], "bf8"),
    ("option", B, ["--out", "{root}/sb7", "--device", "cuda"], "no CUDA GPU is available"),
    ("option", B, ["--out", "{root}/sb8", "--model", "dual"], "'dual'"),
    ("option", S, ["-o", "{root}/s9", "--regions", "many"], "--regions"),
    ("option", E, ["{ckpt}", "--bogus-flag"], "--bogus-flag"),
    ("option", "nonsense", [], "nonsense"),
    # broken files
    ("file", E, ["{ckpt}", "--data", "{empty_npy}"], "test_ims.npy"),
    ("file", E, ["{ckpt}", "--data", "{empty_caps}"], "test_caps.txt"),
    ("file", E, ["{ckpt}", "--data", "{data}", "--vocab", "{nonutf8}"], "latin1_vocab.json"),
    ("file", E, ["{ckpt}", "--data", "{data}", "--vocab", "{listjson}"], "list_vocab.json"),
    ("file", E, ["{garbage}", "--data", "{data}"], "garbage.pt"),
    ("file", E, ["{userdir}", "--data", "{data}"], "userdata"),
    ("file", E, ["{ckpt}", "--data", "{file}"], "a_file.txt"),
    ("file", T, ["-m", "imram", "--data", "{data}", "--vocab", "{nonutf8}", "-o", "{root}/r13"], "latin1_vocab.json"),
    ("file", S, ["-o", "{root}/s10", "--vocab", "{nonutf8}"], "latin1_vocab.json"),
    ("file", X, ["-m", "imram", "--artifacts", "{art_nokeys}", "--data", "{data}"], "'graphs'"),
    ("file", X, ["-m", "imram", "--artifacts", "{art_list}", "--data", "{data}"], "manifest.json"),
    ("file", X, ["-m", "imram", "--artifacts", "{art_truncated}", "--data", "{data}"], "pair_scorer.onnx"),
    ("file", X, ["-m", "imram", "--artifacts", "{art_flipped}", "--data", "{data}"], "image_encoder.onnx"),
    ("file", I, ["{garbage}", "-m", "imram", "--vocab", "{f30k}", "-o", "{root}/i1.pt"], "garbage.pt"),
    ("file", I, ["{torchscript}", "-m", "imram", "--vocab", "{f30k}", "-o", "{root}/i2.pt"], "TorchScript"),
    ("file", I, ["{authors}", "-m", "imram", "--vocab", "{nonutf8}", "-o", "{root}/i3.pt"], "latin1_vocab.json"),
    ("file", C, ["-m", "imram", "--checkpoint", "{garbage}", "-o", "{root}/a12"], "garbage.pt"),
    # messages are never rich markup
    ("message", E, ["{root}/runs/[bold]ck.pt"], "runs/[bold]ck.pt"),
    ("message", E, ["{root}/a[/x]b.pt"], "a[/x]b.pt"),
    ("message", S, ["-o", "{root}/s11", "--vocab", "[red]v.json"], "[red]v.json"),
    ("message", C, ["-m", "imram", "--checkpoint", "{ckpt}", "-o", "{root}/a13", "--precision", "[fp8]"], "[fp8]"),
]


def _arguments(case_args: list, world: dict[str, Path], mounts: dict[str, Path]) -> list[str]:
    from conftest import shared_vocab_path

    values = {**world, **mounts}
    args = []
    for a in case_args:
        text = str(a)
        for missing in ("readonly", "full"):
            if f"{{{missing}}}" in text and missing not in mounts:
                pytest.skip("cannot mount a small or read-only file system here")
        if "{f30k}" in text:
            text = text.replace("{f30k}", str(shared_vocab_path("f30k")))
        for key, value in values.items():
            text = text.replace(f"{{{key}}}", str(value))
        args.append(text)
    return args


@pytest.mark.parametrize("kind, command, args, expected", CASES,
                         ids=[f"{c[0]}:{c[1]}:{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_with_status_2(world, full_disk, monkeypatch, kind, command, args, expected):
    monkeypatch.chdir(world["root"])
    before = {p: p.stat().st_mtime_ns for p in world["root"].rglob("*") if p.is_file()
              and "runs" not in p.parts and p.suffix != ".cache"}
    status, stdout, stderr = xmr(*command.split(), *_arguments(args, world, full_disk))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert status == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout
    changed = [p for p, mtime in before.items() if not p.exists() or p.stat().st_mtime_ns != mtime]
    assert not changed, f"inputs or other files changed: {changed}"


def test_the_case_table_covers_every_command_and_class():
    commands = {c[1] for c in CASES}
    assert {S, T, E, I, C, X, B, D} <= commands
    assert {c[0] for c in CASES} == {"output", "non-finite", "option", "file", "message"}


def _xmr_process(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xmr.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})}, **kwargs)


@pytest.mark.slow
def test_a_real_process_prints_one_line_at_any_terminal_width(world):
    child = _xmr_process("export", "--model", "imram", "--checkpoint", str(world["ckpt"]),
                         "-o", str(world["userdir"]), env={"COLUMNS": "20"})
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 2 and stderr.count("\n") == 1 and "did not write" in stderr, stderr


def _interrupt_while_staging(out: Path) -> tuple[int, str] | None:
    """Exit status and stderr of an ``xmr data synth -o out`` sent SIGINT while its staging
    directory exists (the dataset half written); None when it may have finished before the
    signal landed: it had, or this process stalled between looking and signalling (a GC
    pause late in the suite). Writing takes ~5 s; the signal goes as soon as staging shows."""
    child = _xmr_process("data", "synth", "-o", str(out), "--n-train", "16000", "--img-dim", "256")
    staging = f".{out.name}.xmr-new-*"
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(staging)) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        looked = time.monotonic()
        if child.poll() is not None or not list(out.parent.glob(staging)):
            child.communicate(timeout=60)
            return None
        child.send_signal(signal.SIGINT)
        stalled = time.monotonic() - looked > 0.5
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    return None if stalled else (child.returncode, stderr)


@pytest.mark.slow
def test_ctrl_c_prints_interrupted_and_leaves_no_half_written_output(tmp_path):
    for attempt in range(3):
        root = tmp_path / str(attempt)
        root.mkdir()
        if (interrupted := _interrupt_while_staging(root / "synth")) is not None:
            break
    else:
        pytest.fail("xmr data synth finished before it could be interrupted, three times")
    status, stderr = interrupted
    assert status == 130 and stderr.strip() == "interrupted", stderr
    assert not list(root.iterdir())  # neither the dataset nor its staging directory
