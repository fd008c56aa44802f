"""Prompt files (one prompt a line), read as text within bounds: a wrong path such as /dev/zero or a binary file
gets a one-line error before it can fill memory."""

from __future__ import annotations

from pathlib import Path

from ovsd3.errors import OvsdError

MAX_FILE_BYTES = 16 * 2**20  # 16 MiB: some hundred thousand captions
MAX_PROMPT_CHARS = 4096  # far beyond what a text encoder reads (77 CLIP tokens, 512 T5 tokens)


def read_prompt_file(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise OvsdError(f"cannot read prompt file {path}: {error.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise OvsdError(f"prompt file {path} is larger than {MAX_FILE_BYTES // 2**20} MiB: is it a prompt file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise OvsdError(f"prompt file {path} is not UTF-8 text (line {line}, byte {error.start})") from None
    if "\x00" in text:
        raise OvsdError(f"prompt file {path} holds NUL bytes: is it a prompt file?")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise OvsdError(f"prompt file {path}: prompt {number} is {len(prompt)} characters long "
                            f"(at most {MAX_PROMPT_CHARS})")
    if not prompts:
        raise OvsdError(f"prompt file {path} holds no prompts")
    return prompts
