"""Reading a stored tensor by plain reads (klconvert/checkpoint/stored_tensor.py): the same tensors safetensors
reads, cut as indexing cuts them, and a file cut short under the read refused in one line."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from klconvert.checkpoint.safetensors_header import read_header
from klconvert.checkpoint.safetensors_writer import PlannedTensor, write_shard
from klconvert.checkpoint.stored_tensor import TORCH_DTYPES, index_span, read_stored
from klconvert.errors import KLError

SHAPE = (4, 6, 3)


@pytest.mark.parametrize("index", [(), (2,), (slice(1, 3),), (3, slice(2, 5)), (1, 4), (0, 5, slice(1, 3)),
                                   (slice(0, 0),)])
def test_index_span_is_where_indexing_cuts(index):
    tensor = torch.arange(torch.Size(SHAPE).numel()).reshape(SHAPE)
    first, shape = index_span(SHAPE, index)
    want = tensor[index]
    assert shape == tuple(want.shape)
    assert tensor.flatten()[first:first + want.numel()].reshape(shape).equal(want)


def test_index_span_refuses_an_index_that_is_no_one_run():
    with pytest.raises(ValueError, match="does not cut one run"):
        index_span(SHAPE, (slice(0, 2), 1))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@pytest.fixture
def shard(tmp_path):
    tensors = {f"t.{tag}": torch.arange(-12, 12).reshape(2, 3, 4).to(dtype) for tag, dtype in TORCH_DTYPES.items()
               if not tag.startswith(("U16", "U32", "U64", "F8"))}   # torch's arange/to lack these; dtype-only below
    tensors |= {f"t.{tag}": torch.zeros(2, 3, 4, dtype=dtype) for tag, dtype in TORCH_DTYPES.items()
                if tag.startswith(("U16", "U32", "U64", "F8"))}
    tensors["empty"] = torch.zeros(0, 5)
    tensors["scalar"] = torch.tensor(7.5)
    save_file(tensors, tmp_path / "s.safetensors")
    return tmp_path / "s.safetensors"


def test_every_tensor_reads_as_safetensors_reads_it(shard):
    header, want = read_header(shard), load_file(shard)
    assert {entry.dtype for entry in header.tensors.values()} >= set(TORCH_DTYPES)
    with open(shard, "rb") as f:
        for name, tensor in want.items():
            got = read_stored(f, header, name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert bits(got).equal(bits(tensor)), name
            if tensor.dim() == 3:
                assert bits(read_stored(f, header, name, (1, slice(1, 3)))).equal(bits(tensor[1, 1:3])), name


def test_the_writer_writes_every_dtype_the_reader_reads(shard, tmp_path):
    """write_shard had a dtype table of its own, nine of TORCH_DTYPES' fifteen: an fp8 or float64 tensor was a
    KeyError."""
    want = load_file(shard)
    write_shard(tmp_path / "w.safetensors", [PlannedTensor(name, t.dtype, tuple(t.shape), lambda t=t: t)
                                             for name, t in want.items()])
    got = load_file(tmp_path / "w.safetensors")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and bits(got[name]).equal(bits(tensor)), name


def test_a_file_cut_short_under_the_read_is_one_line(shard):
    header = read_header(shard)
    last = max(header.tensors, key=lambda name: header.tensors[name].begin)
    entry = header.tensors[last]
    os.truncate(shard, header.data_start + entry.begin + 1)
    with open(shard, "rb") as f, pytest.raises(KLError) as refused:
        read_stored(f, header, last)
    start = header.data_start + entry.begin
    assert str(refused.value) == (f"{shard}: ends at byte {start + 1:,}, inside tensor '{last}' (bytes {start:,} to "
                                  f"{start + entry.nbytes:,}): the file was cut short while this command read it -- "
                                  "run again once whatever rewrites it is done, or download the checkpoint again")


def test_a_read_lands_on_the_host_whatever_the_default_device(shard):
    """helper-147: a program that had set torch's default device to meta got 'cannot read tensor ... (Bad address);
    download the checkpoint again' of a good checkpoint: the buffer read into was made on the meta device."""
    header, want = read_header(shard), load_file(shard)
    with open(shard, "rb") as f, torch.device("meta"):
        got = read_stored(f, header, "t.F32")
    assert got.device.type == "cpu" and got.equal(want["t.F32"])
