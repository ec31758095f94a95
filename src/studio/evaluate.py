"""`app.py evaluate`: score decompositions against ground-truth layers with LayerD's metrics (`studio.scores`),
one row per ground truth and grid setting, into evaluate.csv and evaluate.json. The model is loaded and run by
functions the app passes in. Where the ground truth's strings are known (assets/layered_gt/text_layers.json), the
text read back from the predicted layers is scored too (`text_cer`, `studio.design`).
"""

import argparse
import dataclasses
import gc
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from studio.design import ground_truth_text, ocr_engine, text_cer
from studio.errors import OutOfMemoryError, terminal_safe
from studio.exports import export_layer_pngs, safe_file_text
from studio.images import _layer_pngs, composite_layers, find_ground_truth, read_layered_file
from studio.modes import QUANT
from studio.params import LAYERS_RANGE, PARAM, PARAMS, add_param_args, check_params
from studio.scores import EVAL_MAX_MERGES, PSNR_CAP_DB, evaluate_layers

# `evaluate --grid KEY=V1,V2`: the settings a grid may vary -> the PARAMS row each sets (its type reads the values,
# `check_param` checks them), or None for a load setting (`LOAD_GRID_KEYS`).
EVAL_GRID_KEYS = {"steps": "num_inference_steps", "layers": "layers", "true_cfg_scale": "true_cfg_scale",
                  "resolution": "resolution", "seed": "seed", "first_block_cache_threshold": None,
                  "quantization": None, "quantized_blocks": None}
# The load settings a grid may vary, each with what reads its value. FirstBlockCache is switched in place; the
# quantization keys change the loaded model, so each of their combinations loads it anew (`RELOAD_GRID_KEYS`: 57 GB of
# weights leave no room for a bf16 copy beside a quantized one), the previous one freed first, the grid ordered so
# that each loads once. A block range of several parts joins them with "+" (0-11+48-59): "," separates values.
LOAD_GRID_KEYS = {"first_block_cache_threshold": float, "quantization": str,
                  "quantized_blocks": lambda text: text.replace("+", ",")}
RELOAD_GRID_KEYS = ("quantization", "quantized_blocks")


def evaluate_parser() -> argparse.ArgumentParser:
    """`app.py evaluate`'s own flags (the common ones are added by `parse_args`)."""
    parser = argparse.ArgumentParser(prog="app.py evaluate", description=(
        "Score decompositions against ground-truth layers (LayerD's metrics): each ground truth is flattened, "
        "decomposed with the settings given (or its prediction is read from --pred), aligned and scored. "
        "Writes evaluate.csv (one row per image and setting) and evaluate.json (summary) into --out."))
    parser.add_argument("ground_truth", nargs="+", metavar="GT",
                        help="layered files: PSD, the studio's ZIP, a folder of RGBA PNGs (bottom first), or a folder "
                             "holding such files (e.g. assets/layered_gt)")
    parser.add_argument("--out", type=Path, required=True, help="folder for evaluate.csv, evaluate.json and the "
                                                                  "predicted layers")
    parser.add_argument("--max-merges", type=int, default=EVAL_MAX_MERGES,
                        help="merges of adjacent layers the alignment may make (default: %(default)s, as LayerD)")
    parser.add_argument("--no-group", dest="group", action="store_false",
                        help="score layers as they are; by default non-overlapping top layers are grouped, as LayerD does")
    parser.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="run every combination, one row each with time per image; KEY: " + ", ".join(EVAL_GRID_KEYS))
    parser.add_argument("--no-text-cer", dest="text_cer", action="store_false",
                        help="skip the text score: by default, where the ground truth's strings are known (a "
                             "text_layers.json beside it, as in assets/layered_gt), the predicted layers are read by "
                             "OCR (--text-language) and scored by character error rate against them")
    parser.add_argument("--pred", type=Path, default=None, metavar="DIR",
                        help="score layers made elsewhere, no model: DIR/<ground truth name>/ (PNGs), .zip or .psd; "
                             "with one ground truth, DIR itself may hold the PNG layers")
    add_param_args(parser, defaults={"layers": None})  # --layers None: the ground truth's count
    return parser


# `evaluate`: one row per ground truth and setting, in evaluate.csv; means per setting in evaluate.json.
EVAL_COLUMNS = ("ground_truth", "settings", "gt_layers", "pred_layers", "rgb_l1", "alpha_iou", "edit_cost", "merges",
                "recomposition_psnr_db", "recomposition_rgb_mae", "recomposition_alpha_error", "text_cer", "seconds",
                "error")
# text_cer's mean is over the designs with text (a design without has none: its row leaves it empty).
EVAL_MEANS = ("rgb_l1", "alpha_iou", "edit_cost", "merges", "recomposition_psnr_db", "text_cer", "seconds")


