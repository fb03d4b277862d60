"""minikv: training-free KV-cache compression for Llama models, over an explicit KV store.

    from minikv import load, generate, get_policy
    model = load("path/to/model")                    # a Hugging Face model folder
    result = generate(model, [[1, 2, 3]], get_policy("h2o", 0.2), max_new_tokens=16)"""
from minikv.generate import decode_step, generate, prefill
from minikv.io.checkpoint import load_model as load
from minikv.model import Llama
from minikv.policies import get_policy
from minikv.store import KVCache

__all__ = ["Llama", "KVCache", "load", "generate", "prefill", "decode_step", "get_policy"]
