"""The Shakespeare corpus (examples/shakespeare_data.py, examples/data/shakespeare/):
rebuilt byte for byte from the source texts, parsed by its stated rules, cut
into windows that each belong to one role."""

import gzip
import hashlib
import os

import numpy as np
import pytest

import example_runs

data = example_runs.import_example("shakespeare_data")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.environ.get("SHAKESPEARE_TEXTS",
                        os.path.join(os.path.dirname(ROOT), "shared", "data", "shakespeare"))


def _sums(name):
  with open(os.path.join(data.DATA_DIR, name)) as f:
    return {line.split()[1]: line.split()[0] for line in f if line.strip()}


def test_bundled_corpus_matches_its_checksum():
  with open(data.CORPUS, "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == _sums("SHA256SUMS")["dialogue.json.gz"]


def test_corpus_build_reproduces_the_shipped_file(tmp_path):
  """The build from the source texts gives the shipped .gz byte for byte (and
  the JSON inside, whose sum the data README states)."""
  if not os.path.isdir(SOURCE):
    if os.environ.get("CI"):
      pytest.fail(f"the source texts are not at {SOURCE} (CI has ../shared beside the clone)")
    pytest.skip(f"the source texts are not at {SOURCE} (set SHAKESPEARE_TEXTS)")
  for name, digest in _sums("SOURCES.sha256").items():
    with open(os.path.join(SOURCE, name), "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, name
  out = tmp_path / "dialogue.json.gz"
  assert data.main(["--build", SOURCE, "--out", str(out)]) == 0
  assert out.read_bytes() == open(data.CORPUS, "rb").read()
  with open(os.path.join(data.DATA_DIR, "README.md")) as f:
    readme = f.read()
  assert hashlib.sha256(gzip.decompress(out.read_bytes())).hexdigest() in readme


PLAY = """TITLE

PERSONS REPRESENTED.

Ham., a prince.

ACT I.

Scene I. A platform.

Hor.
Who's there?
[Enter Ghost.]
Stay, illusion!

FIRST CLOWN
    Is she to be buried
in Christian burial?

[Exit Ghost. [Thunder]]

Yet more of the clown.

1 Clown.
A numbered speaker.

Farewell

SCENE II. Another part.

The scene's first line, spoken by nobody named.

Hor.
Again.
[Enter Lords
"""


def test_parse_play_follows_its_rules():
  roles = data.parse_play(PLAY)
  # Before the first ACT: title and cast list, no roles. A stage direction
  # (nested, or unclosed to the end of its line) is removed; the speaker
  # keeps the floor past it until a heading; indentation is stripped.
  assert roles == {
      "Hor": ["Who's there?\nStay, illusion!", "Again."],
      "FIRST CLOWN": ["Is she to be buried\nin Christian burial?\nYet more of the clown."],
      "1 Clown": ["A numbered speaker.\nFarewell"],
  }


def test_parse_play_refuses_a_text_without_acts():
  with pytest.raises(ValueError, match="not a play"):
    data.parse_play("Shall I compare thee to a summer's day?\n")


@pytest.fixture(scope="module")
def corpus():
  return data.load()


def test_splits_are_by_play_and_disjoint(corpus):
  plays = [p for names in data.SPLITS.values() for p in names]
  assert len(plays) == len(set(plays)) == len(corpus["plays"]) == 37
  for split, names in data.SPLITS.items():
    assert all(corpus["plays"][p]["split"] == split for p in names)
  assert {k: len(v) for k, v in data.SPLITS.items()} == {
      "public": 10, "train": 17, "validation": 3, "test": 7}


def test_vocabulary_covers_the_dialogue(corpus):
  vocab = corpus["vocabulary"]
  assert list(vocab) == sorted(set(vocab)) and len(vocab) <= 255
  text = "".join(t for p in corpus["plays"].values() for t in p["roles"].values())
  assert set(text) == set(vocab)


@pytest.mark.parametrize("length", [7, 64])
def test_windows_are_consecutive_characters_of_one_role(corpus, length):
  tokens, owners = data.windows(corpus, "validation", length)
  roles = data.roles_of(corpus, "validation")
  assert tokens.shape == (len(owners), length + 1) and tokens.dtype == np.uint8
  # Per role: its windows, in order, are the start of its dialogue, cut
  # without overlap; what is left is shorter than one window.
  for r, (_, _, text) in enumerate(roles):
    mine = tokens[owners == r]
    n = len(text) // (length + 1)
    assert len(mine) == n
    decoded = "".join(corpus["vocabulary"][i] for i in mine.reshape(-1))
    assert decoded == text[:n * (length + 1)]
  assert np.all(np.diff(owners) >= 0)


def test_windows_refuse_an_unknown_split_and_a_bad_length(corpus):
  with pytest.raises(ValueError, match="split must be one of"):
    data.windows(corpus, "private", 8)
  with pytest.raises(ValueError, match="length"):
    data.windows(corpus, "train", 0)
