"""The names of the subgraphs (If branches, Loop and Scan bodies) of an ONNX file, read from its protobuf wire format
without onnx -- `run --engine onnxruntime` needs onnxruntime alone, whose session shows no nodes -- and without
reading its weights: the file is mapped and each field that is not a graph, a node or an attribute is stepped over
by its length (an export's model.onnx holds its weights inline up to 2 GB)."""
from __future__ import annotations

import mmap
from pathlib import Path

from klconvert.checkpoint.regular_file import open_regular

# onnx.proto's field numbers: ModelProto.graph, GraphProto.node and .name, NodeProto.attribute, AttributeProto.g and
# .graphs (a graph-valued attribute holds one graph or a list of them)
MODEL_GRAPH, GRAPH_NODE, GRAPH_NAME, NODE_ATTRIBUTE, ATTRIBUTE_GRAPH, ATTRIBUTE_GRAPHS = 7, 1, 2, 5, 6, 11
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5   # the wire types ONNX writes (protobuf's groups it does not)
# a varint's most bytes, as protobuf reads them (64 bits, 7 a byte): a longer one's value grew without bound, each
# byte costlier than the last (300 KB of 0xff took 3 s)
VARINT_BYTES = 10


def _varint(data, at: int) -> tuple[int, int]:
    """The varint at data[at] -> (its value, where the next field starts)."""
    value = shift = 0
    for at in range(at, min(at + VARINT_BYTES, len(data))):
        byte = data[at]
        value, shift = value | (byte & 0x7F) << shift, shift + 7
        if byte < 0x80:
            return value, at + 1
    raise ValueError(f"a varint runs past the end or past {VARINT_BYTES} bytes")


def _messages(data, start: int, end: int, number: int) -> list[tuple[int, int]]:
    """The (start, end) of each length-delimited field `number` of the message data[start:end], the others stepped
    over. ValueError where the bytes are no protobuf message."""
    found, at = [], start
    while at < end:
        key, at = _varint(data, at)
        wire = key & 7
        if wire == VARINT:
            _, at = _varint(data, at)
        elif wire == LENGTH_DELIMITED:
            length, at = _varint(data, at)
            if key >> 3 == number:
                found.append((at, at + length))
            at += length
        elif wire in (FIXED64, FIXED32):
            at += 8 if wire == FIXED64 else 4
        else:
            raise ValueError(f"wire type {wire} at byte {at}")
    if at != end:
        raise ValueError(f"a field runs past its message's end at byte {end}")
    return found


def subgraph_names(path: Path) -> set[str]:
    """The names of every subgraph of the ONNX model at `path`, at any depth. ValueError where the file is no ONNX
    model's protobuf, OSError where it cannot be read."""
    with open_regular(path) as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        names, graphs = set(), _messages(data, 0, len(data), MODEL_GRAPH)
        while graphs:
            for node in _messages(data, *graphs.pop(), GRAPH_NODE):
                for attribute in _messages(data, *node, NODE_ATTRIBUTE):
                    for graph in (*_messages(data, *attribute, ATTRIBUTE_GRAPH),
                                  *_messages(data, *attribute, ATTRIBUTE_GRAPHS)):
                        names.update(bytes(data[s:e]).decode("utf-8", "replace")
                                     for s, e in _messages(data, *graph, GRAPH_NAME))
                        graphs.append(graph)
        return names
