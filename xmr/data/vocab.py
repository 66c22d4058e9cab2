"""Vocabulary in SCAN's JSON format: ``{"word2idx": {...}, "idx2word": {...}, "idx": n}``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from xmr.data.files import read_text
from xmr.errors import VocabError
from xmr.outputs import write_text

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in every SCAN vocabulary
MAX_FILE_BYTES = 256 << 20  # the released vocabularies are < 1 MB; a larger file is a wrong path


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id mapping; ``<pad>`` is 0 and unknown words map to ``<unk>``."""

    word2idx: dict[str, int]

    def __post_init__(self) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if self.word2idx.get(token) != expected_id:
                raise VocabError(f"vocabulary must map {token!r} to {expected_id}, got {self.word2idx.get(token)!r}")
        seen: dict[int, str] = {}
        size = len(self.word2idx)
        for word, i in self.word2idx.items():
            if not isinstance(i, int) or isinstance(i, bool):
                raise VocabError(f"vocabulary id of {word!r} must be an integer, got {i!r}"[:300])
            if not 0 <= i < size:
                raise VocabError(f"vocabulary id {i} of {word!r} is outside 0..{size - 1} "
                                 f"(ids must be exactly 0..N-1 for N={size} words)"[:300])
            if i in seen:
                raise VocabError(f"vocabulary id {i} is given to both {seen[i]!r} and {word!r}"[:300])
            seen[i] = word

    def __len__(self) -> int:
        return len(self.word2idx)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.word2idx[UNK])

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Ids of ``<start> tokens... <end>``, exactly as the authors' data loaders build them."""
        return [self.word2idx[START], *(self(t) for t in tokens), self.word2idx[END]]

    def to_dict(self) -> dict:
        return {"word2idx": dict(self.word2idx), "idx2word": {str(i): w for w, i in self.word2idx.items()},
                "idx": len(self.word2idx)}

    @classmethod
    def from_dict(cls, data: object) -> "Vocabulary":
        """A vocabulary from SCAN's JSON object; ``word2idx`` must map strings to integer ids."""
        if not isinstance(data, dict) or "word2idx" not in data:
            kind = "an object without 'word2idx'" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
            raise VocabError(f"vocabulary JSON must be an object with a 'word2idx' mapping (SCAN format), got {kind}")
        word2idx = data["word2idx"]
        if not isinstance(word2idx, dict):
            raise VocabError(f"vocabulary 'word2idx' must map words to integer ids, got a {type(word2idx).__name__}")
        return cls({str(w): i for w, i in word2idx.items()})

    @classmethod
    def from_words(cls, words: Iterable[str]) -> "Vocabulary":
        """A vocabulary of the special tokens followed by ``words`` (duplicates dropped)."""
        word2idx: dict[str, int] = {}
        for w in (*SPECIAL_TOKENS, *words):
            word2idx.setdefault(w, len(word2idx))
        return cls(word2idx)

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Read a SCAN vocabulary JSON; every problem is a one-line ``VocabError`` naming ``path``
        (``MissingFileError`` when there is no file)."""
        path = Path(path)
        text = read_text(path, "vocabulary file", VocabError, MAX_FILE_BYTES)
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so are over-long ints
            raise VocabError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except VocabError as e:
            raise VocabError(f"{path}: {e}") from e

    def save(self, path: str | Path) -> None:
        """Write SCAN's JSON format to ``path`` atomically."""
        write_text(Path(path), json.dumps(self.to_dict()))
