"""vLLM's tokenizer endpoints: /tokenize, /detokenize, /tokenizer_info."""

from __future__ import annotations

from typing import Any

from dsv3.serve.handlers.base import OpenAIServing
from dsv3.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, req: TokenizeRequest) -> dict:
        if (req.prompt is None) == (req.messages is None):
            raise APIError("give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = await self.chat_ids([m.model_dump(exclude_none=True) for m in req.messages],
                                      req.add_generation_prompt)
        else:
            ids = await self.encode(req.prompt, req.add_special_tokens and self.tok.add_bos_token)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [self.tok.id_to_token(i) for i in ids]
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tok.decode(req.tokens, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        cfg = getattr(self.tok, "config", {}) or {}
        info = {
            "tokenizer_class": cfg.get("tokenizer_class", "LlamaTokenizerFast"),
            "bos_token": self.tok.bos_token, "eos_token": self.tok.eos_token,
            "bos_token_id": self.tok.bos_id, "eos_token_id": self.tok.eos_id,
            "pad_token": self.tok.id_to_token(self.tok.pad_id),
            "add_bos_token": bool(self.tok.add_bos_token), "add_eos_token": False,
            "model_max_length": self.max_model_len, "vocab_size": self.tok.vocab_size,
        }
        if isinstance(cfg.get("chat_template"), str):
            info["chat_template"] = cfg["chat_template"]
        return info
