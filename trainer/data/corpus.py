"""Where documents come from: the embedded stdlib corpus, local files, or a hub dataset.

Every corpus yields `Document`s in a deterministic order and reports the documents it
drops (empty, not UTF-8) through an `on_skip(identity, reason)` callback instead of
failing, so one bad file never sinks a long prepare run.
"""

import codecs
import logging
import os
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

from rundir.errors import DataError

logger = logging.getLogger(__name__)

SkipFn = Callable[[str, str], None]


@dataclass(frozen=True)
class Document:
    identity: str  # stable name: decides the train/val split and names the document in logs
    text: str


def _ignore_skip(identity: str, reason: str) -> None:
    pass


def _usable(identity: str, text: Optional[str], on_skip: SkipFn) -> bool:
    if text is None or not text.strip():
        on_skip(identity, "empty")
        return False
    return True


def _utf8_problem(data: bytes) -> Optional[str]:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
    return None


def _file_utf8_problem(path: Path) -> Optional[str]:
    # Incremental so that checking a multi-GB file does not load it whole.
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                return f"not valid UTF-8 (near byte offset {offset + max(exc.start, 0)})"
            if not block:
                return None
            offset += len(block)


class Corpus:
    source: Dict  # recorded in meta.json: what a prepared directory was made from
    size_hint: Optional[int] = None  # number of candidate documents, for the progress bar

    def documents(self, on_skip: SkipFn = _ignore_skip) -> Iterator[Document]:
        raise NotImplementedError


# Test suites are excluded: they hold deliberately broken encodings and odd fixtures,
# and they would dominate a corpus that is meant to look like ordinary code.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


