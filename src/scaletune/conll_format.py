"""CoNLL files in and out -- the file format only (no tags, no model, no task).

One `word ... tag` per line (first column the word, last column the tag), a blank line between sentences,
`-DOCSTART-` lines skipped. A leaf: assets (the packaged NER set), data's callers and the token classification
task all read it, so it imports nothing of theirs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import DataError

CONLL_SUFFIXES = (".conll", ".txt")
"""Local files read as CoNLL under `task: token_classification`."""
DOCSTART = "-DOCSTART-"


def read_conll(path: str, require_tags: bool = True) -> tuple[list[list[str]], Optional[list[list[str]]]]:
    """(sentences of words, sentences of tags) from a CoNLL file; tags None when no line has a tag column.

    A line is tab separated when it holds a tab (a word may then contain spaces), else whitespace separated;
    the first column is the word and the last the tag (CoNLL-2003's POS and chunk columns in between are
    ignored). A blank line -- or one of tabs and spaces -- ends a sentence. `-DOCSTART-` lines are CoNLL-2003's
    document markers: a sentence boundary, not a word. With `require_tags=False` a file of one word per line
    (nothing to score, just to tag) is read too.
    """
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    untagged_line = tagged_line = None

    def flush():
        if words:
            sentences.append(list(words))
            tags.append(list(labels))
        words.clear()
        labels.clear()

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if parts[0].strip() == DOCSTART:
                flush()
                continue
            if len(parts) < 2 or not parts[-1].strip():
                if require_tags:
                    raise DataError(f"{path} line {lineno} ({line.strip()!r}) has no tag column; CoNLL lines are "
                                    f"`word ... tag` (first column the word, last the tag), a blank line between "
                                    f"sentences.")
                untagged_line = untagged_line or lineno
                words.append(parts[0])
                continue
            if not parts[0].strip():
                raise DataError(f"{path} line {lineno} has an empty word before its tag {parts[-1].strip()!r}; "
                                f"remove the line or put the word in the first column.")
            tagged_line = tagged_line or lineno
            words.append(parts[0])
            labels.append(parts[-1].strip())
    flush()
    if untagged_line and tagged_line:
        raise DataError(f"{path} mixes tagged lines (line {tagged_line}) with untagged ones (line {untagged_line}); "
                        f"give every word a tag, or none (a file to predict).")
    return sentences, (None if untagged_line else tags)


def is_conll_file(path: Optional[str]) -> bool:
    return bool(path) and Path(path).suffix.lower() in CONLL_SUFFIXES


def conll_dataset(path: str, require_tags: bool = True):
    """A CoNLL file as a `datasets.Dataset` with `id` (sentence index), `tokens` and, when tagged, `ner_tags`."""
    import datasets

    words, tags = read_conll(path, require_tags)
    if not words:
        raise DataError(f"{path} holds no sentence (no `word ... tag` line); check the file.")
    columns = {"id": list(range(len(words))), "tokens": words}
    if tags is not None:
        columns["ner_tags"] = tags
    return datasets.Dataset.from_dict(columns)


def write_conll(path, sentences: list[list[str]], tags: list[list[str]]) -> None:
    """`word<TAB>tag` per line, a blank line after each sentence; written through a temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for words, labels in zip(sentences, tags):
            f.writelines(f"{w}\t{t}\n" for w, t in zip(words, labels))
            f.write("\n")
    tmp.replace(path)
