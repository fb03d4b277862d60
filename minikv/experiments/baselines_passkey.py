"""Which baselines still answer a ~3k-token passkey at budget ratios 0.5, 0.2 and 0.1 (issue 3's check).

    python -m minikv.experiments.baselines_passkey [--length 3000] [--depths 0.25,0.5,0.75]

Prints one row per (policy, ratio): correct answers, the measured cache ratio, live / allocated / full KV MiB.
The prompt is `minikv eval`'s passkey task (question-aware, the model's chat template where the task uses it).
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=3000)
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--policies", default="full,streaming,h2o,snapkv,pyramidkv")
    ap.add_argument("--ratios", default="0.5,0.2,0.1")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from minikv.io.checkpoint import load_model
    from minikv.io.convert import ensure_default_model
    from minikv.tools.eval.tasks import make_example
    from minikv.generate import generate
    from minikv.policies import get_policy
    from minikv.io.tokenizer import chat_stop_ids, load_tokenizer

    folder = ensure_default_model()
    model, tok = load_model(folder), load_tokenizer(folder)
    depths = [float(d) for d in args.depths.split(",")]
    examples = [make_example(tok, "passkey", args.length, d) for d in depths]
    mib = 2 ** 20
    print(f"passkey, {len(examples[0].ids)}-token prompts, depths {depths}")
    print("| policy | ratio | correct | measured ratio | KV live MiB | KV allocated MiB | KV full MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.policies.split(","):
        for ratio in ([None] if name == "full" else [float(r) for r in args.ratios.split(",")]):
            results = [generate(model, [ex.ids], get_policy(name, ratio), max_new_tokens=ex.max_new_tokens,
                                stop_ids=chat_stop_ids(tok) if ex.chat else []) for ex in examples]
            correct = sum(any(a in tok.decode(r.tokens[0]) for a in ex.answers) for r, ex in zip(results, examples))
            n = len(results)
            mean = lambda f: sum(f(r) for r in results) / n
            print(f"| {name} | {ratio if ratio else '-'} | {correct}/{n} | {mean(lambda r: r.cache_ratio):.3f} | "
                  f"{mean(lambda r: r.kv_bytes_live) / mib:.1f} | {mean(lambda r: r.kv_bytes_allocated) / mib:.1f} | "
                  f"{mean(lambda r: r.kv_bytes_full) / mib:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
