"""The shared blocks must be byte-identical in both training scripts: users copy one file, so the
loop core is duplicated on purpose, and this test is what keeps the copies from drifting."""
import os

import pytest

from shared_blocks import PAIRS, ROOT, SCRIPTS, blocks

EXPECTED = {"config", "schedule", "devices, data order, precision", "data file content", "training loop", "loop checks",
            "run dir, checkpoints, resume", "progress and metric sinks"}
COMPANIONS = {"evaluate command"}  # E11: only the --evaluate companions use it, so it lives in them


def test_both_scripts_carry_every_shared_block():
    for script in SCRIPTS:
        path = os.path.join(ROOT, script)
        if not os.path.exists(path):
            pytest.fail(f"{script} is missing")
        assert set(blocks(path)) == EXPECTED, script


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_block_is_identical_in_both_scripts(name):
    probe, distill = (blocks(os.path.join(ROOT, s)) for s in SCRIPTS)
    assert probe[name] == distill[name], (
        f"shared block '{name}' differs between {SCRIPTS[0]} and {SCRIPTS[1]}; edit it in {SCRIPTS[0]} "
        "and run python tests/shared_blocks.py --write")


def test_the_evaluate_companions_share_the_evaluate_command_block():
    source, target = PAIRS[1]
    master, copy = (blocks(os.path.join(ROOT, name)) for name in PAIRS[1])
    assert set(master) == set(copy) == COMPANIONS
    assert master == copy, (f"a shared block differs between {source} and {target}; edit it in {source} and run "
                            "python tests/shared_blocks.py --write")
