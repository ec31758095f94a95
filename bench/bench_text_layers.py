"""Text layers read as text (issue 26), measured on the CPU: character error rate per language and seconds a layer.

The designs are assets/layered_gt (13 PSDs, 52 layers, 10 text lines in 9 of them), scaled with the app's
`resize_layers` so their long side is 640 px (the 640 bucket). English: the text layers as drawn
(assets/make_layered_gt.py; strings from layered_gt/text_layers.json). Chinese and Korean: the same lines drawn
again in that language (strings below, same place, colour and size, a CJK font found by fontconfig: Debian's
fonts-wqy-microhei and fonts-nanum), replacing the English layer; skipped when no such font is installed. Every
layer of every design is read, so the seconds a layer include the many layers without text.
Also the layer names of studio/naming.py on the demo model (CPU) as a run makes them (`app.name_layers_locked`),
seconds a layer (its words are noise), `tidy_layers`' seconds a design, and
"Clean edges" (`decontaminate_edges`): every layer above the bottom with opaque pixels and >= 1,000 soft-edge pixels,
its edge mixed with what was drawn behind it (a * rgb + (1 - a) * behind), put over the negative of that: the mean
colour error on its 0 < alpha < 1 pixels against the drawn layer over the same background, before and after.

    python bench/bench_text_layers.py --out bench/results/text_layers_cpu.json
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
import app  # noqa: E402  (loads no model)
from studio import design, naming  # noqa: E402
from studio.images import composite_layers, read_layered_file, resize_layers  # noqa: E402

GT_DIR = ROOT / "assets" / "layered_gt"
LONG_SIDE = 640
# The designs' lines in Chinese and Korean, in the order of text_layers.json.
TRANSLATIONS = {
    "zh": ["促销 -40%", "夜晚", "第1名", "图层工作室", "入场", "一人", "你好", "2025年销售", "点击", "玻璃"],
    "ko": ["세일 -40%", "밤", "1위", "레이어 스튜디오", "입장", "한 명", "안녕하세요", "2025 매출", "클릭", "유리"],
}
FONT_FAMILIES = {"zh": "WenQuanYi Micro Hei", "ko": "NanumGothic"}


def find_font(family: str) -> str | None:
    if not shutil.which("fc-match"):
        return None
    found = subprocess.run(["fc-match", "-f", "%{family}|%{file}", family], capture_output=True, text=True).stdout
    names, _, file = found.partition("|")
    return file if family.lower() in names.lower() else None


def at_640(layers):
    width, height = layers[0].size
    scale = LONG_SIDE / max(width, height)
    return resize_layers(layers, (round(width * scale), round(height * scale)))


def redraw(layers, lines, strings, font_file):
    """The design with each text layer drawn again with its string in `strings` (same place, colour, size)."""
    from PIL import Image, ImageDraw, ImageFont

    layers = list(layers)
    for line, words in zip(lines, strings):
        layer = Image.new("RGBA", layers[0].size, (0, 0, 0, 0))
        font = ImageFont.truetype(font_file, line["font_size"])
        ImageDraw.Draw(layer).text(line["xy"], words, fill=tuple(line["fill"]) + (line["opacity"],), font=font)
        layers[line["layer"] - 1] = layer
    return layers


def by_design(truth, strings):
    """design -> its strings, taking `strings` in the order of text_layers.json's lines."""
    strings, table = iter(strings), {}
    for name, lines in truth.items():
        table[name] = [next(strings) for _ in lines]
    return table


def measure(language, designs, strings, engine):
    """OCR of every layer of every design; CER against `strings` (design -> its lines)."""
    rows, seconds, layer_count, errors, chars, errors_nospace, chars_nospace = [], 0.0, 0, 0, 0, 0, 0
    for name, layers in designs.items():
        wanted = strings.get(name, [])
        started = time.perf_counter()
        texts = design.read_layer_text(layers, engine=engine)
        took = time.perf_counter() - started
        seconds, layer_count = seconds + took, layer_count + len(layers)
        strict = design.text_cer(layers, wanted, texts=texts)
        loose = design.text_cer(layers, wanted, texts=texts, ignore_spaces=True)
        errors, chars = errors + strict["errors"], chars + strict["chars"]
        errors_nospace, chars_nospace = errors_nospace + loose["errors"], chars_nospace + loose["chars"]
        rows.append(dict(design=name, layers=len(layers), seconds=round(took, 3), lines=strict["lines"],
                         extra=strict["extra"], text_layers=[i + 1 for i, t in enumerate(texts) if t.is_text],
                         read=[dict(layer=i + 1, text=line.text, score=round(line.score, 3), share=round(t.share, 3))
                               for i, t in enumerate(texts) for line in t.lines]))
    return dict(language=language, cer=round(errors / chars, 4), errors=errors, chars=chars,
                cer_ignoring_spaces=round(errors_nospace / chars_nospace, 4), layers=layer_count,
                seconds_per_layer=round(seconds / layer_count, 3), seconds=round(seconds, 2), designs=rows)


