"""Draw SmartSplit's floors from the import-linter contract and the real import graph.

    python scripts/architecture.py           # rewrite the picture in docs/architecture.md
    python scripts/architecture.py --check   # exit 1 if the page's picture is not the current graph's

The picture is a Mermaid flowchart (GitHub renders it): one row per floor of the ``floors`` layers contract in
pyproject.toml, top to bottom, and the direct imports between packages found by grimp (import-linter's own
graph), drawn as their transitive reduction: an import that a path of other arrows already implies is left out
of the picture, and listed in the table under it with every other. Nothing in it is drawn by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

import grimp

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"
START, END = "<!-- floors:start (scripts/architecture.py) -->", "<!-- floors:end -->"


def floors() -> list[list[str]]:
    """The ``floors`` contract's layers, top first, each a list of its modules (siblings split on | or :)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c.get("id") == "floors")
    return [[m.strip() for m in layer.replace(":", "|").split("|")] for layer in contract["layers"]]


def imports(modules: list[str]) -> list[tuple[str, str]]:
    """(importer, imported) for every pair of ``modules`` (packages or modules) with a direct import."""
    sys.path.insert(0, str(ROOT / "src"))
    graph = grimp.build_graph("smartsplit")
    return [(a, b) for a in modules for b in modules
            if a != b and graph.direct_import_exists(importer=a, imported=b, as_packages=True)]


def reduction(edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The arrows no path of two or more other arrows implies (the graph is acyclic: the floors say so)."""
    following: dict[str, set[str]] = {}
    for a, b in edges:
        following.setdefault(a, set()).add(b)

    def reachable(start: str, skip: tuple[str, str]) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            for nxt in following.get(current, ()):
                if (current, nxt) == skip or nxt in seen:
                    continue
                seen.add(nxt)
                todo.append(nxt)
        return seen

    return [(a, b) for a, b in edges if b not in reachable(a, (a, b))]


def picture() -> str:
    layers = floors()
    modules = [m for layer in layers for m in layer]
    short = {m: m.removeprefix("smartsplit.") for m in modules}
    edges = imports(modules)
    lines = ["```mermaid", "flowchart TB"]
    for number, layer in enumerate(layers):
        lines.append(f"    subgraph floor{number}[\" \"]")
        lines.append("        direction LR")
        lines += [f"        {short[m]}[{short[m]}]" for m in layer]
        lines.append("    end")
    for number in range(len(layers) - 1):
        lines.append(f"    floor{number} ~~~ floor{number + 1}")
    lines += [f"    {short[a]} --> {short[b]}" for a, b in reduction(edges)]
    lines += ["```", "", "| package | imports directly |", "|---|---|"]
    for m in modules:
        lines.append(f"| `{short[m]}` | {', '.join(f'`{short[b]}`' for a, b in edges if a == m) or '(nothing of SmartSplit)'} |")
    return "\n".join(lines)


def page_with(text: str, drawing: str) -> str:
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{drawing}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/architecture.md's picture is stale")
    args = parser.parse_args()
    text = PAGE.read_text()
    if START not in text or END not in text:
        print(f"{PAGE}: the markers {START} ... {END} are missing", file=sys.stderr)
        return 1
    updated = page_with(text, picture())
    if args.check:
        if updated != text:
            print(f"{PAGE}: the floors picture is not the current import graph's; run python scripts/architecture.py",
                  file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(updated)
    print(f"wrote the floors picture into {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
