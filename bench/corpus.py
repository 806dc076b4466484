"""The byte-level corpus of the paper experiments: Python's own standard library.

Text that is on every machine and that nobody in this project wrote: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages`` / ``dist-packages`` trees
excluded), read as bytes, so the vocabulary is the 256 byte values and no tokenizer is needed.

Each file goes to the validation split when the SHA-256 of its path relative to the stdlib
root falls in the first ``VALIDATION_PER_MILLE`` thousandths, else to training: the split is
fixed by file names alone, so no file is ever on both sides, on any machine. The files of a
split, sorted by relative path, are concatenated into one long byte stream with ``SEPARATOR``
between files; training batches are random windows of that stream, evaluation uses windows at
fixed, evenly spaced offsets.

The stdlib differs between Python versions, so every result records ``Corpus.fingerprint``
and ``Corpus.python``.
"""
import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
VALIDATION_PER_MILLE = 50
# A NUL byte between files tells the model where a file ends; source files do not contain it.
SEPARATOR = b"\0"
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root():
    """The directory of Python's standard library, as ``sysconfig`` reports it."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root):
    """The ``.py`` files under ``root`` as sorted POSIX paths relative to it, third-party
    package trees and byte-code caches excluded."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root must be a directory, got {root}")
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def is_validation(relpath):
    """Whether the file at ``relpath`` (relative POSIX path) belongs to the validation split."""
    if not isinstance(relpath, str) or not relpath:
        raise TypeError(f"relpath must be a non-empty str, got {relpath!r}")
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < VALIDATION_PER_MILLE


@dataclass(frozen=True)
class Corpus:
    """The two splits as ``uint8`` streams plus what identifies them."""

    train: torch.Tensor
    validation: torch.Tensor
    train_files: int
    validation_files: int
    fingerprint: str  # SHA-256 (first 12 hex digits) of every file's path and bytes
    python: str

    def describe(self):
        """One line for logs and result files."""
        return (f"corpus: Python {self.python} stdlib, {self.train_files} train files "
                f"({self.train.numel() / 1e6:.1f} MB), {self.validation_files} validation files "
                f"({self.validation.numel() / 1e6:.2f} MB), fingerprint {self.fingerprint}")


def load_corpus(root=None):
    """Reads the corpus under ``root`` (default: this interpreter's stdlib)."""
    root = stdlib_root() if root is None else Path(root)
    splits = {False: [], True: []}
    digest = hashlib.sha256()
    for rel in source_files(root):
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + SEPARATOR + data + SEPARATOR)
        splits[is_validation(rel)].append(data)
    if not splits[False] or not splits[True]:
        raise ValueError(f"root {root} has too few .py files for a train/validation split")
    streams = {val: torch.frombuffer(bytearray(SEPARATOR.join(files) + SEPARATOR),
                                     dtype=torch.uint8)
               for val, files in splits.items()}
    return Corpus(train=streams[False], validation=streams[True], train_files=len(splits[False]),
                  validation_files=len(splits[True]), fingerprint=digest.hexdigest()[:12],
                  python=platform.python_version())


def _check_window(stream, length):
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    if stream.dim() != 1 or stream.numel() < length:
        raise ValueError(f"stream must be 1-D with at least length={length} bytes, "
                         f"got shape {tuple(stream.shape)}")


def train_batches(stream, batch_size, length, steps, seed):
    """``steps`` batches ``[batch_size, length]`` (int64) of windows at random offsets.

    The offsets come from a CPU ``torch.Generator`` seeded with ``seed`` alone, so every run
    with the same arguments sees the same data in the same order, whatever else it does with
    torch's global random state.
    """
    _check_window(stream, length)
    if batch_size < 1 or steps < 0:
        raise ValueError(f"batch_size must be >= 1 and steps >= 0, got {batch_size}, {steps}")
    gen = torch.Generator().manual_seed(seed)
    span = torch.arange(length)
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - length + 1, (batch_size, 1), generator=gen)
        yield stream[starts + span].long()


def validation_windows(stream, length, count):
    """``[count, length]`` (int64) windows at evenly spaced offsets of ``stream``, not
    overlapping, spread over the whole split so that every part of it is sampled.
    Raises ``ValueError`` if the stream holds fewer than ``count`` such windows."""
    _check_window(stream, length)
    available = stream.numel() // length
    if count < 1 or count > available:
        raise ValueError(f"count must be in [1, {available}] for windows of {length} bytes, "
                         f"got {count}")
    starts = (torch.arange(count) * available // count) * length
    return stream[starts[:, None] + torch.arange(length)].long()
