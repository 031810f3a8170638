"""Runtime sizing rules that do not need a graph."""

from __future__ import annotations

from kolite.engine.runtime import ATTENTION_SCRATCH_BYTES, PREFILL_CHUNK, prefill_chunk_tokens


def test_prefill_chunks_keep_attention_scratch_bounded() -> None:
    """KoGPT2 (12 heads, 1024 slots) prefills 256 tokens a call; more heads or longer slots get shorter
    chunks, so one layer's [heads, chunk, capacity] float32 scratch never passes the bound."""
    assert prefill_chunk_tokens(12, 1024) == PREFILL_CHUNK == 256
    assert prefill_chunk_tokens(12, 256) == 256  # a small pool: the chunk is not longer than PREFILL_CHUNK
    assert prefill_chunk_tokens(16, 1024) == 192  # gpt2-medium
    assert prefill_chunk_tokens(12, 2048) == 128
    assert prefill_chunk_tokens(64, 65536) == 16  # never fewer than 16 tokens a call
    for heads, capacity in ((12, 1024), (16, 1024), (20, 1024), (12, 2048), (25, 1600)):
        assert 4 * heads * prefill_chunk_tokens(heads, capacity) * capacity <= ATTENTION_SCRATCH_BYTES
