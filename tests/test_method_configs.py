"""``conf/method/*.yaml`` against the classes they instantiate."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_method_config_values_are_the_constructor_defaults(path):
    """Each value in a method's YAML is what ``Class()`` uses, so a sweep of ``method=<name>`` measures the same
    method as the Python API, and a default changed in one place cannot drift from the other."""
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    module, cls_name = cfg.pop("_target_").rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    obj, params = cls(), inspect.signature(cls).parameters
    for key, value in cfg.items():
        assert key in params or hasattr(obj, key), f"{path.name}: {key} is not a parameter of {cls_name}"
        used = getattr(obj, key) if hasattr(obj, key) else params[key].default
        if used != value and key in params:  # an attribute may hold a derived value (a resolved None, say)
            used = params[key].default
        assert used == value, f"{path.name}: {key}={value!r} but {cls_name}() uses {used!r}"


def test_the_check_above_can_fail(tmp_path):
    """A YAML value that differs from the constructor's default is caught (here DeFT-Flatten's ``wide_waves``)."""
    text = (CONF / "deft_flatten.yaml").read_text()
    value = OmegaConf.load(CONF / "deft_flatten.yaml").wide_waves
    bad = tmp_path / "deft_flatten.yaml"
    bad.write_text(re.sub(r"(?m)^wide_waves: \S+", f"wide_waves: {value + 0.25}", text))
    with pytest.raises(AssertionError, match=f"wide_waves={value + 0.25}"):
        test_method_config_values_are_the_constructor_defaults(bad)
