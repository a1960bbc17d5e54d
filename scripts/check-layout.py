#!/usr/bin/env python3
"""Checks the server crate's layout rules (README, Architecture), printing what breaks them:

1. no import circle between the server's top-level modules (`use crate::a` in b is an edge b -> a);
2. only `server/src/plugins/d3po/` names the `plugin_d3po` crate;
3. no source file over 600 lines, its `#[cfg(test)] mod tests` block aside.

Exit status 1 when a rule is broken. Run from anywhere: `python3 scripts/check-layout.py`.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "server" / "src"
MAX_LINES = 600


def production_text(path):
    """The file without its trailing unit-test module."""
    text = path.read_text()
    cut = re.search(r"^#\[cfg\(test\)\]\s*\nmod tests\b", text, re.M)
    return text[: cut.start()] if cut else text


def code_only(text):
    """`text` without `//` comments (doc links are no imports)."""
    return re.sub(r"//.*", "", text)


def top_module(path):
    rel = path.relative_to(SRC)
    if rel.parts[0] == "bin":
        return None
    return rel.parts[0].removesuffix(".rs")


def main():
    problems = []
    files = sorted(SRC.rglob("*.rs"))
    edges = {}
    for path in files:
        text = production_text(path)
        module = top_module(path)
        rel = path.relative_to(ROOT)
        if "plugin_d3po" in text and not str(rel).startswith("server/src/plugins/d3po/"):
            problems.append(f"{rel}: names plugin_d3po outside server/src/plugins/d3po/")
        lines = text.count("\n")
        if lines > MAX_LINES:
            problems.append(f"{rel}: {lines} lines (tests aside); split it below {MAX_LINES}")
        if module in (None, "lib"):
            continue
        for used in re.findall(r"\bcrate::([a-z_]+)", code_only(text)):
            if used != module:
                edges.setdefault(module, set()).add(used)
    # Any cycle in the module graph (depth-first search with colours).
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                problems.append("import circle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    for p in problems:
        print(p)
    if problems:
        return 1
    biggest = max(files, key=lambda p: production_text(p).count("\n"))
    print(
        f"layout ok: {len(files)} server source files, no import circle among "
        f"{len(edges)} modules, largest {biggest.relative_to(ROOT)} "
        f"({production_text(biggest).count(chr(10))} lines without tests)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
