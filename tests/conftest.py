"""Shared fixtures. Hypothesis profile "ci" (>= 200 examples per property) is selected by
HYPOTHESIS_PROFILE=ci, which `make test` sets."""

import os
import shutil

# Triton kernels run under the CPU interpreter where there is no GPU. The flag is read when
# triton is first imported, and other test modules (unsloth, kvpress, inductor) import it
# indirectly, so it must be set here, before any test module loads.
if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def method_or_skip(spec: str):
    """`spectral_kv.eval.make_method(spec)`, or skip the test when its optional package is missing."""
    from spectral_kv.eval import make_method

    try:
        return make_method(spec)
    except ImportError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session."""
    from spectral_kv.models import ModelPackageMissing, load_default_model

    try:
        return load_default_model(progress=False)
    except ModelPackageMissing as exc:  # make test installs it; a bare checkout may not have it
        pytest.skip(str(exc))
