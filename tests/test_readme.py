"""README.md documents every config key of both training scripts (users configure from it)."""
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["train_probe", "train_distill"])
def test_readme_documents_every_config_key(script):
    if not os.path.exists(os.path.join(ROOT, script + ".py")):
        pytest.fail(f"{script}.py is missing")
    readme = open(os.path.join(ROOT, "README.md")).read()
    missing = [k for k in importlib.import_module(script).CONFIG if f"`{k}`" not in readme]
    assert not missing, f"README.md does not document {missing}"


def test_readme_states_the_two_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "./launch.sh configs/probe_synthetic.yaml" in readme and "./launch.sh --tests" in readme
