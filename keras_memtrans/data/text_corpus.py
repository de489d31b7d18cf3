import fnmatch
import hashlib
import json
import numbers
import os
import sysconfig

import numpy as np

from keras_memtrans.validation import is_int

_TEST_DIRECTORIES = frozenset({"test", "tests", "idle_test"})
_INSTALLED_PACKAGE_DIRECTORIES = frozenset({"site-packages", "dist-packages"})
_GLOB_CHARACTERS = frozenset("*?[")
_SKIP_REASONS = (
    "unreadable",
    "binary",
    "not_utf8",
    "too_short",
    "bad_json_lines",
    "duplicate",
)


class TextCorpus:
    """Named plain-text documents from files, JSONL or the standard library.

    The default corpus is the source of the running Python's standard library
    (`sysconfig.get_paths()["stdlib"]`): every `*.py` file outside
    `site-packages`, `dist-packages` and test directories (`test/`,
    `tests/`, `idle_test/`), other than `test_*.py`, and at least
    `min_chars` characters long. It needs no download and holds long,
    structured documents, which is what a memory model learns from.

    `source` may instead name a directory (every regular file below it,
    recursively), a glob pattern (`**` matches across directories), a single
    file, or a list of in-memory documents. Links to files are read; links
    to directories below the directory (or below the fixed part of the
    pattern) are not followed, so a link loop cannot repeat the tree. A
    file whose name ends in `.jsonl`, in any case, is read as JSON Lines,
    one document per line: the text under `text_field`, the name under
    `"name"` or `"id"` (default `"<file>:<line>"`). Every other file is one
    document, named by its path relative to the directory (or as matched by
    the glob).

    Nothing unusable stops the load: files the OS will not read
    (`"unreadable"`), files with NUL bytes (`"binary"`),
    files or lines that are not UTF-8 (`"not_utf8"`), documents shorter than
    `min_chars` (`"too_short"`), JSONL lines that are not a JSON object
    with a string under `text_field` (`"bad_json_lines"`), and a file
    reached again through a link or a text equal to one already kept
    (`"duplicate"`) are skipped and counted in `skipped`. Files are read in
    sorted path order, so the corpus is deterministic, each text is kept
    once, under its first name, and no text can fall on both sides of a
    `split`.

    Args:
        source: `None` for the standard library, a path or glob pattern
            (`str` or `os.PathLike`), or a list whose items are texts or
            `(name, text)` pairs.
        min_chars: int. Shortest document kept, in characters.
        text_field: str. Key of the text in each JSONL object.
        max_documents: optional int. Stop reading once this many documents
            are kept; `skipped` then counts only what was read.

    Attributes:
        documents: list of `(name, text)` pairs, in source order.
        skipped: dict from skip reason to count.
        source: str describing where the documents came from.

    A corpus is a sequence of `(name, text)` pairs: `len(corpus)`,
    `corpus[i]` and `for name, text in corpus` work.

    Raises:
        FileNotFoundError: `source` is a path that does not exist.
        ValueError: no document is usable; the message names the source and
            the skip counts.

    Example:
    >>> corpus = TextCorpus(
    ...     [("short", "hi"), ("long", "x" * 50)], min_chars=10
    ... )
    >>> corpus.names, corpus.skipped["too_short"]
    (['long'], 1)
    """

    def __init__(
        self, source=None, min_chars=2000, text_field="text", max_documents=None
    ):
        if not is_int(min_chars) or min_chars < 0:
            raise ValueError(
                f"`min_chars` must be a non-negative int, got {min_chars!r}."
            )
        if not isinstance(text_field, str):
            raise ValueError(f"`text_field` must be a str, got {text_field!r}.")
        if max_documents is not None and (
            not is_int(max_documents) or max_documents < 1
        ):
            raise ValueError(
                "`max_documents` must be a positive int or None, got "
                f"{max_documents!r}."
            )
        self.min_chars = min_chars
        self.text_field = text_field
        self.max_documents = max_documents
        self.documents = []
        self.skipped = dict.fromkeys(_SKIP_REASONS, 0)
        self._text_hashes = set()

        if source is None:
            stdlib = sysconfig.get_paths()["stdlib"]
            self.source = f"the standard library at {stdlib}"
            self._read_files(_standard_library_files(stdlib))
        elif isinstance(source, (list, tuple)):
            self.source = f"{len(source)} in-memory documents"
            self._read_in_memory(source)
        elif isinstance(source, (str, os.PathLike)):
            self.source = os.fspath(source)
            self._read_files(_files_of(self.source))
        else:
            raise ValueError(
                "`source` must be None, a path, a glob pattern or a list of "
                f"documents, got {type(source).__name__}."
            )

        if not self.documents:
            raise ValueError(
                f"No usable document in {self.source} "
                f"(min_chars={self.min_chars}); skipped: {self._skip_counts()}."
            )

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, index):
        return self.documents[index]

    def __iter__(self):
        return iter(self.documents)

    @property
    def names(self):
        """Document names, in corpus order."""
        return [name for name, _ in self.documents]

    @property
    def texts(self):
        """Document texts, in corpus order."""
        return [text for _, text in self.documents]

    def summary(self):
        """One line: documents and characters kept, source, skip counts."""
        characters = sum(len(text) for _, text in self.documents)
        return (
            f"{len(self.documents)} documents, {characters:,} characters from "
            f"{self.source}; skipped: {self._skip_counts()}"
        )

    def split(self, validation_fraction=0.05, seed=0):
        """Splits the corpus by document into training and validation parts.

        Documents are drawn at random (seeded) but each part keeps corpus
        order. The validation part holds `round(validation_fraction * n)`
        documents, at least 1 and at most `n - 1`. The corpus holds each
        text once, so no validation text is also a training text.

        Args:
            validation_fraction: float in `(0, 1)`.
            seed: non-negative int.

        Returns:
            `(training, validation)` `TextCorpus` objects; their `skipped`
            counts are zero.
        """
        if (
            isinstance(validation_fraction, bool)
            or not isinstance(validation_fraction, numbers.Real)
            or not 0 < validation_fraction < 1
        ):
            raise ValueError(
                "`validation_fraction` must be a number in (0, 1), got "
                f"{validation_fraction!r}."
            )
        count = len(self.documents)
        if count < 2:
            raise ValueError(
                f"Cannot split {count} document from {self.source}: a split "
                "needs at least 2."
            )
        validation_count = min(count - 1, max(1, round(validation_fraction * count)))
        permutation = np.random.default_rng(seed).permutation(count)
        is_validation = np.zeros(count, dtype=bool)
        is_validation[permutation[:validation_count]] = True
        return (
            self._subset(np.flatnonzero(~is_validation), "training"),
            self._subset(np.flatnonzero(is_validation), "validation"),
        )

    def _subset(self, indices, part):
        subset = TextCorpus(
            [self.documents[i] for i in indices],
            min_chars=self.min_chars,
            text_field=self.text_field,
        )
        subset.source = f"{self.source} ({part} split)"
        return subset

    def _skip_counts(self):
        return ", ".join(f"{count} {reason}" for reason, count in self.skipped.items())

    def _is_full(self):
        return (
            self.max_documents is not None and len(self.documents) >= self.max_documents
        )

    def _keep(self, name, text):
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        if len(text) < self.min_chars:
            self.skipped["too_short"] += 1
        elif digest in self._text_hashes:
            self.skipped["duplicate"] += 1
        else:
            self._text_hashes.add(digest)
            self.documents.append((name, text))

    def _read_in_memory(self, items):
        for index, item in enumerate(items):
            if self._is_full():
                return
            if isinstance(item, str):
                self._keep(str(index), item)
            elif (
                isinstance(item, (list, tuple))
                and len(item) == 2
                and isinstance(item[1], str)
            ):
                self._keep(str(item[0]), item[1])
            else:
                raise ValueError(
                    f"Document {index} must be a str or a (name, text) pair, "
                    f"got {type(item).__name__}."
                )

    def _read_files(self, named_paths):
        real_paths = set()
        for name, path in named_paths:
            if self._is_full():
                return
            real_path = os.path.realpath(path)
            if real_path in real_paths:
                self.skipped["duplicate"] += 1
                continue
            real_paths.add(real_path)
            try:
                with open(path, "rb") as file:
                    data = file.read()
            except OSError:
                self.skipped["unreadable"] += 1
                continue
            if b"\x00" in data:
                self.skipped["binary"] += 1
            elif path.lower().endswith(".jsonl"):
                self._read_json_lines(name, data)
            else:
                try:
                    text = data.decode("utf-8-sig")
                except UnicodeDecodeError:
                    self.skipped["not_utf8"] += 1
                    continue
                self._keep(name, text)

    def _read_json_lines(self, file_name, data):
        for line_number, line in enumerate(data.split(b"\n"), start=1):
            if self._is_full():
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError:
                self.skipped["not_utf8"] += 1
                continue
            except json.JSONDecodeError:
                self.skipped["bad_json_lines"] += 1
                continue
            if not isinstance(record, dict) or not isinstance(
                record.get(self.text_field), str
            ):
                self.skipped["bad_json_lines"] += 1
                continue
            default_name = f"{file_name}:{line_number}"
            name = record.get("name", record.get("id", default_name))
            self._keep(str(name), record[self.text_field])


