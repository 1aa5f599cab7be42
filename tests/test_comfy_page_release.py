"""quant/page_release.py: pages of a memory-mapped safetensors tensor leave RSS; anonymous memory is untouched."""

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_headroom.quant.page_release import release_file_pages


def rss_file_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and madvise (Linux)")
def test_mapped_pages_are_released_and_data_stays_readable(tmp_path, gen):
    path = tmp_path / "w.safetensors"
    tensors = {f"w{i}": torch.randn(1024, 1024, generator=gen) for i in range(16)}  # 64 MB
    save_file(tensors, str(path))
    with safe_open(str(path), "pt") as f:
        mapped = {k: f.get_tensor(k) for k in f.keys()}
    before = rss_file_kb()
    for t in mapped.values():
        t.sum()  # touch every page
    touched = rss_file_kb()
    released = sum(release_file_pages(t) for t in mapped.values())
    after = rss_file_kb()
    assert touched - before > 40_000  # the reads were mapped in (KB)
    assert released > 60 * 2**20 and touched - after > 40_000
    assert all(torch.equal(mapped[k], tensors[k]) for k in tensors)  # faulted back in from the file


def test_anonymous_memory_is_never_released(gen):
    t = torch.randn(1 << 20, generator=gen)
    copy = t.clone()
    assert release_file_pages(t) == 0
    assert torch.equal(t, copy)
