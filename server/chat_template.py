"""Chat prompts: the messages of ``/v1/chat/completions`` rendered to the token ids the backbone continues.

The template is the Jinja file given at start-up (``PTSERVE_CHAT_TEMPLATE``) or else the tokenizer's own
``chat_template``; transformers' ``apply_chat_template`` renders it (in its sandboxed Jinja environment) with the
generation prompt added, so a prompt here is token for token what ``tokenizer.apply_chat_template(messages,
add_generation_prompt=True)`` gives.
"""
from __future__ import annotations

from pathlib import Path

import jinja2

from ptserve.client.wire.errors import InvalidInput, NoChatTemplate
from ptserve.server import hf_compat


class ChatTemplate:
    def __init__(self, tokenizer, backbone: str, template_file: str | None = None):
        self.tokenizer, self.backbone = tokenizer, backbone
        self.template: str | None = None  # None with a tokenizer template: the tokenizer's is used
        self.source = "tokenizer" if getattr(tokenizer, "chat_template", None) else None
        if template_file is not None:
            self.template = Path(template_file).expanduser().read_text()
            jinja2.Environment().parse(self.template)  # a syntax error fails start-up, not every request
            self.source = template_file

    def render(self, messages: list[dict]) -> list[int]:
        if self.source is None:
            raise NoChatTemplate(
                f"backbone {self.backbone!r} has no chat template: start the server with PTSERVE_CHAT_TEMPLATE "
                "(--chat-template) set to a Jinja template file, or serve a backbone whose tokenizer has a "
                "chat_template (tokenizer_config.json)"
            )
        try:
            return hf_compat.apply_chat_template(self.tokenizer, messages, self.template)
        except (jinja2.TemplateError, TypeError, ValueError) as exc:  # the template refused these messages
            raise InvalidInput(f"the chat template ({self.source}) cannot render these messages: {exc}") from None
