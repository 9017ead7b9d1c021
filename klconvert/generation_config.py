"""generation_config.json, which transformers and vLLM take their stop ids from: checked before an output copies it
(klconvert itself stops at config.json's eos_token_id and the tokenizer's)."""
from __future__ import annotations

import json
from pathlib import Path

from klconvert.checkpoint.folder_files import MAX_SIDE_FILE_BYTES
from klconvert.checkpoint.regular_file import read_json
from klconvert.errors import KLError, not_utf8, read_failure, shown, unreadable_reason
from klconvert.verified_files import redownload_advice

GENERATION_CONFIG_FILE = "generation_config.json"
# The token ids transformers' generate takes from it, and whether one may be a list: it stops at eos, starts at bos,
# and fills a batch's finished rows with pad (an id past the vocabulary there breaks a batch)
TOKEN_ID_FIELDS = {"bos_token_id": False, "eos_token_id": True, "pad_token_id": False}


def check_generation_config(path: Path, vocab_size: int) -> None:
    """KLError where the generation config at `path` is no JSON object, gives a key twice (json, and so transformers,
    keeps the last of the two, other readers the first: h180's probe had eos_token_id 4097 and 4098 copied through),
    or gives one of TOKEN_ID_FIELDS other than null or one id of the model's vocabulary (0..vocab_size - 1) -- or, for
    eos_token_id, a list of them."""

    def advice() -> str:   # called on a refusal only: it reads the pull's record
        return f"fix the file or {redownload_advice(path)}"

    try:
        fields = read_json(path, MAX_SIDE_FILE_BYTES, GENERATION_CONFIG_FILE)
    except UnicodeDecodeError as e:   # a ValueError, so before the JSON parser's
        raise KLError(f"{not_utf8(path, e.start)}; convert it to UTF-8, or {redownload_advice(path)}") from None
    except OSError as e:
        raise KLError(read_failure(e, path, "check the file (or re-download the model)")) from None
    except json.JSONDecodeError as e:
        raise KLError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {advice()}") from None
    except (RecursionError, ValueError) as e:  # nesting past Python's stack; a key twice; an int of 4,300+ digits
        raise KLError(f"{path}: not a generation config ({unreadable_reason(e, 80)}); {advice()}") from None
    if not isinstance(fields, dict):
        raise KLError(f"{path}: expected a JSON object at the top level; {advice()}")
    for field, listed in TOKEN_ID_FIELDS.items():
        given = fields.get(field)
        for token_id in given if listed and isinstance(given, list) else () if given is None else (given,):
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                kinds = "a token id or a list of them" if listed else "a token id"
                raise KLError(f"{path}: {field} {shown(given)} is not {kinds}; {advice()}")
            if not 0 <= token_id < vocab_size:
                raise KLError(f"{path}: {field} {shown(token_id)} is outside the vocabulary 0..{vocab_size - 1}; "
                              f"{advice()}")
