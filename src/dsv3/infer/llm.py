"""Offline inference shaped like vLLM's `LLM`:

    from dsv3 import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")                      # or LLM(model, tokenizer=...)
    outs = llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].finish_reason
    llm.chat([{"role": "user", "content": "请介绍一下北京的景点"}])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from dsv3.infer.engine import LLMEngine
from dsv3.infer.outputs import RequestOutput
from dsv3.infer.sampling import SamplingParams

Prompt = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]


class LLM:
    """An `LLMEngine` plus batch helpers. `model_dir_or_model`: a checkpoint directory or a Transformer.

    `quantization="w8a8" | "int8" | "int4" | "fp8" | "none"` (an engine keyword) quantises once at load
    (`dsv3.quant`); by default a quantised checkpoint runs as stored (FP8 stays FP8).

    `tensor_parallel_size=N` (a checkpoint directory only) runs the model over N processes: this one is
    rank 0 and starts the others as fresh interpreters (`dsv3.infer.worker`: they never re-run your
    script, so no `if __name__ == "__main__":` guard is needed), or, under torchrun / `dsv3 launch`, N
    must equal the world size (the default there) and on ranks > 0 the constructor follows rank 0 and
    exits the process when rank 0 shuts down. `enable_expert_parallel=True` places the routed experts
    across those ranks. A vocabulary that N does not divide is padded (vLLM's way; the padding never
    reaches the logits). `shutdown()`, `del llm` or leaving `with LLM(...) as llm:` stops the workers
    and frees the process group, so another multi-process `LLM` can follow in the same process.
    """

    def __init__(self, model_dir_or_model, tokenizer=None, dtype=None, device=None, tensor_parallel_size: Optional[int] = None,
                 enable_expert_parallel: bool = False, **engine_kwargs):
        from dsv3.infer.distributed import EngineSpec, external_env, start_engine

        env = external_env()
        tp = tensor_parallel_size if tensor_parallel_size is not None else (env[1] if env else 1)
        if tp != 1 or env is not None:
            if not isinstance(model_dir_or_model, (str, Path)):
                raise ValueError("tensor_parallel_size > 1 needs a checkpoint directory (each rank loads its own part)")
            from dsv3.infer.loading import load_tokenizer_for

            spec = EngineSpec(str(model_dir_or_model), tp, enable_expert_parallel, dtype, device, engine_kwargs)
            self.engine = start_engine(spec, load_tokenizer_for(model_dir_or_model, tokenizer))
        elif isinstance(model_dir_or_model, (str, Path)):
            self.engine = LLMEngine.from_pretrained(model_dir_or_model, tokenizer, dtype=dtype, device=device, **engine_kwargs)
        else:
            from dsv3.data.tokenizer import resolve_tokenizer

            tok = resolve_tokenizer(tokenizer, None, getattr(getattr(model_dir_or_model, "config", None), "vocab_size", None))
            self.engine = LLMEngine(model_dir_or_model, tok, dtype=dtype, device=device, **engine_kwargs)
        self._counter = 0

    def shutdown(self) -> None:
        """Stop the worker processes and free the process group (idempotent; also done by `del`, at the
        end of a `with` block and at exit)."""
        engine = getattr(self, "engine", None)  # None: the constructor failed
        if engine is not None:
            engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self):
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def update_weights(self, source, version: str | None = None) -> str:
        """New weights without rebuilding the engine: a checkpoint directory or a mapping of dsv3
        parameter names to tensors (`LLMEngine.update_weights`) -> the new weight version."""
        return self.engine.update_weights(source, version)

    # ---- completion
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Text prompts, token-id lists, or vLLM's prompt dicts (`{"prompt": text}` / `{"prompt_token_ids": ids}`);
        one SamplingParams for all or one per prompt. Outputs keep prompt order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params(sampling_params, len(prompts))
        return self._run([split_prompt(p, i) for i, p in enumerate(prompts)], params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the cumulative output of one prompt after every step that advanced it (for streaming UIs)."""
        rid = self._next_id()
        text, ids = split_prompt(prompt, 0)
        self.engine.add_request(rid, text, ids, sampling_params or SamplingParams())
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:  # the consumer stopped early: free the request's cache blocks
                self.engine.abort_request(rid)
                self.engine.step()

    # ---- chat
    def chat_prompt(self, messages: Conversation, add_generation_prompt: bool = True,
                    chat_template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a conversation rendered with the checkpoint's chat template (it supplies BOS);
        `chat_template_kwargs` as vLLM's (DeepSeek-V3.1: {"thinking": True}, tools=[...])."""
        tok = self.engine.tokenizer
        if tok is None or not hasattr(tok, "apply_chat_template"):
            raise ValueError("chat needs a tokenizer with a chat template")
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                      **(chat_template_kwargs or {}))
        if not isinstance(ids, list):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def chat(self, messages: Conversation | Sequence[Conversation], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of {role, content}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.chat_prompt(c, add_generation_prompt, chat_template_kwargs) for c in convs]
        return self._run([(None, i) for i in ids], self._params(sampling_params, len(ids)))

    # ---- internals
    def _next_id(self) -> str:
        self._counter += 1
        return f"llm-{self._counter}"

    @staticmethod
    def _params(sp, n: int) -> list[SamplingParams]:
        if sp is None:
            return [SamplingParams()] * n
        if isinstance(sp, SamplingParams):
            return [sp] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} SamplingParams for {n} prompts")
        return sp

    def _run(self, items: list[tuple[Optional[str], Optional[list[int]]]], params: list[SamplingParams]) -> list[RequestOutput]:
        ids = []
        try:
            for (text, tok_ids), p in zip(items, params):
                rid = self._next_id()
                self.engine.add_request(rid, text, tok_ids, p)
                ids.append(rid)
        except ValueError as e:
            self.engine.abort_request(ids)
            while self.engine.has_unfinished_requests():
                self.engine.step()
            raise ValueError(f"prompt {len(ids)}: {e}") from None
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in ids]


def split_prompt(p: Prompt, i: int) -> tuple[Optional[str], Optional[list[int]]]:
    """One prompt as (text, token ids): a string, a list of ids, or vLLM's TextPrompt / TokensPrompt dict."""
    if isinstance(p, str):
        return p, None
    if isinstance(p, dict):
        keys = set(p)
        if keys == {"prompt_token_ids"} or keys == {"prompt", "prompt_token_ids"}:
            return p.get("prompt"), list(p["prompt_token_ids"])
        if keys == {"prompt"} and isinstance(p["prompt"], str):
            return p["prompt"], None
        raise ValueError(f"prompt {i}: a prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (a list of ints), "
                         f"got keys {sorted(p)}")
    if isinstance(p, (list, tuple)):
        return None, list(p)
    raise ValueError(f"prompt {i}: expected a string, a list of token ids or a prompt dict, got {type(p).__name__}")
