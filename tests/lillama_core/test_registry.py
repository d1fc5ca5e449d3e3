import pytest

from lillama_core.errors import ConfigError
from lillama_core.registry import Registry


def test_a_registry_finds_by_name_in_order_and_refuses_unknown_names_in_one_line():
    registry = Registry("colour")
    registry.add("red", 1)
    registry.add("blue", 2)
    registry.add("red", 3)  # a later registration replaces the earlier one, in its place
    assert registry["red"] == 3 and list(registry) == ["red", "blue"] and registry.values() == [3, 2]
    assert "blue" in registry and "green" not in registry
    with pytest.raises(ConfigError, match="^colour must be one of red, blue, not 'green'$"):
        registry["green"]
    copy = registry.copy()
    copy.add("green", 4)
    assert "green" not in registry and copy["green"] == 4
