"""The documentation a user reads: the README front page with its two commands, the config reference that
--help_config prints straight from CONFIG, the docs/ pages, their links, and catalogue ids that link to
FAILURE_MODES.md. Scripts, keys and pages are found by scanning the kit, never listed here."""
import glob
import importlib
import os
import re
import subprocess
import sys

import pytest
import yaml

from doc_links import bare_ids, doc_pages
from run_records import loud_findings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "train_*.py")))
README_MAX_LINES = 300  # a front page (nanoGPT's is about 230 lines); the manual lives in docs/
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def markdown_files():
    found = []
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in {".git", ".venv", "runs", "__pycache__"}]
        found += [os.path.join(top, f) for f in files if f.endswith(".md")]
    return found


def anchors(path):
    """GitHub's heading anchors of a Markdown file: lower case, punctuation but - and _ dropped, spaces -> -."""
    text = re.sub(r"^```.*?^```", "", open(path).read(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_readme_states_the_two_commands():
    readme = read("README.md")
    assert "./launch.sh configs/probe_synthetic.yaml" in readme and "./launch.sh --tests" in readme


def test_readme_is_a_front_page():
    lines = read("README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the detail to a page in docs/"


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_every_config_key_has_a_doc_and_appears_in_help_config(script):
    module = importlib.import_module(script)
    schema = module.CONFIG
    undocumented = [key for key, (_default, _kind, doc) in schema.items() if not str(doc).strip()]
    assert not undocumented, f"{script}.CONFIG keys without a doc string: {undocumented}"
    out = subprocess.run([sys.executable, os.path.join(ROOT, script + ".py"), "--help_config"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    printed = {}  # key -> its row; a long list of choices puts the meaning on the next line, which is joined here
    for i, line in enumerate(lines):
        if line.startswith("  ") and line.split() and line.split()[0] in schema:
            more = lines[i + 1] if i + 1 < len(lines) else ""
            printed[line.split()[0]] = line + ("  " + more.strip() if more.startswith("      ") and
                                               more.split()[0] not in schema else "")
    missing = [key for key in schema if key not in printed]
    assert not missing, f"{script}.py --help_config does not print {missing}"
    for key, (default, kind, doc) in schema.items():  # each line: key, default (YAML), type, meaning
        name, default_text, kind_text, meaning = re.split(r"\s{2,}", printed[key].strip(), maxsplit=3)
        needs = f" [set: needs {module.COMPANION_KEYS[key]}.py beside {script}.py]" if key in module.COMPANION_KEYS else ""
        assert yaml.safe_load(default_text) == default and meaning == doc + needs, printed[key]  # C3: needs its file
        if isinstance(kind, tuple):
            assert [yaml.safe_load(c) for c in kind_text.split(" | ")] == list(kind), printed[key]
        else:
            assert kind_text == (kind[:-1] + " or null" if kind.endswith("?") else kind), printed[key]


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_docs_page_of_each_training_script_points_at_help_config(script):
    page = os.path.join("docs", script + ".md")
    assert os.path.isfile(os.path.join(ROOT, page)), f"{page} is missing"
    assert f"python {script}.py --help_config" in read(page)
    assert page in read("README.md"), f"README.md does not link {page}"


def test_every_script_and_tool_is_documented_on_a_page_the_readme_links():
    readme = read("README.md")
    linked = [p for p in glob.glob(os.path.join(ROOT, "docs", "*.md")) if os.path.relpath(p, ROOT) in readme]
    pages = "".join(open(p).read() for p in linked)
    tools = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*.sh"))]
    assert tools and linked
    missing = [t for t in tools if t not in pages and t not in readme]
    assert not missing, f"no docs page linked from README.md describes {missing}"


def test_every_relative_link_in_the_markdown_resolves():
    broken = []
    for path in markdown_files():
        for target in LINK.findall(open(path).read()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(resolved):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such file)")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such heading)")
    assert not broken, f"broken links: {broken}"


def test_catalogue_ids_in_the_readme_and_docs_link_to_failure_modes_md():
    bare = {os.path.relpath(p, ROOT): sorted(set(bare_ids(open(p).read()))) for p in doc_pages()}
    bare = {page: ids for page, ids in bare.items() if ids}
    assert not bare, f"row ids not linked to FAILURE_MODES.md: {bare}; run python tests/doc_links.py --write"


def test_readme_inference_snippets_run_on_checkpoints_the_kit_wrote(tmp_path):
    """Every ```python block of the README ("Using a trained model") runs as a user would paste it, from a
    directory holding the runs it names (tiny ones, written by the scripts themselves)."""
    import train_distill as td
    import train_probe as tp
    snippets = re.findall(r"```python\n(.*?)```", read("README.md"), re.S)
    assert snippets, "the README shows no Python snippet"
    old = os.getcwd()
    os.chdir(tmp_path)  # the snippets name runs/<run_name>/ relative to where they run
    try:
        probe, _ = tp.resolve_config(os.path.join(ROOT, "configs", "probe_synthetic.yaml"),
                                     ["train.epochs=4", "data.synthetic.num_train=256", "data.synthetic.num_val=32", "train.batch_size=16", "schedule.warmup=2",
                                      "train.log_every=1"])
        assert tp.train(probe, os.path.join("runs", "probe_synthetic"), "none", quiet=True)[0] == "finished"
        assert loud_findings(os.path.join("runs", "probe_synthetic")) == []  # the false-positive corpus (issue 22)
        teacher, _ = td.resolve_config(None, td.DRY_RUN_SETTINGS + ["train.epochs=1"])
        assert td.train(teacher, os.path.join("runs", "distill_demo"), "none", quiet=True)[0] == "finished"
    finally:
        os.chdir(old)
    env = {**os.environ, "PYTHONPATH": ROOT}
    for code in snippets:
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, f"README snippet failed:\n{code}\n{out.stderr}"