def parse_grid(items: list[str]) -> list[dict[str, Any]]:
    """`--grid` items `KEY=V1,V2` -> every combination, as {key: value} dicts; [{}] without a grid."""
    axes: dict[str, list] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in EVAL_GRID_KEYS or not values.strip():
            raise ValueError(f"--grid {item!r}: write KEY=V1,V2,... with KEY one of {', '.join(EVAL_GRID_KEYS)}")
        if key in axes:
            raise ValueError(f"--grid {item!r}: {key} is given twice; put all its values in one KEY=V1,V2,...")
        kind = PARAM[EVAL_GRID_KEYS[key]].type if EVAL_GRID_KEYS[key] else LOAD_GRID_KEYS[key]
        try:
            axes[key] = [kind(value.strip()) for value in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid {item!r}: every value of {key} must be a {kind.__name__}") from None
        if key == "first_block_cache_threshold" and min(axes[key]) < 0:
            raise ValueError(f"--grid {item!r}: a FirstBlockCache threshold is 0 (off) or more")
        if key == "quantization" and set(axes[key]) - set(QUANT):
            raise ValueError(f"--grid {item!r}: a quantization is one of {', '.join(QUANT)}")
    axes = {key: axes[key] for key in sorted(axes, key=lambda key: key not in RELOAD_GRID_KEYS)}  # reloads vary slowest
    combos = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    for combo in combos:  # a block range means nothing to a mode that does not choose blocks: one run of it
        if not QUANT[combo.get("quantization") or "bf16"].block_range:
            combo.pop("quantized_blocks", None)
    return [dict(items) for items in dict.fromkeys(tuple(combo.items()) for combo in combos)]


def grid_label(combo: dict[str, Any]) -> str:
    return " ".join(f"{key}={value}" for key, value in combo.items())


def set_first_block_cache(loaded, threshold: float) -> None:
    """Switch FirstBlockCache to `threshold` between runs (0: off), through diffusers' cache API."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = loaded.pipe
    if loaded.stages is not None:
        raise ValueError("--grid first_block_cache_threshold cannot switch the cache under --offload budget (the "
                         "low-VRAM engine wraps it): run one evaluate per threshold with --first-block-cache-threshold")
    if pipe.transformer._cache_config is not None:
        pipe.transformer.disable_cache()
    if threshold > 0:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))


def find_prediction(pred_dir: Path, ground_truth: Path, single: bool) -> Path:
    """The prediction for one ground truth in `--pred DIR`: DIR/<name>/ (PNG layers), DIR/<stem>.zip or .psd;
    with a single ground truth, DIR itself when it holds PNG layers."""
    pred_dir = Path(pred_dir)
    for candidate in (pred_dir / ground_truth.stem, pred_dir / ground_truth.name, pred_dir / f"{ground_truth.stem}.zip",
                      pred_dir / f"{ground_truth.stem}.psd"):
        if candidate.exists() and candidate.resolve() != ground_truth.resolve():
            return candidate
    if single and pred_dir.is_dir() and _layer_pngs(pred_dir):
        return pred_dir
    raise ValueError(f"no prediction for {ground_truth} in {pred_dir}: expected {ground_truth.stem}/ (PNG layers, "
                     f"bottom first), {ground_truth.stem}.zip or {ground_truth.stem}.psd")


def evaluation_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting (in order of first appearance): images scored, failed, and the mean of each EVAL_MEANS column."""
    summary = []
    for label in dict.fromkeys(row["settings"] for row in rows):
        done = [row for row in rows if row["settings"] == label and not row.get("error")]
        entry: dict[str, Any] = dict(settings=label, images=len(done),
                                     failed=sum(1 for row in rows if row["settings"] == label and row.get("error")))
        for column in EVAL_MEANS:
            values = [row[column] for row in done if row.get(column) is not None]
            entry[f"mean_{column}"] = float(np.mean(values)) if values else None
        summary.append(entry)
    return summary


def evaluation_table(summary: list[dict[str, Any]]) -> str:
    """The terminal table: one row per setting. Lower is better for L1 and edit cost; higher for IoU and PSNR."""
    head = f"{'settings':<40} {'images':>6} {'failed':>6} {'RGB L1':>8} {'IoU':>7} {'edit':>7} {'merges':>6} " \
           f"{'PSNR dB':>8} {'text CER':>8} {'s/image':>8}"
    lines = [head, "-" * len(head)]

    def cell(value, width, digits):
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for entry in summary:
        lines.append(f"{entry['settings'][:40]:<40} {entry['images']:>6} {entry['failed']:>6} "
                     f"{cell(entry['mean_rgb_l1'], 8, 4)} {cell(entry['mean_alpha_iou'], 7, 4)} "
                     f"{cell(entry['mean_edit_cost'], 7, 4)} {cell(entry['mean_merges'], 6, 2)} "
                     f"{cell(entry['mean_recomposition_psnr_db'], 8, 2)} {cell(entry['mean_text_cer'], 8, 4)} "
                     f"{cell(entry['mean_seconds'], 8, 2)}")
    return "\n".join(lines)


def write_evaluation(out: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> tuple[Path, Path]:
    """evaluate.csv (EVAL_COLUMNS, one row per ground truth and setting; an unreadable ground truth gets one row,
    settings "-", with its error) and evaluate.json (`info`, the summary per setting, the unreadable files and every
    row with its alignment path) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "evaluate.csv", out / "evaluate.json"
    import csv

    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=EVAL_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    unreadable = [row for row in rows if row["settings"] == "-"]  # ground truth that could not be read
    report = dict(info, summary=evaluation_summary([row for row in rows if row not in unreadable]),
                  unreadable={row["ground_truth"]: row["error"] for row in unreadable}, rows=rows)
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return csv_path, json_path


def evaluate_main(settings, ns: argparse.Namespace, start: Callable, infer: Callable) -> int:
    """`app.py evaluate`: exit 0 when every ground truth was scored, 1 when any failed, 2 when nothing could run.
    `start(settings)` loads the model (the app's `start_pipeline`), `infer(loaded, image, **params)` runs a job."""
    from tqdm.auto import tqdm

    # 1. Mistakes that would fail every image are caught before the model loads.
    truths = find_ground_truth(ns.ground_truth)
    if not truths:
        print(f"error: no ground truth in {' '.join(ns.ground_truth)}: pass PSDs, the studio's ZIPs or folders of "
              f"RGBA PNGs", file=sys.stderr)
        return 2
    # (A ValueError here ends `main` with its message and exit 2: `exits_with_message`.)
    if ns.max_merges < 0:
        raise ValueError(f"--max-merges {ns.max_merges} is negative: 0 scores without merges")
    if ns.pred is not None and ns.grid:
        raise ValueError("--grid varies how the model runs, --pred scores layers made without it: pass one")
    if ns.pred is not None and not Path(ns.pred).is_dir():
        raise ValueError(f"--pred {ns.pred} is not a folder")
    if ns.pred is not None and len(truths) > 1 and _layer_pngs(Path(ns.pred)) and \
            not any((Path(ns.pred) / truth.stem).is_dir() for truth in truths):
        # PNG layers in DIR itself are one prediction: which of the ground truths it is cannot be told.
        names = ", ".join(truth.stem for truth in truths[:2]) + (", ..." if len(truths) > 2 else "")
        raise ValueError(f"--pred {ns.pred} holds PNG layers itself: that is one prediction, and {len(truths)} ground "
                         f"truths were given ({names}). Put each prediction in {ns.pred}/<name>/ (e.g. "
                         f"{ns.pred}/{truths[0].stem}/layer_1.png ...), or pass one ground truth.")
    if Path(ns.out).exists() and not Path(ns.out).is_dir():
        raise ValueError(f"--out {ns.out} is a file: pass a folder (it is created if missing)")
    # The PARAMS values of each grid combination: the flags' (checked by their `type=`), then the grid's on top.
    base = {p.name: getattr(ns, p.name) for p in PARAMS}
    combos = parse_grid(ns.grid)
    settings_of = [dict(base, **{EVAL_GRID_KEYS[k]: v for k, v in combo.items() if EVAL_GRID_KEYS[k]})
                   for combo in combos]
    for values in settings_of:
        check_params(**dict(values, layers=values["layers"] or LAYERS_RANGE[0]))

    # 2. The ground truth, read once; a bad file is reported and skipped, the run goes on.
    layers_of: dict[Path, list[Image.Image]] = {}
    rows: list[dict[str, Any]] = []
    for path in truths:
        try:
            layers_of[path] = read_layered_file(path)
        except ValueError as err:
            rows.append(dict(ground_truth=str(path), settings="-", error=str(err)))
            print(terminal_safe(f"skipped {path}: {err}"), file=sys.stderr)
    info: dict[str, Any] = dict(arguments={k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                                           for k, v in vars(ns).items() if k != "auth"},
                                max_merges=ns.max_merges, group_top_layers=ns.group,
                                metrics="LayerD (github.com/CyberAgentAILab/LayerD, src/layerd/evaluation)",
                                psnr_cap_db=PSNR_CAP_DB,
                                text_cer="OCR of the predicted layers (studio.design, RapidOCR PP-OCRv4) against the "
                                         "strings drawn into the ground truth (text_layers.json): character errors / "
                                         "characters, each string matched to its nearest read line")

    def score(path: Path, pred: list[Image.Image], label: str, seconds: float | None, texts=None) -> dict[str, Any]:
        result = evaluate_layers(pred, layers_of[path], ns.max_merges, ns.group)
        row = dict(ground_truth=str(path), settings=label, gt_layers=len(layers_of[path]), pred_layers=len(pred),
                   seconds=seconds, **result)
        truth = ground_truth_text(path) if ns.text_cer else None
        if truth:  # OCR of the predicted layers (`texts`: infer's own, with --text-layers) against the drawn strings
            engine = ocr_engine(ns.text_language, str(settings.models_dir))
            row["text"] = text_cer(pred, truth, engine=engine, texts=texts)
            row["text_cer"] = row["text"]["cer"]
        return row

    # 3a. Layers made elsewhere: read and score, no model.
    if ns.pred is not None:
        info.update(pred=str(ns.pred), demo=None)
        for path in layers_of:
            try:
                pred = read_layered_file(find_prediction(ns.pred, path, single=len(truths) == 1))
                rows.append(score(path, pred, "pred", None))
            except ValueError as err:
                rows.append(dict(ground_truth=str(path), settings="pred", error=str(err)))
                print(terminal_safe(f"skipped {path}: {err}"), file=sys.stderr)
    # 3b. Decompose each flattened ground truth with every setting of the grid, the model loaded once (once per
    #     quantization setting of the grid).
    elif layers_of:
        loaded, load = None, None
        for combo, values in zip(combos, settings_of):
            label = grid_label(combo) if combo else \
                f"steps={ns.num_inference_steps} resolution={ns.resolution} seed={ns.seed}"
            if loaded is None or {k: combo[k] for k in RELOAD_GRID_KEYS if k in combo} != load:
                load = {k: combo[k] for k in RELOAD_GRID_KEYS if k in combo}
                if loaded is not None:  # the previous model's memory goes before the next one loads; the GPU's
                    loaded = None  #      too, since the budget mode plans with its free memory
                    gc.collect()
                    import torch

                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                try:  # the first load's errors (no weights, a machine too small) end the command: exit 2
                    loaded = start(dataclasses.replace(settings, **load))
                except ValueError as err:
                    if not info.get("loads"):
                        raise
                    rows.extend(dict(ground_truth=str(path), settings=label, error=str(err)) for path in layers_of)
                    print(terminal_safe(f"skipped {label}: {err}"), file=sys.stderr)
                    continue
                if not info.get("loads"):
                    info.update(loaded.run_info())
                    if loaded.demo:
                        print("DEMO MODEL in use: tiny random weights; its layers are noise, so its scores are poor "
                              "by design.")
                info.setdefault("loads", {})[grid_label(load) or "flags"] = loaded.run_info()
                loaded.pipe.set_progress_bar_config(desc="steps", position=1, leave=False)
            if "first_block_cache_threshold" in combo:
                set_first_block_cache(loaded, combo["first_block_cache_threshold"])
            for path in tqdm(layers_of, desc=label, unit="image", position=0):
                gt = layers_of[path]
                layers = values["layers"] or min(max(len(gt), LAYERS_RANGE[0]), LAYERS_RANGE[1])
                try:
                    began = time.perf_counter()
                    result = infer(loaded, composite_layers(gt), **dict(values, layers=layers))
                    seconds = time.perf_counter() - began
                    export_layer_pngs(result.layers, Path(ns.out) / "pred" / safe_file_text(label) / path.stem)
                    rows.append(score(path, result.layers, label, seconds, result.labels.texts))
                except (ValueError, OutOfMemoryError) as err:
                    rows.append(dict(ground_truth=str(path), settings=label, error=str(err)))
                    tqdm.write(terminal_safe(f"skipped {path} ({label}): {err}"), file=sys.stderr)

    # 4. The files and the table.
    csv_path, json_path = write_evaluation(ns.out, rows, info)
    print(evaluation_table(evaluation_summary([row for row in rows if row["settings"] != "-"])))
    # The footer counts what the table counts (scored and failed pairs of a ground truth and a setting), then the
    # ground truth files that could not be read at all.
    failed = [row for row in rows if row.get("error") and row["settings"] != "-"]
    unreadable = [row for row in rows if row["settings"] == "-"]
    scored = len(rows) - len(failed) - len(unreadable)
    print(f"{scored} scored, {len(failed)} failed" + (f", {len(unreadable)} ground truth file(s) unreadable"
                                                         if unreadable else "") + f"; {csv_path}, {json_path}")
    return 1 if failed or unreadable else 0
