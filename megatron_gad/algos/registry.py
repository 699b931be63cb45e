"""Name -> function registries, so a config can pick an algorithm by name."""

from collections.abc import Callable


class Registry:
    def __init__(self, what: str):
        self.what = what
        self._fns: dict[str, Callable] = {}

    def register(self, name: str):
        def deco(fn):
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:
        if name not in self._fns:
            raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._fns))}")
        return self._fns[name]
