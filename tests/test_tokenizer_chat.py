"""Tokenizer (vs transformers built from the same files) and the univl-chat format (vs chat_template.jinja)."""

from __future__ import annotations

import json
import shutil

import pytest

from sail_jax.data import chat
from sail_jax.data.tokenizer import SailTokenizer

SYS = "你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。"
COT = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
TEXTS = [
    "hello world",
    "你好，世界！这是一个测试。中文和English混合",
    "😀🎉 emoji 👩\u200d👩\u200d👧 ✓",
    "def f(x):\n    return x**2  # comment\n\n\n\tindent\r\n",
    "12345 3.14159 1,000,000 2024-09-18 0x1F",
    "   leading   and\t\ttabs  \r\n\r\n trailing   ",
    "I'm, you're, they'LL, it's — “quotes” and …",
    "café cafe\u0301 Ｆｕｌｌ width ①",
    "<|im_start|>user\n<image>\nhi<|im_end|><think>\nx\n</think><img><IMG_CONTEXT><IMG_CONTEXT></img>",
    "<tool_call>{\"a\": 1}</tool_call><|endoftext|><box>[1,2]</box>",
    "",
]


def render(messages, system=None, add_generation_prompt=True) -> str:
    """The rendered prompt text: the concatenated `chat.render_segments`."""
    return "".join(s.text for s in chat.render_segments(messages, system, add_generation_prompt))


@pytest.fixture(scope="module")
def tok(data_dir):
    return SailTokenizer.from_dir(data_dir / "tokenizer")


@pytest.fixture(scope="module")
def hf_tok(data_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))


def test_matches_transformers(tok, hf_tok):
    assert len(tok) == len(hf_tok) == 151678
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), text


def test_token_ids_and_special_flags(tok):
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
        "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_response>": 151666, "<think>": 151667,
        "</think>": 151668, "<img>": 151669, "</img>": 151670, "<IMG_CONTEXT>": 151671, "<quad>": 151672,
        "</box>": 151677,
    }
    for token, idx in expected.items():
        assert tok.token_to_id(token) == idx and tok.encode(token) == [idx]
    assert tok.decode(tok.encode("<think>a</think><img><IMG_CONTEXT></img><|im_end|>b")) == "<think>a</think>b"
    assert 151667 not in tok.special_ids and 151671 in tok.special_ids
    assert tok.encode(SYS)[:3] == [56568, 104625, 108782] and len(tok.encode(SYS)) == 29
    with pytest.raises(KeyError):
        tok.token_to_id("<not-a-token>")


