"""optimum's ORTModelForCausalLM drives a slimconv export: the consumer check of issue 11, by hand.

    python benchmarks/optimum_check.py                  # SmolLM2, drop-blocks-20pct (a uniform export), fp32
    python benchmarks/optimum_check.py --onnx-dir DIR   # any export with a stock config

optimum-onnx pins transformers < 4.58 while slimconv needs 5.x, so optimum runs in a throwaway
environment (torch, optimum-onnx, onnxruntime; kept under ``$SLIMCONV_CACHE/compat/optimum``). This
environment's slimconv writes the export and its greedy tokens (`slimconv.runtime.generate`); optimum loads
the same folder with ``ORTModelForCausalLM.from_pretrained`` and generates greedily from the same prompt;
the tokens must be equal. Exit 0 when they are, 1 when not, 2 when the environment could not be made.
Only uniform (blocks-only) exports qualify: optimum sizes the cache from the stock config's layer count.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the city begins"
NEW_TOKENS = 24
OPTIMUM = ["torch==2.13.0", "optimum-onnx==0.1.0", "onnxruntime"]

INNER = r'''
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import PreTrainedTokenizerFast
import transformers
folder, n = sys.argv[1], int(sys.argv[2])
# tokenizer_config.json names transformers 5's TokenizersBackend, which 4.x does not know; the tokenizer
# itself (tokenizer.json) is the same.
tok = PreTrainedTokenizerFast(tokenizer_file=folder + "/tokenizer.json")
model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
ids = tok(sys.argv[3], return_tensors="pt")
out = model.generate(input_ids=ids.input_ids, attention_mask=ids.attention_mask, max_new_tokens=n,
                     min_new_tokens=n, do_sample=False)
print(json.dumps({"tokens": out[0, ids.input_ids.shape[1]:].tolist(), "transformers": transformers.__version__}))
'''


def environment() -> Path:
    from slimconv.source import cache_root

    env = cache_root() / "compat" / "optimum"
    python = env / "bin" / "python"
    if not (env / ".complete").exists():
        print(f"making an environment with {' '.join(OPTIMUM)} in {env} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *OPTIMUM], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout + proc.stderr)
            raise SystemExit(2)
        (env / ".complete").touch()
    return python


def default_export(work: Path) -> Path:
    from slimconv.convert import run_convert
    from slimconv.formats.onnx_export import run_export
    from slimconv.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "smollm2-drop-blocks-20pct.yaml")
    recipe.output.dir = str(work / "slim")
    if not (work / "slim" / "config.json").is_file():
        run_convert(recipe, force=True)
    if not (work / "slim" / "onnx" / "model.onnx").is_file():
        run_export(work / "slim", provider="cpu", force=True)
    return work / "slim" / "onnx"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx-dir", type=Path, help="an export of a blocks-only output (default: made here)")
    p.add_argument("--workdir", type=Path, help="where the default export is written (default: a temp folder)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from slimconv.runtime import generate

    folder = args.onnx_dir or default_export(args.workdir or Path(tempfile.mkdtemp(prefix="slimconv-optimum-")))
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") == "slimconv":
        raise SystemExit("error: optimum needs a stock config: export a blocks-only output")
    ours = [x for x in generate(folder, PROMPT, NEW_TOKENS, provider="cpu")][-1]["token_ids"]
    python = environment()
    proc = subprocess.run([str(python), "-c", INNER, str(folder), str(len(ours)), PROMPT], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        print(proc.stdout + proc.stderr[-4000:])
        print("optimum could NOT load or run the export")
        return 1
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    same = theirs["tokens"] == ours
    print(f"{folder}: slimconv generate {ours}\n{' ' * len(str(folder))}  optimum (transformers "
          f"{theirs['transformers']}) {theirs['tokens']}\n{'SAME' if same else 'DIFFERENT'} greedy tokens "
          f"({len(ours)})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
