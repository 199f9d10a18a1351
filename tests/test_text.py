"""The corpus text must not depend on the process (environment, memory addresses)."""

import os
import subprocess
import sys
from pathlib import Path

TEXT_PY = Path(__file__).resolve().parents[1] / "spectral_kv" / "text.py"
# Loads text.py alone (no torch import), so each subprocess takes a second or two.
SNIPPET = (
    "import hashlib, importlib.util as u; s = u.spec_from_file_location('t', {path!r}); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); "
    "print(hashlib.sha256(m.stdlib_text(('os', 'random', 'logging')).encode()).hexdigest())"
)


def _digest(extra_env: dict) -> str:
    env = {**os.environ, **extra_env}
    code = SNIPPET.format(path=str(TEXT_PY))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_corpus_is_the_same_in_different_environments():
    a = _digest({"SPECTRAL_KV_TEST_A": "x" * 50})
    b = _digest({"SPECTRAL_KV_TEST_B": "y" * 500, "SOME_OTHER": "1"})
    assert a == b and len(a) == 64
