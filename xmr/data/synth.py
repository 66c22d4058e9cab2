"""Deterministic synthetic retrieval data in the SCAN precomp format.

An image is a set of ``regions`` region vectors: ``objects`` of them show an object, a
noun with a colour (``feature = scale * (noun_prototype + colour_prototype + noise)``), the
rest are clutter (background prototypes + noise). Prototypes are random unit vectors;
``scale`` gives features the magnitude of real bottom-up features (norms in the tens),
which matters to models that do not normalise their embeddings (CAMP). Each caption names some of the image's
objects with their colours, in words from the real Flickr30K vocabulary
("a red car beside a white dog").

Images come in *twins*: the second image of a pair has the same nouns and the same
colours, bound differently ("a white car beside a red dog"). Any model that pools regions
and words before comparing them (a dual encoder) gives twins the same score for every
caption; only a model that aligns words with regions, i.e. cross-attention, separates
them. Everything is drawn from one seeded generator, so a config gives the same bytes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from xmr.config import check_float, check_int, check_memory, config_to_dict, format_bytes, save_json
from xmr.data.vocab import Vocabulary
from xmr.errors import ConfigError, OutputError, VocabError
from xmr.outputs import check_output_dir, keep_foreign, staged_directory

DEFAULT_DATA = Path("data/synth")  # where `xmr data synth` writes and every command reads by default
NOUNS = (
    "dog cat car horse bird boat truck bus umbrella bag guitar bench bicycle table lamp "
    "cup box flower sign book phone bottle balloon shirt jacket skateboard surfboard frisbee tent train"
).split()
COLORS = "red white blue black green yellow brown orange pink purple gray silver".split()
RELATIONS = ("beside", "next to", "near", "behind", "in front of", "with")
# {o[i]} is "colour noun" of the i-th described object; templates name 1 to 3 objects.
TEMPLATES = (
    ("a {o0} .",),
    ("a {o0} {rel} a {o1} .", "there is a {o0} {rel} a {o1} .", "a photo of a {o0} {rel} a {o1}",
     "the {o0} is {rel} the {o1} .", "a {o0} and a {o1} on the street ."),
    ("a {o0} , a {o1} and a {o2} .", "a {o0} {rel} a {o1} and a {o2} in the park ."),
)
FILLER_WORDS = "a an the there is of on and photo street park , .".split()


def synthetic_words() -> list[str]:
    """Every word a synthetic caption can contain (all are in the Flickr30K vocabulary)."""
    relation_words = {w for rel in RELATIONS for w in rel.split()}
    template_words = {w for group in TEMPLATES for template in group for w in template.split() if not w.startswith("{")}
    return sorted({*NOUNS, *COLORS, *FILLER_WORDS, *relation_words, *template_words})


CAPTION_BYTES = 120  # memory of one caption string in the list a split is built in (~45 bytes on disk)
SYNTH_MAX_BYTES = 1 << 40  # a synthetic dataset larger than 1 TiB is a typo, whatever the machine
CONFIG_FILE = "synth_config.json"
SYNTH_FILES = {CONFIG_FILE, "vocab.json", *(f"{s}_{k}" for s in ("train", "dev", "test") for k in ("ims.npy", "caps.txt"))}


@dataclass
class SynthConfig:
    """Shape and difficulty of a synthetic dataset. Every field is checked on construction
    (``ConfigError`` naming the field and its valid range), and so is the memory the largest
    split needs (a split is built in memory before it is written)."""

    VERSION = 1

    n_train: int = 2000  # images in the train split (5 captions each)
    n_dev: int = 200  # images in the dev split
    n_test: int = 500  # images in the test split
    captions_per_image: int = 5
    regions: int = 12  # regions per image (objects + clutter), like the 36 of bottom-up features
    objects: int = 3  # objects per image; captions name 1 to min(objects, 3) of them
    img_dim: int = 128  # region feature size (2048 for real bottom-up features)
    noise: float = 0.5  # std of the per-region noise, relative to a prototype's norm
    scale: float = 10.0  # norm of a prototype; bottom-up region features have norms in the tens
    clutter_types: int = 16  # background prototypes for non-object regions
    seed: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_int(owner, "objects", self.objects, 1, min(len(COLORS), len(NOUNS)))
        if check_int(owner, "regions", self.regions, 1) < self.objects:
            raise ConfigError(f"{owner}: regions ({self.regions}) must be >= objects ({self.objects}): "
                              "each object is a region")
        for name in ("n_train", "n_dev", "n_test"):
            if check_int(owner, name, getattr(self, name), 2) % 2:
                raise ConfigError(f"{owner}: {name} must be an even integer >= 2 (images come in twins), "
                                  f"got {getattr(self, name)}")
        for name in ("captions_per_image", "img_dim", "clutter_types"):
            check_int(owner, name, getattr(self, name), 1)
        check_int(owner, "seed", self.seed, 0)
        check_float(owner, "noise", self.noise, 0.0)
        check_float(owner, "scale", self.scale, 0.0, above=True)
        hint = "lower the image counts, regions or img_dim"
        check_memory(owner, f"the largest split ({max(self.split_sizes().values())} images x {self.regions} "
                            f"regions x {self.img_dim} floats)", self.memory_bytes(), hint)
        if self.disk_bytes() > SYNTH_MAX_BYTES:
            raise ConfigError(f"{owner}: the dataset would take about {format_bytes(self.disk_bytes())} of disk, "
                              f"more than the {format_bytes(SYNTH_MAX_BYTES)} a synthetic dataset may take; {hint}")

    def split_sizes(self) -> dict[str, int]:
        """Images per split."""
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}

    def memory_bytes(self) -> int:
        """Peak memory of ``write_synthetic``: the largest split's float32 features and
        captions, one image being drawn (float64) and the prototypes."""
        largest = max(self.split_sizes().values())
        per_image = self.regions * self.img_dim * 4 + self.captions_per_image * CAPTION_BYTES
        drawing = 4 * self.regions * self.img_dim * 8 + (len(NOUNS) + len(COLORS) + self.clutter_types) * self.img_dim * 8
        return largest * per_image + drawing

    def disk_bytes(self) -> int:
        """Size of the written dataset (features, captions at ~45 bytes, vocabulary), about."""
        images = sum(self.split_sizes().values())
        return images * (self.regions * self.img_dim * 4 + self.captions_per_image * 45) + (1 << 20)


@dataclass
class _Prototypes:
    noun: np.ndarray  # (n_nouns, img_dim)
    color: np.ndarray  # (n_colors, img_dim)
    clutter: np.ndarray  # (clutter_types, img_dim)


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _image_twins(cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Nouns and colours ``(2, objects)`` for a twin pair: same sets, colours rotated."""
    nouns = rng.choice(len(NOUNS), size=cfg.objects, replace=False)
    colors = rng.choice(len(COLORS), size=cfg.objects, replace=False)
    shift = 1 + rng.integers(cfg.objects - 1) if cfg.objects > 1 else 0
    return np.stack([nouns, nouns]), np.stack([colors, np.roll(colors, shift)])


