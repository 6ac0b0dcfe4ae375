"""Catalogue ids in the Markdown docs link to FAILURE_MODES.md: find the bare ones, or link them.

    python tests/doc_links.py            # list bare ids in README.md and docs/*.md
    python tests/doc_links.py --write    # link them: S2 -> [S2](FAILURE_MODES.md#s2) (../FAILURE_MODES.md from docs/)

Code (fenced blocks, indented blocks, `inline code`), headings and existing links are left alone.
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_ID = re.compile(r"(?<![\[\w#])([SRGECD][1-9][0-9]?)(?![\w\]])")
KEEP = re.compile(r"(`[^`]*`|\[[^\]]*\]\([^)]*\))")  # inline code and existing links


def doc_pages():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def prose_lines(text):
    """(index, line) of the lines that are prose: not in a fenced block, not indented code, not a heading."""
    fenced = False
    for i, line in enumerate(text.split("\n")):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and not line.startswith(("    ", "#")):
            yield i, line


def bare_ids(text):
    return [rid for _, line in prose_lines(text) for part in KEEP.split(line)[::2] for rid in ROW_ID.findall(part)]


def link_ids(text, prefix):
    lines = text.split("\n")
    for i, line in prose_lines(text):
        parts = KEEP.split(line)
        parts[::2] = [ROW_ID.sub(lambda m: f"[{m.group(1)}]({prefix}FAILURE_MODES.md#{m.group(1).lower()})", p)
                      for p in parts[::2]]
        lines[i] = "".join(parts)
    return "\n".join(lines)


if __name__ == "__main__":
    for path in doc_pages():
        with open(path) as f:
            text = f.read()
        prefix = os.path.relpath(ROOT, os.path.dirname(path)).replace(os.sep, "/") + "/"
        prefix = "" if prefix == "./" else prefix
        if "--write" in sys.argv:
            with open(path, "w") as f:
                f.write(link_ids(text, prefix))
        else:
            print(f"{os.path.relpath(path, ROOT)}: {bare_ids(text) or 'every id linked'}")
