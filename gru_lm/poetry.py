"""The chinese-poetry collection (github.com/chinese-poetry/chinese-poetry, MIT licence; the
texts are public domain) as corpora: which files make each one, their SHA-256 sums at the
pinned commit, and how their JSON becomes text.

A poem becomes one line: its `paragraphs` (each a couplet with its ，and 。) joined with
nothing between them, without title or author; poems follow each other in file order
(poet.tang.0.json, poet.tang.1000.json, ... by number) and, inside a file, in the order the
file lists them. So the train/val/test split, contiguous in that order, puts whole files of
late poets in val and test, and a model learns that a line break starts a new poem.
Annotations the collection keeps in the text (（一作…）, □ for a lost character) stay.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gru_lm.errors import DataError

REPOSITORY = "chinese-poetry/chinese-poetry"
COMMIT = "99ebbef7e1345c0985c44b9fd96a3f9e776f117b"
BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}/"
FOLDER = "chinese-poetry"  # under GRU_LM_DATA_DIR and data.cache_dir, files at their paths
SUMS = Path(__file__).with_name("sums") / "chinese-poetry.sha256"
# The same files, byte for byte, as an npm package (for networks that reach the npm registry
# or a mirror of it, but not GitHub): gru-lm data import reads its archive.
NPM_PACKAGE = "chinese-poetry@2.0.1"
WITHOUT_GITHUB = (f"without GitHub: npm pack {NPM_PACKAGE}, then gru-lm data import "
                  "chinese-poetry-2.0.1.tgz")


def sums() -> dict[str, str]:
    """Path inside the repository -> SHA-256, for every file the corpora use."""
    out = {}
    for line in SUMS.read_text(encoding="utf-8").splitlines():
        digest, _, path = line.strip().partition("  ")
        out[path.removeprefix("./")] = digest
    return out


def _number(path: str) -> int:
    """The N of poet.tang.N.json (files are read in numeric order, not by name)."""
    found = re.search(r"\.(\d+)\.json$", path)
    return int(found.group(1)) if found else -1


def _poems(data, path: Path) -> list[str]:
    """The poems of one file of a collection (a list of {paragraphs: [...]}) as lines."""
    if not isinstance(data, list):
        raise DataError(f"{path} is not a list of poems; replace it with the file of "
                        f"{REPOSITORY} at commit {COMMIT[:7]}")
    return [_joined(poem, path) for poem in data]


def _joined(poem, path: Path) -> str:
    paragraphs = poem.get("paragraphs") if isinstance(poem, dict) else None
    if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
        raise DataError(f"{path} holds a poem without a list of paragraphs; replace it with "
                        f"the file of {REPOSITORY} at commit {COMMIT[:7]}")
    # (a line break inside a paragraph would start a new "poem")
    return "".join(paragraphs).replace("\n", "")


def _tang300(data, path: Path) -> list[str]:
    """蒙学/tangshisanbaishou.json: {content: [{type: 五言絕句, content: [poems]}, ...]}."""
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise DataError(f"{path} is not 唐詩三百首's {{content: [...]}}; replace it with the "
                        f"file of {REPOSITORY} at commit {COMMIT[:7]}")
    return [line for group in data["content"] for line in _poems(
        group.get("content") if isinstance(group, dict) else None, path)]


def _sayings(data, path: Path) -> list[str]:
    """论语/lunyu.json: chapters whose paragraphs are sayings, one saying a line."""
    return [line for chapter in _checked_list(data, path) for line in
            _paragraphs(chapter, path)]


def _checked_list(data, path: Path) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path} is not a list of chapters; replace it with the file of "
                        f"{REPOSITORY} at commit {COMMIT[:7]}")
    return data


def _paragraphs(chapter, path: Path) -> list[str]:
    paragraphs = chapter.get("paragraphs") if isinstance(chapter, dict) else None
    if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
        raise DataError(f"{path} holds a chapter without a list of paragraphs; replace it "
                        f"with the file of {REPOSITORY} at commit {COMMIT[:7]}")
    return [p.replace("\n", "") for p in paragraphs]


@dataclass(frozen=True)
class PoetryCorpus:
    """One corpus of the collection: the files whose path starts with `prefix` (in numeric
    order), each turned into lines by `lines`."""

    name: str
    prefix: str
    description: str
    lines: Callable[..., list[str]] = _poems

    def files(self) -> list[tuple[str, str]]:
        """(path, SHA-256) of its files, in the order their text is joined."""
        chosen = [(p, d) for p, d in sums().items() if p.startswith(self.prefix)]
        return sorted(chosen, key=lambda pd: (_number(pd[0]), pd[0]))

    def text(self, paths: list[Path]) -> str:
        """The corpus' text from its verified files (given in files()' order)."""
        lines: list[str] = []
        for path in paths:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read {path} as JSON ({type(e).__name__}); replace "
                                f"it with the file of {REPOSITORY} at commit "
                                f"{COMMIT[:7]}") from None
            lines.extend(self.lines(data, Path(path)))
        return "\n".join(lines) + "\n"


CORPORA = (
    PoetryCorpus("tang", "全唐诗/poet.tang.",
                 "全唐诗: 57,607 Tang poems, 3.73 M characters, traditional script "
                 "(chinese-poetry, one poem a line)"),
    PoetryCorpus("songci", "宋词/ci.song.",
                 "宋词: 21,050 ci of the Song dynasty, simplified script (chinese-poetry, "
                 "one ci a line)"),
    PoetryCorpus("tang300", "蒙学/tangshisanbaishou.json",
                 "唐诗三百首: the 300 Tang poems, traditional script (chinese-poetry, one "
                 "poem a line)", _tang300),
    PoetryCorpus("lunyu", "论语/lunyu.json",
                 "论语: the Analects, simplified script (chinese-poetry, one saying a line)",
                 _sayings),
)
