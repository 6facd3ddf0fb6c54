"""Request bodies of the OpenAI-compatible API, validated with bounds. Fields clients commonly send
that this server cannot honour (logprobs, echo, penalties, tools, n > 1, ...) are refused with a
400 when set to anything but their neutral value, rather than silently ignored; unknown fields
are ignored, as the OpenAI API and vLLM do."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

MAX_STOP = 4  # the OpenAI API's limit
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024

#: field -> the values that mean "off"; anything else is a feature this server does not have.
_UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(max_length=1024)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # the OpenAI API's default and range
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(None, ge=0, lt=1 << 63)  # the protocol carries a uint64
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data):
        # Clients send explicit nulls for unset options (temperature: null): use the defaults.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in ("temperature", "top_p", "n",
                                                                                "stream"))}
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.n != 1:
            raise ValueError("n: only n = 1 is supported")
        for name, off in _UNSUPPORTED.items():
            if name in (self.model_extra or {}) and self.model_extra[name] not in off:
                raise ValueError(f"{name}: not supported by this server")
        stops = self.stop_list()
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream = true")
        return self

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    # One prompt: a string, a list holding one string, or token ids (checked against the vocabulary).
    prompt: StrictStr | list[StrictStr] | list[StrictInt]

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and (not self.prompt or (isinstance(self.prompt[0], str)
                                                                 and len(self.prompt) != 1)):
            raise ValueError("prompt: give one prompt (a string, or a non-empty list of token ids)")
        return self


class _TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _newer_name(self):
        # Newer clients send max_completion_tokens (max_tokens is deprecated for chat): it wins.
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if not any(m.text().strip() for m in self.messages):
            raise ValueError("messages: all messages are empty")
        return self


def chat_messages(req: ChatRequest) -> list[dict]:
    """The messages as a chat template takes them ("developer" is the newer name of "system")."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
