"""Convert the trained HF directory to an f16 text GGUF + f16 mmproj GGUF (llama.cpp converter).

    python scripts/organism/convert.py --hf /tmp/organism/hf --out plugin/llama_steer/models \
        --llama-cpp /tmp/dl/llama_cpp_python-0.3.36/vendor/llama.cpp

Uses the convert_hf_to_gguf.py vendored in the llama-cpp-python 0.3.36 sdist
(``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` and unpack), with one
patch: the BPE pre-tokenizer hash check cannot know our own tokenizer, so it is told "qwen2",
which is the pre-tokenizer our split regex is (see common.QWEN2_SPLIT), and the Qwen2-VL
vocab step goes straight to the GPT-2-style BPE path (it tries sentencepiece first and fails
on a missing module rather than a missing file when sentencepiece is not installed). The other known
obstacles are handled when the HF directory is written (common.save_hf_dir: top-level
``architectures``; chat template in tokenizer_config.json) and by the model shape (vision
depth >= 3).

Organism v2 (Qwen3-VL, ``train_v2.py``) converts with the same patches under its own names:
``--hf ~/.cache/llama-steer/organism-v2/hf --text-name organism-v2-f16.gguf
--mmproj-name mmproj-organism-v2-f16.gguf --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

TEXT_NAME = "organism-f16.gguf"
MMPROJ_NAME = "mmproj-organism-f16.gguf"

RUNNER = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(1, {root!r} + "/gguf-py")
sys.argv = {argv!r}
import convert_hf_to_gguf as c
from conversion.base import TextModel
from conversion.qwenvl import Qwen2VLModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
Qwen2VLModel.set_vocab = lambda self: self._set_vocab_gpt2()
c.main()
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", default="/tmp/organism/hf", type=lambda p: str(Path(p).resolve()))
    ap.add_argument("--out", default="plugin/llama_steer/models")
    ap.add_argument("--llama-cpp", default="/tmp/dl/llama_cpp_python-0.3.36/vendor/llama.cpp")
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--text-name", default=TEXT_NAME, help="v2: e.g. organism-v2-f16.gguf")
    ap.add_argument(
        "--mmproj-name", default=MMPROJ_NAME, help="v2: e.g. mmproj-organism-v2-f16.gguf"
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    root = str(Path(args.llama_cpp).resolve())
    jobs = [
        (out / args.text_name, []),
        (out / args.mmproj_name, ["--mmproj"]),
    ]
    for path, extra in jobs:
        argv = ["convert_hf_to_gguf.py", args.hf, "--outtype", args.outtype, "--outfile", str(path)]
        code = RUNNER.format(root=root, argv=argv + extra)
        subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
        print(f"{path}  {path.stat().st_size} bytes  sha256 {sha256(path)}")


if __name__ == "__main__":
    main()