def _standard_library_files(stdlib):
    """`(name, path)` of the standard library's non-test `*.py` files."""
    named_paths = []
    for directory, subdirectories, file_names in os.walk(stdlib):
        subdirectories[:] = sorted(
            name
            for name in subdirectories
            if name not in _TEST_DIRECTORIES
            and name not in _INSTALLED_PACKAGE_DIRECTORIES
        )
        for file_name in sorted(file_names):
            if file_name.endswith(".py") and not file_name.startswith("test_"):
                path = os.path.join(directory, file_name)
                named_paths.append((_relative_name(path, stdlib), path))
    return sorted(named_paths)


def _files_of(source):
    """`(name, path)` of the regular files a path or glob pattern names."""
    if os.path.isdir(source):
        named_paths = []
        for directory, subdirectories, file_names in os.walk(source, followlinks=False):
            subdirectories.sort()
            for file_name in file_names:
                path = os.path.join(directory, file_name)
                if os.path.isfile(path):
                    named_paths.append((_relative_name(path, source), path))
        return sorted(named_paths)
    if os.path.isfile(source):
        return [(source, source)]
    if _GLOB_CHARACTERS.intersection(source):
        return sorted((path, path) for path in _glob_files(source))
    raise FileNotFoundError(f"Corpus source {source!r} does not exist.")


