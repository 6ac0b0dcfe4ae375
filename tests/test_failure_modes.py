"""FAILURE_MODES.md decodes every row id the kit prints or cites (`WARNING E2`, `note C1`, `# S1: ...`).

Nothing here is a hard-coded list: the ids are collected from the kit's own files (code, messages, launch.sh,
configs, docs, test names), the tests from tests/*.py, the functions from the scripts. A row id, test or
function added on any branch is covered as soon as it exists.
"""
import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE = os.path.join(ROOT, "FAILURE_MODES.md")
# A row id: a known prefix and a number, as a whole word ("E5" yes; "E402", "1E5", "test_e5" no).
ROW_ID = re.compile(r"\b([SRGECD][1-9][0-9]?)\b")
TEST_NAME_ID = re.compile(r"^[srgecd][1-9][0-9]?$")  # one "_"-separated part of a test name: test_r4_r5_...
TEST_REF = re.compile(r"`tests/(test_\w+\.py)::(test_\w+)(?:\[[^\]]*\])?`")
FUNCTION_REF = re.compile(r"`(\w+)\(\)`")
SKIP_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
PARTS = ("Symptom:", "Cause:", "The kit:", "Tests:", "diagnose_and_fix.py:")


def kit_files():
    """Every file whose text may cite a row: *.py anywhere, launch.sh, configs/**, Markdown docs."""
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        rel_top = os.path.relpath(top, ROOT)
        for name in files:
            path = os.path.join(top, name)
            in_configs = rel_top == "configs" or rel_top.startswith("configs" + os.sep)
            if name.endswith((".py", ".sh", ".md")) or in_configs:
                yield path


def kit_tests():
    """{(file name, test function name)} of tests/test_*.py, read with ast (nothing imported)."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                found.add((os.path.basename(path), node.name))
    return found


def rows():
    """{row id: its text} from the `### ID` headings of FAILURE_MODES.md."""
    text = open(CATALOGUE).read()
    parts = re.split(r"^### ([SRGECD][1-9][0-9]?)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def cited_ids():
    """{row id: [where it is cited]} over the kit's files and test names."""
    cited = {}
    for path in kit_files():
        if os.path.abspath(path) == CATALOGUE:
            continue
        with open(path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                for rid in ROW_ID.findall(line):
                    cited.setdefault(rid, []).append(f"{os.path.relpath(path, ROOT)}:{number}")
    for file_name, test in kit_tests():
        for part in test.split("_")[1:]:
            if TEST_NAME_ID.match(part):
                cited.setdefault(part.upper(), []).append(f"tests/{file_name}::{test}")
    return cited


def test_failure_modes_md_exists_with_a_heading_per_row():
    assert os.path.isfile(CATALOGUE), "FAILURE_MODES.md is missing from the project root"
    assert rows(), "FAILURE_MODES.md has no '### ID' row headings"


def test_every_row_id_the_kit_cites_has_an_entry_in_failure_modes_md():
    cited, documented = cited_ids(), set(rows())
    assert {"S1", "R4", "G2", "C1"} <= set(cited), "the scan found none of the kit's ids: the scan is broken"
    missing = {rid: where[:3] for rid, where in cited.items() if rid not in documented}
    assert not missing, f"row ids cited in the kit without an entry in FAILURE_MODES.md: {missing}"


@pytest.mark.parametrize("part", PARTS)
def test_every_entry_says_symptom_cause_what_the_kit_does_tests_and_diagnose(part):
    empty = [rid for rid, text in rows().items()
             if not re.search(rf"^- {re.escape(part)}\s*\S", text, flags=re.M)]
    assert not empty, f"FAILURE_MODES.md entries without a '- {part} ...' line: {empty}"


def test_every_test_an_entry_names_exists():
    existing = kit_tests()
    named = [(rid, f, t) for rid, text in rows().items() for f, t in TEST_REF.findall(text)]
    assert named, "no `tests/test_x.py::test_name` references found in FAILURE_MODES.md"
    missing = [f"{rid}: tests/{f}::{t}" for rid, f, t in named if (f, t) not in existing]
    assert not missing, f"FAILURE_MODES.md names tests that do not exist: {missing}"


def test_every_entry_names_at_least_one_test():
    bare = [rid for rid, text in rows().items() if not TEST_REF.search(text)]
    assert not bare, f"FAILURE_MODES.md entries naming no test: {bare}"


def test_every_test_named_after_a_row_is_listed_in_that_rows_entry():
    entries = rows()
    unlisted = []
    for file_name, test in sorted(kit_tests()):
        for part in test.split("_")[1:]:
            rid = part.upper()
            if TEST_NAME_ID.match(part) and rid in entries and f"`tests/{file_name}::{test}" not in entries[rid]:
                unlisted.append(f"{rid}: tests/{file_name}::{test}")
    assert not unlisted, f"add these tests to their rows' 'Tests:' line in FAILURE_MODES.md: {unlisted}"


def test_every_function_an_entry_names_is_defined_in_the_kit():
    defined = set()
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.add(node.name)
    named = {name for text in rows().values() for name in FUNCTION_REF.findall(text)}
    assert named, "FAILURE_MODES.md names no function"
    assert not named - defined, f"FAILURE_MODES.md names functions the kit does not define: {sorted(named - defined)}"


def test_the_scan_finds_ids_as_words_only():
    """The scan must not read "E402" (a lint code) or "1E5" as row ids, and must read test-name parts."""
    assert ROW_ID.findall("noqa: E402, 1E5, WARNING E2, (S10), R1-R5, test_s1") == ["E2", "S10", "R1", "R5"]
    assert [p for p in "test_r4_r5_e2e_resume".split("_") if TEST_NAME_ID.match(p)] == ["r4", "r5"]
