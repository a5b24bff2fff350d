"""Classification tasks built offline from CPython's pydoc help topics: `topic`, `acceptability`, `next_sentence`.

The study pre-trains on the standard library's docstrings, so the help topics are text the pre-trained model
never saw; they ship with every Python, so the tasks need no download and are the same on every machine
running the same Python version.

- Sentences: each topic is cut at its headings into sections; a section's blank-line-separated blocks are
  prose, or code, grammar, tables and doctests (skipped). Prose is split into sentences; a sentence is kept
  when it has MIN_WORDS..MAX_WORDS words, starts with a capital (or a quote), ends with . ! ? or :, and is
  mostly plain words (code fragments such as `x = x + 1` are not). The topics repeat each other ("specialnames"
  holds "customization"), so every sentence is used once only, where it first appears in sorted topic order.
- Splits: the sections are the documents that are split. They are taken in the order of a hash of their text
  and each goes whole to the split furthest below its share of sentences (SPLIT_SHARES), so no sentence
  appears in two splits and the split of a section does not depend on the task.
- Labels: balanced in every split (exactly, or within one); each split's examples are in a fixed order, from
  a random.Random seeded by a constant, the task and the split (never the global RNG).

topic: one sentence; label 1 ("true") if its help topic is about objects and types (the data model, the built-in
types and their methods, literals: `TYPE_TOPICS`), label 0 ("false") if about statements, expressions and
execution. The labels are balanced by keeping, in each split, as many sentences of the larger class as the smaller
has (the first ones in the split's shuffled order). A topic is told by the words a sentence uses, which a
small model can learn from a thousand examples; the other two tasks ask for word order and discourse.
acceptability: label 1 ("true") is a real sentence, label 0 ("false") a real sentence with two of its plain
lowercase words swapped (never the first word, never "x and y" around a conjunction, which often stays
acceptable). Each sentence is used once, as one or the other, so a swap keeps length and characters.
next_sentence: text_a a sentence; label 1 if text_b is the sentence that follows it in its topic (no code
between), label 0 if text_b is the true successor of another example's sentence from a different topic. Both
labels draw text_b from the same kind of sentence (true successors), so length says nothing about the label.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pydoc_data.topics import topics
from typing import Optional

from mpoe.train.data.corpus import pydoc_topics

TOPIC = "topic"
ACCEPTABILITY = "acceptability"
NEXT_SENTENCE = "next_sentence"
EMBEDDED_TASKS = (TOPIC, ACCEPTABILITY, NEXT_SENTENCE)
# topic: the help topics about objects and types (label 1); every other topic is about statements, expressions
# and execution (label 0). Also every topic whose name starts with "types" or "bltin-".
TYPE_TOPICS = frozenset(
    {
        "atom-literals",
        "attribute-access",
        "callable-types",
        "context-managers",
        "customization",
        "dict",
        "floating",
        "formatstrings",
        "imaginary",
        "integers",
        "lists",
        "numbers",
        "numeric-types",
        "objects",
        "sequence-types",
        "specialattrs",
        "specialnames",
        "string-methods",
        "strings",
        "truth",
        "types",
    }
)
EMBEDDED_LABEL_WORDS = ("false", "true")
SPLITS = ("train", "val", "test")
SPLIT_SHARES = {"train": 0.69, "val": 0.10, "test": 0.21}
SELECTION = (
    "train/val/test = pydoc help-topic sections split whole (by a hash order, to shares 0.69/0.10/0.21 of "
    "sentences); val selects, test scores"
)
MIN_WORDS, MAX_WORDS = 6, 40
SEED = 29

_UNDERLINE = re.compile(r"^\s*([*=\-^~#+])\1{2,}\s*$")  # a heading's underline
_CODE_STARTS = (">>>", "...", "+-", "|", "$ ", "#")  # doctests, tables, shell lines, comments
_FOOTNOTE = re.compile(r"\s*\[\d+\]")
_LIST_MARKER = re.compile(r"^(\d+\.|\*|-|\(\d+\))\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“‘]?[A-Z])")
# A plain word, maybe quoted, emphasised (*x*) or followed by punctuation: not code such as `x.__add__(y)`.
_WORD = re.compile(r"^[\"'“‘(*]*[A-Za-z][A-Za-z'’\-]*[\"'”’)*]*[,.;:!?]?[\"'”’)]*$")
_PLAIN_WORD_SHARE = 0.85
_SWAPPABLE = re.compile(r"^[a-z]+$")
_CONJUNCTIONS = ("and", "or")


@dataclass(frozen=True)
class Section:
    """A section of one help topic: runs of sentences, each run consecutive in the topic's text (no code or
    heading between); None stands for a sentence that is not used (filtered out, or used earlier)."""

    topic: str
    runs: tuple[tuple[Optional[str], ...], ...]

    def sentences(self) -> list[str]:
        return [s for run in self.runs for s in run if s is not None]


def embedded_splits(name: str) -> dict[str, list[tuple[str, Optional[str], int]]]:
    """{"train"|"val"|"test": [(text_a, text_b, label), ...]} of the embedded task `name`."""
    builder = {TOPIC: _topic, ACCEPTABILITY: _acceptability, NEXT_SENTENCE: _next_sentence}[name]
    sections = split_sections(help_sections())
    return {split: builder(sections[split], random.Random(f"{SEED}:{name}:{split}")) for split in SPLITS}


def help_sections() -> list[Section]:
    """Every section of the help topics (sorted by topic name), each sentence kept in its first one only."""
    seen: set[str] = set()
    sections = []
    for topic, text in zip(sorted(topics), pydoc_topics()):  # pydoc_topics() is in key order
        for runs in _section_runs(text):
            unique = tuple(tuple(_first_time(s, seen) for s in run) for run in runs)
            section = Section(topic, unique)
            if section.sentences():
                sections.append(section)
    return sections


def split_sections(sections: list[Section]) -> dict[str, list[Section]]:
    """Sections in hash order, each to the split furthest below its share of the sentences so far."""
    by_hash = sorted(sections, key=lambda s: hashlib.sha1("\n".join(s.sentences()).encode("utf-8")).digest())
    splits: dict[str, list[Section]] = {split: [] for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    for section in by_hash:
        total = sum(counts.values()) + len(section.sentences())
        split = max(SPLITS, key=lambda k: SPLIT_SHARES[k] * total - counts[k])
        splits[split].append(section)
        counts[split] += len(section.sentences())
    return splits


def _first_time(sentence: Optional[str], seen: set[str]) -> Optional[str]:
    if sentence is None or sentence in seen:
        return None
    seen.add(sentence)
    return sentence


def _section_runs(text: str) -> list[list[list[Optional[str]]]]:
    """Per section of a topic, its runs of sentences: a heading ends a section, a code block ends a run."""
    sections: list[list[list[Optional[str]]]] = []
    runs: list[list[Optional[str]]] = [[]]
    intro: Optional[tuple[int, str]] = None  # (indent, text) of the last prose block
    for block in _blocks(text):
        if len(block) >= 2 and _UNDERLINE.match(block[-1]):
            sections.append([r for r in runs if r])
            runs, intro = [[]], None
        elif _is_code(block, intro):
            runs.append([])
        else:
            intro = (_indent(block[0]), " ".join(line.strip() for line in block))
            runs[-1].extend(_sentences(intro[1]))
    sections.append([r for r in runs if r])
    return [s for s in sections if s]


def _blocks(text: str) -> list[list[str]]:
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_code(block: list[str], intro: Optional[tuple[int, str]]) -> bool:
    """Doctests, tables, grammar rules, or a block indented under prose that ends with ":" (a literal block in
    the reST source; "Note:" and the like introduce indented prose, so a short intro does not count)."""
    if any(line.strip().startswith(_CODE_STARTS) or "::=" in line for line in block):
        return True
    return intro is not None and intro[1].endswith(":") and _indent(block[0]) > intro[0] and len(intro[1].split()) > 2


def _sentences(paragraph: str) -> list[Optional[str]]:
    paragraph = _LIST_MARKER.sub("", _FOOTNOTE.sub("", paragraph))
    return [_kept(" ".join(s.split())) for s in _SENTENCE_END.split(paragraph)]


def _kept(sentence: str) -> Optional[str]:
    words = sentence.split()
    prose = (
        MIN_WORDS <= len(words) <= MAX_WORDS
        and (sentence[0].isupper() or sentence[0] in '"“')
        and sentence[-1] in ".!?:"
        and sum(bool(_WORD.match(w)) for w in words) >= _PLAIN_WORD_SHARE * len(words)
    )
    return sentence if prose else None


def is_type_topic(topic: str) -> bool:
    return topic in TYPE_TOPICS or topic.startswith(("types", "bltin-"))


def _topic(sections: list[Section], rng: random.Random) -> list[tuple[str, Optional[str], int]]:
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for section in sections:
        by_label[int(is_type_topic(section.topic))].extend(section.sentences())
    for sentences in by_label.values():
        rng.shuffle(sentences)
    count = min(len(v) for v in by_label.values())
    examples = [(s, None, label) for label, sentences in by_label.items() for s in sentences[:count]]
    rng.shuffle(examples)
    return examples


def _acceptability(sections: list[Section], rng: random.Random) -> list[tuple[str, Optional[str], int]]:
    sentences = [s for section in sections for s in section.sentences() if _swaps(s.split())]
    rng.shuffle(sentences)
    examples = []
    for i, sentence in enumerate(sentences):
        if i % 2:
            examples.append((sentence, None, 1))
        else:
            words = sentence.split()
            a, b = rng.choice(_swaps(words))
            words[a], words[b] = words[b], words[a]
            examples.append((" ".join(words), None, 0))
    rng.shuffle(examples)
    return examples


def _swaps(words: list[str]) -> list[tuple[int, int]]:
    """Position pairs whose swap makes an unacceptable sentence of the same length: two different plain
    lowercase words, not the first word (its capital would give the swap away), not "x and y"."""
    plain = [i for i in range(1, len(words)) if _SWAPPABLE.match(words[i])]
    return [
        (a, b)
        for n, a in enumerate(plain)
        for b in plain[n + 1 :]
        if words[a] != words[b] and not (b == a + 2 and words[a + 1] in _CONJUNCTIONS)
    ]


def _next_sentence(sections: list[Section], rng: random.Random) -> list[tuple[str, Optional[str], int]]:
    pairs = [
        (section.topic, a, b)
        for section in sections
        for run in section.runs
        for a, b in zip(run, run[1:])
        if a is not None and b is not None
    ]
    rng.shuffle(pairs)
    positives = [(a, b, 1) for _, a, b in pairs[0::2]]
    negatives = _mismatched(pairs[1::2])
    count = min(len(positives), len(negatives))
    examples = positives[: count + (len(positives) > count)] + negatives[:count]  # within one of balanced
    rng.shuffle(examples)
    return examples


def _mismatched(pairs: list[tuple[str, str, str]]) -> list[tuple[str, Optional[str], int]]:
    """Each first sentence with the successor of a pair from another topic, each successor used once; a
    sentence with no such successor left is dropped."""
    unused = list(range(len(pairs)))
    examples = []
    for topic, a, _ in pairs:
        other = next((j for j in unused if pairs[j][0] != topic), None)
        if other is not None:
            unused.remove(other)
            examples.append((a, pairs[other][2], 0))
    return examples
