"""Matching the key names of two state_dicts that were saved under different wrappers.

DataParallel and DDP save every key under ``module.``, ``torch.compile`` under
``_orig_mod.`` (the two nest in either order), and training frameworks often
put the whole network under ``model.`` or ``backbone.``. Alignment strips a
prefix only when *every* key of that side carries it, and only when doing so
makes more keys match: never some keys and not others.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import UsageError


@dataclass(frozen=True)
class Alignment:
    """Prefixes stripped from each side's keys (``""`` when none) so that the names meet.

    >>> a = Alignment("module.", "")
    >>> a.canon_a("module.fc.weight"), a.to_b("fc.weight")
    ('fc.weight', 'fc.weight')
    """

    prefix_a: str = ""
    prefix_b: str = ""

    @property
    def active(self) -> bool:
        return bool(self.prefix_a or self.prefix_b)

    def canon_a(self, name: str) -> str:
        return name[len(self.prefix_a):]

    def canon_b(self, name: str) -> str:
        return name[len(self.prefix_b):]

    def to_b(self, canon: str) -> str:
        return self.prefix_b + canon

    def to_dict(self) -> Optional[Dict[str, str]]:
        return {"a": self.prefix_a, "b": self.prefix_b} if self.active else None

    def describe(self, a: str = "A", b: str = "B") -> str:
        bits = [f"stripped {p!r} from every key of {side}" for p, side in ((self.prefix_a, a), (self.prefix_b, b)) if p]
        return "; ".join(bits) if bits else "none"


def common_prefix(names: Sequence[str]) -> List[str]:
    """The leading dotted components every name shares, never a whole name.

    >>> common_prefix(["module.model.conv.weight", "module.model.fc.bias"])
    ['module', 'model']
    >>> common_prefix(["module.weight"])
    ['module']
    """
    if not names:
        return []
    split = [n.split(".") for n in names]
    limit = min(len(s) for s in split) - 1  # the last component is the tensor's own name
    first = split[0]
    out = []
    for i in range(limit):
        if all(s[i] == first[i] for s in split):
            out.append(first[i])
        else:
            break
    return out


def align(names_a: Iterable[str], names_b: Iterable[str], renames: Sequence["Rename"] = ()) -> Alignment:
    """The prefix stripping that makes the most names of A and B meet (none if that is already best).

    >>> align(["module.fc.weight", "module.fc.bias"], ["fc.weight", "fc.bias"])
    Alignment(prefix_a='module.', prefix_b='')
    >>> align(["_orig_mod.module.conv.weight"], ["model.conv.weight"])
    Alignment(prefix_a='_orig_mod.module.', prefix_b='model.')
    """
    a, b = list(names_a), list(names_b)
    pa, pb = common_prefix(a), common_prefix(b)
    set_b = set(b)
    best = (sum(1 for n in a if apply_renames(n, renames) in set_b), 0, "", "")  # (matches, -components, a, b)
    for i in range(len(pa) + 1):
        strip_a = ".".join(pa[:i]) + "." if i else ""
        canon_a = {apply_renames(n[len(strip_a):], renames) for n in a}
        for j in range(len(pb) + 1):
            if not i and not j:
                continue
            strip_b = ".".join(pb[:j]) + "." if j else ""
            matches = sum(1 for n in b if n[len(strip_b):] in canon_a)
            if (matches, -(i + j)) > best[:2]:
                best = (matches, -(i + j), strip_a, strip_b)
    return Alignment(best[2], best[3])


@dataclass(frozen=True)
class Rename:
    """One ``REGEX=REPL`` rule (``re.sub`` on the whole name, back-references allowed)."""

    pattern: "re.Pattern[str]"
    repl: str

    @classmethod
    def parse(cls, spec: str) -> "Rename":
        """``'^encoder\\.=backbone.'`` -> Rename. The first ``=`` not inside the regex's escapes splits."""
        m = re.search(r"(?<!\\)(?:\\\\)*=", spec)  # the first "=" not escaped by a backslash
        if m is None:
            raise UsageError(f"--rename {spec!r} is not REGEX=REPL")
        regex, repl = spec[:m.end() - 1], spec[m.end():]
        try:
            return cls(re.compile(regex), repl)
        except re.error as e:
            raise UsageError(f"--rename {spec!r}: not a valid regular expression: {e}") from None

    def apply(self, name: str) -> str:
        try:
            return self.pattern.sub(self.repl, name)
        except (re.error, IndexError) as e:
            raise UsageError(f"--rename {self.pattern.pattern}={self.repl}: {e}") from None


def apply_renames(name: str, renames: Sequence[Rename]) -> str:
    """``name`` after each rule in order."""
    for r in renames:
        name = r.apply(name)
    return name


def pair_names(names_a: Sequence[str], names_b: Sequence[str], alignment: Alignment,
               renames: Sequence[Rename] = ()) -> Tuple[Dict[str, str], List[str], List[str]]:
    """Match names: ``({a_name: b_name}, only_in_a, only_in_b)``, in A's and B's orders.

    A's names are stripped of ``alignment.prefix_a``, renamed, and looked up among
    B's names stripped of ``alignment.prefix_b``. Two A names landing on the same B
    name is a UsageError (a rename rule that merges keys).
    """
    canon_b = {alignment.canon_b(n): n for n in names_b}
    pairs: Dict[str, str] = {}
    taken: Dict[str, str] = {}
    only_a: List[str] = []
    for n in names_a:
        canon = apply_renames(alignment.canon_a(n), renames)
        target = canon_b.get(canon)
        if target is None:
            only_a.append(n)
            continue
        if target in taken:
            raise UsageError(f"keys {taken[target]!r} and {n!r} both map to {target!r}; check the --rename rules")
        taken[target] = n
        pairs[n] = target
    only_b = [n for n in names_b if n not in taken]
    return pairs, only_a, only_b
