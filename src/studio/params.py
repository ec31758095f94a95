"""The decomposition's parameters: one table (`PARAMS`) that checks `infer`'s inputs, makes the page's widgets, the
API's parameters and the `decompose` / `evaluate` flags. Adding a parameter: one row here and its use in `infer`.

Also `env_default`, the one reader of `QIL_*` environment overrides for every flag. Imports no torch.
"""

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Parameter ranges of the decomposition (the pipeline asserts the resolution; the rest are the UI's limits).
LAYERS_RANGE = (2, 10)
# At 1 step the scheduler's shift_terminal stretch divides by zero and every layer comes out NaN
# (seen with diffusers 0.42.1: FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal), so 2 is the minimum.
STEPS_RANGE = (2, 50)
TRUE_CFG_RANGE = (1.0, 10.0)
RESOLUTIONS = (640, 1024)
MAX_SEED = 2**31 - 1
# Text inputs are capped: the pipeline keeps the first 512 prompt tokens (its max_sequence_length), about 2,000
# English characters, so nothing longer reaches the model; a 10 MB prompt once held the only job slot for 17
# minutes and 10 GB of RAM while the tokenizer and text encoder chewed on it.
PROMPT_MAX_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class Param:
    """One decomposition parameter: `infer`'s keyword (the pipeline's name), its check, widget and CLI flag."""

    name: str  # infer's keyword argument; also the API parameter name
    default: Any  # the model card's example call
    type: type  # int, float, bool or str
    label: str  # the widget's label
    flag: str  # the `decompose` flag; for a bool, the flag that flips the default
    help: str  # the flag's help
    range: tuple | None = None  # (min, max) of a number; (0, max characters) of a text
    choices: tuple | None = None  # the accepted values, when only a few are
    step: float | None = None  # a slider's step; None: a number box
    advanced: bool = True  # in the UI's "Advanced settings"
    pipeline: bool = True  # passed to the pipeline's call under its name (seed and randomize_seed make the noise)


# THE parameter table: `infer` checks its inputs with it (`check_params`), the UI builds its widgets, its
# `inputs=` lists and its handlers' arguments from it, `decompose` its flags. Its order is the API's order.
# Adding a parameter: one row here (a `pipeline` row reaches the pipeline's call under its name).
PARAMS = (
    Param("prompt", "", str, "Prompt (empty: the model writes a caption)", "--prompt",
          "empty: the model writes a caption", range=(0, PROMPT_MAX_CHARS), advanced=False),
    Param("negative_prompt", " ", str, "Negative prompt", "--negative-prompt", "what the layers should not show",
          range=(0, PROMPT_MAX_CHARS)),
    Param("seed", 777, int, "Seed", "--seed", "noise seed", range=(0, MAX_SEED), pipeline=False),
    Param("randomize_seed", False, bool, "Randomize seed", "--randomize-seed", "draw a new seed for every image",
          pipeline=False),
    Param("true_cfg_scale", 4.0, float, "True CFG scale", "--true-cfg-scale", "prompt guidance", range=TRUE_CFG_RANGE,
          step=0.1),
    Param("num_inference_steps", 50, int, "Steps", "--steps", "denoising steps", range=STEPS_RANGE, step=1),
    Param("layers", 4, int, "Layers", "--layers", "how many RGBA layers", range=LAYERS_RANGE, step=1),
    Param("resolution", 640, int, "Resolution bucket", "--resolution", "the model's working size",
          choices=RESOLUTIONS),
    Param("cfg_normalize", True, bool, "CFG normalize", "--no-cfg-normalize", "turn off CFG normalization"),
    Param("use_en_prompt", True, bool, "English auto-caption (off: Chinese)", "--zh-caption",
          "auto-caption in Chinese instead of English"),
    # What the layers become before export (studio.design, issue 26): not the pipeline's arguments.
    Param("tidy_layers", True, bool, "Drop empty / repeated layers", "--no-tidy-layers",
          "keep empty and near-duplicate layers as the model made them", advanced=False, pipeline=False),
    Param("clean_edges", False, bool, "Clean edges", "--clean-edges",
          "replace the colour left in soft edges by the layer's own (no halo on a new background)", advanced=False,
          pipeline=False),
    Param("text_layers", False, bool, "Editable text", "--text-layers", "read text layers (OCR, CPU): PPTX text "
          "boxes, PSD layers named 'Text: ...', the strings in params.json", advanced=False, pipeline=False),
    Param("text_language", "en", str, "Text language", "--text-language", "the text's language: en and zh use the "
          "bundled OCR model; ko fetches a Korean one into models/ocr/ on first use",
          choices=("en", "zh", "ko"), advanced=False, pipeline=False),
    Param("name_layers", False, bool, "Name the layers", "--name-layers", "the caption model names each layer "
          "(gallery, PSD, PPTX, file names); costs a short caption per layer", advanced=False, pipeline=False),
)
# The rows the page shows in one row under the advanced settings: what the exports make of the layers.
DESIGN_PARAMS = ("tidy_layers", "clean_edges", "text_layers", "text_language", "name_layers")
PARAM = {p.name: p for p in PARAMS}
# The defaults by name (tests and the README's server override them here; widgets and handlers read them at build).
DEFAULTS = {p.name: p.default for p in PARAMS}


def env_default(name: str, default: Any) -> Any:
    """Environment override `QIL_<NAME>` for a flag default, parsed to the default's type."""
    raw = os.environ.get(f"QIL_{name}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(raw)
        except ValueError:
            raise ValueError(f"QIL_{name}={raw!r} is not {'a whole number' if isinstance(default, int) else 'a number'}: "
                             f"set it like QIL_{name}={default}, or unset it") from None
    if isinstance(default, Path):
        return Path(raw)
    return raw


def add_param_args(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """One flag per row of PARAMS (`dest` is the row's name); a bool's flag flips its default. `defaults` replaces
    some rows' defaults (`evaluate`'s --layers: None, the ground truth's count)."""
    for p in PARAMS:
        default = (defaults or {}).get(p.name, p.default)
        if p.type is bool:
            parser.add_argument(p.flag, dest=p.name, action="store_false" if p.default else "store_true",
                                default=p.default, help=p.help)
            continue
        limits = f" ({p.range[0]} to {p.range[1]})" if p.range and p.type is not str else ""
        parser.add_argument(p.flag, dest=p.name, type=_param_arg(p), default=default, choices=p.choices,
                            help=f"{p.help}{limits} (default: %(default)r)")


def _param_arg(p: "Param") -> Callable[[str], Any]:
    """argparse `type=` for a row: parsed and checked by `check_param`, so the CLI says what the API says."""
    def parse(text: str) -> Any:
        try:
            value = {int: int, float: float, str: str}[p.type](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a number' if p.type is float else 'a whole number'}") from None
        try:
            return check_param(p.name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = p.type.__name__
    return parse


def check_param(name: str, value: Any) -> Any:
    """`value` for the PARAMS row `name`, in the row's type; a ValueError names the value and what is accepted.

    Numbers may arrive as floats from the API (a whole float such as 7.0 is taken as 7); bools, NaN, infinities,
    fractions, text and lists are refused. None gives the row's default (an empty Textbox sends None).
    """
    p = PARAM[name]
    if value is None:
        return DEFAULTS[name]
    shown = repr(value) if not isinstance(value, str) or len(value) <= 40 else f"a text of {len(value):,} characters"
    # 1. The type.
    if p.type is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text, not a {type(value).__name__} ({shown}): send one string")
        if p.choices is not None and value not in p.choices:
            raise ValueError(f"{name}={shown} is not supported: use one of {p.choices}")
        if p.range is not None and len(value) > p.range[1]:
            raise ValueError(f"{name} is {len(value):,} characters long: the limit is {p.range[1]:,} (the model reads "
                             f"about that much; a longer text is cut off). Shorten it.")
        return value
    if p.type is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name}={shown} is not true or false: send a boolean")
        return bool(value)
    whole = "a whole number" if p.type is int else "a number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}={shown} is not {whole}: {_accepted(p)}")
    if not math.isfinite(value) or (p.type is int and not float(value).is_integer()):
        raise ValueError(f"{name}={shown} is not {whole}: {_accepted(p)}")
    value = int(value) if p.type is int else float(value)
    # 2. The range.
    if p.choices is not None and value not in p.choices:
        raise ValueError(f"{name}={value!r} is not supported: use one of {p.choices}")
    if p.range is not None and not p.range[0] <= value <= p.range[1]:
        hint = " (1 step makes the scheduler divide by zero)" if name == "num_inference_steps" else ""
        raise ValueError(f"{name}={value!r} is out of range: {_accepted(p)}{hint}")
    return value


def _accepted(p: Param) -> str:
    if p.choices is not None:
        return f"use one of {p.choices}"
    kind = "an integer" if p.type is int else "a number"
    return f"use {kind} from {p.range[0]} to {p.range[1]}"


def check_params(**values: Any) -> dict[str, Any]:
    """`check_param` for each keyword given (PARAMS names); returns the checked values, in their types."""
    unknown = sorted(set(values) - set(PARAM))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)}: use {', '.join(PARAM)}")
    return {name: check_param(name, value) for name, value in values.items()}


def param_widget(gr, p: Param, **overrides):
    """The widget of a PARAMS row: text box, checkbox, radio (choices), slider (a step) or number box."""
    value = DEFAULTS[p.name]  # read at build time: the README's test server changes its steps here
    if p.type is str and p.choices is None:
        options = dict(label=p.label, value=value or None, max_length=p.range[1])
        return gr.Textbox(**{**options, **overrides})
    if p.type is bool:
        return gr.Checkbox(**{**dict(label=p.label, value=value), **overrides})
    if p.choices is not None:
        return gr.Radio(**{**dict(choices=list(p.choices), value=value, label=p.label), **overrides})
    if p.step is not None:
        return gr.Slider(**{**dict(minimum=p.range[0], maximum=p.range[1], value=value, step=p.step, label=p.label),
                            **overrides})
    return gr.Number(**{**dict(label=p.label, value=value, precision=0 if p.type is int else None,
                               minimum=p.range[0], maximum=p.range[1]), **overrides})


@dataclasses.dataclass(frozen=True)
class Flag:
    """One load or serving setting: a `Settings` field, its default (a constant at the top of src/app.py, or a tool's),
    its command-line flag and its environment variable. `add_flags` makes the flags from a table of these, `flag_values`
    reads them back: a new setting is one row and its use."""

    name: str  # the Settings field (argparse's dest)
    default: Any
    flag: str  # a bool's flag flips its default: "--compile" turns on, "--no-warm-up" turns off
    help: str
    type: Callable[[str], Any] | None = None  # parses and checks the flag's text and the variable's
    choices: tuple | None = None
    metavar: str | None = None
    env: str | None = None  # QIL_<env>; None: QIL_<NAME>
    commands: tuple[str, ...] = ("ui", "decompose", "evaluate", "edit")  # the commands that take it
    secret: bool = False  # --help does not show its value (a password)

    @property
    def variable(self) -> str:
        return f"QIL_{self.env or self.name.upper()}"


def flag_default(row: Flag) -> Any:
    """The row's default, or its environment variable's value parsed by the row's type (a bad value names the
    variable and what it takes)."""
    raw = os.environ.get(row.variable)
    if raw is None:
        return row.default
    if isinstance(row.default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    parse = row.type or (type(row.default) if row.default is not None else str)
    try:
        value = parse(raw)
    except (ValueError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"{row.variable}={raw!r} is not accepted ({err}): set it like {row.flag}, or unset it") from None
    if row.choices is not None and value not in row.choices:
        raise ValueError(f"{row.variable}={raw!r} is not one of {', '.join(map(str, row.choices))}")
    return value


def add_flags(parser: argparse.ArgumentParser, rows: tuple[Flag, ...], command: str) -> None:
    """The flags of the rows that `command` takes, with their variables' values as defaults."""
    for row in rows:
        if command not in row.commands:
            continue
        default = flag_default(row)
        if isinstance(row.default, bool):
            parser.add_argument(row.flag, dest=row.name, action="store_false" if row.flag.startswith("--no-")
                                else "store_true", default=default, help=f"{row.help} ({row.variable})")
            continue
        shown = "" if row.secret else "default: %(default)s; "
        parser.add_argument(row.flag, dest=row.name, type=row.type, choices=row.choices, default=default,
                            metavar=row.metavar, help=f"{row.help} ({shown}{row.variable})")


def flag_values(ns: argparse.Namespace, rows: tuple[Flag, ...]) -> dict[str, Any]:
    """The rows' values as parsed (the rows a command does not take keep their defaults)."""
    return {row.name: getattr(ns, row.name, row.default) for row in rows}


def positive_int(text: str) -> int:
    """argparse `type=` for a count of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def non_negative_float(text: str) -> float:
    """argparse `type=` for a limit where 0 means none."""
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is negative: use 0 for no limit, or a positive number")
    return value
