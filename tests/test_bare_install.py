"""The CLI as a bare install runs it: another process, a folder with nothing beside it, no Hub, no data
folder named by the environment. WikiText-2 must come from inside the package."""
import json
import os
import shutil
import subprocess
import sys

import yaml

# Runs `python -m slimconv ARGS` with an audit hook that refuses to read WikiText-2 from anywhere but the
# package, so a lookup beside the project fails here even on a machine that has such a folder.
CHILD = """
import os, runpy, sys
import slimconv
package = os.path.dirname(os.path.abspath(slimconv.__file__)) + os.sep
def guard(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        if "wikitext" in path.lower() and not path.startswith(package):
            raise RuntimeError(f"WikiText-2 read from outside the package: {path}")
sys.addaudithook(guard)
sys.argv = ["slimconv", *sys.argv[1:]]
runpy.run_module("slimconv", run_name="__main__")
"""

WORDS = "the , . of and in to a = was @-@ <unk> 's is on for as that with by he his at from it".split()


def _slimconv(cwd, *args):
    env = {k: v for k, v in os.environ.items() if k != "SLIMCONV_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", SLIMCONV_CACHE=str(cwd / "empty-cache"))
    p = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, f"slimconv {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _tiny_with_tokenizer(tiny_models, where):
    """The tiny Llama with a word-level tokenizer of a few common WikiText-2 words (ids inside its vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    src = shutil.copytree(tiny_models["llama-tied"], where)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(src)
    return src


def test_validate_and_analyze_in_a_bare_folder(tiny_models, tmp_path):
    src = _tiny_with_tokenizer(tiny_models, tmp_path / "src")
    _slimconv(tmp_path, "analyze", str(src), "-o", "an", "--samples", "2", "--seq-len", "32", "--sleb-blocks", "0",
              "--no-group-ppl")
    assert (tmp_path / "an" / "metrics.json").is_file()

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(dict(
        model=str(src), remove={"blocks": [2]}, output={"dir": "out"},
        validate={"exactness": {"prompt_tokens": 16, "greedy_tokens": 4}, "quality": {"samples": 2, "seq_len": 32}})))
    _slimconv(tmp_path, "convert", "r.yaml")
    p = _slimconv(tmp_path, "validate", "out")
    assert "validation passed" in p.stdout
    report = (tmp_path / "out" / "slimconv_report.json").read_text()
    assert '"exactness"' in report and '"quality"' in report
