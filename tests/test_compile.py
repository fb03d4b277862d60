"""generate(compile=True): the decode step through torch.compile (inductor on this CPU) is the reference step.

From the second decode step on the cache is fitted to every token left and marked `fixed` (appends keep no
host-side bound, so nothing a compiled step guards on changes between steps); afterwards the store is unfixed again
and grows as usual. The GPU speed of this mode is measured by `minikv bench gpu` (mode "compiled"), not here."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from minikv.generate import decode_step, fixed_capacity_step, generate
from minikv.policies import get_policy
from conftest import tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    old = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True        # one compilation serves every step
    yield
    torch._dynamo.config.error_on_recompile = old
    torch._dynamo.reset()


@pytest.mark.parametrize("name, budget, kw", [("full", None, {}), ("h2o", 0.5, {}),
                                              ("d2o", 0.5, {"protected_layers": [0]}),     # layer 1 compressed
                                              ("d2o", 0.5, {"when": "prefill", "protected_layers": [0]})])
def test_compiled_decode_equals_eager(name, budget, kw):
    model = tiny_model(num_hidden_layers=2)
    prompts = torch.randint(3, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)).tolist()
    eager = generate(model, prompts, get_policy(name, budget, **kw), max_new_tokens=8, stop_ids=[], keep_cache=True)
    comp = generate(model, prompts, get_policy(name, budget, **kw), max_new_tokens=8, stop_ids=[], keep_cache=True,
                    compile=True)
    assert comp.tokens == eager.tokens and comp.capture_seconds > 0 and eager.capture_seconds == 0
    assert name == "full" or bool((comp.cache.layers[-1].length < 40).all())   # the last layer was compressed
    for a, b in zip(eager.cache.layers, comp.cache.layers):
        order = lambda s: torch.sort(torch.where(s.pos >= 0, s.pos, 1 << 40), dim=-1).values
        assert torch.equal(order(a), order(b))                     # the same positions kept in every head
        assert not b.fixed and b.max_len_bound == b.capacity      # unfixed: the next append re-reads the lengths
    # The returned cache keeps working: appends past its fitted capacity grow it instead of overwriting entries.
    cache, policy, n = comp.cache, get_policy(name, budget, **kw), comp.cache.layers[0].capacity + 2
    for _ in range(n):
        decode_step(model, cache, torch.tensor([5, 6]), policy)
    assert cache.seen.tolist() == [40 + 7 + n] * 2                 # 7 tokens fed back by generate, then n more
    if name == "full":
        assert all(bool((s.length == 40 + 7 + n).all()) for s in cache.layers)   # every entry still there


def test_a_fixed_store_keeps_no_host_bound():
    model = tiny_model(num_hidden_layers=1)
    cache = model.new_cache(1)
    model(torch.tensor([[1, 2, 3]]), cache)
    store = cache.layers[0]
    cache.fit(4, fixed=True)
    bound = store.max_len_bound
    model(torch.tensor([[4]]), cache, validate=False)
    assert store.fixed and store.max_len_bound == bound == 3       # the append left the host state alone
    cache.fit(4)
    assert not store.fixed and store.max_len_bound == 4


@pytest.mark.parametrize("name, budget, kw", [("full", None, {}), ("h2o", 0.5, {}),
                                              ("d2o", 0.5, {"protected_layers": [0]})])
def test_compiled_step_writes_the_store_in_place(name, budget, kw):
    """inductor's code for generate's fitted decode step (fixed_capacity_step) holds no store-sized temporary: the
    appends, h2o's eviction and d2o's merge write the store in place. A `scatter_` append made it copy every layer's
    whole store at each step; so did d2o's merge while inductor's reorder_for_locality pass was on."""
    model, policy = tiny_model(num_hidden_layers=3), get_policy(name, budget, **kw)
    prompts = torch.randint(3, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)).tolist()
    cache = generate(model, prompts, policy, max_new_tokens=2, stop_ids=[], keep_cache=True).cache
    tokens, pos = torch.tensor([5, 6]), cache.seen.clone()
    _, code = run_and_get_code(lambda: fixed_capacity_step(model, cache, policy, None, 4, tokens, pos, compile=True))
    shapes = {tuple(s.k.shape) for s in cache.layers}
    assert code and not [s for s in shapes for c in code if f"empty_strided_cpu({s}" in c], shapes
