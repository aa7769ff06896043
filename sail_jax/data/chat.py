"""The `univl-chat` conversation format, `<image>` expansion and the thinking instruction, as the original
processor and model cards format them.

`univl-chat` is InternVL's MPT style: `<|im_start|>system\\n{SYS}<|im_end|>`, then `{role}{message}<|im_end|>` per
message, then the bare role of the open turn; there is NO newline after `<|im_end|>`. For a single user turn this
equals the released `chat_template.jinja`, which mishandles system and assistant messages, so it is not used.

Rendering returns segments flagged `trainable` for the assistant responses (content plus the closing `<|im_end|>`,
never the `<|im_start|>assistant\\n` header): our loss-mask choice, kept here so training and inference share
one formatter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_SYSTEM_PROMPT = "你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。"
THINKING_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
TOKENS_PER_TILE = 256

SEP = "<|im_end|>"
SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}"
ROLE_PREFIX = {"user": "<|im_start|>user\n", "assistant": "<|im_start|>assistant\n"}


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt; `trainable` marks assistant-response text (incl. its `<|im_end|>`)."""

    text: str
    trainable: bool = False


def content_text(content: str | Sequence[Mapping[str, Any]]) -> str:
    """Message content as text: a string as is; a list as the jinja template renders it (an image item becomes
    `<image>\\n`, a text item its text, in list order)."""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        if item.get("type") == "image" or "image" in item or "image_url" in item:
            parts.append(IMAGE_PLACEHOLDER + "\n")
        elif "text" in item:
            parts.append(item["text"])
        else:
            raise ValueError(f"content item has neither an image nor text: {dict(item)!r}")
    return "".join(parts)


def render_segments(
    messages: Sequence[Mapping[str, Any]], system: str | None = None, add_generation_prompt: bool = True
) -> list[Segment]:
    """Render a conversation in `univl-chat` form.

    The system prompt is a leading `system` message, else `system`, else the default Chinese prompt; an empty one
    drops the system block. As upstream, an empty message renders as its bare role (an open turn).
    """
    msgs = list(messages)
    if msgs and msgs[0].get("role") == "system":
        if system is not None:
            raise ValueError("system prompt given twice: as a system message and as the `system` argument")
        system = content_text(msgs.pop(0)["content"])
    elif system is None:
        system = DEFAULT_SYSTEM_PROMPT
    segments = [Segment(SYSTEM_TEMPLATE.format(system_message=system) + SEP)] if system else []
    for i, message in enumerate(msgs):
        role = message.get("role")
        if role not in ROLE_PREFIX:
            where = "only first" if role == "system" else "'user' or 'assistant'"
            raise ValueError(f"message {i}: role {role!r} not allowed here ({where})")
        text = content_text(message.get("content", ""))
        if not text:
            segments.append(Segment(ROLE_PREFIX[role]))
        elif role == "assistant":
            segments += [Segment(ROLE_PREFIX[role]), Segment(text + SEP, trainable=True)]
        else:
            segments.append(Segment(ROLE_PREFIX[role] + text + SEP))
    if add_generation_prompt:
        segments.append(Segment(ROLE_PREFIX["assistant"]))
    return segments


def with_thinking(text: str, separator: str = "\n") -> str:
    """Append the CoT instruction. `separator="\\n"` is VLMEvalKit's form (our default); the model cards use ""."""
    return text + separator + THINKING_INSTRUCTION


def add_image_placeholders(text: str, n_images: int) -> str:
    """Prepend `<image>\\n` per image when the text has no `<image>` yet (model.chat / jinja-template form)."""
    if n_images and IMAGE_PLACEHOLDER not in text:
        return (IMAGE_PLACEHOLDER + "\n") * n_images + text
    return text


def image_tokens(num_tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> str:
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (tokens_per_tile * num_tiles) + IMG_END_TOKEN


def check_placeholders(texts: Sequence[str], n_images: int) -> None:
    """Upstream silently leaves surplus markers or images unmatched, which later breaks the feature scatter; a count
    mismatch is an error here."""
    found = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if found != n_images:
        raise ValueError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) were given; "
            f"they must match one to one"
        )


def expand_images(
    texts: Sequence[str], num_patches_list: Sequence[int], tokens_per_tile: int = TOKENS_PER_TILE
) -> list[str]:
    """Replace, image by image, the first remaining `<image>` (across `texts` in order) by its token string."""
    check_placeholders(texts, len(num_patches_list))
    tiles = iter(num_patches_list)
    out = []
    for text in texts:
        pieces = text.split(IMAGE_PLACEHOLDER)
        out.append(pieces[0] + "".join(image_tokens(next(tiles), tokens_per_tile) + p for p in pieces[1:]))
    return out


def vlmevalkit_prompt(message: Sequence[Mapping[str, Any]]) -> str:
    """VLMEvalKit's prompt for an interleaved message of {"type": "text"|"image", "value": ...} items.

    One image: `<image>\\n` + the texts joined by newlines. Otherwise `Image-k: <image>\\n` per image, then the texts
    with `<Image-k>` at the image positions, where a contiguous run of all the `<Image-k>` markers is dropped."""
    n_images = sum(1 for x in message if x["type"] == "image")
    if n_images == 1:
        return IMAGE_PLACEHOLDER + "\n" + "\n".join(x["value"] for x in message if x["type"] == "text")
    body, k = "", 0
    for x in message:
        if x["type"] == "text":
            body += x["value"]
        elif x["type"] == "image":
            k += 1
            body += f"<Image-{k}>"
    head = "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images))
    return (head + body).replace("".join(f"<Image-{i + 1}>" for i in range(n_images)), "")