def _glob_files(pattern):
    """The regular files that match the glob `pattern`, in no order.

    As `glob.glob(pattern, recursive=True)` (a wildcard does not match a
    leading `.`; `**` matches any number of directories), except that links
    to directories below the pattern's fixed leading directories are not
    followed: `glob` follows them, around a link loop as deep as the OS
    allows.
    """
    parts = pattern.split(os.sep)
    fixed = 0
    while fixed < len(parts) - 1 and not _GLOB_CHARACTERS.intersection(parts[fixed]):
        fixed += 1
    root, wild = os.sep.join(parts[:fixed]), parts[fixed:]
    if fixed and not root:  # "/*.txt": the fixed part is the root directory
        root = os.sep
    top = root or os.curdir
    matches = []
    for directory, subdirectories, file_names in os.walk(top, followlinks=False):
        below = os.path.relpath(directory, top).split(os.sep)
        below = [] if below == [os.curdir] else below
        if "**" not in wild and len(below) + 1 >= len(wild):
            subdirectories.clear()  # deeper files cannot match
        for file_name in file_names:
            path = os.path.join(directory, file_name)
            if _glob_match(wild, [*below, file_name]) and os.path.isfile(path):
                matches.append(os.path.join(root, *below, file_name))
    return matches


def _glob_match(pattern_parts, names):
    """Whether the path components `names` match the glob components."""
    if not pattern_parts:
        return not names
    first, rest = pattern_parts[0], pattern_parts[1:]
    if first == "**":
        return _glob_match(rest, names) or (
            bool(names)
            and not names[0].startswith(".")
            and _glob_match(pattern_parts, names[1:])
        )
    return (
        bool(names)
        and fnmatch.fnmatchcase(names[0], first)
        and (first.startswith(".") or not names[0].startswith("."))
        and _glob_match(rest, names[1:])
    )


def _relative_name(path, root):
    return os.path.relpath(path, root).replace(os.sep, "/")
