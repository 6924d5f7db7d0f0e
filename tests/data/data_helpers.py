"""Shared inputs for the tests/data suite (a plain module, not a conftest.py: other test folders import
`conftest` by name, which a second conftest.py here would shadow)."""

import functools

from nanoseek.data import Tokenizer, stdlib_sources, train_tokenizer

UNICODE_CODE = (
    "def grüße(name: str) -> str:\n"
    "    \"\"\"Say hello — in 日本語 too. 🚀\"\"\"\n"
    "\treturn f'héllo {name}!'  # naïve café, ½ ≠ 0.5\n\n\n"
    "if __name__ == \"__main__\":\n    print(grüße('Ωmega'), 12345678)\r\n"
)
_FILES = {"abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "heapq.py", "keyword.py", "numbers.py",
          "operator.py", "queue.py", "random.py", "shlex.py", "string.py", "textwrap.py"}


@functools.cache
def stdlib_texts() -> tuple[str, ...]:
    """A few small standard-library files (about 150k characters)."""
    texts = tuple(p.read_text(encoding="utf-8") for p in stdlib_sources() if p.name in _FILES)
    assert sum(map(len, texts)) > 50_000
    return texts


@functools.cache
def small_tokenizer() -> Tokenizer:
    """A 512-token BPE trained on `stdlib_texts` (shared: the tests only read it)."""
    return train_tokenizer(stdlib_texts(), vocab_size=512, show_progress=False)
