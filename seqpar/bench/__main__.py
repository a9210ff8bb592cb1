"""`python -m seqpar.bench NAME [options]` runs `seqpar.bench.NAME.main(options)`.

Each benchmark is one module of this package with a `main(argv) -> int` that writes its JSON
(`--out FILE.json`); this dispatcher only finds it by name, so adding a benchmark adds a module.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys

import seqpar.bench


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(seqpar.bench.__path__) if not m.name.startswith("_"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = available()
    if not argv or argv[0] not in names:
        given = f"unknown benchmark {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        print(f"usage: python -m seqpar.bench NAME [options]; {given}NAME is one of: {', '.join(names)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"seqpar.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
