"""A cheap GGUF header read: validates a file and returns its metadata without loading weights.

llama.cpp answers a damaged file with a log line and a NULL model; we check first so the user
gets one clear sentence. Parsing runs over an mmap with struct, skipping big arrays (the
tokenizer's 50k strings) by length instead of decoding them, so a header read takes milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from app.engine.errors import ModelFileError

_MAGIC = b"GGUF"
# value type id -> struct format for fixed-size scalars
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# arrays longer than this are summarised by their length (tokenizer vocabularies, merges)
_MAX_ARRAY_KEPT = 64


# the architectures llama.cpp 0.3.36's MTP graph (LLM_GRAPH_TYPE_DECODER_MTP, src/models/*.cpp) is built for
MTP_ARCHITECTURES = frozenset({
    "qwen35", "qwen35moe", "qwen3next", "glm4moe", "glm5-next", "glm-dsa", "deepseek2", "deepseek32", "deepseek4",
    "bailingmoe3", "cohere2moe", "nemotron_h_moe", "mimo2", "hy_v3", "step35",
})  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int  # ggml_type (GGMLQuantizationType's value)
    dims: tuple[int, ...]  # ne0, ne1, ...: ggml's order


@dataclass
class GGUFInfo:
    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)
    array_offsets: dict[str, int] = field(default_factory=dict)  # where a skipped array's elements start
    n_tensors: int = 0
    n_params: int = 0
    tensor_types: set[str] = field(default_factory=set)  # every tensor's type, e.g. {"F32", "Q4_1"}
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def mtp_layers(self) -> int:
        """Multi-token-prediction (NextN) blocks the file carries after its trunk that the llama.cpp inside Tandem
        can run as a draft head (MTP_ARCHITECTURES): Qwen3.5/3.6, GLM-4.5+, DeepSeek-V3/4, MiMo... Others that
        write the key (EXAONE's keeps the blocks "preserved but unused"; granite-switch reuses it) count 0."""
        if self.architecture not in MTP_ARCHITECTURES:
            return 0
        try:
            return int(self.metadata.get(f"{self.architecture}.nextn_predict_layers", 0))
        except (TypeError, ValueError):
            return 0

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        try:
            return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except (TypeError, ValueError):
            return "unknown"

    @property
    def float_weights(self) -> bool:
        """No quantized tensor at all (read from the tensors, not the file-type label, which may lie)."""
        return self.tensor_types <= {"F32", "F16", "BF16"}

    @property
    def context_length(self) -> int:
        """The context the model was trained for (0 when the header does not say)."""
        value = self.metadata.get(f"{self.architecture}.context_length")
        return value if isinstance(value, int) else 0

    @property
    def kv_bytes_per_token(self) -> int | None:
        """Bytes of llama.cpp's KV cache (F16 keys and values) per token of context, from the header: every layer with
        attention heads (a hybrid's per-layer head counts, or Qwen3.5/Qwen3-Next's every full_attention_interval-th
        layer). None where the header does not say enough to estimate it honestly (a sliding-window model keeps
        less, an MLA model a compressed cache, an array too long to be kept here)."""
        arch, meta = self.architecture, self.metadata
        layers = meta.get(f"{arch}.block_count")
        heads, kv_heads = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.attention.head_count_kv", None)
        embd = meta.get(f"{arch}.embedding_length")
        if not isinstance(layers, int) or layers <= 0 or f"{arch}.attention.sliding_window" in meta:
            return None
        # an MLA cache (compressed) or an SSM model without per-layer head counts: only Qwen3.5/Qwen3-Next say which
        # layers attend (full_attention_interval)
        mla_or_ssm = f"{arch}.attention.kv_lora_rank" in meta or (f"{arch}.ssm_inner_size" in meta and not isinstance(kv_heads, list))
        if mla_or_ssm and f"{arch}.full_attention_interval" not in meta:
            return None
        if kv_heads is None:
            kv_heads = heads
        if isinstance(kv_heads, list):
            per_layer = [int(h) for h in kv_heads[:layers]]
        elif isinstance(kv_heads, int):
            interval = meta.get(f"{arch}.full_attention_interval")
            per_layer = [kv_heads if not isinstance(interval, int) or (i + 1) % interval == 0 else 0 for i in range(layers)]
        else:
            return None
        first_heads = heads[0] if isinstance(heads, list) and heads else heads
        fallback = embd // first_heads if isinstance(embd, int) and isinstance(first_heads, int) and first_heads else None
        key, value = meta.get(f"{arch}.attention.key_length", fallback), meta.get(f"{arch}.attention.value_length", fallback)
        if not isinstance(key, int) or not isinstance(value, int):
            return None
        return sum(per_layer) * (key + value) * 2

    @property
    def vocab_size(self) -> int:
        return self.array_lengths.get("tokenizer.ggml.tokens", 0)

    def token_texts(self, ids: Iterable[int]) -> dict[int, str]:
        """Vocabulary entries for `ids`, read from the file without loading the model. Ids past the
        vocabulary are left out."""
        wanted = {i for i in ids if 0 <= i < self.vocab_size}
        if not wanted:
            return {}
        texts = self.token_bytes(0, max(wanted) + 1)
        return {i: texts[i].decode("utf-8", errors="replace") for i in sorted(wanted)}

    def token_bytes(self, start: int, stop: int) -> list[bytes]:
        """The raw text of tokens start..stop-1 (the draft check compares every one, as llama.cpp does;
        151,936 entries read in about 0.1 s)."""
        offset = self.array_offsets.get("tokenizer.ggml.tokens")
        stop = min(stop, self.vocab_size)
        if offset is None or start >= stop:
            return []
        texts: list[bytes] = []
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos, end = offset, len(buf)
            for index in range(stop):
                if pos + 8 > end:
                    raise ModelFileError(f"{self.path} is truncated: its vocabulary ends early (the download may be incomplete)")
                length = int.from_bytes(buf[pos : pos + 8], "little")
                pos += 8
                if index >= start:
                    texts.append(buf[pos : pos + length])
                pos += length
        return texts


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelFileError(f"{self.path} is truncated: its GGUF header ends early (the download may be incomplete)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path} is truncated: its GGUF header ends early (the download may be incomplete)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.take("<Q")  # read first: `self.pos += self.take()` would add to the stale position
        self.pos += length

    def value(self, vtype: int, key: str, info: GGUFInfo) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            info.array_lengths[key] = count
            info.array_offsets[key] = self.pos
            if count <= _MAX_ARRAY_KEPT:
                return [self.value(etype, key, info) for _ in range(count)]
            self.skip_array(etype, count)
            return None
        raise ModelFileError(f"{self.path} is not a valid GGUF file (unknown metadata type {vtype} for '{key}')")

    def skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[etype]) * count
        elif etype == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            raise ModelFileError(f"{self.path} is not a valid GGUF file (nested metadata arrays)")


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Validate `path` as a complete GGUF file and return its metadata. Raises ModelFileError."""
    path = Path(path).expanduser()
    if not path.exists():
        if path.is_symlink():
            try:
                path.resolve(strict=True)
            except RuntimeError:  # Python < 3.13 reports a loop this way
                raise ModelFileError(f"{path} is a symbolic link that loops back on itself") from None
            except OSError as exc:
                if "loop" in str(exc).lower() or getattr(exc, "errno", None) == 40:  # ELOOP
                    raise ModelFileError(f"{path} is a symbolic link that loops back on itself") from None
            raise ModelFileError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist")
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a GGUF model file")
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError(f"{path} is not a GGUF model file (only {size} bytes)")
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != _MAGIC:
                raise ModelFileError(f"{path} is not a GGUF model file (it does not start with 'GGUF')")
            return _parse(_Cursor(buf, path), size)
    except PermissionError as exc:
        raise ModelFileError(f"cannot read {path}: permission denied") from exc
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse(cur: _Cursor, size: int) -> GGUFInfo:
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{cur.path} uses GGUF version {version}; only versions 2 and 3 are supported")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    # every key-value pair takes at least 13 bytes and every tensor entry 28: counts beyond what the file
    # could hold are corruption, not a short download
    if n_kv * 13 + n_tensors * 28 > size:
        raise ModelFileError(f"{cur.path} is not a valid GGUF file (its header claims {n_kv} metadata entries and {n_tensors} tensors)")
    info = GGUFInfo(path=cur.path, version=version, file_size=size, n_tensors=n_tensors)
    for _ in range(n_kv):
        key = cur.string()
        value = cur.value(cur.take("<I"), key, info)
        if value is not None:
            info.metadata[key] = value
    data_end = 0
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        ggml_type, offset = cur.take("<I"), cur.take("<Q")
        n_elements = 1
        for d in dims:
            n_elements *= d
        info.n_params += n_elements
        try:
            tensor_type = GGMLQuantizationType(ggml_type)
            block, type_size = GGML_QUANT_SIZES[tensor_type]
            info.tensor_types.add(tensor_type.name)
            info.tensors.append(TensorInfo(name, ggml_type, tuple(dims)))
        except (ValueError, KeyError) as exc:
            raise ModelFileError(f"{cur.path}: tensor '{name}' has a tensor type ({ggml_type}) this build does not know") from exc
        data_end = max(data_end, offset + n_elements // block * type_size)
    if n_tensors == 0:
        raise ModelFileError(f"{cur.path} holds no weights (a vocabulary-only GGUF); it cannot generate text")
    alignment = int(info.metadata.get("general.alignment", 32))
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    if data_start + data_end > size:
        missing = data_start + data_end - size
        raise ModelFileError(f"{cur.path} is truncated: {missing} bytes of tensor data are missing (the download may be incomplete)")
    return info
