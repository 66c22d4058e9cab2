from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xmr.data import SynthConfig, Vocabulary, write_synthetic
from xmr.models import build_model, make_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_VOCAB = ROOT.parent / "shared" / "vocab"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run_xmr(*args: object) -> tuple[int, str, str]:
    """``xmr ARGS`` in this process, through the same entry point as the command: (status, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from xmr.cli import run

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = run([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class CliResult:
    """What ``xmr ARGS`` did (``invoke``): its exit status and everything it printed."""

    def __init__(self, *args: object) -> None:
        self.exit_code, self.stdout, self.stderr = run_xmr(*args)
        self.output = self.stdout + self.stderr


def invoke(*args: object) -> CliResult:
    return CliResult(*args)


def shared_vocab_path(name: str) -> Path:
    path = SHARED_VOCAB / f"{name}_precomp_vocab.json"
    if not path.is_file():
        pytest.skip(f"real SCAN vocabularies not found beside the repository ({SHARED_VOCAB})")
    return path


def export_small_imram(root: Path, n_test: int, seed: int, regions: int = 5, img_dim: int = 12):
    """Under ``root``: synthetic ``data/``, a small random IMRAM with a prefilter head
    (``model.pt``), its fp32 ``artifacts/``, and the test split's ``images.npy`` and
    ``captions.txt``; returns that split."""
    import numpy as np

    from xmr.data import load_split
    from xmr.export.artifacts import export_artifacts
    from xmr.models.checkpoint import save_checkpoint

    write_synthetic(root / "data", SynthConfig(n_train=8, n_dev=4, n_test=n_test, regions=regions, img_dim=img_dim,
                                               seed=seed))
    vocab = Vocabulary.load(root / "data" / "vocab.json")
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=img_dim, embed_size=8, word_dim=8,
                                    global_dim=4), vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    export_artifacts(save_checkpoint(model, root / "model.pt", {"regions": regions}), root / "artifacts", ("fp32",),
                     engine=False)
    split = load_split(root / "data", "test", vocab)
    np.save(root / "images.npy", np.asarray(split.features))
    (root / "captions.txt").write_text("\n".join(split.captions) + "\n")
    return split


@pytest.fixture(scope="session")
def f30k_vocab() -> Vocabulary:
    return Vocabulary.load(shared_vocab_path("f30k"))


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A small synthetic dataset (train 40, dev/test 10 images)."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, SynthConfig(n_train=40, n_dev=10, n_test=10, regions=6, img_dim=16, seed=3))
    return out


def tiny_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, **fields):
    """A small random model whose every parameter is non-degenerate (std 0.3)."""
    torch.manual_seed(seed)
    config = make_config(kind, vocab_size=50, word_dim=8, embed_size=16, img_dim=12, **fields)
    model = build_model(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def random_batch(n_images: int = 3, n_captions: int = 4, regions: int = 5, img_dim: int = 12,
                 lengths: tuple[int, ...] = (7, 1, 3, 5), vocab_size: int = 50, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_images, regions, img_dim, generator=g, dtype=dtype)
    lens = torch.tensor(lengths[:n_captions], dtype=torch.int64)
    ids = torch.randint(4, vocab_size, (n_captions, int(lens.max())), generator=g)
    ids[torch.arange(ids.size(1))[None, :] >= lens[:, None]] = 0
    return features, ids, lens


MODEL_VARIANTS = [
    ("camp", {}),
    ("imram", {"mode": "full"}),
    ("imram", {"mode": "text"}),
    ("imram", {"mode": "image"}),
    ("imram", {"mode": "full", "memory_norm": True, "steps": 2}),
    ("dual", {}),
]
