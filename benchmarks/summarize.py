"""Gather a benchmark suite's runs into one JSON file and print a table.

    python benchmarks/summarize.py OUT_DIR

Moves every OUT_DIR/runs/NAME.json (one `python -m gptjax.cli.bench --json` result each)
into OUT_DIR/suite.json under the key NAME (runs kept there from earlier calls stay),
then prints one line per run: model settings, gptjax's step time, tokens/s, MFU
(causal formula), compile time and peak memory, and, where the run had a reference, the
fastest PyTorch variant's step time, precision (fp32, or bf16 / fp16 under autocast) and
name (eager or compile, AdamW foreach or fused), and gptjax's speed-up over it. A
speed-up is printed only between the same precisions: a run whose reference computed in
another precision than gptjax (which the benchmark no longer makes, but an older
suite.json may hold) shows "-" there. Used by cpu_suite.sh and gpu_suite.sh.
"""

import json
import sys
from pathlib import Path

NAN = float("nan")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def reference_cells(r: dict) -> str:
    """The reference's columns: step time, precision, fastest variant, speed-up."""
    p = r["pytorch"]
    precision = SHORT.get(p.get("autocast") or "float32", "?")
    # Older runs timed one variant and did not name it.
    best = p.get("best") or (f"{'compile' if p.get('compile') else 'eager'}+"
                             f"{p.get('optimizer', 'AdamW ?').split()[-1]}")
    same = precision == SHORT.get(r.get("model", {}).get("dtype"))
    speedup = f"{r['speedup']:5.2f}x" if same and "speedup" in r else "    -"
    return f"  {p['step_ms']['median']:9.2f} ms {precision} {best:15s} {speedup}"


def row(name: str, r: dict) -> str:
    j, model = r.get("gptjax", {}), r.get("model", {})
    memory = j.get("memory", {})
    peak = memory.get("peak_bytes_in_use_mb", memory.get("temp_size_mb", NAN)) / 1024
    line = (f"{name:18s} {r['preset']:10s} {r['batch_size']:5d} {r['n_ctx']:5d} "
            f"{model.get('dtype', '?'):8s} {'scan' if model.get('scan_layers') else 'loop':4s} "
            f"{j.get('step_ms', {}).get('median', NAN):9.2f} {j.get('tokens_per_s', NAN):9.0f} "
            f"{100 * j.get('mfu_causal', NAN):6.1f}% {j.get('compile_s', NAN):8.1f} "
            f"{peak:8.2f}")
    if "pytorch" in r:
        line += reference_cells(r)
    return line


def main(out_dir: str) -> int:
    out = Path(out_dir)
    merged_path = out / "suite.json"
    merged = json.loads(merged_path.read_text()) if merged_path.exists() else {}
    for path in sorted((out / "runs").glob("*.json")):
        merged[path.stem] = json.loads(path.read_text())
        path.unlink()
    merged_path.write_text(json.dumps(merged, indent=1))
    print(f"{'run':18s} {'preset':10s} {'batch':>5s} {'ctx':>5s} {'dtype':8s} {'lyrs':4s} "
          f"{'step ms':>9s} {'tok/s':>9s} {'MFU':>7s} {'compile':>8s} {'mem GiB':>8s}  "
          f"{'pytorch':>17s} {'best variant':15s} speed-up")
    for name, r in merged.items():
        print(row(name, r))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    sys.exit(main(sys.argv[1]))