def _region_features(cfg: SynthConfig, protos: _Prototypes, nouns: np.ndarray, colors: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    regions = np.empty((cfg.regions, cfg.img_dim))
    regions[: cfg.objects] = protos.noun[nouns] + protos.color[colors]
    clutter = rng.integers(cfg.clutter_types, size=cfg.regions - cfg.objects)
    regions[cfg.objects :] = protos.clutter[clutter]
    regions += cfg.noise * rng.standard_normal(regions.shape) / np.sqrt(cfg.img_dim)
    return cfg.scale * regions[rng.permutation(cfg.regions)]


def _caption(nouns: np.ndarray, colors: np.ndarray, rng: np.random.Generator) -> str:
    n_named = int(rng.integers(1, min(len(nouns), 3) + 1))
    # two objects is the common case: weight it like real captions' "X with Y"
    if len(nouns) >= 2 and rng.random() < 0.6:
        n_named = 2
    chosen = rng.permutation(len(nouns))[:n_named]
    group = TEMPLATES[n_named - 1]
    template = group[int(rng.integers(len(group)))]
    objects = {f"o{i}": f"{COLORS[colors[j]]} {NOUNS[nouns[j]]}" for i, j in enumerate(chosen)}
    return template.format(rel=RELATIONS[int(rng.integers(len(RELATIONS)))], **objects)


def generate_split(cfg: SynthConfig, protos: _Prototypes, n_images: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Features ``float32 [n_images, regions, img_dim]`` and ``n_images * captions_per_image`` captions."""
    feats = np.empty((n_images, cfg.regions, cfg.img_dim), dtype=np.float32)
    captions: list[str] = []
    for pair in range(n_images // 2):
        nouns, colors = _image_twins(cfg, rng)
        for twin in range(2):
            feats[2 * pair + twin] = _region_features(cfg, protos, nouns[twin], colors[twin], rng)
            captions.extend(_caption(nouns[twin], colors[twin], rng) for _ in range(cfg.captions_per_image))
    return feats, captions


def synth_vocabulary(base: Vocabulary | None = None) -> Vocabulary:
    """The built-in vocabulary (special tokens + synthetic words), or ``base`` checked to cover them."""
    if base is None:
        return Vocabulary.from_words(synthetic_words())
    missing = [w for w in synthetic_words() if w not in base.word2idx]
    if missing:
        raise VocabError(f"the vocabulary lacks words the synthetic captions use: {missing}")
    return base


def is_synthetic_dataset(path: Path) -> bool:
    """True when ``path`` holds a ``synth_config.json`` that ``write_synthetic`` of this xmr wrote."""
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    names = {f.name for f in fields(SynthConfig)} | {"version"}
    return isinstance(data, dict) and data.get("version") == SynthConfig.VERSION and set(data) == names


def check_disk_space(out: Path, nbytes: int, what: str) -> None:
    """``OutputError`` when the file system that will hold ``out`` has less than ``nbytes`` free."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if nbytes > free:
        raise OutputError(f"{what} {out}: No space left on {existing} for about {format_bytes(nbytes)} (only "
                          f"{format_bytes(free)} free); lower the sizes or choose another location")


def write_synthetic(out_dir: str | Path, cfg: SynthConfig | None = None, vocab: Vocabulary | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``{train,dev,test}_ims.npy``, ``*_caps.txt``, ``vocab.json`` and ``synth_config.json``.

    The dataset is built in a directory beside ``out_dir`` and swapped in when complete, so an
    interrupted run (Ctrl-C, kill) leaves what was there before. An existing ``out_dir`` is
    replaced only if it is empty or an xmr synthetic dataset, unless ``overwrite``
    (``OutputError`` otherwise, and when the disk lacks the space)."""
    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    what = "synthetic dataset directory"
    check_output_dir(out, is_synthetic_dataset, overwrite, what)
    check_disk_space(out, cfg.disk_bytes(), what)
    vocabulary = synth_vocabulary(vocab)
    rng = np.random.default_rng(cfg.seed)
    protos = _Prototypes(*(_unit_rows(rng, n, cfg.img_dim) for n in (len(NOUNS), len(COLORS), cfg.clutter_types)))
    with staged_directory(out) as staged:
        for split, n in cfg.split_sizes().items():
            feats, captions = generate_split(cfg, protos, n, rng)
            np.save(staged / f"{split}_ims.npy", feats)
            (staged / f"{split}_caps.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
            del feats, captions
        vocabulary.save(staged / "vocab.json")
        save_json(config_to_dict(cfg), staged / CONFIG_FILE)
        keep_foreign(out, staged, SYNTH_FILES if is_synthetic_dataset(out) else set())
    return out
