"""A small nginx config reader for the tests: directives and blocks as a tree (quotes, comments, braces)."""
from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"""'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|[{};]|[^\s{};'"#]+|\#[^\n]*""")


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list["Directive"] | None = None  # None: a simple directive; a list: a block

    def all(self, name: str) -> list["Directive"]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> "Directive":
        found = self.all(name)
        where = f"{self.name} {' '.join(self.args)}"
        assert len(found) == 1, f"expected one {name!r} in {where}, found {len(found)}"
        return found[0]


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return token[1:-1]
    return token


def parse(text: str) -> Directive:
    """The whole file as the block of a root directive named ``main``."""
    root = Directive("main", [], [])
    stack, words = [root], []
    for token in _TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if token == ";":
            assert words, "empty directive"
            stack[-1].block.append(Directive(words[0], words[1:]))
            words = []
        elif token == "{":
            block = Directive(words[0], words[1:], [])
            stack[-1].block.append(block)
            stack.append(block)
            words = []
        elif token == "}":
            assert not words and len(stack) > 1, "unbalanced braces"
            stack.pop()
        else:
            words.append(_unquote(token))
    assert len(stack) == 1 and not words, "config ends inside a block or a directive"
    return root