class StdlibCorpus(Corpus):
    """The running Python's standard library sources: present on every machine, no download."""

    def __init__(self, root: Optional[str] = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        candidates = (p for p in self.root.rglob("*.py") if p.is_file())
        self.files = sorted(
            (p for p in candidates if not _STDLIB_SKIP_DIRS & set(p.relative_to(self.root).parts[:-1])),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.files:
            raise DataError(f"no standard library sources (*.py) found under {self.root}")
        self.size_hint = len(self.files)
        self.source = {
            "kind": "stdlib",
            "root": str(self.root),
            "python": platform.python_version(),
            "num_files": len(self.files),
        }

    def documents(self, on_skip: SkipFn = _ignore_skip) -> Iterator[Document]:
        for path in self.files:
            name = path.relative_to(self.root).as_posix()
            try:
                data = path.read_bytes()
            except OSError as exc:
                on_skip(name, f"unreadable ({exc})")
                continue
            problem = _utf8_problem(data)
            if problem:
                on_skip(name, problem)
                continue
            text = data.decode("utf-8")
            if _usable(name, text, on_skip):
                yield Document(name, text)


_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def expand_files(patterns: Sequence[str]) -> List[Path]:
    """Expand globs (each sorted, for a deterministic order) and drop duplicates."""
    from glob import glob

    files: List[Path] = []
    seen = set()
    for pattern in patterns:
        if re.search(r"[*?\[]", pattern):
            matches = [Path(m) for m in sorted(glob(pattern, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise DataError(f"--files pattern {pattern!r} matches no files")
        else:
            path = Path(pattern)
            if path.is_dir():
                raise DataError(f"--files {pattern} is a directory; pass a glob such as '{pattern}/**/*.txt'")
            if not path.is_file():
                raise DataError(f"--files {pattern}: no such file")
            matches = [path]
        for path in matches:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def builder_for(files: Sequence[Path]) -> str:
    """The `datasets` builder for the files; they must all be of one kind."""
    groups: Dict[str, List[str]] = {}
    for path in files:
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"--files {path}: unsupported extension {path.suffix!r} "
                f"(supported: {', '.join(sorted(_BUILDERS))})"
            )
        groups.setdefault(builder, []).append(str(path))
    if len(groups) > 1:
        listing = "; ".join(
            f"{b}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" for b, names in sorted(groups.items())
        )
        raise DataError(f"--files mixes file formats, give one kind at a time ({listing})")
    return next(iter(groups))


def _check_field(field: str, columns: Optional[Iterable[str]], what: str) -> None:
    if columns is not None and field not in columns:
        raise DataError(
            f"{what} has no field {field!r} (available: {', '.join(sorted(columns)) or 'none'}); "
            "choose one with --text-field"
        )


def _as_text(value, row: int, field: str) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise DataError(f"field {field!r} of row {row} holds {type(value).__name__}, not text")
    return value


class FilesCorpus(Corpus):
    """Local .txt (one file = one document), .json/.jsonl or .parquet (one row = one document)."""

    def __init__(self, patterns: Sequence[str], text_field: str, cache_dir: Optional[str] = None):
        self.files = expand_files(patterns)
        self.builder = builder_for(self.files)
        self.text_field = text_field
        # Names relative to the files' common folder: the split then does not change
        # when the corpus is moved to another place or machine.
        root = Path(os.path.commonpath([os.path.abspath(p) for p in self.files]))
        if len(self.files) == 1:
            root = root.parent
        self.names = [Path(os.path.abspath(p)).relative_to(root).as_posix() for p in self.files]
        self.bad: Dict[int, str] = {}
        self.dataset = self._load(cache_dir)
        _check_field(text_field, self.dataset.column_names, f"{self.builder} files {self._listing()}")
        if self.builder == "text" and len(self.dataset) != len(self.files) - len(self.bad):
            raise DataError(
                f"expected one document per .txt file but datasets produced {len(self.dataset)} rows "
                f"for {len(self.files) - len(self.bad)} files"
            )
        self.size_hint = len(self.dataset) + len(self.bad)
        self.source = {
            "kind": "files",
            "builder": self.builder,
            "patterns": list(patterns),
            "num_files": len(self.files),
            "text_field": text_field,
        }

    def _listing(self, limit: int = 5) -> str:
        more = f" and {len(self.names) - limit} more" if len(self.names) > limit else ""
        return ", ".join(self.names[:limit]) + more

    def _load(self, cache_dir: Optional[str]):
        import datasets

        # sample_by="document": the text builder otherwise makes one row per line.
        kwargs = {"sample_by": "document"} if self.builder == "text" else {}
        while True:
            good = [str(p) for i, p in enumerate(self.files) if i not in self.bad]
            if not good:
                reasons = "; ".join(f"{self.names[i]}: {why}" for i, why in list(self.bad.items())[:3])
                more = f"; and {len(self.bad) - 3} more" if len(self.bad) > 3 else ""
                raise DataError(f"none of the --files is usable ({len(self.files)} files, all skipped: "
                                f"{reasons}{more})")
            try:
                return datasets.load_dataset(
                    self.builder, data_files=good, split="train", cache_dir=cache_dir, **kwargs
                )
            except Exception as exc:  # datasets wraps decoding errors in its own types
                if not self._find_bad_utf8():
                    raise DataError(
                        f"datasets could not load {self.builder} files {self._listing()}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc

    def _find_bad_utf8(self) -> bool:
        """Mark files that are not UTF-8 (a parquet file is binary: never); True if any new."""
        if self.builder == "parquet":
            return False
        found = False
        for i, path in enumerate(self.files):
            if i in self.bad:
                continue
            problem = _file_utf8_problem(path)
            if problem:
                self.bad[i] = problem
                found = True
        return found

    def _texts(self) -> Iterator[Optional[str]]:
        column = self.dataset.select_columns([self.text_field])
        row = 0
        for batch in column.iter(batch_size=256):
            for value in batch[self.text_field]:
                yield _as_text(value, row, self.text_field)
                row += 1

    def documents(self, on_skip: SkipFn = _ignore_skip) -> Iterator[Document]:
        texts = self._texts()
        if self.builder == "text":
            # Rows come in file order, one per loadable file: that pairs rows with names.
            for i, name in enumerate(self.names):
                if i in self.bad:
                    on_skip(name, self.bad[i])
                    continue
                text = next(texts)
                if _usable(name, text, on_skip):
                    yield Document(name, text)
            return
        # JSON/parquet rows cannot be traced back to their files, so rows are named by
        # their index; files dropped at load time are reported first.
        for index, reason in self.bad.items():
            on_skip(self.names[index], reason)
        for i, text in enumerate(texts):
            name = f"row {i}"
            if _usable(name, text, on_skip):
                yield Document(name, text)


class HubCorpus(Corpus):
    """A Hugging Face hub dataset, streamed (it may be far larger than the local disk)."""

    def __init__(self, name: str, config: Optional[str], split: str, text_field: str):
        import datasets

        self.name, self.text_field = name, text_field
        self.what = f"dataset {name!r} (config={config!r}, split={split!r})"
        try:
            self.dataset = datasets.load_dataset(name, name=config, split=split, streaming=True)
        except Exception as exc:  # connection, not-found and bad-config errors all land here
            raise DataError(
                f"could not open {self.what} from the Hugging Face hub: {type(exc).__name__}: {exc}. "
                "Check the name and that the hub is reachable from this machine, "
                "or give local files with --files."
            ) from exc
        _check_field(text_field, self.dataset.column_names, self.what)
        self.source = {"kind": "hub", "dataset": name, "config": config, "split": split, "text_field": text_field}

    def documents(self, on_skip: SkipFn = _ignore_skip) -> Iterator[Document]:
        i = -1
        try:
            for i, row in enumerate(self.dataset):
                if self.text_field not in row:
                    _check_field(self.text_field, row.keys(), f"row {i} of {self.what}")
                name = f"row {i}"
                text = _as_text(row[self.text_field], i, self.text_field)
                if _usable(name, text, on_skip):
                    yield Document(name, text)
        except OSError as exc:
            raise DataError(f"streaming {self.what} failed after row {i}: {exc}") from exc


def capped(docs: Iterable[Document], max_docs: Optional[int], max_bytes: Optional[int]) -> Iterator[Document]:
    """The prefix of `docs` within the caps; stops before pulling a document it won't use."""
    count = size = 0
    it = iter(docs)
    while (max_docs is None or count < max_docs) and (max_bytes is None or size < max_bytes):
        doc = next(it, None)
        if doc is None:
            return
        yield doc
        count += 1
        size += len(doc.text.encode("utf-8"))
