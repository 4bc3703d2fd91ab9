"""engine/memory.py: a stream's KV bytes (against what the generator allocates, and csm-1b's worked
out by hand), and load()'s refusal of a max_streams whose caches do not fit."""

import logging

import pytest
import torch

import csmstream
from csmstream import DeviceMemoryError
from csmstream.engine import memory
from csmstream.engine.config import CsmModelConfig


def test_stream_bytes_is_what_the_generator_allocates_a_row(tiny_engine):
    gen = tiny_engine.gen
    allocated = gen.bb_cache.nbytes + sum(c.kv.nbytes for c in gen.dd_caches)
    assert memory.stream_bytes(tiny_engine.config, tiny_engine.dtype) * gen.rows == allocated


def test_csm_1b_stream_bytes_by_hand():
    # backbone: 16 layers x 2048 positions x (8 KV heads x 2: K and V) x 64 dims;
    # depth: 4 layers x 32 codebooks x (2 x 2) x 128 dims; 2 bytes each in bf16
    want = 2 * (16 * 2048 * 16 * 64 + 4 * 32 * 4 * 128)
    cfg = CsmModelConfig.csm_1b()
    assert memory.stream_bytes(cfg, torch.bfloat16) == want == 67_239_936
    assert memory.stream_bytes(cfg, torch.float32) == 2 * want


def test_what_fits_passes_and_says_the_figure(caplog):
    with caplog.at_level(logging.INFO, logger="csmstream.engine"):
        memory.check_fits(64, 67_239_936, 80_000_000_000, "cuda:0")
    assert "KV cache: 64 streams x 67.24 MB = 4.30 GB on cuda:0 (80.00 GB free)" in caplog.text
    memory.check_fits(10**6, 10**6, None, "cpu")  # free memory unknown: nothing to check against


def test_too_many_streams_are_refused_with_how_many_fit():
    with pytest.raises(DeviceMemoryError) as e:
        memory.check_fits(1024, 67_239_936, 60_000_000_000, "cuda:0")
    # 60 GB x 0.9 / 67.24 MB = 803.1
    assert str(e.value) == ("max_streams=1024 needs 68.85 GB of KV cache on cuda:0 (67.24 MB a stream), but only "
                            "60.00 GB is free there; at most 803 fit with room for the rest: lower max_streams "
                            "(serve --max-streams 803)")
    assert isinstance(e.value, ValueError)  # (the CLI's one-line error)
    with pytest.raises(DeviceMemoryError, match="free there; not even one fits: free memory on it"):
        memory.check_fits(1, 67_239_936, 50_000_000, "cuda:0")


def test_a_tight_fit_is_warned_not_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="csmstream.engine"):
        memory.check_fits(10, 95, 1000, "cuda:0")  # 950 of 1000: over the headroom, under the total
    assert "max_streams=10 takes 950 B of the 1.00 kB free on cuda:0" in caplog.text
    assert "lower it to 9" in caplog.text


def test_load_refuses_before_allocating(monkeypatch):
    from csmstream.engine.tiny import tiny_config
    from csmstream.engine.tokenizer import TextTokenizer

    per = memory.stream_bytes(tiny_config(TextTokenizer.tiny().vocab_size), torch.float32)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 3 * per)  # three streams' worth free
    seen = []
    real = memory.check_fits
    monkeypatch.setattr(memory, "check_fits", lambda *a: (seen.append(a), real(*a)))
    with pytest.raises(DeviceMemoryError, match=r"max_streams=4 needs .* at most 2 fit"):
        csmstream.load("tiny", device="cpu", max_streams=4)
    assert seen[0][:3] == (4, per, 3 * per)
    assert csmstream.load("tiny", device="cpu", max_streams=2).max_streams == 2


def test_an_out_of_memory_while_building_says_what_to_lower(monkeypatch):
    from csmstream.engine import loader

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(loader, "Engine", oom)
    with pytest.raises(DeviceMemoryError) as e:
        csmstream.load("tiny", device="cpu", max_streams=2)
    assert str(e.value).startswith("out of memory on cpu building the engine for max_streams=2 (")
    assert str(e.value).endswith("lower max_streams (serve --max-streams) (CUDA out of memory. Tried to allocate "
                                 "2.00 GiB)")


def test_free_bytes_on_the_cpu_is_at_most_the_hosts_available_memory():
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    got = memory.free_bytes(torch.device("cpu"))
    assert 0 < got < kb * 1024 + 2**30  # (read a moment apart; a container's limit may make it less)


def test_a_containers_memory_limit_counts_on_the_cpu(tmp_path):
    """In a container MemAvailable is the host's; the cgroup's limit less its usage is what the
    process may still take (v2's memory.max, or v1's limit_in_bytes; unlimited: the host's)."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4000000000\n")
    (v2 / "memory.current").write_text("1500000000\n")
    assert memory.host_free(str(meminfo), str(v2)) == 2_500_000_000
    (v2 / "memory.max").write_text("max\n")
    assert memory.host_free(str(meminfo), str(v2)) == 20_000_000 * 1024
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("100\n")
    assert memory.host_free(str(meminfo), str(v1)) == 20_000_000 * 1024
    (v1 / "memory" / "memory.limit_in_bytes").write_text("1000\n")
    assert memory.host_free(str(meminfo), str(v1)) == 900
    assert memory.host_free(str(tmp_path / "none"), str(tmp_path / "none")) is None
