"""NVIDIA kvpress and minikv on one prompt: the positions each (layer, KV head) keeps after prefill, and the scores
each side ranked them by (tests/test_kvpress.py; needs kvpress and transformers, which minikv does not depend on).

kvpress side: the press's forward hooks on a transformers LlamaForCausalLM, the prompt prefilled without the LM head
into a fresh DynamicCache, as kvpress's own pipeline prefills (kvpress/pipeline.py:216-221 in kvpress 0.5.5). The press
prunes each layer's cache by gathering the kept keys (kvpress/presses/scorer_press.py:96-100); its `compress` is
wrapped on the instance to record, per layer, its scores (`score`'s return value) and the original positions of the
keys it returned, found by matching them against the cache before pruning (exact: a gather copies rows, and no two
rotated keys of one head are equal). Nothing is re-derived from the scores: what is recorded is what kvpress kept.

minikv side: `minikv.generate.prefill` with the policy, the kept positions read from each store's `pos`, as
`minikv/tools/compare.py` does; the policy's `after_prefill` is wrapped to record the scores it ranks by, computed with
minikv's own functions from the statistics it is handed, before it evicts."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from minikv.ops import group_mean
from minikv.policies.h2o import ranked_scores
from minikv.policies.snapkv import window_scores


def kvpress_run(hf_model, ids: list[int], press) -> tuple[list[list[list[int]]], list[torch.Tensor]]:
    """(kept[layer][head] sorted positions, scores[layer] (Hkv, T)) of `press` prefilling `ids` on `hf_model`."""
    from transformers import DynamicCache
    n_layers = hf_model.config.num_hidden_layers
    kept, scores = [None] * n_layers, [None] * n_layers
    compress, score = press.compress, press.score

    def recording_score(module, *args):
        scores[module.layer_idx] = out = score(module, *args)
        return out

    def recording_compress(module, hidden_states, keys, values, attentions, kwargs):
        new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
        where = []
        for h in range(keys.shape[1]):                              # batch row 0
            row = {k.numpy().tobytes(): j for j, k in enumerate(keys[0, h].float())}
            assert len(row) == keys.shape[2], "two equal keys in one head: positions would be ambiguous"
            where.append(sorted(row[k.numpy().tobytes()] for k in new_keys[0, h].float()))
        kept[module.layer_idx] = where
        return new_keys, new_values

    press.score, press.compress = recording_score, recording_compress    # instance attributes: the hook calls these
    try:
        with torch.no_grad(), press(hf_model):
            hf_model.model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(config=hf_model.config))
    finally:
        del press.score, press.compress
    assert all(k is not None for k in kept), "the press did not compress every layer"
    return kept, [s[0].detach().double() for s in scores]


def minikv_run(model, ids: list[int], policy) -> tuple[list[list[list[int]]], list[torch.Tensor]]:
    """(kept[layer][head] sorted positions, scores[layer] (Hkv, T)) of a snapkv or h2o `policy` prefilling `ids`:
    the scores it ranks by (snapkv: `window_scores`, -inf for the window; h2o: `ranked_scores`)."""
    from minikv.generate import prefill
    n, scores = len(ids), [None] * len(model.layers)
    after_prefill = policy.after_prefill

    def recording(layer, store, stats):
        if "last_rows" in stats:
            s = window_scores(store, stats["last_rows"], policy.window, policy.kernel, policy.pooling)
        else:                                                        # h2o: the store gets "score" only after this
            s = ranked_scores(SimpleNamespace(stats={"score": group_mean(stats["colsum"])}, seen=store.seen,
                                              pos=store.pos), policy.score)
        assert bool((store.pos[0, :, :n] == torch.arange(n)).all())   # a fresh store: slot j holds position j
        scores[layer] = s[0, :, :n].detach().double()
        after_prefill(layer, store, stats)

    policy.after_prefill = recording
    try:
        with torch.no_grad():
            cache = prefill(model, [ids], policy)[1]
    finally:
        del policy.after_prefill
    kept = [[sorted(s.pos[0, h][s.pos[0, h] >= 0].tolist()) for h in range(s.pos.shape[1])] for s in cache.layers]
    return kept, scores


def boundary(kept_scores: torch.Tensor) -> float:
    """The lowest finite score among the kept (the window's scores are +-inf or padded, not ranked)."""
    return kept_scores[torch.isfinite(kept_scores)].min().item()


def differences(a, b, sa: list[torch.Tensor], sb: list[torch.Tensor]) -> list[dict]:
    """Every (layer, head) whose kept sets differ, with both sides' scores of the positions only one side kept, and
    each side's score of its own last kept entry (its boundary): the material for telling a tie from a real
    difference."""
    out = []
    for layer, (la, lb) in enumerate(zip(a, b)):
        for h, (x, y) in enumerate(zip(la, lb)):
            only_a, only_b = sorted(set(x) - set(y)), sorted(set(y) - set(x))
            if only_a or only_b:
                sc = {side: {"only_a": s[layer][h, only_a].tolist(), "only_b": s[layer][h, only_b].tolist()}
                      for side, s in (("a_scores", sa), ("b_scores", sb))}
                out.append({"layer": layer, "head": h, "only_a": only_a, "only_b": only_b, **sc,
                            "a_boundary": boundary(sa[layer][h, x]), "b_boundary": boundary(sb[layer][h, y])})
    return out


def main(argv: list[str] | None = None) -> int:
    """kvpress as one side of `minikv compare`, run in kvpress's own environment (test_kvpress.py's docstring sets it
    up): kvpress's kept positions for the prompt of a `minikv compare --out` JSON, compared per layer and KV head
    with one of that run's minikv sides, printed as `minikv compare` prints its own; --plot draws the heatmap,
    --out saves the kvpress side ({"spec", "prompt_ids", "kept"}, the JSON's format)."""
    import argparse
    import importlib.metadata
    import json
    from pathlib import Path

    import kvpress
    import transformers
    from kvpress.utils import compute_n_kept
    from minikv.tools.common import format_rows
    from minikv.tools.compare import heatmap, jaccard

    p = argparse.ArgumentParser(prog="tests/kvpress_peer.py", description=main.__doc__.splitlines()[0])
    p.add_argument("compare_json", help="the --out file of a `minikv compare` run on one prompt")
    p.add_argument("--model", required=True, help="the Hugging Face model folder that run used")
    p.add_argument("--press", choices=("snapkv", "observed"), default="snapkv",
                   help="SnapKVPress (window 32, kernel 7, minikv's defaults) or ObservedAttentionPress")
    p.add_argument("--ratio", type=float, default=0.2, help="share kept: kvpress's compression_ratio is 1 - ratio")
    p.add_argument("--against", choices=("a", "b"), default="a", help="the minikv side compared with")
    p.add_argument("--plot", default=None, help="save the heatmap PNG here")
    p.add_argument("--out", default=None, help="save the kvpress side's JSON here")
    args = p.parse_args(argv)
    mk = json.loads(Path(args.compare_json).read_text())
    ids, ours = mk["prompt_ids"], mk[args.against]
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=(
        "eager" if args.press == "observed" else "sdpa")).eval()     # observed attention needs the weights
    press = (kvpress.SnapKVPress(compression_ratio=1 - args.ratio, window_size=32, kernel_size=7)
             if args.press == "snapkv" else kvpress.ObservedAttentionPress(compression_ratio=1 - args.ratio))
    kept, _ = kvpress_run(hf, ids, press)
    version = importlib.metadata.version("kvpress")                   # the package has no __version__
    side = {"spec": f"kvpress {version} {type(press).__name__}(compression_ratio={1 - args.ratio:g})",
            "prompt_ids": ids, "kept": kept}
    J = jaccard(kept, ours["kept"])
    print(f"A = {side['spec']}: {compute_n_kept(len(ids), 1 - args.ratio)} of {len(ids)} positions per KV head; "
          f"B = minikv {ours['spec']}: {len(ours['kept'][0][0])} in layer 0, head 0")
    rows = [{"layer": i, "jaccard mean": sum(j) / len(j), "jaccard min": min(j)} for i, j in enumerate(J)]
    flat = [x for j in J for x in j]
    print(format_rows(rows + [{"layer": "mean", "jaccard mean": sum(flat) / len(flat), "jaccard min": min(flat)}],
                      digits=3))
    if args.plot:
        print(f"saved {heatmap({'a': side, 'b': ours, 'layers': [{'jaccard': j} for j in J]}, args.plot)}")
    if args.out:
        Path(args.out).write_text(json.dumps(side))
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
