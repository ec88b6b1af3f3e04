"""The engine parts on their own: overlapped GGUF load (decided from available memory), decoder batches."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenvl_edge.runtime import memory
from qwenvl_edge.runtime.bundle import Bundle
from qwenvl_edge.runtime.pipeline import QwenVL


@pytest.mark.parametrize("available", [1 << 20, 1 << 50], ids=["small-device", "roomy"])
def test_load_overlaps_the_encoder_only_when_memory_allows(f32_bundle: Path, golden, monkeypatch,
                                                           available: int) -> None:
    monkeypatch.delenv("QWENVL_EDGE_OVERLAP", raising=False)
    monkeypatch.setattr(memory, "available_bytes", lambda: available)
    roomy = available > memory.needed_together(Bundle.open(f32_bundle), 2048)
    case = golden.cases["one_image"]
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None, keep_vision=False) as m:
        session = m.session
        started = []
        original = session.start_loading
        monkeypatch.setattr(session, "start_loading", lambda: started.append(original()) or started[-1])
        result = m.generate([golden.images["sign"]], case["text"], max_tokens=golden.max_new_tokens, temperature=0)
        assert started == [roomy]
        assert result.token_ids == case["generated_ids"]
        assert not session.encoder.is_open  # released after the encode either way


def test_unknown_memory_keeps_the_low_memory_order(f32_bundle: Path, monkeypatch) -> None:
    monkeypatch.delenv("QWENVL_EDGE_OVERLAP", raising=False)
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert not memory.fits_together(Bundle.open(f32_bundle), 2048)
    monkeypatch.setenv("QWENVL_EDGE_OVERLAP", "1")
    assert memory.fits_together(Bundle.open(f32_bundle), 2048)


def test_batches_are_allocated_once(f32_bundle: Path, golden) -> None:
    with QwenVL(f32_bundle, n_threads=2, cache_dir=None) as m:
        m.generate([golden.images["sign"]], "What is it?", max_tokens=3, temperature=0)
        decoder = m.session.decoder()
        batches = (id(decoder._tokens.batch), id(decoder._rows.batch))
        m.generate([golden.images["noise"]], "And this?", max_tokens=3, temperature=0)
        assert (id(decoder._tokens.batch), id(decoder._rows.batch)) == batches
