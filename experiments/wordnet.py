"""ImageNet's classes and their coarse groups from WordNet 3.0, read offline.

ImageNet class ids are WordNet noun ids (``n01440764`` = part of speech ``n`` + byte offset ``01440764`` in
WordNet 3.0's ``data.noun``). The database comes from Debian's ``wordnet-base`` package (``/usr/share/wordnet``,
installed by ``make setup``); this module parses its ``data.noun`` / ``index.noun`` itself (a few lines, no nltk).
The 1,000 class ids, in the standard label order, are timm's bundled ``imagenet_synsets.txt``.

Groupings (`GROUPINGS`, the ``coarse`` data option of ``--dataset imagenet``):

    depthN     the ancestor N levels below ``entity`` on the class's hypernym path (``depth4`` puts a tench
               under ``organism.n.01``...). A synset with several hypernyms follows the first one WordNet lists;
               a class less than N levels deep is its own group.
    entity13   APPROXIMATION of BREEDS entity13 (Santurkar et al. 2020): the 13 superclasses BREEDS names
               (garment, bird, reptile, arthropod, mammal, accessory, craft, equipment, furniture, instrument,
               man-made structure, wheeled vehicle, produce), each class assigned to the first of them found
               among all its WordNet ancestors; classes under none go to ``other``. BREEDS itself uses a
               hand-edited hierarchy and keeps 20 classes per superclass; that file is not in WordNet, so this
               is not BREEDS' exact split (entity30 is not offered for the same reason).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from models.errors import UserError

__all__ = ["WORDNET_DIR", "ENTITY", "GROUPINGS", "WordNet", "imagenet_synsets", "grouping", "check_grouping"]

WORDNET_DIR = "/usr/share/wordnet"   # where Debian's wordnet-base puts the database
ENTITY = "n00001740"                  # entity.n.01, the root of the noun hierarchy
GROUPINGS = "depthN (N = 1..12), entity13"
# BREEDS entity13's superclasses as (lemma, sense number) in WordNet 3.0 (sense order of index.noun).
ENTITY13 = (("garment", 1), ("bird", 1), ("reptile", 1), ("arthropod", 1), ("mammal", 1), ("accessory", 1),
            ("craft", 2), ("equipment", 1), ("furniture", 1), ("instrument", 1), ("structure", 1),
            ("wheeled_vehicle", 1), ("produce", 1))


@dataclass(frozen=True)
class Synset:
    wnid: str
    names: tuple[str, ...]
    hypernyms: tuple[str, ...]   # "@" then "@i" (instance) pointers, in file order

    @property
    def name(self) -> str:
        return self.names[0]


class WordNet:
    """WordNet 3.0 nouns: id -> `Synset`, and lemma -> ids in sense order."""

    def __init__(self, folder: str | Path = WORDNET_DIR):
        folder = Path(folder)
        data, index = folder / "data.noun", folder / "index.noun"
        if not data.is_file() or not index.is_file():
            raise UserError(f"WordNet 3.0 not found: no data.noun/index.noun in {folder}; install it with "
                            "`apt-get install wordnet-base` (or make setup)")
        self.synsets: dict[str, Synset] = {}
        for line in data.read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):  # the licence header
                continue
            f = line.split(" | ", 1)[0].split()
            n_words = int(f[3], 16)
            names = tuple(f[4 + 2 * k] for k in range(n_words))
            p = 4 + 2 * n_words
            n_ptr = int(f[p])
            ptrs = [f[p + 1 + 4 * k: p + 5 + 4 * k] for k in range(n_ptr)]
            hyper = tuple("n" + off for sym, off, pos, _ in ptrs if sym in ("@", "@i") and pos == "n")
            self.synsets["n" + f[0]] = Synset("n" + f[0], names, hyper)
        self.senses: dict[str, list[str]] = {}
        for line in index.read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):
                continue
            f = line.split()
            n_sense = int(f[2])
            self.senses[f[0]] = ["n" + off for off in f[-n_sense:]]

    def synset(self, wnid: str) -> Synset:
        try:
            return self.synsets[wnid]
        except KeyError:
            raise UserError(f"{wnid} is not a WordNet 3.0 noun id") from None

    def path(self, wnid: str) -> list[str]:
        """Ids from `entity` down to `wnid`, following each synset's first hypernym."""
        out = [wnid]
        while self.synset(out[-1]).hypernyms:
            out.append(self.synset(out[-1]).hypernyms[0])
        return out[::-1]

    def ancestors(self, wnid: str) -> set[str]:
        """Every id above `wnid` through any hypernym (and `wnid` itself)."""
        seen, todo = set(), [wnid]
        while todo:
            w = todo.pop()
            if w not in seen:
                seen.add(w)
                todo += self.synset(w).hypernyms
        return seen

    def by_lemma(self, lemma: str, sense: int) -> str:
        return self.senses[lemma][sense - 1]


@lru_cache(maxsize=2)
def load_wordnet(folder: str = WORDNET_DIR) -> WordNet:
    """The parsed database, once per process (about a second)."""
    return WordNet(folder)


def imagenet_synsets() -> list[str]:
    """The 1,000 ImageNet-1k class ids in label order, from timm's bundled imagenet_synsets.txt."""
    from importlib import resources

    text = resources.files("timm.data").joinpath("_info/imagenet_synsets.txt").read_text()
    return text.split()


def check_grouping(name: str) -> int | None:
    """The depth of a ``depthN`` grouping, None for entity13; a `UserError` names anything else."""
    m = re.fullmatch(r"depth(\d+)", str(name))
    if m and 1 <= int(m.group(1)) <= 12:
        return int(m.group(1))
    if name == "entity13":
        return None
    raise UserError(f"imagenet option coarse={name!r}: allowed {GROUPINGS}")


def grouping(classes: list[str], name: str, wordnet: WordNet | None = None) -> dict:
    """Coarse groups of WordNet ids `classes` under grouping `name` (see the module docstring).

    Returns {"grouping", "approximation" (bool), "coarse_names" (readable, "name (wnid)"), "coarse_ids",
    "fine_to_coarse", "fine_names"}, JSON-able, for the run's record.
    """
    depth = check_grouping(name)
    wn = wordnet or load_wordnet()
    if depth is not None:
        group_of = []
        for c in classes:
            p = wn.path(c)
            if p[0] != ENTITY:
                raise UserError(f"{c}: its hypernym path ends at {p[0]}, not entity ({ENTITY})")
            group_of.append(p[min(depth, len(p) - 1)])
    else:
        supers = [wn.by_lemma(lemma, sense) for lemma, sense in ENTITY13]
        group_of = []
        for c in classes:
            up = wn.ancestors(c)
            group_of.append(next((s for s in supers if s in up), "other"))
    ids = sorted(set(group_of), key=lambda g: (g == "other", g))
    label = {g: "other" if g == "other" else f"{wn.synset(g).name} ({g})" for g in ids}
    return {"grouping": name, "approximation": depth is None,
            "coarse_ids": ids, "coarse_names": [label[g] for g in ids],
            "fine_to_coarse": [ids.index(g) for g in group_of],
            "fine_names": [f"{wn.synset(c).name} ({c})" for c in classes]}
