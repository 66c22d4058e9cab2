"""Vocabulary in SCAN's JSON format: ``{"word2idx": {...}, "idx2word": {...}, "idx": n}``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from xmr.errors import VocabError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in every SCAN vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id mapping; ``<pad>`` is 0 and unknown words map to ``<unk>``."""

    word2idx: dict[str, int]

    def __post_init__(self) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if self.word2idx.get(token) != expected_id:
                raise VocabError(
                    f"vocabulary must map {token!r} to {expected_id}, got {self.word2idx.get(token)!r}"
                )
        ids = sorted(self.word2idx.values())
        if ids != list(range(len(ids))):
            raise VocabError("vocabulary ids must be exactly 0..N-1 without gaps or repeats")

    def __len__(self) -> int:
        return len(self.word2idx)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def idx2word(self) -> dict[int, str]:
        return {i: w for w, i in self.word2idx.items()}

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx[UNK])

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``<start> tokens... <end>``, exactly as the authors' data loaders build them."""
        return [self.word2idx[START], *(self(t) for t in tokens), self.word2idx[END]]

    def decode(self, ids: Sequence[int]) -> list[str]:
        inverse = self.idx2word
        return [inverse.get(int(i), UNK) for i in ids]

    def to_dict(self) -> dict:
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for w, i in self.word2idx.items()},
            "idx": len(self.word2idx),
        }

    def sha256(self) -> str:
        blob = json.dumps(sorted(self.word2idx.items()), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        if not isinstance(data, dict) or "word2idx" not in data:
            raise VocabError("vocabulary JSON must be an object with a 'word2idx' mapping (SCAN format)")
        try:
            word2idx = {str(w): int(i) for w, i in data["word2idx"].items()}
        except (TypeError, ValueError, AttributeError) as e:
            raise VocabError(f"vocabulary 'word2idx' must map words to integer ids: {e}") from e
        return cls(word2idx)

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "Vocabulary":
        """A vocabulary of the special tokens followed by ``words`` (duplicates dropped)."""
        word2idx: dict[str, int] = {}
        for w in (*SPECIAL_TOKENS, *words):
            word2idx.setdefault(w, len(word2idx))
        return cls(word2idx)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise VocabError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except VocabError as e:
            raise VocabError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
