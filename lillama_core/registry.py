"""Named registries for the engine's extensible sets (planning strategies, factor initialisations): each item is
registered once, by name, and an unknown name is one user error listing the known ones."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """name -> item, in registration order; a later registration under a name replaces the earlier one."""

    def __init__(self, kind: str, items: dict[str, T] | None = None):
        self.kind = kind  # what the names name, for the error message ("strategy", "init")
        self._items: dict[str, T] = dict(items or {})

    def add(self, name: str, item: T) -> None:
        self._items[name] = item

    def __getitem__(self, name: str) -> T:
        """The item registered as `name`.

        Raises:
            ConfigError: nothing is registered under that name.
        """
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"{self.kind} must be one of {', '.join(self._items)}, not {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def values(self) -> list[T]:
        return list(self._items.values())

    def copy(self) -> Registry[T]:
        return Registry(self.kind, self._items)
