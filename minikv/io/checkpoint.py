"""Load a Llama checkpoint in the Hugging Face layout: config.json + safetensors (maybe sharded through
`model.safetensors.index.json`; never pickle). A missing or unexpected tensor, a shape mismatch, a non-float dtype or
a non-finite value is an error naming tensor and file."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minikv.config import LlamaConfig
from minikv.errors import BadInput, NoDevice, NotFound
from minikv.io import require
from minikv.io.hf_config import load_config, read_json_object
from minikv.model import Llama

FETCH_HINT = "run `minikv fetch` to get the default model, or pass --model with a Hugging Face Llama folder"

def resolve_device(device) -> torch.device:
    """`device` ('cpu', 'cuda', 'cuda:1', 'mps', a torch.device) checked to exist here (BadInput / NoDevice)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadInput(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    require(dev.type in ("cpu", "cuda", "mps"), f"device {device!r}: minikv runs on cpu, cuda[:N] or mps")
    n = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.is_available() else 0
    require(dev.type != "cuda" or n > 0, f"device {device!r}: no CUDA GPU is available on this machine; use "
            "--device cpu", NoDevice)
    require(dev.type != "cuda" or dev.index is None or dev.index < n,
            f"device {device!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}", NoDevice)
    require(dev.type != "mps" or torch.backends.mps.is_available(), f"device {device!r}: Apple's MPS backend is not "
            "available on this machine; use --device cpu", NoDevice)
    return dev

def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Hugging Face Llama checkpoint must hold, with its shape, in checkpoint order."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    Q, KV = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,), "self_attn.q_proj": (Q, D),
             "self_attn.k_proj": (KV, D), "self_attn.v_proj": (KV, D), "self_attn.o_proj": (D, Q),
             "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F)}
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    shapes |= {f"model.layers.{i}.{name}.weight": shape
               for i in range(cfg.num_hidden_layers) for name, shape in layer.items()}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    return shapes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

def _weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of the folder: the shards its index names (plain names of files beside it), else
    model.safetensors."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if not index.exists():
        if not single.exists() and any(next(folder.glob(p), None) for p in ("*.bin", "*.pt", "*.pth")):
            raise BadInput(f"{folder} holds only pickle weights (*.bin/*.pt); minikv reads safetensors only "
                           f"(convert them with transformers: save_pretrained(..., safe_serialization=True))")
        require(single.exists(), f"no model.safetensors or model.safetensors.index.json in {folder}; {FETCH_HINT}",
                NotFound)
        return [single]
    weight_map = read_json_object(index).get("weight_map")
    require(isinstance(weight_map, dict) and bool(weight_map), f"{index} is not a valid safetensors index: "
            "'weight_map' must be a non-empty object of tensor name -> shard file")
    shards = sorted(set(map(str, weight_map.values())))
    for name in shards:  # a path, not a plain name, would read outside the model folder
        require(Path(name).name == name and name not in (".", ".."),
                f"{index} names shard {name!r}, which is not a plain file name")
        require((folder / name).is_file(), f"{index} names shard {name}, which is missing from {folder}", NotFound)
    return [folder / name for name in shards]

def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint's safetensors file(s), by name; each a float tensor of finite values."""
    state, source = {}, {}
    for f in _weight_files(Path(folder)):
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise BadInput(f"cannot read {f}: corrupt or truncated safetensors file ({e}); "
                           f"re-download or re-convert it") from None
        for name, t in tensors.items():
            require(name not in state, f"tensor {name!r} is in both {source.get(name, f).name} and {f.name}")
            # Integer/quantized/boolean weights are refused: casting them would silently change the model.
            require(t.dtype in FLOAT_DTYPES, f"{f}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                    "minikv reads unquantized float weights (float32, float16, bfloat16, float64)")
            flat = t.reshape(-1)  # checked in chunks, so the temporary boolean mask stays small
            for i in range(0, flat.numel(), 1 << 24):
                require(bool(torch.isfinite(flat[i:i + (1 << 24)]).all()),
                        f"{f}: tensor {name!r} holds NaN or infinite values; the checkpoint is corrupt")
            state[name], source[name] = t, f
    return state

def check_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig, source: str = "checkpoint") -> None:
    """Raise naming the first missing tensor, unexpected tensor or shape mismatch."""
    want = expected_shapes(cfg)
    # Tied checkpoints sometimes still carry a copy of the head; accept it and use the embeddings.
    extra = set(state) - set(want) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    extra = {n for n in extra if not n.endswith("rotary_emb.inv_freq")}
    missing = [n for n in want if n not in state]
    if missing:
        raise BadInput(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    require(not extra, f"{source}: unexpected tensor {min(extra, default=None)!r} ({len(extra)} unexpected in all)")
    for name, shape in want.items():
        have = tuple(state[name].shape)
        require(have == shape, f"{source}: tensor {name!r} has shape {have}, config implies {shape}")

def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Llama:
    """Build a Llama from a Hugging Face folder and load its weights (cast to `dtype`)."""
    folder = Path(folder)
    require(not folder.exists() or folder.is_dir(), f"model folder {folder} is a file; give the folder that holds "
            "config.json")
    require(folder.is_dir(), f"model folder {folder} does not exist; {FETCH_HINT}", NotFound)
    require((folder / "config.json").exists(), f"{folder} has no config.json; {FETCH_HINT}", NotFound)
    cfg, state = load_config(folder / "config.json"), read_state_dict(folder)
    check_state_dict(state, cfg, source=str(folder))
    with torch.device("meta"):
        model = Llama(cfg)
    ours = {name.removeprefix("model."): t.to(dtype) for name, t in state.items() if name in expected_shapes(cfg)}
    model.load_state_dict(ours, strict=True, assign=True)
    return model.to(device).eval()
