"""Save and load compressed students.

A compressed export is an ordinary transformers folder (safetensors, config.json, tokenizer, model card)
whose config carries the rank map, its own `model_type` ("lillama_" + the teacher's) and an `auto_map` to a
shipped `modeling_lillama.py` (with the teacher's own code files when it had any), so stock
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it (`AutoModelForSpeechSeq2Seq`
for Whisper) and refuses it without remote code. A merged export multiplies the factors back into dense weights
in the teacher's own classes. Exports are written to a hidden staging folder and renamed into place, so a
half-written export never exists.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .errors import ExportError, first_line
from .factorize.svd import merge_low_rank
from .model_card import write_model_card
from .modeling import shipped
from .modeling.discovery import share_weights_copy
from .modeling.packs import packs_of, unpack_low_rank
from .modeling.quantize import quantized_modules, quantized_storage
from .modeling.shipped import FactoredLinear, LowRankLinear, set_submodule
from .runtime.atomic import staged_folder, write_json
from .tasks import auto_class_for

# 3: config.json lists packed factors (lillama_packs); 2: compressed exports have their own model_type; 1. Exports of
# versions 1 and 2 (tests/fixtures/v1_export, v2_export) still load.
FORMAT_VERSION = 3
MODELING_FILE = "modeling_lillama.py"
RECORD_FILE = "lillama.json"


def rank_map_of(model: nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, FactoredLinear)}


def _dense_class(cls: type) -> type:
    """The transformers class a Lillama subclass (model or config, from `lowrank_subclass`/`lowrank_config`)
    was made from; any other class unchanged."""
    parent = cls.__mro__[1] if len(cls.__mro__) > 1 else cls
    return parent if cls.__name__ == "Lillama" + parent.__name__ else cls


def _importable(cls: type, carried: dict[str, Path]) -> str:
    """The module an exported modeling file imports `cls` from. transformers' own classes are imported from
    transformers; a remote-code class (module `transformers_modules.<folder>.<file>`, which exists only in this
    machine's modules cache) is imported relatively from its source file, added to `carried` with every file it
    imports relatively, so the export carries the code it runs."""
    from transformers.dynamic_module_utils import get_relative_import_files

    module = cls.__module__
    if module.startswith("transformers."):
        return module
    source = getattr(sys.modules.get(module), "__file__", None)
    if not module.startswith("transformers_modules.") or source is None:
        raise ExportError(f"cannot export a {cls.__name__}: its code lives in the module {module}, which an export "
                          "cannot carry (only transformers classes and trust_remote_code classes are exportable)")
    for path in [source, *get_relative_import_files(source)]:
        carried[Path(path).name] = Path(path)
    return "." + module.rsplit(".", 1)[1]


def _modeling_source(task: type, backbone: type, config_class: type) -> tuple[str, dict[str, Path]]:
    """(modeling/shipped.py itself plus the lines binding the exported classes, so exports never drift from the code
    the library uses; the teacher's own code files it imports, by file name)."""
    carried: dict[str, Path] = {}
    imports = "".join(f"from {_importable(cls, carried)} import {cls.__name__} as {alias}\n"
                      for cls, alias in ((config_class, "_BaseConfig"), (task, "_Task"), (backbone, "_Backbone")))
    if MODELING_FILE in carried:
        raise ExportError(f"the teacher's own code has a file named {MODELING_FILE}, which an export needs for its own")
    source = Path(shipped.__file__).read_text()
    return (f"{source}\n\n{imports}\n"
            f"Lillama{config_class.__name__} = lowrank_config(_BaseConfig)\n"
            f"Lillama{task.__name__} = lowrank_subclass(_Task, Lillama{config_class.__name__})\n"
            f"Lillama{backbone.__name__} = lowrank_subclass(_Backbone, Lillama{config_class.__name__})\n"), carried


def _ship_lowrank_code(model: nn.Module, staging: Path) -> None:
    """Make `model` (an export's own copy) save as a compressed export: its class and config become Lillama
    subclasses (their own `model_type`, so stock loaders refuse the folder without the shipped code), the
    config's `auto_map` names them for AutoConfig, AutoModel and the task Auto class, and the modeling file
    with any teacher code it imports is written to `staging`."""
    task, config_class = _dense_class(type(model)), _dense_class(type(model.config))
    backbone = type(model.base_model) if model.base_model is not model else task
    source, carried = _modeling_source(task, backbone, config_class)
    lowrank_config = shipped.lowrank_config(config_class)
    model.config.__class__ = lowrank_config  # in place: the backbone holds the same config object
    model.__class__ = shipped.lowrank_subclass(task, lowrank_config)
    module = MODELING_FILE[:-3]
    model.config.auto_map = {"AutoConfig": f"{module}.{lowrank_config.__name__}",
                             "AutoModel": f"{module}.Lillama{backbone.__name__}",
                             _auto_class(model.config)[0]: f"{module}.Lillama{task.__name__}"}
    (staging / MODELING_FILE).write_text(source)
    for name, path in carried.items():
        shutil.copyfile(path, staging / name)


def _dense_weight(linear: nn.Module) -> torch.Tensor:
    return merge_low_rank(linear).weight if isinstance(linear, LowRankLinear) else linear.weight


def merged_copy(model: nn.Module) -> nn.Module:
    """A dense copy in the original layout: every low-rank module (packed ones unpacked first) multiplied back
    into an nn.Linear (float32 product), and unfused MoE experts stacked back into their fused 3-D weights."""
    dense = share_weights_copy(model)
    unpack_low_rank(dense)
    for kind, replace in ((shipped.UnfusedExperts, lambda m: m.to_fused(_dense_weight)),
                          (LowRankLinear, merge_low_rank)):
        for name, module in list(dense.named_modules()):
            if isinstance(module, kind):
                set_submodule(dense, name, replace(module))
    # A student reloaded by load_compressed is a Lillama subclass with a Lillama config: a dense checkpoint
    # names the base classes, which every loader (vLLM, llama.cpp's converter) knows.
    dense.__class__ = _dense_class(type(dense))
    dense.config.__class__ = _dense_class(type(dense.config))  # in place: the backbone shares it
    for key in ("lillama_rank_map", "lillama_packs", "lillama_unfused_experts", "lillama_quantization"):
        dense.config.__dict__.pop(key, None)
    if MODELING_FILE[:-3] in json.dumps(getattr(dense.config, "auto_map", None)):
        del dense.config.auto_map
    if not type(dense).__module__.startswith("transformers."):
        # A remote-code teacher's classes, e.g. rebuilt from a compressed export: registered, save_pretrained
        # copies their code files and names them in auto_map, as for the teacher itself.
        type(dense.config).register_for_auto_class()
        type(dense).register_for_auto_class(_auto_class(dense.config)[0])
    return dense


def _check_target(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not overwrite:
        raise ExportError(f"{folder} already exists; choose another folder or allow overwriting")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"{folder} exists and is not a folder")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to {parent}: permission denied")


def _auto_class(config) -> tuple[str, object]:
    """(the transformers Auto class name that builds this config, its config -> model class mapping): the
    task's, so a compressed Whisper is a speech-to-text model however its config class is dressed."""
    return auto_class_for(config)


def export_student(student: nn.Module, tokenizer, folder: str | os.PathLike, merge: bool = False,
                   overwrite: bool = False, record: dict | None = None, quantize: str | None = None,
                   feature_extractor=None) -> Path:
    """Write the student as a transformers folder that loads the standard way, or fails loudly.

    Args:
        student: a compressed model (low-rank modules, packed or not: the export keeps its packs) or any model
            of a transformers class.
        tokenizer: saved beside the weights.
        folder: the export folder; written in a hidden sibling and renamed into place.
        merge: multiply the factors back into dense weights in the teacher's classes (teacher-sized).
        overwrite: replace an existing folder.
        record: the run's config, metrics and plan, kept in lillama.json and the model card.
        quantize: "int8" (per output channel) or "int4" (HQQ, groups of 64) integer linear weights, stored in a
            portable layout and packed for torchao's kernels on the device the export loads on.
        feature_extractor: a speech model's audio feature extractor, saved beside the weights.

    Returns:
        The folder.

    Raises:
        ExportError: the folder exists (without `overwrite`), cannot be written, or the model's code
            cannot be carried in the export.
    """
    folder = Path(folder).expanduser()
    _check_target(folder, overwrite)
    ranks = {} if merge else rank_map_of(student)
    try:
        with staged_folder(folder, overwrite=overwrite) as staging:
            _write_student(student, tokenizer, staging, folder.name, merge, ranks, record, quantize,
                           feature_extractor)
    except OSError as exc:
        raise ExportError(f"could not write {folder}: {exc.strerror or exc}") from None
    return folder


def _lowrank_classes(folder: Path, config: dict, trust_remote_code: bool) -> tuple[type, type]:
    """(model class, config class) that rebuild a compressed export of today's format (model_type
    "lillama_<base>") from lillama_core's own code: transformers' base classes where the base is transformers',
    else the teacher code the export ships, which runs only with `trust_remote_code`."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    base_type = config["model_type"][len(shipped.LILLAMA_MODEL_TYPE):]
    task_ref = next(ref for auto, ref in config.get("auto_map", {}).items() if auto not in ("AutoConfig", "AutoModel"))
    if base_type in CONFIG_MAPPING:
        base_config = CONFIG_MAPPING[base_type]
        task = getattr(transformers, task_ref.rsplit(".", 1)[1].removeprefix("Lillama"))
    elif not trust_remote_code:
        raise ExportError(f"{folder} compresses a model with its own code ({base_type}), shipped in the export: "
                          "load it with trust_remote_code (--trust-remote-code) if you trust that code")
    else:
        module = MODELING_FILE[:-3]
        base_config = get_class_from_dynamic_module(f"{module}._BaseConfig", str(folder))
        task = get_class_from_dynamic_module(f"{module}._Task", str(folder))
    config_class = shipped.lowrank_config(base_config)
    return shipped.lowrank_subclass(task, config_class), config_class


def load_compressed(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False):
    """(student model, tokenizer) from an export folder (compressed, merged, or compressed in the format before
    exports had their own model_type), built with lillama_core's classes so it can be exported again. Exports of
    a teacher with its own code need `trust_remote_code`. Raises ExportError."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder).expanduser()
    if not (folder / RECORD_FILE).exists():
        raise ExportError(f"{folder} is not a Lillama export (no {RECORD_FILE})")
    try:
        raw = json.loads((folder / "config.json").read_text())
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if raw.get("lillama_quantization"):  # integer weights are packed for the device they load on
            kwargs["device_map"] = str(device)
        if raw.get("model_type", "").startswith(shipped.LILLAMA_MODEL_TYPE):
            cls, config_class = _lowrank_classes(folder, raw, trust_remote_code)
            config = config_class.from_pretrained(folder)
        else:  # merged, or written before compressed exports had their own model_type
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            auto_class, mapping = _auto_class(config)
            cls = mapping[type(config)]
            if (getattr(config, "auto_map", None) or {}).get(auto_class, "").startswith(MODELING_FILE[:-3]):
                cls = shipped.lowrank_subclass(cls)
        model = cls.from_pretrained(folder, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, config=config)  # not AutoConfig, which asks for remote code
    except (OSError, ValueError, KeyError, AttributeError, StopIteration) as exc:
        raise ExportError(f"could not load {folder}: {first_line(exc)}") from None
    return model.to(device).eval(), tokenizer


def load_feature_extractor(folder: str | os.PathLike):
    """The audio feature extractor saved with a speech model's export, or None for text models."""
    if not (Path(folder) / "preprocessor_config.json").exists():
        return None
    from transformers import AutoFeatureExtractor

    return AutoFeatureExtractor.from_pretrained(folder)


def read_record(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / RECORD_FILE).read_text())


def _write_student(student: nn.Module, tokenizer, staging: Path, name: str, merge: bool, ranks: dict[str, int],
                   record: dict | None, quantize: str | None, feature_extractor) -> None:
    """Everything an export folder holds, written into `staging`: weights (with the shipped code when the layers
    are not stock transformers ones), preprocessors, the run record and the model card."""
    model = merged_copy(student) if merge else share_weights_copy(student)
    quantized = {}
    if quantize:
        model = quantized_storage(model, quantize)
        quantized = quantized_modules(model)
    unfused = any(isinstance(m, shipped.UnfusedExperts) for m in model.modules())
    if ranks or quantized or unfused:  # layers stock transformers does not have: shipped code rebuilds them
        model.config.lillama_rank_map = ranks
        model.config.lillama_packs = packs_of(model)
        model.config.lillama_quantization = quantized
        model.config.lillama_unfused_experts = unfused
        _ship_lowrank_code(model, staging)
    model.save_pretrained(staging)
    for preprocessor in (tokenizer, feature_extractor):
        if preprocessor is not None:
            preprocessor.save_pretrained(staging)
    meta = {"format_version": FORMAT_VERSION, "merged": merge, "rank_map": ranks, "quantize": quantize,
            **(record or {})}
    # Facts of this export, never a copied record's (re-exporting a reloaded export passes its old record on).
    meta["auto_class"] = _auto_class(model.config)[0]
    meta["teacher"] = ((meta.get("config") or {}).get("model") or {}).get("name") or student.config.name_or_path
    write_json(staging / RECORD_FILE, meta)
    _write_card(staging, name, meta)


def _write_card(folder: Path, name: str, meta: dict) -> None:
    write_model_card(folder, name, meta, meta["auto_class"], (folder / MODELING_FILE).exists(), meta["teacher"] or None)


def update_export_metrics(folder: str | os.PathLike, metrics: dict) -> None:
    """Replace the metrics in an export's record (lillama.json) and write its model card again with them, e.g.
    once the exported student is evaluated (the export is written first, so a failing evaluation cannot lose it).

    Raises:
        ExportError: the folder is not an export written by this version (its record lacks the card's facts).
    """
    folder = Path(folder)
    meta = {**read_record(folder), "metrics": metrics}
    if "auto_class" not in meta or "teacher" not in meta:
        raise ExportError(f"{folder} was exported by an older version; export the run again to record its metrics")
    write_json(folder / RECORD_FILE, meta)
    _write_card(folder, folder.name, meta)
