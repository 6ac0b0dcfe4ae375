"""The marked shared blocks of the two training scripts (and of their two --evaluate companions): read them,
compare them, or copy them.

train_probe.py (probe_evaluate.py) holds the master copy. After editing a shared block there, run
    python tests/shared_blocks.py --write
to copy every block into train_distill.py (distill_evaluate.py); tests/test_shared_blocks.py fails while they differ.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("train_probe.py", "train_distill.py")
PAIRS = (SCRIPTS, ("probe_evaluate.py", "distill_evaluate.py"))  # (master, copy): each pair's blocks are identical
BLOCK = re.compile(r"^# ==== shared: (?P<name>[^(\n]+?) \(identical in (?P<pair>\S+ and \S+)\) ====\n"
                   r".*?^# ==== end shared: (?P=name) ====\n", re.S | re.M)


def blocks(path):
    with open(path) as f:
        return {m.group("name"): m.group(0) for m in BLOCK.finditer(f.read())}


def write_blocks(source=SCRIPTS[0], target=SCRIPTS[1]):
    src_blocks = blocks(os.path.join(ROOT, source))
    path = os.path.join(ROOT, target)
    with open(path) as f:
        text = f.read()
    text = BLOCK.sub(lambda m: src_blocks[m.group("name")], text)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    for source, target in PAIRS:
        if "--write" in sys.argv:
            write_blocks(source, target)
        path = os.path.join(ROOT, target)
        others = blocks(path) if os.path.exists(path) else {}
        for name, block in blocks(os.path.join(ROOT, source)).items():
            other = others.get(name)
            print(f"{name}: {'identical' if other == block else 'DIFFERENT' if other else 'missing'}")
