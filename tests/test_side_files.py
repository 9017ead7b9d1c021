"""The side files quantize and export-onnx copy (copied_side_file): a JSON object naming remote code is written again
without auto_map, at about its own size, whatever its strings and however its key is spelt (helper-166)."""
from __future__ import annotations

import json

from klconvert.checkpoint import folder_files
from klconvert.checkpoint.folder_files import copied_side_file

AUTO_MAP = {"AutoConfig": "configuration_kimi.KimiLinearConfig"}


def test_a_config_is_written_again_indented_without_auto_map(tmp_path):
    fields = {"model_type": "kimi_linear", "auto_map": AUTO_MAP, "name": "Kimi – 日本語"}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    written = copied_side_file(tmp_path / "config.json")
    assert written == (json.dumps({"model_type": "kimi_linear", "name": "Kimi – 日本語"}, indent=2,
                                  ensure_ascii=False) + "\n").encode()


def test_deep_nesting_is_written_on_one_line_where_indenting_would_pass_the_bound(tmp_path, monkeypatch):
    """Lists nested 100 deep indent 2 spaces a level on every line: a 4 MB file was written as 434 MB."""
    monkeypatch.setattr(folder_files, "MAX_SIDE_FILE_BYTES", 64 << 10)
    nested = [[[[[[[[[[1] * 10] * 10] * 4] * 2]]]]]]
    for _ in range(90):
        nested = [nested]
    fields = {"auto_map": AUTO_MAP, "nested": nested}
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps(fields, separators=(",", ":")))
    assert len(json.dumps(fields, indent=2)) > 64 << 10 > path.stat().st_size
    written = copied_side_file(path)
    assert len(written) <= path.stat().st_size * 1.5 and json.loads(written) == {"nested": nested}


def test_a_lone_surrogate_is_written_escaped(tmp_path):
    """json reads "\\ud800" as a string UTF-8 cannot hold: the rewrite ended in a traceback (UnicodeEncodeError)."""
    path = tmp_path / "tokenizer_config.json"
    path.write_bytes(b'{"auto_map": {"AutoTokenizer": ["t.T", null]}, "eos": "\\ud800", "name": "\xc3\xa9"}')
    written = copied_side_file(path)
    assert json.loads(written) == {"eos": "\ud800", "name": "é"} and written.isascii()


def test_an_escaped_auto_map_key_is_dropped_too(tmp_path):
    """"auto\\u005fmap" is the key auto_map to json (and transformers): a look for its bytes missed it."""
    path = tmp_path / "config.json"
    path.write_bytes(b'{"auto\\u005fmap": {"AutoConfig": "configuration_kimi.KimiLinearConfig"}, "a": 1}')
    assert json.loads(copied_side_file(path)) == {"a": 1}
    (tmp_path / "plain.json").write_bytes(b'{"a": 1}')
    assert copied_side_file(tmp_path / "plain.json") == b'{"a": 1}'   # no auto_map: copied as it is
