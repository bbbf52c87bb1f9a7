"""Recipe check shared by the scorers and allocators that handle heads and MLP channels only:
they refuse ``structures.layers: true`` (whole-layer removal) up front, with one line."""

from __future__ import annotations

from resp_core.errors import RespError

# the refusal's wording per plugin family, formatted with the plugin's name
WHOLE_LAYER_REFUSALS = {
    "scorer": "scorer {name!r} cannot prune whole layers (it scores heads and MLP channels); "
              "set structures.layers: false",
    "allocator": "allocator {name!r} allocates heads and MLP channels; it cannot remove whole layers",
}


def refuse_whole_layers(recipe, family: str, name: str) -> None:
    """Raise the one-line refusal of ``family`` ("scorer" / "allocator") for the plugin ``name``
    when the recipe prunes whole layers; do nothing otherwise."""
    if recipe.structures.layers:
        raise RespError("structures.layers: " + WHOLE_LAYER_REFUSALS[family].format(name=name))


class HeadsAndChannelsOnly:
    """Mixin (put it before :class:`~resp_core.interfaces.Scorer` / ``Allocator`` in the bases) of a
    plugin that cannot remove whole layers: its :meth:`check_recipe` refuses ``structures.layers``.

    ``family`` picks the refusal's wording; ``name`` is the plugin name the refusal quotes."""

    family: str = "scorer"
    name: str

    def check_recipe(self, recipe, path: str) -> None:
        refuse_whole_layers(recipe, self.family, self.name)
