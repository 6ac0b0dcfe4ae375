"""FAILURE_MODES.md lists, in each row's "Tests:" line, every test named after that row: find the missing
ones, or add them.

    python tests/catalogue_tests.py            # list tests named after a row (test_r4_...) that its row omits
    python tests/catalogue_tests.py --write    # append them to the row's "Tests:" line

tests/test_failure_modes.py fails while any is missing; this only saves typing them.
"""
import re
import sys

from test_failure_modes import CATALOGUE, TEST_NAME_ID, kit_tests, rows


def missing():
    entries, out = rows(), {}
    for file_name, test in sorted(kit_tests()):
        for part in test.split("_")[1:]:
            rid = part.upper()
            ref = f"`tests/{file_name}::{test}`"
            if TEST_NAME_ID.match(part) and rid in entries and f"`tests/{file_name}::{test}" not in entries[rid]:
                out.setdefault(rid, []).append(ref)
    return out


def write(additions):
    text = open(CATALOGUE).read()
    for rid, refs in additions.items():
        heading = re.search(rf"^### {rid}\s*$", text, flags=re.M)
        tests_line = re.compile(r"^- Tests: .*?(?=^- diagnose_and_fix\.py:)", re.M | re.S)
        block = tests_line.search(text, heading.end())
        body = block.group(0).rstrip("\n").rstrip(".")
        body += "".join(f",\n  {ref}" for ref in refs) + ".\n"
        text = text[:block.start()] + body + text[block.end():]
    with open(CATALOGUE, "w") as f:
        f.write(text)


if __name__ == "__main__":
    found = missing()
    for rid, refs in sorted(found.items()):
        print(rid, *refs, sep="\n  ")
    if "--write" in sys.argv and found:
        write(found)
        print(f"added {sum(map(len, found.values()))} test(s) to FAILURE_MODES.md")
