"""What `keep:` reads from disk: prompts, images and unlabelled conversations, checked before any weights load.

The readers raise ValueError with the fix in it: the schema's field validators call them (pydantic names
the key, `mmtuning.keep.data: ...`), so a host's config validation already refuses bad keep input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MMTuningError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_PLACEHOLDER = "<image>"  # marks where an image sits in a conversation's text (LLaMA-Factory/Axolotl style)
USER_ROLES = ("user", "human")
DATA_EXAMPLE = ('{"messages": [{"role": "user", "content": "<image>what is the colour of the shape?"}], '
                '"images": ["pics/1.png"]}')


@dataclass
class Conversation:
    """A keep row from `data:`: the first user turn's text and its images (assistant turns are never read)."""

    text: str
    images: list[Path] = field(default_factory=list)


@dataclass
class KeepSources:
    prompts: list[str]
    images: str  # "train", "none" or "files"
    image_files: list[Path]
    conversations: list[Conversation]

    @property
    def uses_train_images(self) -> bool:
        return bool(self.prompts) and self.images == "train"

    @property
    def has_images(self) -> bool:
        return (bool(self.prompts) and self.images != "none") or any(c.images for c in self.conversations)


def resolve_sources(spec: Any, where: str = "mmtuning.keep") -> KeepSources:
    """Read prompt files, list image folders and parse keep data; MMTuningError naming the key otherwise."""
    key = "prompts"
    try:
        prompts = read_prompts(spec.prompts) if spec.prompts is not None else []
        key = "images"
        mode, files = resolve_images(spec.images)
        key = "data"
        conversations = read_conversations(Path(spec.data)) if spec.data is not None else []
    except ValueError as error:
        raise MMTuningError(f"{where}.{key}: {error}") from None
    return KeepSources(prompts, mode, files, conversations)


def read_prompts(value: list[str] | str) -> list[str]:
    if isinstance(value, list):
        return list(value)
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"'{value}' is not a file. Write a list of prompts ([\"what shape is in the "
                            f"image?\"]) or the path of a text file with one prompt per line.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts; write one question per line (lines starting with # "
                            f"are comments).")
    return prompts


def resolve_images(value: str | list[str]) -> tuple[str, list[Path]]:
    if isinstance(value, str) and value in ("train", "none"):
        return value, []
    if isinstance(value, str):
        folder = Path(value)
        if not folder.is_dir():
            raise ValueError(f"'{value}' is not a folder. Write `train` (the training images), `none`, "
                                f"a folder of images or a list of image files.")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"the folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); point it "
                                f"at a folder with images, or write `images: train` to use the training images.")
        return "files", files
    missing = [v for v in value if not Path(v).is_file()]
    if missing:
        raise ValueError(f"no such image file(s): {', '.join(missing[:5])}; list existing files, or "
                            f"write `images: train` to use the training images.")
    return "files", [Path(v) for v in value]


def read_conversations(path: Path) -> list[Conversation]:
    """JSONL (one object per line) or a JSON list; `messages` (role/content) or `conversations` (from/value)."""
    if not path.is_file():
        raise ValueError(f"no such file '{path}'; write the path of a JSONL file, one conversation per "
                            f"line, e.g. {DATA_EXAMPLE}")
    text = path.read_text(encoding="utf-8")
    records: list[tuple[int, Any]]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number} of {path} is not JSON ({error.msg}); write one JSON object "
                                    f"per line, e.g. {DATA_EXAMPLE}") from None
    if not records:
        raise ValueError(f"{path} holds no conversations; write one JSON object per line, e.g. {DATA_EXAMPLE}")
    base = path.parent
    return [_conversation(record, number, path, base) for number, record in records]


def _conversation(record: Any, number: int, path: Path, base: Path) -> Conversation:
    def bad(why: str) -> ValueError:
        return ValueError(f"record {number} of {path} {why}; write conversations like {DATA_EXAMPLE} "
                             f"(or sharegpt `conversations` with from/value).")

    if not isinstance(record, dict):
        raise bad("is not a JSON object")
    turns = record.get("messages", record.get("conversations"))
    if not isinstance(turns, list):
        raise bad("has no `messages` or `conversations` list")
    user = next((t for t in turns if isinstance(t, dict)
                 and str(t.get("role", t.get("from", ""))).lower() in USER_ROLES), None)
    if user is None:
        raise bad("has no user turn (role `user` or from `human`)")
    content = user.get("content", user.get("value"))
    if isinstance(content, list):  # OpenAI-style parts
        content = "".join(IMAGE_PLACEHOLDER if p.get("type") == "image" else str(p.get("text", ""))
                          for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.replace(IMAGE_PLACEHOLDER, "").strip():
        raise bad("has a user turn without text")
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise bad("has `images` that is not a list of paths")
    resolved = [Path(i) if Path(i).is_absolute() else base / i for i in images]
    missing = [str(p) for p in resolved if not p.is_file()]
    if missing:
        raise bad(f"names missing image(s) {', '.join(missing[:3])} (relative paths are read from the file's folder)")
    placeholders = content.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(resolved):
        raise bad(f"has {placeholders} {IMAGE_PLACEHOLDER} marks but {len(resolved)} images")
    return Conversation(content, resolved)