def test_added_tokens_json_fallback_and_tokenizer_json(tok, data_dir, tmp_path):
    # Without tokenizer_config.json the added tokens come from added_tokens.json, special iff special_tokens_map names
    # them (the slow tokenizer's rule).
    src = data_dir / "tokenizer"
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    fallback = SailTokenizer.from_dir(tmp_path)
    assert len(fallback) == len(tok)
    for text in TEXTS:
        assert fallback.encode(text) == tok.encode(text)
    assert 151644 in fallback.special_ids and 151667 not in fallback.special_ids
    # A tokenizer.json, when present, is used as is.
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    tok.tokenizer.save(str(json_dir / "tokenizer.json"))
    from_json = SailTokenizer.from_dir(json_dir)
    assert [from_json.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    (json_dir / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    with pytest.raises(ValueError, match="tokenizer.json"):
        SailTokenizer.from_dir(json_dir)


def test_missing_files(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="not found"):
        SailTokenizer.from_dir(tmp_path / "absent")
    shutil.copy(data_dir / "tokenizer" / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        SailTokenizer.from_dir(tmp_path)


def test_single_turn_matches_jinja_template_and_fixture(data_dir):
    jinja2 = pytest.importorskip("jinja2")
    question = "What objects and colors can you see in this picture? Answer briefly."
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    template = jinja2.Environment().from_string((data_dir / "tokenizer" / "chat_template.jinja").read_text())
    ours = render(messages)
    assert ours == template.render(messages=messages, add_generation_prompt=True)
    literal = (
        f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\n<image>\n{question}<|im_end|><|im_start|>assistant\n"
    )
    assert ours == literal
    assert ours == json.loads((data_dir / "sailvl2-tiny" / "prompts.json").read_text())["rendered_prompt"]
    string_msgs = [{"role": "user", "content": "<image>\nhi"}]
    assert render(string_msgs) == template.render(messages=string_msgs, add_generation_prompt=True)


def test_multi_turn_and_system_handling():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    assert render(msgs) == (
        f"<|im_start|>system\n{SYS}<|im_end|><|im_start|>user\nq1<|im_end|><|im_start|>assistant\na1<|im_end|>"
        "<|im_start|>user\nq2<|im_end|><|im_start|>assistant\n"
    )
    assert render(msgs, add_generation_prompt=False).endswith("q2<|im_end|>")
    assert render(msgs[:1], system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|><|im")
    assert render([{"role": "system", "content": "S"}, *msgs[:1]]).startswith("<|im_start|>system\nS<|")
    assert render(msgs[:1], system="") == "<|im_start|>user\nq1<|im_end|><|im_start|>assistant\n"
    # Upstream MPT rule: an empty message is an open turn (bare role).
    assert render([*msgs[:1], {"role": "assistant", "content": ""}], add_generation_prompt=False).endswith(
        "q1<|im_end|><|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="twice"):
        render([{"role": "system", "content": "S"}], system="T")
    with pytest.raises(ValueError, match="role 'system'"):
        render([*msgs, {"role": "system", "content": "late"}])
    with pytest.raises(ValueError, match="role 'tool'"):
        render([{"role": "tool", "content": "x"}])


def test_segments_flag_only_assistant_responses():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]
    segments = chat.render_segments(msgs, add_generation_prompt=False)
    assert [s.text for s in segments if s.trainable] == ["<think>r</think>a<|im_end|>"]
    assert segments[-2] == chat.Segment("<|im_start|>assistant\n", trainable=False)


def test_thinking_suffix():
    assert chat.THINKING_INSTRUCTION == COT
    assert "\\boxed{}" in COT and "\\\\boxed" not in COT
    assert chat.with_thinking("Q") == "Q\n" + COT
    assert chat.with_thinking("Q", separator="") == "Q" + COT


def test_image_expansion_and_mismatch():
    texts = ["a<image>b", "<image>\nc<image>"]
    out = chat.expand_images(texts, [1, 2, 3])
    ctx = "<IMG_CONTEXT>"
    assert out == [f"a<img>{ctx * 256}</img>b", f"<img>{ctx * 512}</img>\nc<img>{ctx * 768}</img>"]
    assert chat.expand_images(["x"], []) == ["x"]
    with pytest.raises(ValueError, match="3 <image> placeholder.* 2 image"):
        chat.expand_images(texts, [1, 2])
    with pytest.raises(ValueError, match="1 <image> placeholder.* 2 image"):
        chat.expand_images(["<image>"], [1, 1])
    assert chat.add_image_placeholders("q", 2) == "<image>\n<image>\nq"
    assert chat.add_image_placeholders("see <image>", 1) == "see <image>"
    assert chat.add_image_placeholders("q", 0) == "q"


def test_vlmevalkit_prompts():
    img = {"type": "image", "value": "a.png"}
    assert chat.vlmevalkit_prompt([{"type": "text", "value": "Q"}, img]) == "<image>\nQ"
    assert chat.vlmevalkit_prompt([img, img, {"type": "text", "value": "Q"}]) == (
        "Image-1: <image>\nImage-2: <image>\nQ"
    )
    interleaved = [{"type": "text", "value": "A "}, img, {"type": "text", "value": " vs "}, img]
    assert chat.vlmevalkit_prompt(interleaved) == "Image-1: <image>\nImage-2: <image>\nA <Image-1> vs <Image-2>"
