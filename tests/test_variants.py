import dataclasses

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from mythos_jax import OpenMythos, variants
from mythos_jax.interop.openmythos import OPENMYTHOS_FIELDS, config_to_torch, import_reference

NAMES = ["mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b", "mythos_500b",
         "mythos_1t"]


def _reference_variant(name):
    import_reference()
    import importlib.util
    import sys

    if "open_mythos.variants" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "open_mythos.variants", sys.modules["open_mythos"].__path__[0] + "/variants.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["open_mythos.variants"] = module
        spec.loader.exec_module(module)
    return getattr(sys.modules["open_mythos.variants"], name)()


def _jax_param_count(cfg) -> int:
    abstract = nnx.eval_shape(lambda: OpenMythos(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _torch_param_count(cfg) -> int:
    with torch.device("meta"):
        model = import_reference().OpenMythos(config_to_torch(cfg))
    return sum(p.numel() for p in model.parameters())  # tied embed/head counted once


@pytest.mark.parametrize("name", NAMES)
def test_variant_matches_openmythos(name):
    ours = variants.get_variant(name)
    reference = _reference_variant(name)
    assert {k: getattr(ours, k) for k in OPENMYTHOS_FIELDS} == dataclasses.asdict(reference)


@pytest.mark.parametrize("name", NAMES + ["tiny_mla", "tiny_gqa"])
def test_parameter_count_matches_openmythos(name):
    cfg = variants.get_variant(name)
    assert _jax_param_count(cfg) == _torch_param_count(cfg)


def test_known_sizes():
    assert round(_jax_param_count(variants.mythos_1b()) / 1e9, 2) == 1.06
    assert round(_jax_param_count(variants.mythos_1t()) / 1e9) == 999


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'mythos_7b'"):
        variants.get_variant("mythos_7b")
