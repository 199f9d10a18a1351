"""The pydoc corpus is the same text in every process (no memory addresses)."""

import pydoc
import re

from spectral_kv.text import stdlib_text

ADDR = re.compile(r"0x[0-9a-f]{6,}")


def test_corpus_has_no_memory_addresses():
    raw = pydoc.render_doc("logging", renderer=pydoc.plaintext)
    assert ADDR.search(raw), "pydoc of logging shows object addresses (weakrefs in handlerList)"
    text = stdlib_text(("logging",))
    assert not ADDR.search(text) and "0x..." in text
