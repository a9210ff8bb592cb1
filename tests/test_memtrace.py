"""The peak replay of `logging.memory_snapshot` on a hand-made allocator trace (the GPU run
checks it against torch.cuda.max_memory_allocated: tests marked gpu)."""
import pytest
import torch

from seqpar.memtrace import peak_breakdown, site


def frame(path, line, name):
    return {"filename": path, "line": line, "name": name}


ATTN = [frame("/x/torch/nn/functional.py", 10, "linear"), frame("/r/seqpar/model/layers.py", 42, "forward")]
CE = [frame("/r/kernels/cross_entropy/triton.py", 7, "forward"), frame("/r/seqpar/train.py", 3, "train_step")]


def test_peak_is_the_highest_allocated_moment_and_names_what_was_live():
    trace = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": ATTN},
        {"action": "alloc", "addr": 2, "size": 50, "frames": CE},
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},  # the completion does not count twice
        {"action": "alloc", "addr": 3, "size": 70, "frames": []},  # peak: 170 (1 and 3)
        {"action": "segment_alloc", "addr": 9, "size": 4096},  # segments are not allocated bytes
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 4, "size": 60, "frames": CE},  # 130: below the peak
    ]
    b = peak_breakdown(trace)
    assert b["peak_bytes"] == 170 and b["event_index"] == 4
    assert [(r["site"], r["bytes"]) for r in b["top"]] == [
        ("seqpar/model/layers.py:42 forward", 100), ("(no Python frame: autograd engine, C++)", 70)]


def test_site_prefers_the_innermost_frame_of_the_repository():
    assert site(CE) == "kernels/cross_entropy/triton.py:7 forward"
    assert site([frame("/x/torch/autograd/function.py", 5, "apply")]) == "(outside seqpar) function.py:5 apply"



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_replayed_peak_is_torchs_max_memory_allocated(tmp_path):
    from seqpar import memtrace

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    assert memtrace.start(torch.device("cuda"))
    x = torch.randn(1 << 20, device="cuda")  # 4 MiB
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = x * 2  # made on another stream, used on this one: its free completes later
    y.record_stream(torch.cuda.current_stream())
    z = torch.cat([x, y])  # 16 MiB: x, y, z
    del y  # requested now, completed once the other stream's event has passed: 12 MiB
    w = torch.empty(3 << 20, device="cuda")  # the peak: 24 MiB
    del x, z, w
    b = memtrace.dump(tmp_path, 0)
    assert b["peak_bytes"] + base == b["max_memory_allocated"] == torch.cuda.max_memory_allocated()
    assert b["top"][0]["bytes"] == 12 << 20 and (tmp_path / "memory" / "peak_rank0.json").exists()
