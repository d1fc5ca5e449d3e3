"""The recipe row (on the Distill step, beside Start): save every setting as a YAML recipe, load one back
into the forms, and show the `lillama compress` line that reproduces them, as LlamaBoard saves and loads
arguments and previews its command. The handlers are the controller's."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import gradio as gr

from .common import user_errors
from .studio import Studio

if TYPE_CHECKING:  # the controller imports the panels
    from .controller import Controller

RECIPE_TYPES = [".yaml", ".yml", ".json"]
NOTE = ("A recipe is every setting of steps 1, 2, 3 and 5 (model, calibration data, plan, distillation, healing, "
        "evaluation), as `lillama compress --config recipe.yaml` reads it; step 6 loads the recipe of any run. "
        "A plan whose ranks were edited by hand is not a setting: saving then also offers its `plan.json`, which "
        "the command line names with `--plan plan.json`.")


def shown_settings(studio: Studio, seen: int, values: Callable[[], tuple], count: int) -> tuple:
    """A panel's on_show outputs for forms that hold recipe settings: the studio's values and the recipe
    version they show where a recipe was loaded since this browser tab last showed them (`seen`); otherwise
    skips, so what the user typed and has not yet used stays in the forms.

    Args:
        studio: the server state.
        seen: the recipe version this tab's forms show (a gr.State).
        values: the forms' values from the studio's settings, in the outputs' order.
        count: how many forms `values` fills.
    Returns:
        (*form values or skips, the version now shown).
    """
    if seen == studio.recipe_version:
        return (*(gr.skip(),) * count, seen)
    return (*values(), studio.recipe_version)


def build(controller: Controller, forms: list, values: Callable[[], tuple]) -> None:
    """Lay out the recipe accordion and wire its buttons.

    Args:
        controller: the app's handlers.
        forms: the components of this step that a loaded recipe changes (other steps re-read the studio
            when they are next shown).
        values: their values from the studio's settings, in order.
    """
    with gr.Accordion("Recipe: save, load, command line", open=False):
        gr.Markdown(NOTE)
        with gr.Row():
            save = gr.DownloadButton("Save recipe (YAML)")
            plan = gr.DownloadButton("Download its plan.json", visible=False)
            load = gr.UploadButton("Load recipe", file_types=RECIPE_TYPES)
            show = gr.Button("Show the CLI command")
        command = gr.Code(language="shell", label="lillama compress with these settings", interactive=False)

    def on_save():
        recipe, *rest = controller.save_recipe()
        return str(recipe), gr.update(value=str(rest[0]) if rest else None, visible=bool(rest))

    save.click(user_errors(on_save), None, [save, plan], api_name="save_recipe")

    @user_errors
    def on_load(file):
        gr.Info(controller.load_recipe(file))
        return (*values(), controller.cli_command())

    load.upload(on_load, load, [*forms, command], api_name="load_recipe")
    show.click(user_errors(controller.cli_command), None, command, api_name="cli_command")
