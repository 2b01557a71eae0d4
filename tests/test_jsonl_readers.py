"""The JSON-lines inputs a user hands over (prompt files, CLIP-score manifests, stage-0 text
corpora) share one strict reader: a missing file or a broken line is named with its path and line
number, never a traceback, and blank lines are skipped."""

import pytest

from mars.cli_generate import read_prompts
from mars.errors import MarsError
from mars.eval.clip_score import read_manifest
from mars.jsonl import read_jsonl
from mars.train.data import read_text_corpus


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    file = write(tmp_path / "x.jsonl", '{"a": 1}\n\n  \n[2]\n')
    assert read_jsonl(file) == [(1, {"a": 1}), (4, [2])]


def test_prompts_file(tmp_path):
    good = write(tmp_path / "p.jsonl", '{"prompt": "a red circle"}\n\n{"text": "一个蓝色的正方形"}\n')
    assert read_prompts(str(good)) == ["a red circle", "一个蓝色的正方形"]
    broken = write(tmp_path / "broken.jsonl", '{"prompt": "a red circle"}\n{"prompt": \n')
    with pytest.raises(MarsError, match=r"broken.jsonl:2: not JSON"):
        read_prompts(str(broken))
    no_text = write(tmp_path / "no_text.jsonl", '{"caption": "a red circle"}\n')
    with pytest.raises(MarsError, match=r"no_text.jsonl:1 has no 'prompt' \(or 'text'\) string"):
        read_prompts(str(no_text))
    with pytest.raises(MarsError, match=r"prompts file not found: .*missing.jsonl"):
        read_prompts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(MarsError, match="holds no prompts"):
        read_prompts(str(write(tmp_path / "empty.jsonl", "\n")))


def test_clip_score_manifest(tmp_path):
    good = write(tmp_path / "m.jsonl", '{"file": "a.png", "prompt": "x"}\n{"file": "b/c.png", "caption": "y"}\n')
    assert read_manifest(good) == [(tmp_path / "a.png", "x"), (tmp_path / "b" / "c.png", "y")]
    for name, text, message in [("broken.jsonl", "{]\n", r"broken.jsonl:1: not JSON"),
                                ("no_file.jsonl", '{"prompt": "x"}\n', r"no_file.jsonl:1: need a JSON object"),
                                ("list.jsonl", '["a.png", "x"]\n', r"list.jsonl:1: need a JSON object")]:
        with pytest.raises(MarsError, match=message):
            read_manifest(write(tmp_path / name, text))
    with pytest.raises(MarsError, match=r"manifest not found: .*missing.jsonl"):
        read_manifest(tmp_path / "missing.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(MarsError, match=r"manifest not found: .*folder.jsonl"):
        read_manifest(tmp_path / "folder.jsonl")


def test_text_corpus(tmp_path):
    tok = CharTokenizer()
    assert read_text_corpus(write(tmp_path / "c.jsonl", '{"text": "ab"}\n\n{"text": "c"}\n'), tok) == [[97, 98], [99]]
    assert read_text_corpus(write(tmp_path / "c.txt", "ab\n\nc\n"), tok) == [[97, 98], [99]]
    with pytest.raises(MarsError, match=r"broken.jsonl:2: not JSON"):
        read_text_corpus(write(tmp_path / "broken.jsonl", '{"text": "a"}\n{text}\n'), tok)
    with pytest.raises(MarsError, match=r"number.jsonl:1: expected a JSON object with a \"text\" string"):
        read_text_corpus(write(tmp_path / "number.jsonl", '{"text": 3}\n'), tok)
    for missing in ("missing.jsonl", "missing.txt"):
        with pytest.raises(MarsError, match=rf"text corpus not found: .*{missing}"):
            read_text_corpus(tmp_path / missing, tok)
    with pytest.raises(MarsError, match="holds no documents"):
        read_text_corpus(write(tmp_path / "empty.txt", "\n \n"), tok)