def clean_edges(designs):
    import numpy as np
    from PIL import Image

    def floats(image):
        return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0

    rows, seconds = [], 0.0
    for name, layers in designs.items():
        for index in range(1, len(layers)):
            rgba = floats(layers[index])
            alpha = np.asarray(layers[index])[..., 3]
            fringe = (alpha > 0) & (alpha < 255)
            if not (alpha >= design.EDGE_OPAQUE_ALPHA).any() or fringe.sum() < 1000:
                continue
            behind = floats(composite_layers(layers[:index]))[..., :3]
            mixed = rgba.copy()
            mixed[..., :3] = rgba[..., 3:] * rgba[..., :3] + (1 - rgba[..., 3:]) * behind
            observed = Image.fromarray((mixed * 255).round().astype(np.uint8), "RGBA")
            started = time.perf_counter()
            cleaned = design.decontaminate_edges(observed)
            seconds += time.perf_counter() - started

            def over(image, background=1 - behind):
                x = floats(image)
                return x[..., :3] * x[..., 3:] + (1 - x[..., 3:]) * background

            truth = over(layers[index])
            before = float(np.abs(over(observed) - truth).mean(-1)[fringe].mean() * 255)
            after = float(np.abs(over(cleaned) - truth).mean(-1)[fringe].mean() * 255)
            rows.append(dict(design=name, layer=index + 1, fringe_pixels=int(fringe.sum()), before=round(before, 2),
                             after=round(after, 2), factor=round(before / after, 1)))
    before, after = (sum(row[k] for row in rows) / len(rows) for k in ("before", "after"))
    return dict(layers=len(rows), mean_error_before=round(before, 2), mean_error_after=round(after, 2),
                factor=round(before / after, 1), worst_layer_factor=min(row["factor"] for row in rows),
                seconds_per_layer=round(seconds / len(rows), 3), rows=rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "text_layers_cpu.json")
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/bench_text_layers_models"),
                        help="where the demo pipeline is built for the naming figures")
    ns = parser.parse_args()

    load_before = os.getloadavg()  # the machine may be shared: a busy one reads slower
    truth = json.loads((GT_DIR / design.TEXT_TRUTH_FILE).read_text())
    drawn = {path.stem: read_layered_file(path) for path in sorted(GT_DIR.glob("*.psd"))}
    english = {name: [line["text"] for line in lines] for name, lines in truth.items()}
    started = time.perf_counter()
    engine = design.ocr_engine()
    engine_seconds = time.perf_counter() - started
    design.read_layer_text(at_640(drawn["01_minimal_square"]), engine=engine)  # the first call's one-off costs

    results = {"en": measure("en", {n: at_640(layers) for n, layers in drawn.items()}, english, engine)}
    for language, strings in TRANSLATIONS.items():
        font = find_font(FONT_FAMILIES[language])
        if font is None:
            results[language] = dict(skipped=f"no {FONT_FAMILIES[language]} font (fc-match)")
            continue
        table = by_design(truth, strings)
        redrawn = {n: at_640(redraw(layers, truth.get(n, []), table.get(n, []), font)) for n, layers in drawn.items()}
        results[language] = measure(language, redrawn, table, engine)
        results[language]["font"] = font
    for language, result in results.items():
        if "cer" in result:
            print(f"{language}: CER {result['cer']:.3f} ({result['errors']}/{result['chars']}), ignoring spaces "
                  f"{result['cer_ignoring_spaces']:.3f}; {result['seconds_per_layer']:.3f} s a layer over "
                  f"{result['layers']} layers")

    edges = clean_edges({n: at_640(layers) for n, layers in drawn.items()})
    print(f"clean edges: fringe error {edges['mean_error_before']} -> {edges['mean_error_after']} levels of 255 "
          f"({edges['factor']}x; worst layer {edges['worst_layer_factor']}x) over {edges['layers']} layers, "
          f"{edges['seconds_per_layer']} s a layer")

    # Drop empty layers / merge near-duplicates: one `layer_report` (pairwise costs) and the stacking, per design.
    tidy_seconds = []
    for layers in (at_640(layers) for layers in drawn.values()):
        started = time.perf_counter()
        design.tidy_layers(layers)
        tidy_seconds.append(time.perf_counter() - started)
    tidy = dict(designs=len(tidy_seconds), layers=sum(len(layers) for layers in drawn.values()),
                mean_seconds=round(sum(tidy_seconds) / len(tidy_seconds), 3), max_seconds=round(max(tidy_seconds), 3))
    print(f"tidy: {tidy['mean_seconds']} s a design (max {tidy['max_seconds']} s, {max(map(len, drawn.values()))} layers)")

    # Layer names on the demo model: the mechanics' cost on a CPU (the real 8.3B model is another matter).
    loaded = app.load_pipeline(app.Settings(demo=True, models_dir=ns.models_dir, offload="off", first_block_cache=False))
    layers = [layer for name in drawn for layer in at_640(drawn[name])]
    app.name_layers_locked(loaded, layers[:2])  # warm-up
    started = time.perf_counter()
    names = app.name_layers_locked(loaded, layers)  # as a run names its layers: under the lock, memory freed after
    seconds = time.perf_counter() - started
    print(f"names (demo model): {seconds / len(layers):.3f} s a layer over {len(layers)} layers")

    out = ns.out.resolve()
    info = dict(command=f"python bench/bench_text_layers.py --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}",
                machine=dict(cpus=os.cpu_count(), load_average_before=load_before, platform=platform.platform(),
                             python=platform.python_version()),
                versions={p: app.package_version(p) for p in ("rapidocr-onnxruntime", "onnxruntime", "opencv-python")},
                long_side=LONG_SIDE, ocr_engine_seconds=round(engine_seconds, 3), ocr=results, clean_edges=edges,
                tidy=tidy,
                naming=dict(model="demo (tiny random Qwen2.5-VL, CPU, float32)", layers=len(layers),
                            seconds_per_layer=round(seconds / len(layers), 3),
                            max_new_tokens=naming.LAYER_NAME_MAX_NEW_TOKENS, names=names[:8]))
    info["machine"]["load_average_after"] = os.getloadavg()
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
